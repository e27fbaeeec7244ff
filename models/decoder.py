"""A Gemma-style decoder with a KV cache and a value head.

One module serves both roles: the inference server calls it with a cache (prefill, then
one token at a time) and the learner calls `forward_completions` without one. Both must
give the same numbers, so every positional convention lives here:

* Prompts are left padded with PAD (0) and `token_mask` False on the padding.
* RoPE positions count real tokens only: `positions_from_mask(mask)`.
* Padding keys are never attended to; a padding query's output is finite garbage.
* A local (sliding-window) layer's query sees the keys less than `sliding_window`
  positions before it, with or without a cache.

The architecture is `DecoderConfig` (decoder_config.py): Chorus's tiny models and the
Gemma family (Gemma, Gemma 2) are configs of this one module.
"""
from collections.abc import Sequence
import math
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from chorus.models.decoder_config import DecoderConfig

# Finite, so that a row with no valid key (a padding query) softmaxes to a uniform
# distribution instead of NaN.
_MASKED_LOGIT = -1e30

Params = Any


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, one slot per token.

  Attributes:
    keys: per layer, [B, S, num_kv_heads, head_dim].
    values: per layer, [B, S, num_kv_heads, head_dim].
    key_mask: [B, S] bool, True where a slot holds a real (non-padding) token.
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  key_mask: jax.Array


class DecoderOutput(NamedTuple):
  """What one decoder call returns.

  Attributes:
    logits: [B, L, V] float32, next-token logits at each input position.
    values: [B, L] float32, value estimate of the prefix ending at each position.
    cache: the updated KVCache, or None when called without one.
  """
  logits: jax.Array
  values: jax.Array
  cache: KVCache | None


def positions_from_mask(token_mask: jax.Array) -> jax.Array:
  """RoPE positions [B, L] int32 of left-padded rows: real tokens count from 0."""
  return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotates x [B, L, H, D] by positions [B, L] (rotate-half form, as in Gemma)."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # [B, L, 1, D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap): Gemma 2's soft-capping of logits; identity for cap None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


class RMSNorm(nn.Module):
  """Gemma's RMSNorm: the scale starts at zero and multiplies by (1 + scale), in float32."""
  epsilon: float = 1e-6
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.zeros_init(), (x.shape[-1],),
                       jnp.dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                                 + self.epsilon)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def _norm(config: DecoderConfig, name: str) -> RMSNorm:
  return RMSNorm(config.rms_norm_eps, config.param_dtype, name=name)


class LoraDense(nn.Module):
  """A bias-free DenseGeneral whose kernel has a low-rank adapter, applied on the fly.

  y = x . W + scale * (x . A) . B with x's last `num_inputs` axes contracted: the same
  function as the merged kernel W + scale * (A @ B).reshape(W.shape) (models/lora.py),
  without forming it.
  """
  features: tuple[int, ...]
  num_inputs: int
  rank: int
  scale: float
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    in_shape = x.shape[-self.num_inputs:]
    in_size, out_size = math.prod(in_shape), math.prod(self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(in_axis=tuple(
        range(self.num_inputs)), out_axis=tuple(range(self.num_inputs, self.num_inputs
                                                      + len(self.features)))),
                        in_shape + self.features, param_dtype)
    lora_a = self.param('lora_a', nn.initializers.normal(stddev=in_size ** -0.5),
                        (in_size, self.rank), param_dtype)
    lora_b = self.param('lora_b', nn.initializers.zeros_init(), (self.rank, out_size),
                        param_dtype)
    flat = x.reshape(x.shape[:-self.num_inputs] + (in_size,)).astype(dtype)
    base = flat @ kernel.reshape(in_size, out_size).astype(dtype)
    adapted = (flat @ lora_a.astype(dtype)) @ lora_b.astype(dtype)
    return (base + self.scale * adapted).reshape(x.shape[:-self.num_inputs] + self.features)


