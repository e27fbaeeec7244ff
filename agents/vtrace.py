"""V-trace (IMPALA, arXiv 1802.01561): actor-critic with off-policy correction.

Models: the policy and the frozen reference (the KL penalty's pi_ref). Actors: one
completion per prompt from the policy, scored by the task. Learner: the IMPALA loss
with V-trace targets (learners/vtrace.py) on token-level rewards, a KL penalty to the
reference folded into every token's reward. Batches: the actors' trajectories through a
Reverb queue, which bounds the policy lag.
"""
import dataclasses

import jax
import jax.numpy as jnp

from chorus import core
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.learners import token_mdp
from chorus.learners import vtrace


@dataclasses.dataclass(frozen=True)
class VTraceConfig(builder_lib.AgentConfig, tag='vtrace'):
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


def vtrace_loss_fn(model, config: VTraceConfig, kl_model: str):
  """The V-trace loss of `config`, its KL penalty to the auxiliary tree `kl_model`.

  The loss reads log pi_{kl_model}(a_t|s_t) from `aux[kl_model]` (the frozen reference,
  or a moving anchor) and reports `kl_to_<kl_model>`, the mean sequence log-ratio of the
  sampled completions.
  """

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    mask = batch.completion_mask
    target = policy.evaluate_actions(model, params, batch)
    kl_logprobs = jax.lax.stop_gradient(
        policy.evaluate_actions(model, aux[kl_model], batch).logprobs)
    rewards = token_mdp.token_rewards(batch.reward, mask, batch.behaviour_logprobs,
                                      kl_logprobs, config.kl_coef)
    discounts = token_mdp.token_discounts(mask, batch.terminated, config.discount)
    loss, metrics = vtrace.vtrace_loss(
        target.logprobs, batch.behaviour_logprobs, target.values, target.entropy, rewards,
        discounts, mask, rho_clip=config.rho_clip, pg_rho_clip=config.pg_rho_clip,
        c_clip=config.c_clip, lambda_=config.lambda_, value_cost=config.value_cost,
        entropy_cost=config.entropy_cost)
    real = mask.astype(jnp.float32)
    metrics[f'kl_to_{kl_model}'] = (
        ((batch.behaviour_logprobs - kl_logprobs) * real).sum(axis=1).mean())
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return loss_fn


def make_vtrace_learner(context: builder_lib.LearnerContext,
                        config: VTraceConfig) -> learner_lib.Learner:
  """V-trace actor-critic against the frozen reference of `context`."""
  return learner_lib.Learner(vtrace_loss_fn(context.model, config, 'reference'),
                             params=policy.with_zero_value_head(context.params),
                             optimizer=context.optimizer,
                             constants={'reference': context.reference_params},
                             mesh=context.mesh)


@builder_lib.register
class VTraceBuilder(builder_lib.AgentBuilder):
  """On-policy actor-critic from a replay queue."""
  config_class = VTraceConfig
  progress_metrics = (('kl_to_reference', 'kl'),)

  def make_rollout(self, client, task, actor_config):
    return rollouts.PolicyRollout(client, task, actor_config)

  def make_learner(self, context):
    return make_vtrace_learner(context, self.config)
