"""Batched autoregressive sampling with KV caches, compiled once per batch shape.

Pure JAX functions and their factories; batching, threads and gRPC live elsewhere. One
decode loop serves every sampler: it asks a `NextTokenLogits` for the logits of the next
token and draws from them. Those logits come from one decoder, or from a per-row affine
combination of two decoding passes, each with its own prompt and KV cache
(`paired_logits`): the geometric mixture of two models (Nash-MD's opponent) and
classifier-free guidance (one model, conditional and unconditional prompts) are both that.
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
      was drawn from (temperature, mixture and guidance included); 0 after a row is done.
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
    step: `(params, state, tokens [B, 1], token_mask [B, 1], cache_index) ->
      (logits [B, V], state)`: feeds one token per row, written at slot `cache_index`
      (prompt slots come first, so it is the token's offset after the prompt plus P), and
      returns the next token's logits. The state knows each row's prompt length, hence the
      token's position.
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
    # Completion token k sits at slot P + k and at position prompt_length + k.
    position_offsets = prompt_mask.sum(axis=1, dtype=jnp.int32) - prompt_tokens.shape[1]
    return output.logits[:, -1], (output.cache, position_offsets)

  def step(params, state, tokens, token_mask, cache_index):
    cache, position_offsets = state
    positions = (position_offsets + cache_index)[:, None]
    output = model.apply({'params': params}, tokens, positions, token_mask, cache=cache,
                         cache_index=cache_index)
    return output.logits[:, 0], (output.cache, position_offsets)

  return NextTokenLogits(prefill, step)


class PairedInputs(NamedTuple):
  """The `params` of `paired_logits`: what a batch needs besides its first prompts.

  Attributes:
    params: the first pass's decoder parameters.
    second_params: the second pass's; None when both passes run one model.
    coef: [B] float32, b: each row's logits are (1 - b) * first + b * second.
    second_prompt_tokens: [B, P] int32, left padded: the second pass's prompts (the first
      prompts again for a geometric mixture, the unconditional ones for guidance).
    second_prompt_mask: [B, P] bool.
  """
  params: Any
  second_params: Any
  coef: jax.Array
  second_prompt_tokens: jax.Array
  second_prompt_mask: jax.Array


def _both_passes(config: decoder_lib.DecoderConfig,
                 second_config: decoder_lib.DecoderConfig | None) -> NextTokenLogits:
  """Like `paired_logits`, but its logits are the pair (first [B, V], second [B, V])."""
  if second_config is not None:
    first, second = decoder_logits(config), decoder_logits(second_config)

    def prefill(inputs, prompt_tokens, prompt_mask, cache_len):
      logits, cache = first.prefill(inputs.params, prompt_tokens, prompt_mask, cache_len)
      second_logits, second_cache = second.prefill(
          inputs.second_params, inputs.second_prompt_tokens, inputs.second_prompt_mask,
          cache_len)
      return (logits, second_logits), (cache, second_cache)

    def step(inputs, state, tokens, token_mask, cache_index):
      cache, second_cache = state
      logits, cache = first.step(inputs.params, cache, tokens, token_mask, cache_index)
      second_logits, second_cache = second.step(inputs.second_params, second_cache, tokens,
                                                token_mask, cache_index)
      return (logits, second_logits), (cache, second_cache)

    return NextTokenLogits(prefill, step)

  # One model: both passes ride in one decoder call of 2B rows (first rows, then second),
  # which keeps the weights' memory traffic per token that of one pass.
  shared = decoder_logits(config)

  def halves(logits):
    return tuple(jnp.split(logits, 2, axis=0))

  def stack(array):
    return jnp.concatenate([array, array], axis=0)

  def shared_prefill(inputs, prompt_tokens, prompt_mask, cache_len):
    logits, state = shared.prefill(
        inputs.params, jnp.concatenate([prompt_tokens, inputs.second_prompt_tokens], axis=0),
        jnp.concatenate([prompt_mask, inputs.second_prompt_mask.astype(bool)], axis=0),
        cache_len)
    return halves(logits), state

  def shared_step(inputs, state, tokens, token_mask, cache_index):
    logits, state = shared.step(inputs.params, state, stack(tokens), stack(token_mask),
                                cache_index)
    return halves(logits), state

  return NextTokenLogits(shared_prefill, shared_step)


def paired_logits(config: decoder_lib.DecoderConfig,
                  second_config: decoder_lib.DecoderConfig | None = None) -> NextTokenLogits:
  """Per-row affine combination of two decoding passes, each with its own prompt and cache.

  `params` is a `PairedInputs` and the logits are
  `(1 - coef) * logits(params | prompt) + coef * logits(second_params | second_prompt)`.
  The weights sum to 1, so raw logits and log-softmax-normalised ones give the same
  distribution. With `second_config` both passes run that second decoder (its own
  architecture, same vocabulary); without it both run the one model of `config`,
  batched together, and `second_params` is ignored. Two uses:

  * geometric mixture (Nash-MD): two models, one prompt, coef = b in [0, 1]: softmax of
    the logits is pi^(1-b) * pi_mixture^b renormalised;
  * classifier-free guidance: one model, the caption prompt and an unconditional prompt,
    coef = 1 - g: the logits are g * l(.|cond) + (1 - g) * l(.|uncond).
  """
  if second_config is not None and config.vocab_size != second_config.vocab_size:
    raise ValueError(f'A combination of two decoders needs one vocabulary; the models have '
                     f'{config.vocab_size} and {second_config.vocab_size} token ids.')
  passes = _both_passes(config, second_config)

  def combine(coef, logits):
    first, second = logits
    return (1.0 - coef)[:, None] * first + coef[:, None] * second

  def prefill(inputs, prompt_tokens, prompt_mask, cache_len):
    logits, state = passes.prefill(inputs, prompt_tokens, prompt_mask, cache_len)
    return combine(inputs.coef, logits), state

  def step(inputs, state, tokens, token_mask, cache_index):
    logits, state = passes.step(inputs, state, tokens, token_mask, cache_index)
    return combine(inputs.coef, logits), state

  return NextTokenLogits(prefill, step)


def _check_fits(config: decoder_lib.DecoderConfig, prompt_len: int, max_new_tokens: int):
  if prompt_len < 1 or max_new_tokens < 1:
    raise ValueError(f'prompt_len ({prompt_len}) and max_new_tokens ({max_new_tokens}) '
                     'must be at least 1.')
  if prompt_len + max_new_tokens > config.max_seq_len:
    raise ValueError(
        f'prompt_len={prompt_len} + max_new_tokens={max_new_tokens} exceeds the '
        f'model max_seq_len={config.max_seq_len}. Raise max_seq_len to at least '
        f'{prompt_len + max_new_tokens} or lower the SequenceSpec (sequence.prompt_len / '
        'sequence.completion_len).')


def row_keys(rng: jax.Array, num_rows: int) -> jax.Array:
  """Each row's own PRNG key [B, 2]: one key [2] gives row i `fold_in(rng, i)` (the rows of
  one request); keys [B, 2] are the rows' keys already."""
  if rng.ndim == 2:
    return rng
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(num_rows))


