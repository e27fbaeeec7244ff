"""The Nash-MD learner: policy gradient against the geometric-mixture opponent."""
import dataclasses

import jax.numpy as jnp
import optax

from chorus import core
from chorus import models
from chorus.learners import learner as learner_lib
from chorus.learners import nash_md
from chorus.learners import policy


@dataclasses.dataclass(frozen=True)
class NashMDConfig:
  """Nash-MD-PG (arXiv 2312.00886).

  Attributes:
    kl_coef: tau, the KL-to-reference regulariser (the paper: about 0.008).
    mixture_coef: beta of the opponent pi^beta ∝ pi^(1-beta) pi_ref^beta (paper's best:
      0.125-0.375); the actors sample the opponent from the inference server.
    preference_temperature: with no learned preference model, P(y > y') =
      sigmoid((r(y) - r(y')) / preference_temperature) from the task reward.
  """
  kl_coef: float = 0.008
  mixture_coef: float = 0.125
  preference_temperature: float = 0.1


def make_nash_md_learner(decoder_config: models.DecoderConfig, config: NashMDConfig, *, params,
                         optimizer: optax.GradientTransformation) -> learner_lib.Learner:
  """Batches carry log pi_ref(y) and P(y > y') as the actors scored them."""

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux
    sampled = policy.evaluate_actions(decoder_config, params, batch)
    loss, metrics = nash_md.nash_md_loss(sampled.logprobs, batch.reference_logprobs,
                                         batch.win_probability, batch.completion_mask,
                                         kl_coef=config.kl_coef)
    real = batch.completion_mask.astype(jnp.float32)
    metrics.update(task_reward=batch.rewards.mean(), completion_length=real.sum(axis=1).mean())
    return loss, metrics

  return learner_lib.Learner(loss_fn, params=params, optimizer=optimizer)