def _dense(config: DecoderConfig, features, name: str, axis=-1) -> nn.Module:
  """A bias-free projection, with a LoRA adapter when `config.lora` targets `name`."""
  if config.lora.rank and name in config.lora.targets:
    return LoraDense(tuple(np.atleast_1d(features).tolist()),
                     len(axis) if isinstance(axis, tuple) else 1, config.lora.rank,
                     config.lora.scale, config.dtype, config.param_dtype, name=name)
  return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=jnp.dtype(config.dtype),
                         param_dtype=jnp.dtype(config.param_dtype), name=name)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optionally reading and writing a cache."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x, positions, attend_mask, layer_cache, cache_index):
    """Attends x [B, L, E] to itself or to the cache.

    Args:
      x: [B, L, E] normed inputs.
      positions: [B, L] RoPE positions.
      attend_mask: [B, L, S] bool, which keys each query may see (S = L without cache);
        a local layer's mask already holds its sliding window.
      layer_cache: None or (keys, values), each [B, S, K, H].
      cache_index: slot of the first of the L new tokens.

    Returns:
      ([B, L, E] output, updated (keys, values) or None).
    """
    config = self.config
    dtype = jnp.dtype(config.dtype)
    q = _dense(config, (config.num_heads, config.head_dim), 'query')(x)
    k = _dense(config, (config.num_kv_heads, config.head_dim), 'key')(x)
    v = _dense(config, (config.num_kv_heads, config.head_dim), 'value')(x)
    q = _apply_rope(q, positions, config.rope_base)
    k = _apply_rope(k, positions, config.rope_base)

    if layer_cache is not None:
      cached_k, cached_v = layer_cache
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), start)
      v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), start)
      layer_cache = (k, v)

    batch, length = q.shape[:2]
    groups = config.num_heads // config.num_kv_heads
    q = q.reshape(batch, length, config.num_kv_heads, groups, config.head_dim)
    scores = jnp.einsum('blkgh,bskh->bkgls', q, k, preferred_element_type=jnp.float32)
    scores = scores * (config.query_pre_attn_scalar or config.head_dim) ** -0.5
    scores = _softcap(scores, config.attn_logit_softcap)
    scores = jnp.where(attend_mask[:, None, None], scores, _MASKED_LOGIT)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    attended = jnp.einsum('bkgls,bskh->blkgh', probs, v)
    attended = attended.reshape(batch, length, config.num_heads, config.head_dim)
    out = _dense(config, config.embed_dim, 'out', axis=(-2, -1))(attended)
    return out, layer_cache


class GeGLU(nn.Module):
  """Gated MLP: down(gelu(gate(x)) * up(x)), GELU in its tanh approximation as in Gemma."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    config = self.config
    gate = _dense(config, config.mlp_dim, 'gate')(x)
    up = _dense(config, config.mlp_dim, 'up')(x)
    return _dense(config, config.embed_dim, 'down')(nn.gelu(gate, approximate=True) * up)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

  With Gemma 2's post-norms the attention and MLP outputs are normed again before
  each residual add.
  """
  config: DecoderConfig

  @nn.compact
  def __call__(self, x, positions, attend_mask, layer_cache, cache_index):
    config = self.config
    attended, layer_cache = Attention(config, name='attention')(
        _norm(config, 'attention_norm')(x), positions, attend_mask, layer_cache, cache_index)
    if config.use_post_attn_norm:
      attended = _norm(config, 'post_attention_norm')(attended)
    x = x + attended
    transformed = GeGLU(config, name='mlp')(_norm(config, 'mlp_norm')(x))
    if config.use_post_ffw_norm:
      transformed = _norm(config, 'post_mlp_norm')(transformed)
    return x + transformed, layer_cache


class Decoder(nn.Module):
  """Decoder-only transformer with tied embeddings and a scalar value head."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array, token_mask: jax.Array,
               cache: KVCache | None = None, cache_index: int | jax.Array = 0
               ) -> DecoderOutput:
    """Runs L new tokens, attending causally to themselves and to the cache.

    Args:
      tokens: [B, L] int32.
      positions: [B, L] int32 RoPE positions (see `positions_from_mask`).
      token_mask: [B, L] bool, False on padding.
      cache: None for a cache-free causal pass over the L tokens; otherwise the
        new tokens are written at slots cache_index .. cache_index + L - 1 (the
        caller keeps cache_index + L <= S: dynamic_update_slice would clamp it).
      cache_index: scalar int, may be traced.

    Returns:
      DecoderOutput with logits [B, L, V], values [B, L] and the updated cache.
    """
    config = self.config
    dtype = jnp.dtype(config.dtype)
    token_mask = token_mask.astype(bool)
    length = tokens.shape[1]
    embedder = nn.Embed(
        config.vocab_size, config.embed_dim,
        embedding_init=nn.initializers.normal(stddev=config.embed_dim ** -0.5),
        param_dtype=jnp.dtype(config.param_dtype), name='embedder')
    x = embedder(tokens)
    # The normaliser is cast to the embedding's dtype first, as in Gemma's reference
    # code and transformers (sqrt(3072) is 55.5 in bfloat16).
    x = (x * jnp.asarray(config.embed_dim ** 0.5, x.dtype)).astype(dtype)

    query_slots = jnp.arange(length)
    if cache is None:
      key_mask, key_slots, key_positions = token_mask, query_slots, positions
    else:
      key_mask = jax.lax.dynamic_update_slice(cache.key_mask, token_mask, (0, cache_index))
      key_slots = jnp.arange(key_mask.shape[1])
      query_slots = query_slots + cache_index
      key_positions = positions_from_mask(key_mask)
    causal = key_slots[None, :] <= query_slots[:, None]  # [L, S]
    attend_mask = causal[None] & key_mask[:, None, :]  # [B, L, S]
    masks = {None: attend_mask}
    if config.sliding_window is not None:
      # Local layers see the last `sliding_window` tokens by position, so the window is
      # a mask over the whole cache and the cache keeps one layout for every layer.
      distance = positions[:, :, None] - key_positions[:, None, :]  # [B, L, S]
      masks[config.sliding_window] = attend_mask & (distance < config.sliding_window)

    new_keys, new_values = [], []
    for layer in range(config.num_layers):
      layer_cache = None if cache is None else (cache.keys[layer], cache.values[layer])
      x, layer_cache = Block(config, name=f'layer_{layer}')(
          x, positions, masks[config.layer_window(layer)], layer_cache, cache_index)
      if layer_cache is not None:
        new_keys.append(layer_cache[0])
        new_values.append(layer_cache[1])

    hidden = _norm(config, 'final_norm')(x)
    # Tied embeddings; float32 accumulation without a float32 copy of the table.
    logits = jnp.einsum('ble,ve->blv', hidden, embedder.embedding.astype(dtype),
                        preferred_element_type=jnp.float32)
    logits = _softcap(logits, config.logit_softcap)
    values = nn.Dense(1, param_dtype=jnp.dtype(config.param_dtype),
                      name='value_head')(hidden.astype(jnp.float32))[..., 0]
    new_cache = None if cache is None else KVCache(
        tuple(new_keys), tuple(new_values), key_mask)
    return DecoderOutput(logits, values, new_cache)


def init_params(config: DecoderConfig, rng: jax.Array) -> Params:
  """Fresh parameters of `Decoder(config)`."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Decoder(config).init(rng, tokens, tokens, tokens > 0)['params']


