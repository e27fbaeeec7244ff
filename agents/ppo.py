"""PPO (arXiv 1707.06347) with GAE (arXiv 1506.02438), token by token.

Models: the policy (with its value head) and the frozen reference. Actors: one completion
per prompt from the policy, scored by the task (PolicyRollout). Learner: at the start of
each update, with the parameters of that moment, the values V(s_t), the per-token rewards
(the task reward on the last token, a KL penalty to the reference on every token, as for
V-trace: token_mdp.token_rewards) and from them GAE advantages and returns; then
`num_epochs` passes of `num_minibatches` shuffled minibatches over the batch, each
minimising the clipped surrogate plus the value loss (learners/ppo.py). The ratio's "old"
policy is the behaviour policy that sampled. Batches: the actors' trajectories through a
replay queue, each used by one update and its epochs.
"""
import dataclasses

import jax.numpy as jnp

from chorus import core
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.learners import ppo
from chorus.learners import token_mdp


@dataclasses.dataclass(frozen=True)
class PPOConfig(builder_lib.AgentConfig, tag='ppo'):
  """PPO with GAE (ALGORITHMS.md defaults).

  Attributes:
    kl_coef: beta_KL of the per-token penalty -beta*(log mu - log pi_ref) in the rewards.
    discount: gamma per token (1 for text).
    gae_lambda: lambda of GAE.
    clip_epsilon: eps of the ratio clip.
    value_cost: weight of the value loss.
    value_clip: clip of the value change against the values the targets were computed
      with; 0 turns it off.
    entropy_cost: weight of the entropy bonus.
    num_epochs: passes over each batch per learner step.
    num_minibatches: minibatches per pass (must divide learner.batch_size).
  """
  kl_coef: float = 0.02
  discount: float = 1.0
  gae_lambda: float = 0.95
  clip_epsilon: float = 0.2
  value_cost: float = 0.5
  value_clip: float = 0.0
  entropy_cost: float = 0.001
  num_epochs: int = 2
  num_minibatches: int = 1


def make_ppo_learner(context: builder_lib.LearnerContext,
                     config: PPOConfig) -> learner_lib.Learner:
  """PPO against the frozen reference of `context`."""
  model = context.model

  def prepare_batch(params, aux, batch: core.TrajectoryBatch) -> core.TrajectoryBatch:
    """Advantages and returns from the values at the start of the update."""
    mask = batch.completion_mask
    values = policy.evaluate_actions(model, params, batch).values
    reference = policy.evaluate_actions(model, aux['reference'], batch)
    rewards = token_mdp.token_rewards(batch.reward, mask, batch.behaviour_logprobs,
                                      reference.logprobs, config.kl_coef)
    discounts = token_mdp.token_discounts(mask, batch.terminated, config.discount)
    targets = ppo.gae(values, rewards, discounts, mask, lambda_=config.gae_lambda)
    return batch._replace(extras={
        **batch.extras, 'advantages': targets.advantages, 'returns': targets.returns,
        'old_values': values[:, :-1], 'reference_logprobs': reference.logprobs})

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux
    target = policy.evaluate_actions(model, params, batch)
    extras = batch.extras
    loss, metrics = ppo.ppo_loss(
        target.logprobs, batch.behaviour_logprobs, target.values, target.entropy,
        extras['advantages'], extras['returns'], extras['old_values'], batch.completion_mask,
        clip_epsilon=config.clip_epsilon, value_cost=config.value_cost,
        value_clip=config.value_clip, entropy_cost=config.entropy_cost)
    log_ratios = batch.behaviour_logprobs - extras['reference_logprobs']
    metrics['kl_to_reference'] = jnp.where(batch.completion_mask, log_ratios,
                                           0.0).sum(axis=1).mean()
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer,
                             constants={'reference': context.reference_params},
                             mesh=context.mesh, prepare_batch=prepare_batch,
                             num_epochs=config.num_epochs,
                             num_minibatches=config.num_minibatches)


@builder_lib.register
class PPOBuilder(builder_lib.AgentBuilder):
  """PPO: several clipped-surrogate passes over each batch from a replay queue."""
  config_class = PPOConfig
  progress_metrics = (('kl_to_reference', 'kl'), ('clip_fraction', 'clipped'))

  def make_rollout(self, client, task, actor_config):
    return rollouts.PolicyRollout(client, task, actor_config)

  def make_learner(self, context):
    return make_ppo_learner(context, self.config)
