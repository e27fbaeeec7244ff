"""The J-BOND learner: distils Best-of-N of a moving anchor into the policy."""
import dataclasses

import jax.numpy as jnp
import optax

from chorus import core
from chorus import models
from chorus.learners import bond
from chorus.learners import learner as learner_lib
from chorus.learners import policy


@dataclasses.dataclass(frozen=True)
class BondConfig:
  """J-BOND (arXiv 2407.14622; ALGORITHMS.md defaults).

  Attributes:
    beta: weight of the backward (policy-gradient) term against the forward (maximum
      likelihood on the better anchor sample) term of the Jeffreys divergence.
    kl_coef: gamma, weight of the KL(pi || anchor) regulariser.
    anchor_update_rate: eta of the anchor EMA, anchor <- (1 - eta) anchor + eta theta,
      after every update; the anchor is pushed to the inference servers with the policy.
    num_anchor_samples: anchor samples per prompt drawn by the actors (J-BOND: 2).
  """
  beta: float = 0.5
  kl_coef: float = 0.5
  anchor_update_rate: float = 0.02
  num_anchor_samples: int = 2


def make_bond_learner(decoder_config: models.DecoderConfig, config: BondConfig, *, params,
                      optimizer: optax.GradientTransformation) -> learner_lib.Learner:
  """Batches carry log pi_anchor(y) and the better anchor sample, as the actors scored them."""

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux  # The anchor's log-probs arrive with the batch.
    sampled = policy.evaluate_actions(decoder_config, params, batch)
    best_anchor = policy.evaluate_paired(decoder_config, params, batch)
    loss, metrics = bond.jbond_loss(
        sampled.logprobs, batch.reference_logprobs, best_anchor.logprobs,
        batch.completion_mask, batch.paired_mask,
        bond.jbond_binary_reward(batch.win_probability), beta=config.beta,
        kl_coef=config.kl_coef)
    real = batch.completion_mask.astype(jnp.float32)
    metrics.update(task_reward=batch.rewards.mean(), completion_length=real.sum(axis=1).mean(),
                   win_rate_vs_anchor=batch.win_probability.mean())
    return loss, metrics

  return learner_lib.Learner(loss_fn, params=params, optimizer=optimizer,
                             aux={'anchor': params},
                             update_aux=learner_lib.polyak_update(config.anchor_update_rate,
                                                                  'anchor'),
                             published_aux=('anchor',))
