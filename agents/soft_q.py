"""Reward-driven soft Q-learning: the logits are soft Q-values (path consistency,
arXiv 2106.07704), trained off-policy from replay.

Models: the policy and the frozen reference. Actors: one completion per prompt from the
policy (PolicyRollout). Learner: path consistency (learners/soft_q.py) with a Polyak
target network. The Q-function is measured against the frozen reference:
Q(s, a) = logits(s, a) - logsumexp(logits_ref(s, .)), with log pi_ref(a_t | s_t) folded
into each token's reward and the task reward scaled by `reward_scale` on the last token.
The soft-optimal policy of that MDP is pi*(y | x) ∝ pi_ref(y | x) exp(reward_scale *
R(x, y)), the KL-regularised optimum with beta = 1 / reward_scale; and the warm-started
network starts as a consistent soft-Q function (V = 0 everywhere), so early updates are
not spent fixing arbitrary logit offsets. The offset changes no policy: softmax(Q) =
softmax(logits). The learner's own V(s_t) starts each consistency path (so the values
are trained, not only log pi) and the Polyak target's V bootstraps it.
Batches: a uniform replay table; off-policy, so with `replay_dataset` a recorded
dataset is written into the table once and no actors run (offline RL).
"""
import dataclasses

import jax

from chorus import core
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.learners import soft_q


@dataclasses.dataclass(frozen=True)
class SoftQConfig(builder_lib.AgentConfig, tag='soft_q'):
  """Reward-driven soft Q-learning (path consistency, arXiv 2106.07704).

  Attributes:
    reward_scale: 1 / beta: the task reward is multiplied by it, against the per-token
      log pi_ref rewards of the KL regulariser.
    multi_step: multi-step path consistency (each suffix of the completion against the
      sequence reward) instead of single-step.
    target_update_rate: Polyak rate of the target network (ALGORITHMS.md: 0.001, for long
      runs; short runs need a faster one).
    discount: gamma per token (1 for text).
  """
  reward_scale: float = 10.0
  multi_step: bool = True
  target_update_rate: float = 0.001
  discount: float = 1.0


def make_soft_q_learner(context: builder_lib.LearnerContext,
                        config: SoftQConfig) -> learner_lib.Learner:
  """Soft Q-learning from replay (any behaviour policy) with a Polyak target network."""
  model = context.model

  def soft_values(evaluation, reference):
    return evaluation.log_normalizers - reference.log_normalizers

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    reference = jax.lax.stop_gradient(policy.evaluate_actions(
        model, aux['reference'], batch, with_log_normalizers=True))
    online = policy.evaluate_actions(model, params, batch, with_log_normalizers=True)
    target = policy.evaluate_actions(model, aux['target'], batch, with_log_normalizers=True)
    loss, metrics = soft_q.path_consistency_loss(
        online.logprobs, soft_values(target, reference), config.reward_scale * batch.reward,
        reference.logprobs, batch.completion_mask, batch.terminated,
        multi_step=config.multi_step, discount=config.discount,
        values=soft_values(online, reference))
    real = batch.completion_mask.astype(jax.numpy.float32)
    metrics['kl_to_reference'] = (
        ((batch.behaviour_logprobs - reference.logprobs) * real).sum(axis=1).mean())
    metrics['soft_value'] = jax.lax.stop_gradient(soft_values(online, reference))[:, 0].mean()
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer,
                             aux={'target': context.params},
                             update_aux=learner_lib.polyak_update(config.target_update_rate,
                                                                  'target'),
                             constants={'reference': context.reference_params},
                             mesh=context.mesh)


@builder_lib.register
class SoftQBuilder(builder_lib.AgentBuilder):
  """Off-policy soft Q-learning from a uniform table, online or from a recorded dataset."""
  config_class = SoftQConfig
  progress_metrics = (('kl_to_reference', 'kl'), ('td_error', 'td error'))

  def data(self, replay_dataset):
    if replay_dataset:
      return builder_lib.Data(builder_lib.DataSource.DATASET_IN_REPLAY, replay_dataset)
    return builder_lib.Data(builder_lib.DataSource.ACTORS)

  def make_rollout(self, client, task, actor_config):
    return rollouts.PolicyRollout(client, task, actor_config)

  def make_learner(self, context):
    return make_soft_q_learner(context, self.config)
