"""Batched scoring of given completions, compiled once per batch shape.

Pure JAX functions and their factory; batching, threads and gRPC live elsewhere. A
decoder scores each completion token (log pi(y_t | x, y_<t)); a reward model gives one
scalar per completion; a preference model gives P(completion > comparison) per pair
(see `models.reward_models`).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from chorus.models import decoder as decoder_lib
from chorus.models import reward_models

MODEL_KINDS = ('decoder', 'reward', 'preference')


def check_fits(kind: str, config: decoder_lib.DecoderConfig, prompt_len: int,
               completion_len: int):
  """Raises ValueError unless a `kind` model with `config` can score these lengths."""
  if kind not in MODEL_KINDS:
    raise ValueError(f'Unknown model kind {kind!r}; use one of {MODEL_KINDS}.')
  if prompt_len < 1 or completion_len < 1:
    raise ValueError(f'prompt_len ({prompt_len}) and completion_len ({completion_len}) '
                     'must be at least 1.')
  # A preference model reads the prompt and both completions packed together.
  needed = prompt_len + (2 if kind == 'preference' else 1) * completion_len
  if needed > config.max_seq_len:
    raise ValueError(
        f'A {kind} model scoring prompts of {prompt_len} tokens and completions of '
        f'{completion_len} tokens reads {needed} tokens, but its max_seq_len is '
        f'{config.max_seq_len}. Raise max_seq_len to at least {needed} or lower the '
        'SequenceSpec (sequence.prompt_len / sequence.completion_len).')


def make_scorer(kind: str, config: decoder_lib.DecoderConfig, prompt_len: int,
                completion_len: int, pooling: str = 'last') -> Callable[..., jax.Array]:
  """Builds `score(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
  comparison_tokens, comparison_mask, temperature)` for one model kind.

  `pooling` is how reward and preference models read their value head
  (`reward_models.POOLINGS`); decoders ignore it.

  Args of the returned function:
    params: the model's parameters.
    prompt_tokens: [B, prompt_len] int32, left padded; prompt_mask [B, prompt_len] bool.
    completion_tokens: [B, completion_len] int32, right padded; completion_mask the same
      shape, bool.
    comparison_tokens, comparison_mask: like the completions; read by preference models
      only (others ignore them).
    temperature: [B] float32 > 0; decoders divide their logits by it, others ignore it.

  The returned array is, per kind:
    'decoder': [B, completion_len] float32, log softmax(logits / temperature) at each
      completion token, 0 on padding.
    'reward': [B] float32 rewards.
    'preference': [B] float32, P(completion > comparison).
  The function is jitted and compiles once per batch size B.
  """
  check_fits(kind, config, prompt_len, completion_len)
  reward_models.check_pooling(pooling)

  def decoder_scores(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                     comparison_tokens, comparison_mask, temperature):
    del comparison_tokens, comparison_mask
    logits, _ = decoder_lib.forward_completions(config, params, prompt_tokens, prompt_mask,
                                                completion_tokens, completion_mask)
    log_probs = jax.nn.log_softmax(logits / temperature[:, None, None], axis=-1)
    token_logprobs = jnp.take_along_axis(log_probs, completion_tokens[..., None], axis=-1)
    return jnp.where(completion_mask, token_logprobs[..., 0], 0.0)

  def rewards(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
              comparison_tokens, comparison_mask, temperature):
    del comparison_tokens, comparison_mask, temperature
    return reward_models.reward_scores(config, params, prompt_tokens, prompt_mask,
                                       completion_tokens, completion_mask, pooling)

  def preferences(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                  comparison_tokens, comparison_mask, temperature):
    del temperature
    return reward_models.preference_probabilities(config, params, prompt_tokens, prompt_mask,
                                                  completion_tokens, completion_mask,
                                                  comparison_tokens, comparison_mask,
                                                  pooling)

  jitted = jax.jit(dict(decoder=decoder_scores, reward=rewards, preference=preferences)[kind])

  def score(params, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
            comparison_tokens, comparison_mask, temperature):
    if prompt_tokens.shape[1] != prompt_len or completion_tokens.shape[1] != completion_len:
      raise ValueError(f'Got prompts {prompt_tokens.shape} and completions '
                       f'{completion_tokens.shape}; this scorer was built for lengths '
                       f'{prompt_len} and {completion_len}.')
    if comparison_tokens.shape != completion_tokens.shape:
      raise ValueError(f'comparison_tokens {comparison_tokens.shape} must have the shape of '
                       f'completion_tokens {completion_tokens.shape}.')
    if not np.all(np.asarray(temperature) > 0):
      raise ValueError(f'Every temperature must be > 0; got {np.asarray(temperature)}.')
    return jitted(params, prompt_tokens, prompt_mask, completion_tokens,
                  np.asarray(completion_mask, bool), comparison_tokens,
                  np.asarray(comparison_mask, bool), jnp.asarray(temperature, jnp.float32))

  return score
