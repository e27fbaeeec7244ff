"""Soft-Q learners: reward-driven soft Q-learning (path consistency) and inverse soft-Q.

The logits are soft Q-values. For reward-driven learning the Q-function is measured
against the frozen reference: Q(s, a) = logits(s, a) - logsumexp(logits_ref(s, .)), with
log pi_ref(a_t | s_t) folded into each token's reward and the task reward scaled by
`reward_scale` on the last token. The soft-optimal policy of that MDP is
pi*(y | x) ∝ pi_ref(y | x) exp(reward_scale * R(x, y)), the KL-regularised optimum with
beta = 1 / reward_scale; and the warm-started network starts as a consistent soft-Q
function (V = 0 everywhere), so early updates are not spent fixing arbitrary logit offsets.
The offset changes no policy: softmax(Q) = softmax(logits). The learner's own V(s_t)
starts each consistency path (so the values are trained, not only log pi) and the
Polyak target's V bootstraps it.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax

from chorus import core
from chorus import models
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.learners import soft_q


@dataclasses.dataclass(frozen=True)
class SoftQConfig:
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


@dataclasses.dataclass(frozen=True)
class InverseSoftQConfig:
  """Inverse soft-Q: TD-regularised maximum likelihood on demonstrations (arXiv 2409.01369).

  Attributes:
    td_coef: lambda, weight of the squared implied reward (Q(s, a) - gamma V(s')); 0 is
      exactly maximum likelihood.
    discount: gamma per token (1 for text).
  """
  td_coef: float = 0.1
  discount: float = 1.0


def _batch_metrics(batch: core.TrajectoryBatch) -> dict:
  real = batch.completion_mask.astype(jnp.float32)
  return dict(task_reward=batch.rewards.mean(), completion_length=real.sum(axis=1).mean())


def make_soft_q_learner(decoder_config: models.DecoderConfig, config: SoftQConfig, *, params,
                        reference_params, optimizer: optax.GradientTransformation
                        ) -> learner_lib.Learner:
  """Soft Q-learning from replay (any behaviour policy) with a Polyak target network."""

  def soft_values(evaluation, reference):
    return evaluation.log_normalizers - reference.log_normalizers

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    reference = jax.lax.stop_gradient(policy.evaluate_actions(
        decoder_config, reference_params, batch, with_log_normalizers=True))
    online = policy.evaluate_actions(decoder_config, params, batch, with_log_normalizers=True)
    target = policy.evaluate_actions(decoder_config, aux['target'], batch,
                                     with_log_normalizers=True)
    loss, metrics = soft_q.path_consistency_loss(
        online.logprobs, soft_values(target, reference), config.reward_scale * batch.rewards,
        reference.logprobs, batch.completion_mask, batch.terminated,
        multi_step=config.multi_step, discount=config.discount,
        values=soft_values(online, reference))
    real = batch.completion_mask.astype(jnp.float32)
    metrics['kl_to_reference'] = (
        ((batch.behaviour_logprobs - reference.logprobs) * real).sum(axis=1).mean())
    metrics['soft_value'] = jax.lax.stop_gradient(soft_values(online, reference))[:, 0].mean()
    return loss, {**metrics, **_batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=params, optimizer=optimizer,
                             aux={'target': params},
                             update_aux=learner_lib.polyak_update(config.target_update_rate,
                                                                  'target'))


def make_inverse_soft_q_learner(decoder_config: models.DecoderConfig,
                                config: InverseSoftQConfig, *, params,
                                optimizer: optax.GradientTransformation) -> learner_lib.Learner:
  """Imitation of demonstrations by inverse soft-Q; Q = the policy's raw logits."""

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux
    evaluation = policy.evaluate_actions(decoder_config, params, batch, with_log_normalizers=True)
    q_taken = evaluation.logprobs + evaluation.log_normalizers[:, :-1]
    loss, metrics = soft_q.inverse_soft_q_loss(
        q_taken, evaluation.log_normalizers, batch.completion_mask, batch.terminated,
        td_coef=config.td_coef, discount=config.discount)
    return loss, {**metrics, **_batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=params, optimizer=optimizer)
