"""One learner for every algorithm: a pure loss, the shared optimiser step, extra networks.

An algorithm is a loss `loss_fn(params, aux, batch) -> (loss, metrics)` plus, where it
needs them, auxiliary parameter trees that follow the policy after every step (soft-Q's
Polyak target, BOND's EMA anchor). Auxiliary trees named in `published_aux` are pushed to
the inference servers beside the policy, under their own model names.
"""
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from chorus import core
from chorus.learners import optimization

LossFn = Callable[[Any, Mapping[str, Any], core.TrajectoryBatch], tuple[jax.Array, dict]]
AuxUpdate = Callable[[Mapping[str, Any], Any], dict[str, Any]]


class TrainState(NamedTuple):
  """What a learner checkpoints: policy params, optimiser state, step and aux params."""
  params: Any
  opt_state: Any
  step: jax.Array
  aux: dict[str, Any]


# Re-exported: callers build the learner's optimizer as `learner_lib.make_optimizer`.
make_optimizer = optimization.make_optimizer


def polyak_update(rate: float, name: str) -> AuxUpdate:
  """aux[name] <- (1 - rate) * aux[name] + rate * params (Polyak target, EMA anchor)."""
  if not 0 < rate <= 1:
    raise ValueError(f'The {name} update rate must be in (0, 1], got {rate}.')

  def update(aux, params):
    moved = jax.tree_util.tree_map(lambda old, new: (1 - rate) * old + rate * new, aux[name],
                                   params)
    return {**aux, name: moved}

  return update


class Learner:
  """Holds the train state; `update(batch)` is one jit-compiled optimiser step."""

  def __init__(self, loss_fn: LossFn, *, params, optimizer: optax.GradientTransformation,
               aux: Mapping[str, Any] | None = None, update_aux: AuxUpdate | None = None,
               published_aux: Sequence[str] = ()):
    aux = dict(aux or {})
    missing = [name for name in published_aux if name not in aux]
    if missing:
      raise ValueError(f'published_aux names {missing}, which are not among the auxiliary '
                       f'parameter trees {sorted(aux)}.')
    self._loss_fn = loss_fn
    self._optimizer = optimizer
    self._update_aux = update_aux
    self._published_aux = tuple(published_aux)
    self.state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), aux)
    self._update = jax.jit(self._update_fn)

  @property
  def params(self):
    return self.state.params

  @property
  def step(self) -> int:
    return int(self.state.step)

  def published_params(self) -> dict[str, Any]:
    """Served model name -> parameters to push: the policy and the published aux trees."""
    return {'policy': self.state.params,
            **{name: self.state.aux[name] for name in self._published_aux}}

  def _update_fn(self, state: TrainState, batch: core.TrajectoryBatch):
    params, opt_state, metrics = optimization.optimizer_step(
        self._loss_fn, self._optimizer, state.params, state.opt_state, state.aux, batch)
    aux = self._update_aux(state.aux, params) if self._update_aux else state.aux
    return TrainState(params, opt_state, state.step + 1, aux), metrics

  def update(self, batch: core.TrajectoryBatch) -> dict[str, float]:
    self.state, metrics = self._update(self.state, batch)
    return {name: float(value) for name, value in jax.device_get(metrics).items()}
