"""Batched autoregressive sampling with a KV cache, compiled once per batch shape.

A pure JAX function and its factory; batching, threads and gRPC live elsewhere.
"""
from collections.abc import Callable
from typing import NamedTuple

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
      was drawn from (temperature included); 0 after a row is done.
    lengths: [B] int32, sampled tokens per row, EOS included.
    terminated: [B] bool, True where EOS was sampled.
  """
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  terminated: jax.Array


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
  if prompt_len < 1 or max_new_tokens < 1:
    raise ValueError(f'prompt_len ({prompt_len}) and max_new_tokens ({max_new_tokens}) '
                     'must be at least 1.')
  if prompt_len + max_new_tokens > config.max_seq_len:
    raise ValueError(
        f'prompt_len={prompt_len} + max_new_tokens={max_new_tokens} exceeds the '
        f'model max_seq_len={config.max_seq_len}.')
  model = decoder_lib.Decoder(config)
  cache_len = prompt_len + max_new_tokens

  def draw(logits, temperature, rng):
    """Samples from softmax(logits / temperature) per row; returns (token, logprob)."""
    log_probs = jax.nn.log_softmax(logits / temperature[:, None], axis=-1)
    token = jax.random.categorical(rng, log_probs, axis=-1).astype(jnp.int32)
    return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]

  @jax.jit
  def sample_jitted(params, prompt_tokens, prompt_mask, temperature, row_max_new_tokens,
                    rng):
    batch = prompt_tokens.shape[0]
    prompt_mask = prompt_mask.astype(bool)
    prompt_lengths = prompt_mask.sum(axis=1, dtype=jnp.int32)

    prefill = model.apply(
        {'params': params}, prompt_tokens, decoder_lib.positions_from_mask(prompt_mask),
        prompt_mask, cache=decoder_lib.init_cache(config, batch, cache_len), cache_index=0)

    def record(step, token, logprob, state):
      """Writes the token drawn at `step` into the state, masking rows already done."""
      tokens, logprobs, lengths, terminated, done = state
      active = ~done
      token = jnp.where(active, token, tokenizer.PAD_ID)
      tokens = tokens.at[:, step].set(token)
      logprobs = logprobs.at[:, step].set(jnp.where(active, logprob, 0.0))
      lengths = lengths + active
      is_eos = active & (token == tokenizer.EOS_ID)
      done = done | is_eos | (lengths >= row_max_new_tokens)
      return tokens, logprobs, lengths, terminated | is_eos, done

    rng, step_rng = jax.random.split(rng)
    first_token, first_logprob = draw(prefill.logits[:, -1], temperature, step_rng)
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
      """Feeds token step - 1 through the model and draws token `step`."""
      step, cache, rng, record_state = loop_state
      tokens, done = record_state[0], record_state[-1]
      # Finished rows feed PAD as padding so they write nothing valid to the cache.
      output = model.apply(
          {'params': params}, jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1),
          (prompt_lengths + step - 1)[:, None], ~done[:, None], cache=cache,
          cache_index=prompt_len + step - 1)
      rng, step_rng = jax.random.split(rng)
      token, logprob = draw(output.logits[:, 0], temperature, step_rng)
      return step + 1, output.cache, rng, record(step, token, logprob, record_state)

    _, _, _, record_state = jax.lax.while_loop(
        keep_going, decode_step, (jnp.int32(1), prefill.cache, rng, record_state))
    tokens, logprobs, lengths, terminated, _ = record_state
    return SampleOutput(tokens, logprobs, lengths, terminated)

  def sample(params, prompt_tokens, prompt_mask, temperature, max_new_tokens_per_row, rng):
    if prompt_tokens.shape[1] != prompt_len:
      raise ValueError(f'prompt_tokens has shape {prompt_tokens.shape}; this sampler was '
                       f'built for prompts of length {prompt_len}.')
    temperature_host = np.asarray(temperature)
    if not np.all(temperature_host > 0):
      raise ValueError(f'Every temperature must be > 0; got {temperature_host}.')
    row_max = np.asarray(max_new_tokens_per_row)
    if np.any(row_max < 1) or np.any(row_max > max_new_tokens):
      raise ValueError(f'Each max_new_tokens must be in 1..{max_new_tokens}; got {row_max}.')
    return sample_jitted(params, prompt_tokens, prompt_mask,
                         jnp.asarray(temperature, jnp.float32),
                         jnp.asarray(max_new_tokens_per_row, jnp.int32), rng)

  return sample
