"""Learned reward and pairwise preference models.

Both are the ordinary `Decoder`; the score is its value head, read after the last real
token or averaged over the completion's positions (`POOLINGS`). No new network: a reward
model is a decoder whose value head was trained with a Bradley-Terry loss, a preference
model is one trained with a pairwise cross-entropy, and both are served, checkpointed and
shipped exactly like a policy.

* Reward model: r(x, y) = the value after prompt x and completion y ('last'), or the
  mean of the values after each token of y ('mean') (`reward_scores`).
* Preference model: the two completions are packed back to back after the prompt,
  f(x, y, y') = value after x, y, y' (`pack_pair`), and the logit of P(y > y') is
  f(x, y, y') - f(x, y', y) (`preference_logits`). The difference makes the model
  antisymmetric by construction: P(y > y') + P(y' > y) = 1 exactly, and P(y > y) = 1/2,
  whatever the parameters.

A preference model over prompts of P tokens and completions of T tokens sees P + 2T
tokens, so its `DecoderConfig.max_seq_len` must be at least P + 2T.
"""
import jax
import jax.numpy as jnp

from chorus.models import decoder
from chorus.models.decoder import DecoderConfig
from chorus.models.decoder import Params


# How a score is read from the value head. 'last': after the whole completion, as
# sequence-classification reward models do. 'mean': the mean over the completion's tokens
# of the value after each; a per-token judgement then needs no aggregation at the end,
# and a reward that sums per-token terms (digit reversal's positional accuracy) is learned
# several times sooner (benchmarks/RESULTS.md, "Reward models").
POOLINGS = ('last', 'mean')


def check_pooling(pooling: str) -> None:
  if pooling not in POOLINGS:
    raise ValueError(f'Unknown reward pooling {pooling!r}; use one of {POOLINGS}.')


def reward_scores(config: DecoderConfig, params: Params,
                  prompt_tokens: jax.Array, prompt_mask: jax.Array,
                  completion_tokens: jax.Array, completion_mask: jax.Array,
                  pooling: str = 'last') -> jax.Array:
  """Scalar scores r(x, y) read from the value head (see `POOLINGS`).

  Args:
    config: the reward model's config.
    params: its parameters.
    prompt_tokens: [B, P] int32, left padded.
    prompt_mask: [B, P] bool.
    completion_tokens: [B, T] int32, right padded (real tokens first).
    completion_mask: [B, T] bool, a prefix of True per row.
    pooling: 'last' or 'mean'.

  Returns:
    [B] float32. With `values` [B, T + 1] of `forward_completions` and n_b =
    sum(completion_mask[b]): 'last' gives values[b, n_b], 'mean' gives
    mean(values[b, 1:n_b + 1]). A row with an empty completion gets the value after its
    prompt, values[b, 0].
  """
  check_pooling(pooling)
  if prompt_tokens.ndim != 2 or completion_tokens.ndim != 2:
    raise ValueError(f'prompt_tokens {prompt_tokens.shape} and completion_tokens '
                     f'{completion_tokens.shape} must both be [B, length].')
  _, values = decoder.forward_completions(config, params, prompt_tokens, prompt_mask,
                                          completion_tokens, completion_mask)
  values = values.astype(jnp.float32)
  lengths = completion_mask.astype(jnp.int32).sum(axis=-1)
  if pooling == 'last':
    return jnp.take_along_axis(values, lengths[:, None], axis=1)[:, 0]
  after_tokens = jnp.where(completion_mask, values[:, 1:], 0.0).sum(axis=-1)
  return jnp.where(lengths > 0, after_tokens / jnp.maximum(lengths, 1), values[:, 0])


