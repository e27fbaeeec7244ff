"""One learner for every algorithm: a pure loss, the shared optimiser step, extra networks.

An algorithm is a loss `loss_fn(params, aux, batch) -> (loss, metrics)` plus, where it
needs them, auxiliary parameter trees: ones that follow the policy after every step
(soft-Q's Polyak target, BOND's EMA anchor), and frozen ones (`constants`: the reference
model, a teacher). The loss sees both in `aux`. Auxiliary trees named in `published_aux`
are pushed to the inference servers beside the policy, under their own model names.

A policy with LoRA adapters (models/lora.py) trains only its adapters: the train state,
its checkpoints and its pushes hold the adapters (and the auxiliary trees that mirror the
policy hold theirs), while the frozen weights are a constant the loss combines them with.

On a device mesh (models/sharding.py) the train state and the constants are placed by
the partition rules and batches are split over the mesh's batch axes; the update is then
one jit over sharded arrays, so each device holds its share of parameters and optimiser
state.

One `update(batch)` is one learner step (the parameter version it publishes). By default it
is one optimiser step on the whole batch; PPO-style learners instead reuse the batch for
`num_epochs` passes of `num_minibatches` shuffled minibatches each, after `prepare_batch`
has computed what must stay fixed across those passes (advantages from the values at the
start of the update, the frozen reference's log-probs).

An update whose loss, gradient, batch rewards or behaviour log-probs, or resulting
parameters are not all finite is skipped inside the same jit: the train state (step
included) stays what it was and the metrics say `skipped_update` = 1 (learners/loop.py
counts them and stops a run that only skips).
"""
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from chorus import core
from chorus.learners import distributed
from chorus.learners import optimization
from chorus.models import lora
from chorus.models import sharding

LossFn = Callable[[Any, Mapping[str, Any], core.TrajectoryBatch], tuple[jax.Array, dict]]
AuxUpdate = Callable[[Mapping[str, Any], Any], dict[str, Any]]
PrepareBatch = Callable[[Any, Mapping[str, Any], core.TrajectoryBatch], core.TrajectoryBatch]


class TrainState(NamedTuple):
  """What a learner checkpoints: policy params, optimiser state, step and aux params."""
  params: Any
  opt_state: Any
  step: jax.Array
  aux: dict[str, Any]


# The constant holding a LoRA policy's frozen weights.
_FROZEN = 'frozen_weights'

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


def _all_finite(tree) -> jax.Array:
  """A scalar bool: every floating leaf of `tree` is free of NaN and inf."""
  leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
  return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in leaves])) if leaves else (
      jnp.bool_(True))