def init_cache(config: DecoderConfig, batch_size: int, cache_len: int) -> KVCache:
  """An empty cache with `cache_len` slots per row."""
  shape = (batch_size, cache_len, config.num_kv_heads, config.head_dim)
  zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
  return KVCache(zeros, zeros, jnp.zeros((batch_size, cache_len), bool))


def left_pad_prompts(prompts: Sequence[Sequence[int]],
                     prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Left pads token-id prompts to `prompt_len`.

  Returns:
    tokens [B, prompt_len] int32 (PAD = 0 on the left) and mask [B, prompt_len] bool.
  """
  tokens = np.zeros((len(prompts), prompt_len), np.int32)
  mask = np.zeros((len(prompts), prompt_len), bool)
  for index, prompt in enumerate(prompts):
    if not 1 <= len(prompt) <= prompt_len:
      raise ValueError(
          f'Prompt {index} has {len(prompt)} tokens; prompts need 1 to '
          f'prompt_len={prompt_len} tokens. Shorten it or raise prompt_len.')
    tokens[index, prompt_len - len(prompt):] = prompt
    mask[index, prompt_len - len(prompt):] = True
  return tokens, mask


def right_pad_completions(completions: Sequence[Sequence[int]],
                          completion_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Right pads token-id completions to `completion_len`.

  Returns:
    tokens [B, completion_len] int32 (PAD = 0 on the right) and mask [B, completion_len]
    bool, True on real tokens (a prefix of each row).
  """
  tokens = np.zeros((len(completions), completion_len), np.int32)
  mask = np.zeros((len(completions), completion_len), bool)
  for index, completion in enumerate(completions):
    if len(completion) > completion_len:
      raise ValueError(f'Completion {index} has {len(completion)} tokens; at most '
                       f'completion_len={completion_len}. Raise completion_len.')
    tokens[index, :len(completion)] = completion
    mask[index, :len(completion)] = True
  return tokens, mask


def forward_completions(config: DecoderConfig, params: Params,
                        prompt_tokens: jax.Array, prompt_mask: jax.Array,
                        completion_tokens: jax.Array, completion_mask: jax.Array, *,
                        include_final: bool = False) -> tuple[jax.Array, jax.Array]:
  """Scores completions with one cache-free pass, as the learner needs.

  Args:
    config: the model's config.
    params: its parameters.
    prompt_tokens: [B, P] int32, left padded.
    prompt_mask: [B, P] bool.
    completion_tokens: [B, T] int32, right padded.
    completion_mask: [B, T] bool.
    include_final: also return the logits after the last completion position, which
      soft-Q learners need for V(s_T) of truncated completions.

  Returns:
    logits [B, T, V] float32 ([B, T + 1, V] with `include_final`), where logits[:, t] is
    the distribution completion token t was drawn from; and values [B, T + 1] float32,
    where values[:, t] is the value of the prefix ending just before completion token t
    (values[:, T], or values[:, n] for a completion of n tokens, is the value after the
    whole completion).
  """
  prompt_len, completion_len = prompt_tokens.shape[1], completion_tokens.shape[1]
  if prompt_len + completion_len > config.max_seq_len:
    raise ValueError(
        f'prompt_len={prompt_len} + completion_len={completion_len} exceeds '
        f'max_seq_len={config.max_seq_len} of the model.')
  tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
  output = Decoder(config).apply({'params': params}, tokens, positions_from_mask(mask), mask)
  logits = output.logits[:, prompt_len - 1:prompt_len + completion_len - (not include_final)]
  values = output.values[:, prompt_len - 1:]
  return logits, values


def params_to_bytes(params: Params) -> bytes:
  """Serializes parameters with msgpack, to ship them between processes."""
  return flax.serialization.msgpack_serialize(jax.device_get(params))


def params_from_bytes(data: bytes, template: Params | None = None) -> Params:
  """Inverse of `params_to_bytes`; with a template, restores its tree structure."""
  state = flax.serialization.msgpack_restore(data)
  if template is None:
    return state
  return flax.serialization.from_state_dict(template, state)
