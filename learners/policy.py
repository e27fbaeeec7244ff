"""What every learner computes from the policy network on a batch of completions."""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from chorus import core
from chorus import models


class ActionEvaluation(NamedTuple):
  """The policy's view of the sampled completions.

  Attributes:
    logprobs: [B, T] log pi(a_t | s_t) of the completion tokens.
    entropy: [B, T] entropy of pi(. | s_t).
    values: [B, T + 1] value head V(s_t); values[:, T] bootstraps truncated episodes.
  """
  logprobs: jax.Array
  entropy: jax.Array
  values: jax.Array


def evaluate_actions(decoder_config: models.DecoderConfig, params,
                     batch: core.TrajectoryBatch) -> ActionEvaluation:
  logits, values = models.forward_completions(
      decoder_config, params, batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens,
      batch.completion_mask)
  log_policy = jax.nn.log_softmax(logits, axis=-1)
  logprobs = jnp.take_along_axis(log_policy, batch.completion_tokens[..., None], axis=-1)[..., 0]
  entropy = -(jnp.exp(log_policy) * log_policy).sum(axis=-1)
  return ActionEvaluation(logprobs, entropy, values)
