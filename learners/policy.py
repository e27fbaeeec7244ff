"""What every learner computes from the policy network on a batch of completions."""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from chorus import core
from chorus import models
from chorus import schema
from chorus.models import lora


def with_zero_value_head(params):
  """`params` with the value head at 0 for every prefix (its kernel and bias zero).

  Where a critic learner starts its value head: the warm start's loss (token NLL) never
  trains the head, so it is still at its random init, values of about +-1 against rewards
  in [0, 1], and the first updates' advantages are noise (benchmarks/RESULTS.md, "Default
  run": the held-out reward fell by up to 0.3 in the first 30 updates). Parameters with
  LoRA adapters are returned as they are: their value head is frozen, and at 0 it would
  stay 0.
  """
  if lora.has_adapters(params):
    return params
  return {**params, 'value_head': jax.tree_util.tree_map(jnp.zeros_like, params['value_head'])}


class ActionEvaluation(NamedTuple):
  """The policy's view of sampled token sequences.

  Attributes:
    logprobs: [B, T] log pi(a_t | s_t) of the tokens.
    entropy: [B, T] entropy of pi(. | s_t).
    values: [B, T + 1] value head V(s_t); values[:, T] bootstraps truncated episodes.
    log_normalizers: [B, T + 1] logsumexp of the logits at s_t (the soft value when the
      logits are read as soft Q-values), or None unless asked for.
  """
  logprobs: jax.Array
  entropy: jax.Array
  values: jax.Array
  log_normalizers: jax.Array | None = None


def evaluate_tokens(decoder_config: models.DecoderConfig, params, prompt_tokens: jax.Array,
                    prompt_mask: jax.Array, tokens: jax.Array, mask: jax.Array, *,
                    with_log_normalizers: bool = False) -> ActionEvaluation:
  """Evaluates `tokens` [B, T] (right padded, `mask` [B, T]) as actions after the prompts."""
  logits, values = models.forward_completions(decoder_config, params, prompt_tokens, prompt_mask,
                                              tokens, mask, include_final=True)
  log_normalizers = jax.nn.logsumexp(logits, axis=-1)
  log_policy = logits[:, :-1] - log_normalizers[:, :-1, None]
  logprobs = jnp.take_along_axis(log_policy, tokens[..., None], axis=-1)[..., 0]
  entropy = -(jnp.exp(log_policy) * log_policy).sum(axis=-1)
  return ActionEvaluation(logprobs, entropy, values,
                          log_normalizers if with_log_normalizers else None)


def evaluate_actions(decoder_config: models.DecoderConfig, params, batch: core.TrajectoryBatch, *,
                     with_log_normalizers: bool = False) -> ActionEvaluation:
  """Evaluates a batch's sampled completions."""
  return evaluate_tokens(decoder_config, params, batch.prompt_tokens, batch.prompt_mask,
                         batch.completion_tokens, batch.completion_mask,
                         with_log_normalizers=with_log_normalizers)


def evaluate_extra_tokens(decoder_config: models.DecoderConfig, params,
                          batch: core.TrajectoryBatch, field: str) -> ActionEvaluation:
  """Evaluates a second completion a batch carries as the token field `field` (chorus.schema:
  `batch.extras[field]` and its mask), e.g. BOND's best anchor sample."""
  return evaluate_tokens(decoder_config, params, batch.prompt_tokens, batch.prompt_mask,
                         batch.extras[field], batch.extras[schema.token_mask_name(field)])


def batch_metrics(batch: core.TrajectoryBatch) -> dict[str, jax.Array]:
  """What every learner reports of its batch: mean task reward, completion length, and the
  share of completions as long as the cap (`at_length_cap`), where a policy that learns to
  run into the cap shows first (docs/algorithms.md, "How a row ends")."""
  lengths = batch.completion_mask.sum(axis=1)
  return dict(task_reward=batch.reward.mean(), completion_length=lengths.mean(),
              at_length_cap=(lengths == batch.completion_mask.shape[1]).mean())
