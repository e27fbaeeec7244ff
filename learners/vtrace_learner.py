"""The V-trace learner: one optax update per batch of on-policy-ish completions."""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from chorus import core
from chorus import models
from chorus.learners import policy
from chorus.learners import token_mdp
from chorus.learners import vtrace


@dataclasses.dataclass(frozen=True)
class VTraceConfig:
  """V-trace loss and the rewards it sees (ALGORITHMS.md defaults).

  Attributes:
    kl_coef: beta_KL of the per-token penalty -beta*(log mu - log pi_ref) folded into rewards.
    discount: gamma per token (1 for text).
    rho_clip: rho-bar, clip of the importance weights in the value targets.
    pg_rho_clip: clip of the importance weights of the policy gradient.
    c_clip: c-bar, clip of the trace coefficients.
    lambda_: trace mixing; advantages bootstrap from v_{s+1} (IMPALA paper, SEED RL).
    value_cost: weight c_V of the value loss.
    entropy_cost: weight c_H of the entropy bonus.
  """
  kl_coef: float = 0.02
  discount: float = 1.0
  rho_clip: float = 1.0
  pg_rho_clip: float = 1.0
  c_clip: float = 1.0
  lambda_: float = 1.0
  value_cost: float = 0.5
  entropy_cost: float = 0.001


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: jax.Array


def make_optimizer(learning_rate: float, max_grad_norm: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))


class VTraceLearner:
  """Holds the train state and the frozen reference; `update` is one jit-compiled step."""

  def __init__(self, decoder_config: models.DecoderConfig, config: VTraceConfig, *,
               params, reference_params, optimizer: optax.GradientTransformation):
    self.config = config
    self._decoder_config = decoder_config
    self._optimizer = optimizer
    self._reference_params = reference_params
    self.state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    self._update = jax.jit(self._update_fn)

  @property
  def params(self):
    return self.state.params

  @property
  def step(self) -> int:
    return int(self.state.step)

  def _loss(self, params, batch: core.TrajectoryBatch):
    config = self.config
    mask = batch.completion_mask
    target = policy.evaluate_actions(self._decoder_config, params, batch)
    reference = policy.evaluate_actions(self._decoder_config, self._reference_params, batch)
    reference_logprobs = jax.lax.stop_gradient(reference.logprobs)
    rewards = token_mdp.token_rewards(batch.rewards, mask, batch.behaviour_logprobs,
                                      reference_logprobs, config.kl_coef)
    discounts = token_mdp.token_discounts(mask, batch.terminated, config.discount)
    loss, metrics = vtrace.vtrace_loss(
        target.logprobs, batch.behaviour_logprobs, target.values, target.entropy, rewards,
        discounts, mask, rho_clip=config.rho_clip, pg_rho_clip=config.pg_rho_clip,
        c_clip=config.c_clip, lambda_=config.lambda_, value_cost=config.value_cost,
        entropy_cost=config.entropy_cost)
    real = mask.astype(jnp.float32)
    metrics['kl_to_reference'] = (
        ((batch.behaviour_logprobs - reference_logprobs) * real).sum(axis=1).mean())
    metrics['task_reward'] = batch.rewards.mean()
    metrics['completion_length'] = real.sum(axis=1).mean()
    return loss, metrics

  def _update_fn(self, state: TrainState, batch: core.TrajectoryBatch):
    grads, metrics = jax.grad(self._loss, has_aux=True)(state.params, batch)
    updates, opt_state = self._optimizer.update(grads, state.opt_state, state.params)
    metrics['grad_norm'] = optax.global_norm(grads)
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), metrics

  def update(self, batch: core.TrajectoryBatch) -> dict[str, float]:
    self.state, metrics = self._update(self.state, batch)
    return {name: float(value) for name, value in jax.device_get(metrics).items()}