class Learner:
  """Holds the train state; `update(batch)` is one jit-compiled learner step.

  Args:
    loss_fn: `(params, aux, batch) -> (loss, metrics)`.
    params: the initial policy parameters.
    optimizer: the optax optimiser.
    aux: auxiliary trees that `update_aux` moves after every step (checkpointed).
    update_aux: `(aux, new params) -> aux`.
    published_aux: aux trees pushed to the inference servers beside the policy.
    constants: frozen trees the loss reads (the reference model, a teacher); not
      checkpointed, never updated. In `aux` for the loss, beside the moving ones.
    mesh: the device mesh to shard over; None runs on the default device.
    prepare_batch: `(params, aux, batch) -> batch`, run once per update with the parameters
      at its start (its outputs get no gradient); None leaves batches as they are.
    num_epochs: passes over each batch per update.
    num_minibatches: minibatches per pass; must divide the batch size. The shuffles are a
      function of the step, so a resumed run shuffles as the first one did.
  """

  def __init__(self, loss_fn: LossFn, *, params, optimizer: optax.GradientTransformation,
               aux: Mapping[str, Any] | None = None, update_aux: AuxUpdate | None = None,
               published_aux: Sequence[str] = (), constants: Mapping[str, Any] | None = None,
               mesh: Mesh | None = None, prepare_batch: PrepareBatch | None = None,
               num_epochs: int = 1, num_minibatches: int = 1):
    aux, constants = dict(aux or {}), dict(constants or {})
    missing = [name for name in published_aux if name not in aux]
    if missing:
      raise ValueError(f'published_aux names {missing}, which are not among the auxiliary '
                       f'parameter trees {sorted(aux)}.')
    clashes = sorted(set(aux) & set(constants))
    if clashes:
      raise ValueError(f'{clashes} are both moving auxiliary trees and constants; rename one.')
    for name, value in (('num_epochs', num_epochs), ('num_minibatches', num_minibatches)):
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f'{name} must be an int >= 1; got {value!r}.')
    self._loss_fn = loss_fn
    self._optimizer = optimizer
    self._update_aux = update_aux
    self._published_aux = tuple(published_aux)
    self._prepare_batch = prepare_batch
    self._num_epochs, self._num_minibatches = num_epochs, num_minibatches
    self.mesh = mesh
    # With adapters, the trained trees are the adapters of the policy and of the aux trees
    # shaped like it; the loss sees them combined with the frozen weights.
    self._mirrors_policy = ()
    if lora.has_adapters(params):
      frozen, adapters = lora.split(params)
      structure = jax.tree_util.tree_structure(params)
      self._mirrors_policy = tuple(name for name, tree in aux.items()
                                   if jax.tree_util.tree_structure(tree) == structure)
      aux = {name: lora.split(tree)[1] if name in self._mirrors_policy else tree
             for name, tree in aux.items()}
      constants[_FROZEN] = frozen
      params = adapters
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), aux)
    if mesh is None:
      self.state, self._constants = state, constants
      self._update = jax.jit(self._update_fn)
    else:
      self._state_shardings = sharding.named_shardings(state, mesh)
      constant_shardings = sharding.named_shardings(constants, mesh)
      self.state = jax.device_put(state, self._state_shardings)
      self._constants = jax.device_put(constants, constant_shardings)
      self._update = jax.jit(
          self._update_fn,
          in_shardings=(self._state_shardings, constant_shardings, sharding.batch_sharding(mesh)),
          out_shardings=(self._state_shardings, sharding.replicated(mesh)))

  def full_params(self, params=None):
    """The policy's whole parameter tree: `params` (default: the current ones), combined
    with the frozen weights when only adapters train."""
    params = self.state.params if params is None else params
    return lora.combine(self._constants[_FROZEN], params) if self.trains_adapters else params

  @property
  def trains_adapters(self) -> bool:
    """Whether only LoRA adapters train (and are checkpointed and pushed)."""
    return _FROZEN in self._constants

  def restore(self, state: TrainState):
    """Takes `state` (a restored checkpoint) as the train state, placed as this learner's."""
    self.state = state if self.mesh is None else jax.device_put(state, self._state_shardings)

  @property
  def params(self):
    return self.state.params

  @property
  def step(self) -> int:
    return int(self.state.step)

  def published_params(self) -> dict[str, Any]:
    """Served model name -> parameters to push: the policy and the published aux trees
    (only their adapters when only adapters train; the servers hold the frozen weights)."""
    return {'policy': self.state.params,
            **{name: self.state.aux[name] for name in self._published_aux}}

  def _whole_trees(self, params, aux):
    """(params, aux) as the loss sees them: adapters combined with the frozen weights."""
    frozen = aux.get(_FROZEN)
    if frozen is None:
      return params, aux
    aux = {name: lora.combine(frozen, tree) if name in self._mirrors_policy else tree
           for name, tree in aux.items() if name != _FROZEN}
    return lora.combine(frozen, params), aux

  def _loss(self, params, aux, batch):
    return self._loss_fn(*self._whole_trees(params, aux), batch)

  def _optimizer_step(self, state: TrainState, constants: dict[str, Any],
                      batch: core.TrajectoryBatch):
    params, opt_state, metrics = optimization.optimizer_step(
        self._loss, self._optimizer, state.params, state.opt_state,
        {**state.aux, **constants}, batch)
    aux = self._update_aux(state.aux, params) if self._update_aux else state.aux
    return state._replace(params=params, opt_state=opt_state, aux=aux), metrics

  def _minibatch_indices(self, step: jax.Array, batch_size: int) -> jax.Array:
    """[num_epochs * num_minibatches, batch_size / num_minibatches] row indices."""
    if batch_size % self._num_minibatches:
      raise ValueError(f'num_minibatches={self._num_minibatches} must divide the batch size '
                       f'{batch_size}; change one of them.')
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), step), self._num_epochs)
    orders = jax.vmap(lambda key: jax.random.permutation(key, batch_size))(keys)
    return orders.reshape(self._num_epochs * self._num_minibatches, -1)

  def _update_fn(self, state: TrainState, constants: dict[str, Any],
                 batch: core.TrajectoryBatch):
    new_state, metrics = self._unguarded_update(state, constants, batch)
    finite = _all_finite((metrics, new_state.params, new_state.aux, batch.reward,
                          batch.behaviour_logprobs))
    # Skipped: every leaf (params, optimiser state, aux, step) keeps its old value. One
    # conditional rather than a select per leaf: XLA fused the check into each select's
    # fusion, repeating it about a hundred times (twice the program, 1.3 CPU-s more compile).
    new_state = jax.lax.cond(finite, lambda: new_state, lambda: state)
    return new_state, {**metrics, 'skipped_update': 1 - finite.astype(jnp.float32)}

  def _unguarded_update(self, state: TrainState, constants: dict[str, Any],
                        batch: core.TrajectoryBatch):
    if self._prepare_batch:
      batch = jax.lax.stop_gradient(self._prepare_batch(
          *self._whole_trees(state.params, {**state.aux, **constants}), batch))
    if self._num_epochs == self._num_minibatches == 1:
      state, metrics = self._optimizer_step(state, constants, batch)
    else:
      indices = self._minibatch_indices(state.step, jnp.shape(batch.reward)[0])

      def minibatch_step(state, rows):
        return self._optimizer_step(state, constants,
                                    jax.tree_util.tree_map(lambda x: x[rows], batch))

      state, metrics = jax.lax.scan(minibatch_step, state, indices)
      metrics = jax.tree_util.tree_map(jnp.mean, metrics)
    return state._replace(step=state.step + 1), metrics

  def memory_analysis(self, batch: core.TrajectoryBatch):
    """XLA's memory analysis of the compiled update for batches like `batch`, per device
    (argument, output and temporary bytes): what sizing a mesh needs."""
    return self._update.lower(self.state, self._constants, batch).compile().memory_analysis()

  def update(self, batch: core.TrajectoryBatch) -> dict[str, float]:
    """One step on `batch`: the whole batch, or this process's rows of it when the mesh
    spans several processes (learners/distributed.py)."""
    if self.mesh is not None:
      batch = distributed.global_batch(batch, self.mesh)
    self.state, metrics = self._update(self.state, self._constants, batch)
    return {name: float(value) for name, value in jax.device_get(metrics).items()}
