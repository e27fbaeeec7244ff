"""Batched autoregressive sampling with KV caches, compiled once per batch shape.

Pure JAX functions and their factories; batching, threads and gRPC live elsewhere. One
decode loop serves every sampler: it asks a `NextTokenLogits` for the logits of the next
token (one model, or the geometric mixture of two models with a KV cache each) and draws
from them.
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chorus.models import decoder as decoder_lib
from chorus.models import tokenizer


class SampleOutput(NamedTuple):
  """Completions of one batch.

  Attributes:
    tokens: [B, T] int32, PAD after a row is done.
    logprobs: [B, T] float32, log-prob of each sampled token under the distribution it
      was drawn from (temperature and mixture included); 0 after a row is done.
    lengths: [B] int32, sampled tokens per row, EOS included.
    terminated: [B] bool, True where EOS was sampled.
  """
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  terminated: jax.Array


class NextTokenLogits(NamedTuple):
  """Where a sampler's next-token logits come from; `params` and `state` are opaque to it.

  Attributes:
    prefill: `(params, prompt_tokens [B, P], prompt_mask [B, P], cache_len) ->
      (logits [B, V], state)`: runs the prompts and returns the first token's logits and
      the decoding state (the KV caches) with `cache_len` slots per row.
    step: `(params, state, tokens [B, 1], positions [B, 1], token_mask [B, 1],
      cache_index) -> (logits [B, V], state)`: feeds one token per row, written at slot
      `cache_index`, and returns the next token's logits.
  """
  prefill: Callable[..., tuple[jax.Array, Any]]
  step: Callable[..., tuple[jax.Array, Any]]


def decoder_logits(config: decoder_lib.DecoderConfig) -> NextTokenLogits:
  """One decoder with its KV cache; `params` is its parameter tree."""
  model = decoder_lib.Decoder(config)

  def prefill(params, prompt_tokens, prompt_mask, cache_len):
    batch = prompt_tokens.shape[0]
    output = model.apply(
        {'params': params}, prompt_tokens, decoder_lib.positions_from_mask(prompt_mask),
        prompt_mask, cache=decoder_lib.init_cache(config, batch, cache_len), cache_index=0)
    return output.logits[:, -1], output.cache

  def step(params, cache, tokens, positions, token_mask, cache_index):
    output = model.apply({'params': params}, tokens, positions, token_mask, cache=cache,
                         cache_index=cache_index)
    return output.logits[:, 0], output.cache

  return NextTokenLogits(prefill, step)


def geometric_mixture_logits(config: decoder_lib.DecoderConfig,
                             mixture_config: decoder_lib.DecoderConfig) -> NextTokenLogits:
  """Token-level geometric mixture of two decoders, each decoding with its own KV cache.

  `params` is `(params, mixture_params, mixture_coef [B])` and the logits are
  `(1 - mixture_coef) * logits + mixture_coef * mixture_logits`, so softmax of them is
  pi^(1-b) * pi_mixture^b renormalised (Nash-MD's opponent). The two models may differ
  in architecture but must share the vocabulary.
  """
  if config.vocab_size != mixture_config.vocab_size:
    raise ValueError(f'A geometric mixture needs one vocabulary; the models have '
                     f'{config.vocab_size} and {mixture_config.vocab_size} token ids.')
  first, second = decoder_logits(config), decoder_logits(mixture_config)

  def mix(coef, logits, mixture_logits):
    return (1.0 - coef)[:, None] * logits + coef[:, None] * mixture_logits

  def prefill(params, prompt_tokens, prompt_mask, cache_len):
    params, mixture_params, coef = params
    logits, cache = first.prefill(params, prompt_tokens, prompt_mask, cache_len)
    mixture_logits, mixture_cache = second.prefill(mixture_params, prompt_tokens, prompt_mask,
                                                   cache_len)
    return mix(coef, logits, mixture_logits), (cache, mixture_cache)

  def step(params, state, tokens, positions, token_mask, cache_index):
    params, mixture_params, coef = params
    cache, mixture_cache = state
    logits, cache = first.step(params, cache, tokens, positions, token_mask, cache_index)
    mixture_logits, mixture_cache = second.step(mixture_params, mixture_cache, tokens,
                                                positions, token_mask, cache_index)
    return mix(coef, logits, mixture_logits), (cache, mixture_cache)

  return NextTokenLogits(prefill, step)


def _check_fits(config: decoder_lib.DecoderConfig, prompt_len: int, max_new_tokens: int):
  if prompt_len < 1 or max_new_tokens < 1:
    raise ValueError(f'prompt_len ({prompt_len}) and max_new_tokens ({max_new_tokens}) '
                     'must be at least 1.')
  if prompt_len + max_new_tokens > config.max_seq_len:
    raise ValueError(
        f'prompt_len={prompt_len} + max_new_tokens={max_new_tokens} exceeds the '
        f'model max_seq_len={config.max_seq_len}.')


def _draw(logits, temperature, rng):
  """Samples from softmax(logits / temperature) per row; returns (token, logprob)."""
  log_probs = jax.nn.log_softmax(logits / temperature[:, None], axis=-1)
  token = jax.random.categorical(rng, log_probs, axis=-1).astype(jnp.int32)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def _make_decode_loop(next_logits: NextTokenLogits, prompt_len: int,
                      max_new_tokens: int) -> Callable[..., SampleOutput]:
  """The jitted loop `(params, prompt_tokens, prompt_mask, temperature, row_max, rng)`."""
  cache_len = prompt_len + max_new_tokens

  @jax.jit
  def decode(params, prompt_tokens, prompt_mask, temperature, row_max_new_tokens, rng):
    batch = prompt_tokens.shape[0]
    prompt_mask = prompt_mask.astype(bool)
    prompt_lengths = prompt_mask.sum(axis=1, dtype=jnp.int32)
    logits, state = next_logits.prefill(params, prompt_tokens, prompt_mask, cache_len)

    def record(step, token, logprob, record_state):
      """Writes the token drawn at `step` into the state, masking rows already done."""
      tokens, logprobs, lengths, terminated, done = record_state
      active = ~done
      token = jnp.where(active, token, tokenizer.PAD_ID)
      tokens = tokens.at[:, step].set(token)
      logprobs = logprobs.at[:, step].set(jnp.where(active, logprob, 0.0))
      lengths = lengths + active
      is_eos = active & (token == tokenizer.EOS_ID)
      done = done | is_eos | (lengths >= row_max_new_tokens)
      return tokens, logprobs, lengths, terminated | is_eos, done

    rng, step_rng = jax.random.split(rng)
    first_token, first_logprob = _draw(logits, temperature, step_rng)
    record_state = record(0, first_token, first_logprob, (
        jnp.full((batch, max_new_tokens), tokenizer.PAD_ID, jnp.int32),
        jnp.zeros((batch, max_new_tokens), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), bool)))

    def keep_going(loop_state):
      step, _, _, record_state = loop_state
      return (step < max_new_tokens) & ~jnp.all(record_state[-1])

    def decode_step(loop_state):
      """Feeds token step - 1 through the model(s) and draws token `step`."""
      step, state, rng, record_state = loop_state
      tokens, done = record_state[0], record_state[-1]
      # Finished rows feed PAD as padding so they write nothing valid to the cache.
      logits, state = next_logits.step(
          params, state, jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1),
          (prompt_lengths + step - 1)[:, None], ~done[:, None], prompt_len + step - 1)
      rng, step_rng = jax.random.split(rng)
      token, logprob = _draw(logits, temperature, step_rng)
      return step + 1, state, rng, record(step, token, logprob, record_state)

    _, _, _, record_state = jax.lax.while_loop(
        keep_going, decode_step, (jnp.int32(1), state, rng, record_state))
    tokens, logprobs, lengths, terminated, _ = record_state
    return SampleOutput(tokens, logprobs, lengths, terminated)

  def checked_decode(params, prompt_tokens, prompt_mask, temperature, max_new_tokens_per_row,
                     rng):
    if prompt_tokens.shape[1] != prompt_len:
      raise ValueError(f'prompt_tokens has shape {prompt_tokens.shape}; this sampler was '
                       f'built for prompts of length {prompt_len}.')
    temperature_host = np.asarray(temperature)
    if not np.all(temperature_host > 0):
      raise ValueError(f'Every temperature must be > 0; got {temperature_host}.')
    row_max = np.asarray(max_new_tokens_per_row)
    if np.any(row_max < 1) or np.any(row_max > max_new_tokens):
      raise ValueError(f'Each max_new_tokens must be in 1..{max_new_tokens}; got {row_max}.')
    return decode(params, prompt_tokens, prompt_mask, jnp.asarray(temperature, jnp.float32),
                  jnp.asarray(max_new_tokens_per_row, jnp.int32), rng)

  return checked_decode


def make_sampler(config: decoder_lib.DecoderConfig, prompt_len: int,
                 max_new_tokens: int) -> Callable[..., SampleOutput]:
  """Builds `sample(params, prompt_tokens, prompt_mask, temperature, max_new_tokens, rng)`.

  Args of the returned function:
    params: decoder parameters.
    prompt_tokens: [B, prompt_len] int32, left padded (see `left_pad_prompts`).
    prompt_mask: [B, prompt_len] bool.
    temperature: [B] float32, each > 0.
    max_new_tokens: [B] int32, each in 1 .. `max_new_tokens` of the factory.
    rng: a PRNG key; the same key and inputs give the same output.

  It returns a SampleOutput with T = `max_new_tokens` of the factory. It validates its
  arguments on the host and then calls a jitted function, which compiles once per
  batch size B.
  """
  _check_fits(config, prompt_len, max_new_tokens)
  return _make_decode_loop(decoder_logits(config), prompt_len, max_new_tokens)


def make_mixture_sampler(config: decoder_lib.DecoderConfig,
                         mixture_config: decoder_lib.DecoderConfig, prompt_len: int,
                         max_new_tokens: int) -> Callable[..., SampleOutput]:
  """Builds a sampler of the token-level geometric mixture of two decoders.

  The returned `sample(params, mixture_params, mixture_coef, prompt_tokens, prompt_mask,
  temperature, max_new_tokens, rng)` draws each token from
  softmax(((1 - b) * logits + b * mixture_logits) / temperature) with b = mixture_coef
  [B] float32 in [0, 1], decoding both models with their own KV cache (two decodes per
  token, not a re-run). Its log-probs are of that mixture distribution. The other
  arguments and the output are as for `make_sampler`; with the same rng, b = 0 draws
  what `make_sampler(config)` draws and b = 1 what `make_sampler(mixture_config)` draws.
  """
  _check_fits(config, prompt_len, max_new_tokens)
  _check_fits(mixture_config, prompt_len, max_new_tokens)
  decode = _make_decode_loop(geometric_mixture_logits(config, mixture_config), prompt_len,
                             max_new_tokens)

  def sample(params, mixture_params, mixture_coef, prompt_tokens, prompt_mask, temperature,
             max_new_tokens_per_row, rng):
    coef = np.asarray(mixture_coef, np.float32)
    if coef.shape != (prompt_tokens.shape[0],) or not np.all((coef >= 0) & (coef <= 1)):
      raise ValueError(f'mixture_coef must hold one value in [0, 1] per row '
                       f'({prompt_tokens.shape[0]} rows); got {coef}.')
    return decode((params, mixture_params, jnp.asarray(coef)), prompt_tokens, prompt_mask,
                  temperature, max_new_tokens_per_row, rng)

  return sample