def draw(logits: jax.Array, temperature: jax.Array, keys: jax.Array,
         token_index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Samples token `token_index` of each row from softmax(logits / temperature).

  Row b draws with `fold_in(keys[b], token_index[b])` alone, so what it samples does not
  depend on the other rows of the batch, nor on where in the batch it sits. A row of
  temperature 0 takes the argmax, with log-prob 0 (a point mass).

  Args:
    logits: [B, V].
    temperature: [B], each >= 0.
    keys: [B, 2] uint32, each row's PRNG key (see `row_keys`).
    token_index: [] or [B] int32, which completion token each row draws.

  Returns:
    (token [B] int32, its log-prob [B] float32 under the tempered distribution).
  """
  greedy = temperature == 0
  log_probs = jax.nn.log_softmax(logits / jnp.where(greedy, 1.0, temperature)[:, None], axis=-1)
  token_keys = jax.vmap(jax.random.fold_in)(
      keys, jnp.broadcast_to(token_index, keys.shape[:1]).astype(jnp.uint32))
  sampled = jax.vmap(jax.random.categorical)(token_keys, log_probs).astype(jnp.int32)
  token = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)
  logprob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
  return token, jnp.where(greedy, 0.0, logprob)


def _make_decode_loop(next_logits: NextTokenLogits, prompt_len: int, max_new_tokens: int,
                      eos_id: int) -> Callable[..., SampleOutput]:
  """The jitted loop `(params, prompt_tokens, prompt_mask, temperature, row_max, rng)`.

  A row is done when it samples `eos_id` or reaches its row_max tokens.
  """
  cache_len = prompt_len + max_new_tokens

  @jax.jit
  def decode(params, prompt_tokens, prompt_mask, temperature, row_max_new_tokens, rng):
    batch = prompt_tokens.shape[0]
    logits, state = next_logits.prefill(params, prompt_tokens, prompt_mask.astype(bool),
                                        cache_len)

    def record(step, token, logprob, record_state):
      """Writes the token drawn at `step` into the state, masking rows already done."""
      tokens, logprobs, lengths, terminated, done = record_state
      active = ~done
      token = jnp.where(active, token, tokenizer.PAD_ID)
      tokens = tokens.at[:, step].set(token)
      logprobs = logprobs.at[:, step].set(jnp.where(active, logprob, 0.0))
      lengths = lengths + active
      is_eos = active & (token == eos_id)
      done = done | is_eos | (lengths >= row_max_new_tokens)
      return tokens, logprobs, lengths, terminated | is_eos, done

    keys = row_keys(rng, batch)
    first_token, first_logprob = draw(logits, temperature, keys, 0)
    record_state = record(0, first_token, first_logprob, (
        jnp.full((batch, max_new_tokens), tokenizer.PAD_ID, jnp.int32),
        jnp.zeros((batch, max_new_tokens), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), bool)))

    def keep_going(loop_state):
      step, _, record_state = loop_state
      return (step < max_new_tokens) & ~jnp.all(record_state[-1])

    def decode_step(loop_state):
      """Feeds token step - 1 through the model(s) and draws token `step`."""
      step, state, record_state = loop_state
      tokens, done = record_state[0], record_state[-1]
      # Finished rows feed PAD as padding so they write nothing valid to the cache.
      logits, state = next_logits.step(
          params, state, jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1),
          ~done[:, None], prompt_len + step - 1)
      token, logprob = draw(logits, temperature, keys, step)
      return step + 1, state, record(step, token, logprob, record_state)

    _, _, record_state = jax.lax.while_loop(
        keep_going, decode_step, (jnp.int32(1), state, record_state))
    tokens, logprobs, lengths, terminated, _ = record_state
    return SampleOutput(tokens, logprobs, lengths, terminated)

  def checked_decode(params, prompt_tokens, prompt_mask, temperature, max_new_tokens_per_row,
                     rng):
    if prompt_tokens.shape[1] != prompt_len:
      raise ValueError(f'prompt_tokens has shape {prompt_tokens.shape}; this sampler was '
                       f'built for prompts of length {prompt_len}.')
    temperature_host = np.asarray(temperature)
    if not np.all(temperature_host >= 0):
      raise ValueError(f'Every temperature must be >= 0 (0 is greedy); got {temperature_host}.')
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
    temperature: [B] float32, each >= 0 (0: greedy, the argmax with log-prob 0).
    max_new_tokens: [B] int32, each in 1 .. `max_new_tokens` of the factory.
    rng: a PRNG key [2] (row i draws with `fold_in(rng, i)`) or one key per row [B, 2];
      a row's completion depends on its own key, prompt and settings only, not on the
      other rows (see `draw`).

  It returns a SampleOutput with T = `max_new_tokens` of the factory. It validates its
  arguments on the host and then calls a jitted function, which compiles once per
  batch size B.
  """
  _check_fits(config, prompt_len, max_new_tokens)
  return _make_decode_loop(decoder_logits(config), prompt_len, max_new_tokens,
                           config.eos_token_id)


def make_paired_sampler(config: decoder_lib.DecoderConfig,
                        second_config: decoder_lib.DecoderConfig | None, prompt_len: int,
                        max_new_tokens: int) -> Callable[..., SampleOutput]:
  """Builds a sampler of `paired_logits(config, second_config)`.

  The returned `sample(params, second_params, coef, prompt_tokens, prompt_mask,
  second_prompt_tokens, second_prompt_mask, temperature, max_new_tokens, rng)` draws
  each token from softmax(((1 - b) * logits + b * second_logits) / temperature), b =
  coef [B] float32 (finite, any sign), each pass decoding with its own KV cache (two
  decodes per token, not a re-run). `second_prompt_tokens` / `second_prompt_mask` are
  [B, prompt_len] like the prompts; `second_params` is ignored (pass None) when
  `second_config` is None and both passes run the model of `params`. Its log-probs are
  of that combined distribution; the other arguments and the output are as for
  `make_sampler`. `make_mixture_sampler` and `make_guided_sampler` are its two uses.
  """
  _check_fits(config, prompt_len, max_new_tokens)
  if second_config is not None:
    _check_fits(second_config, prompt_len, max_new_tokens)
  decode = _make_decode_loop(paired_logits(config, second_config), prompt_len, max_new_tokens,
                             config.eos_token_id)

  def sample(params, second_params, coef, prompt_tokens, prompt_mask, second_prompt_tokens,
             second_prompt_mask, temperature, max_new_tokens_per_row, rng):
    coef = np.asarray(coef, np.float32)
    if coef.shape != (prompt_tokens.shape[0],) or not np.all(np.isfinite(coef)):
      raise ValueError(f'coef must hold one finite value per row ({prompt_tokens.shape[0]} '
                       f'rows); got {coef}.')
    if (np.shape(second_prompt_tokens) != np.shape(prompt_tokens)
        or np.shape(second_prompt_mask) != np.shape(prompt_tokens)):
      raise ValueError(
          f'second_prompt_tokens {np.shape(second_prompt_tokens)} and second_prompt_mask '
          f'{np.shape(second_prompt_mask)} must have the prompts\' shape '
          f'{np.shape(prompt_tokens)}; left pad them to the same prompt_len.')
    inputs = PairedInputs(params, None if second_config is None else second_params,
                          jnp.asarray(coef), second_prompt_tokens,
                          np.asarray(second_prompt_mask, bool))
    return decode(inputs, prompt_tokens, prompt_mask, temperature, max_new_tokens_per_row, rng)

  return sample


def make_mixture_sampler(config: decoder_lib.DecoderConfig,
                         mixture_config: decoder_lib.DecoderConfig, prompt_len: int,
                         max_new_tokens: int) -> Callable[..., SampleOutput]:
  """Builds a sampler of the token-level geometric mixture of two decoders.

  The returned `sample(params, mixture_params, mixture_coef, prompt_tokens, prompt_mask,
  temperature, max_new_tokens, rng)` draws each token from
  softmax(((1 - b) * logits + b * mixture_logits) / temperature) with b = mixture_coef
  [B] float32 in [0, 1], both models reading the same prompts, each decoding with its
  own KV cache (see `make_paired_sampler`). Its log-probs are of that mixture
  distribution. The other arguments and the output are as for `make_sampler`; with the
  same rng, b = 0 draws what `make_sampler(config)` draws and b = 1 what
  `make_sampler(mixture_config)` draws.
  """
  paired = make_paired_sampler(config, mixture_config, prompt_len, max_new_tokens)

  def sample(params, mixture_params, mixture_coef, prompt_tokens, prompt_mask, temperature,
             max_new_tokens_per_row, rng):
    coef = np.asarray(mixture_coef, np.float32)
    if coef.shape != (prompt_tokens.shape[0],) or not np.all((coef >= 0) & (coef <= 1)):
      raise ValueError(f'mixture_coef must hold one value in [0, 1] per row '
                       f'({prompt_tokens.shape[0]} rows); got {coef}.')
    return paired(params, mixture_params, coef, prompt_tokens, prompt_mask, prompt_tokens,
                  prompt_mask, temperature, max_new_tokens_per_row, rng)

  return sample


def make_guided_sampler(config: decoder_lib.DecoderConfig, prompt_len: int,
                        max_new_tokens: int) -> Callable[..., SampleOutput]:
  """Builds a classifier-free guidance sampler of one decoder (MusicLM-style CFG).

  The returned `sample(params, guidance_scale, prompt_tokens, prompt_mask,
  unconditional_tokens, unconditional_mask, temperature, max_new_tokens, rng)` draws
  each token from softmax((g * l(.|prompt) + (1 - g) * l(.|unconditional)) / temperature),
  g = guidance_scale [B] float32, finite and >= 0 (g = 1 is plain sampling, g > 1
  sharpens towards the prompt). `unconditional_tokens` / `unconditional_mask` [B,
  prompt_len] are each row's unconditional prompt (e.g. [BOS, NULL_CAPTION]), left
  padded. Both passes run the same parameters in one decoder call of 2B rows, each with
  its KV cache. Log-probs are of the guided distribution; the other arguments and the
  output are as for `make_sampler`, and with the same rng g = 1 draws what
  `make_sampler(config)` draws.
  """
  paired = make_paired_sampler(config, None, prompt_len, max_new_tokens)

  def sample(params, guidance_scale, prompt_tokens, prompt_mask, unconditional_tokens,
             unconditional_mask, temperature, max_new_tokens_per_row, rng):
    scale = np.asarray(guidance_scale, np.float32)
    if (scale.shape != (prompt_tokens.shape[0],)
        or not np.all(np.isfinite(scale) & (scale >= 0))):
      raise ValueError(f'guidance_scale must hold one finite value >= 0 per row '
                       f'({prompt_tokens.shape[0]} rows); got {scale}.')
    return paired(params, None, 1.0 - scale, prompt_tokens, prompt_mask, unconditional_tokens,
                  unconditional_mask, temperature, max_new_tokens_per_row, rng)

  return sample