def pack_pair(first_tokens: jax.Array, first_mask: jax.Array, second_tokens: jax.Array,
              second_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Puts two completions back to back: first's real tokens, second's, then padding.

  Real tokens keep their order; padding (wherever it is in the inputs) is squeezed out
  and moved to the end, so the result is right padded. Pure jnp, so it jits.

  Args:
    first_tokens: [B, T] int32.
    first_mask: [B, T] bool, True on first's real tokens.
    second_tokens: [B, T] int32.
    second_mask: [B, T] bool.

  Returns:
    tokens [B, 2T] int32 (PAD = 0 after the real tokens) and mask [B, 2T] bool, True on
    the first n1 + n2 slots of row b.
  """
  if not (first_tokens.shape == first_mask.shape == second_tokens.shape
          == second_mask.shape) or first_tokens.ndim != 2:
    raise ValueError(
        f'pack_pair needs four [B, T] arrays of one shape; got first_tokens '
        f'{first_tokens.shape}, first_mask {first_mask.shape}, second_tokens '
        f'{second_tokens.shape}, second_mask {second_mask.shape}. Pad both completions '
        'to the same T.')
  batch, length = first_tokens.shape
  first_mask = first_mask.astype(bool)
  second_mask = second_mask.astype(bool)
  first_len = first_mask.sum(axis=-1, dtype=jnp.int32)
  # Destination slot of every real token; padding goes to slot 2T, which is dropped.
  first_slot = jnp.cumsum(first_mask, axis=-1, dtype=jnp.int32) - 1
  second_slot = first_len[:, None] + jnp.cumsum(second_mask, axis=-1, dtype=jnp.int32) - 1
  out_of_range = 2 * length
  slots = jnp.concatenate([jnp.where(first_mask, first_slot, out_of_range),
                           jnp.where(second_mask, second_slot, out_of_range)], axis=1)
  sources = jnp.concatenate([first_tokens, second_tokens], axis=1).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slots.shape)
  tokens = jnp.zeros((batch, 2 * length), jnp.int32).at[rows, slots].set(sources, mode='drop')
  total = first_len + second_mask.sum(axis=-1, dtype=jnp.int32)
  mask = jnp.arange(2 * length)[None, :] < total[:, None]
  return tokens, mask


def _check_pair_fits(config: DecoderConfig, prompt_len: int, completion_len: int):
  needed = prompt_len + 2 * completion_len
  if needed > config.max_seq_len:
    raise ValueError(
        f'A preference model reads the prompt and both completions packed together: '
        f'prompt_len={prompt_len} + 2 * completion_len={completion_len} = {needed} tokens, '
        f'but max_seq_len={config.max_seq_len}. Build the preference model with '
        f'max_seq_len >= {needed} (dataclasses.replace(config, max_seq_len={needed})) '
        'or shorten the completions.')


def preference_logits(config: DecoderConfig, params: Params,
                      prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      first_tokens: jax.Array, first_mask: jax.Array,
                      second_tokens: jax.Array, second_mask: jax.Array,
                      pooling: str = 'last') -> jax.Array:
  """Antisymmetric logits of P(first > second | prompt).

  logit = f(x, y, y') - f(x, y', y), f = `reward_scores` of the packed pair
  (`pack_pair`) with `pooling` (a 'mean' runs over both completions' tokens). Both orders
  run in one forward pass of batch 2B.

  Args:
    config: the preference model's config; max_seq_len >= P + 2T.
    params: its parameters.
    prompt_tokens: [B, P] int32, left padded.
    prompt_mask: [B, P] bool.
    first_tokens: [B, T] int32, right padded.
    first_mask: [B, T] bool.
    second_tokens: [B, T] int32, right padded.
    second_mask: [B, T] bool.
    pooling: 'last' or 'mean' (`POOLINGS`).

  Returns:
    [B] float32 logits; sigmoid(logit) = P(first preferred), and swapping the two
    completions negates the logit exactly.
  """
  _check_pair_fits(config, prompt_tokens.shape[1], first_tokens.shape[1])
  forward_tokens, forward_mask = pack_pair(first_tokens, first_mask, second_tokens,
                                           second_mask)
  reverse_tokens, reverse_mask = pack_pair(second_tokens, second_mask, first_tokens,
                                           first_mask)
  scores = reward_scores(
      config, params,
      jnp.concatenate([prompt_tokens, prompt_tokens], axis=0),
      jnp.concatenate([prompt_mask, prompt_mask], axis=0),
      jnp.concatenate([forward_tokens, reverse_tokens], axis=0),
      jnp.concatenate([forward_mask, reverse_mask], axis=0), pooling)
  forward_scores, reverse_scores = jnp.split(scores, 2, axis=0)
  return forward_scores - reverse_scores


def preference_probabilities(config: DecoderConfig, params: Params,
                             prompt_tokens: jax.Array, prompt_mask: jax.Array,
                             first_tokens: jax.Array, first_mask: jax.Array,
                             second_tokens: jax.Array, second_mask: jax.Array,
                             pooling: str = 'last') -> jax.Array:
  """P(first > second | prompt) [B] float32: sigmoid of `preference_logits`."""
  return jax.nn.sigmoid(preference_logits(config, params, prompt_tokens, prompt_mask,
                                          first_tokens, first_mask, second_tokens,
                                          second_mask, pooling))
