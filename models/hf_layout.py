"""The Hugging Face layout of Gemma checkpoints: config.json fields and tensor names.

One table (`tensor_layout`) says, for every tensor of a transformers Gemma or Gemma 2
checkpoint, where it lives in the decoder's parameter tree and how its layout differs
(torch Linear weights are [out, in]; Flax kernels are [in, ...out], with attention
projections split into heads). Loading and exporting both read that table.
"""
import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from chorus.models import decoder_config as config_lib
from chorus.models.decoder_config import DecoderConfig

GEMMA, GEMMA2 = 'gemma', 'gemma2'
MODEL_TYPES = (GEMMA, GEMMA2)
_ARCHITECTURES = {GEMMA: 'GemmaForCausalLM', GEMMA2: 'Gemma2ForCausalLM'}
_HIDDEN_ACTIVATION = 'gelu_pytorch_tanh'  # GELU, tanh approximation: Gemma's GeGLU.
# With tied embeddings a checkpoint may still carry the output projection (a copy of
# the embedding table); the decoder reads the table itself, so the copy is skipped.
TIED_OUTPUT_NAME = 'lm_head.weight'


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor and its place in the decoder's parameter tree.

  Attributes:
    name: its name in the checkpoint, e.g. 'model.layers.0.self_attn.q_proj.weight'.
    path: its path in the Flax parameter tree, e.g. ('layer_0', 'attention', 'query',
      'kernel').
    shape: its shape in the checkpoint.
    flax_shape: its shape in the parameter tree.
    transposed: a torch Linear weight: the Flax kernel is its transpose, reshaped.
  """
  name: str
  path: tuple[str, ...]
  shape: tuple[int, ...]
  flax_shape: tuple[int, ...]
  transposed: bool = False

  def to_flax(self, array):
    """The checkpoint's array in the parameter tree's layout."""
    return jnp.transpose(array).reshape(self.flax_shape) if self.transposed else array

  def to_checkpoint(self, array):
    """A parameter in the checkpoint's layout (inverse of `to_flax`)."""
    if not self.transposed:
      return array
    return jnp.transpose(array.reshape(self.shape[::-1]))


def model_type(config: DecoderConfig) -> str:
  """'gemma' or 'gemma2': the transformers architecture that computes what `config` does.

  Raises:
    ValueError: neither does (e.g. soft-caps without Gemma 2's post-norms), naming the
      fields.
  """
  if config.use_post_attn_norm and config.use_post_ffw_norm:
    return GEMMA2
  if config.use_post_attn_norm or config.use_post_ffw_norm:
    raise ValueError('transformers has Gemma 2 post-norms around both attention and MLP or '
                     f'neither; this config sets use_post_attn_norm={config.use_post_attn_norm} '
                     f'and use_post_ffw_norm={config.use_post_ffw_norm}.')
  gemma2_only = {
      'logit_softcap': config.logit_softcap is not None,
      'attn_logit_softcap': config.attn_logit_softcap is not None,
      'layer_types': config_lib.SLIDING_ATTENTION in config.layer_types,
      'query_pre_attn_scalar': config.query_pre_attn_scalar not in (None, config.head_dim),
  }
  used = sorted(name for name, is_set in gemma2_only.items() if is_set)
  if used:
    raise ValueError(f'{used} need Gemma 2, which transformers has only with post-norms; set '
                     'use_post_attn_norm and use_post_ffw_norm too, or drop them.')
  return GEMMA


def tensor_layout(config: DecoderConfig) -> list[TensorSpec]:
  """Every tensor of the checkpoint of `config`, embedding first (it is the largest)."""
  gemma2 = model_type(config) == GEMMA2
  embed, heads, kv_heads = config.embed_dim, config.num_heads, config.num_kv_heads
  head_dim, mlp = config.head_dim, config.mlp_dim
  specs = [TensorSpec('model.embed_tokens.weight', ('embedder', 'embedding'),
                      (config.vocab_size, embed), (config.vocab_size, embed))]
  norms = {'input_layernorm': 'attention_norm'}
  if gemma2:  # Gemma 2's post_attention_layernorm is a post-norm; its pre-MLP norm is new.
    norms.update(post_attention_layernorm='post_attention_norm',
                 pre_feedforward_layernorm='mlp_norm',
                 post_feedforward_layernorm='post_mlp_norm')
  else:
    norms.update(post_attention_layernorm='mlp_norm')
  for layer in range(config.num_layers):
    prefix, path = f'model.layers.{layer}.', (f'layer_{layer}',)

    def linear(name, flax_path, in_features, flax_shape):
      out_features = math.prod(flax_shape) // in_features
      return TensorSpec(prefix + name, path + flax_path + ('kernel',),
                        (out_features, in_features), flax_shape, transposed=True)

    specs += [
        linear('self_attn.q_proj.weight', ('attention', 'query'), embed,
               (embed, heads, head_dim)),
        linear('self_attn.k_proj.weight', ('attention', 'key'), embed,
               (embed, kv_heads, head_dim)),
        linear('self_attn.v_proj.weight', ('attention', 'value'), embed,
               (embed, kv_heads, head_dim)),
        linear('self_attn.o_proj.weight', ('attention', 'out'), heads * head_dim,
               (heads, head_dim, embed)),
        linear('mlp.gate_proj.weight', ('mlp', 'gate'), embed, (embed, mlp)),
        linear('mlp.up_proj.weight', ('mlp', 'up'), embed, (embed, mlp)),
        linear('mlp.down_proj.weight', ('mlp', 'down'), mlp, (mlp, embed)),
    ]
    specs += [TensorSpec(f'{prefix}{name}.weight', path + (norm, 'scale'), (embed,), (embed,))
              for name, norm in norms.items()]
  specs.append(TensorSpec('model.norm.weight', ('final_norm', 'scale'), (embed,), (embed,)))
  return specs


def _get(hf: dict, key: str, default: Any = None, *, required: bool = False) -> Any:
  if required and hf.get(key) is None:
    raise ValueError(f'config.json has no {key!r}; a Gemma config.json has it.')
  return hf.get(key, default)


def _rope_theta(hf: dict) -> float:
  """RoPE base of either config.json form (transformers 4: rope_theta; 5: rope_parameters)."""
  rope = hf.get('rope_parameters') or {}
  if rope.get('rope_type', 'default') != 'default' or hf.get('rope_scaling'):
    raise ValueError(f'RoPE scaling {rope or hf.get("rope_scaling")} is not supported; '
                     'Gemma and Gemma 2 use plain RoPE.')
  return float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0)))


def _token_id(value) -> int | None:
  """An id of config.json, which may list several (instruction-tuned models' EOS)."""
  return value[0] if isinstance(value, list) else value


def decoder_config_from_hf(hf: dict, *, dtype: str = 'float32',
                           param_dtype: str = 'float32') -> DecoderConfig:
  """The DecoderConfig of a transformers Gemma or Gemma 2 config.json (as a dict)."""
  kind = hf.get('model_type')
  if kind not in MODEL_TYPES:
    raise ValueError(f'config.json has model_type {kind!r}; Chorus loads {MODEL_TYPES}.')
  activation = hf.get('hidden_activation') or _HIDDEN_ACTIVATION
  if activation != _HIDDEN_ACTIVATION:
    raise ValueError(f'hidden_activation {activation!r} is not Gemma\'s '
                     f'{_HIDDEN_ACTIVATION!r} (GELU, tanh approximation).')
  if not hf.get('tie_word_embeddings', True):
    raise ValueError('tie_word_embeddings is false; Gemma ties its output projection to the '
                     'embedding, and so does the decoder.')
  num_heads = _get(hf, 'num_attention_heads', required=True)
  embed_dim = _get(hf, 'hidden_size', required=True)
  fields = dict(
      vocab_size=_get(hf, 'vocab_size', required=True),
      num_layers=_get(hf, 'num_hidden_layers', required=True),
      embed_dim=embed_dim, num_heads=num_heads,
      num_kv_heads=_get(hf, 'num_key_value_heads', num_heads),
      head_dim=_get(hf, 'head_dim') or embed_dim // num_heads,
      mlp_dim=_get(hf, 'intermediate_size', required=True),
      max_seq_len=_get(hf, 'max_position_embeddings', 8192),
      rope_base=_rope_theta(hf), rms_norm_eps=float(_get(hf, 'rms_norm_eps', 1e-6)),
      dtype=dtype, param_dtype=param_dtype,
      eos_token_id=_token_id(_get(hf, 'eos_token_id', config_lib.GEMMA_EOS_ID)))
  if kind == GEMMA2:
    num_layers = fields['num_layers']
    # transformers 4 had no layer_types: even layers were local.
    layer_types = hf.get('layer_types') or [
        config_lib.SLIDING_ATTENTION if layer % 2 == 0 else config_lib.FULL_ATTENTION
        for layer in range(num_layers)]
    fields.update(
        query_pre_attn_scalar=float(_get(hf, 'query_pre_attn_scalar', 256)),
        attn_logit_softcap=_get(hf, 'attn_logit_softcapping'),
        logit_softcap=_get(hf, 'final_logit_softcapping'),
        sliding_window=_get(hf, 'sliding_window'), layer_types=tuple(layer_types),
        use_post_attn_norm=True, use_post_ffw_norm=True)
  return DecoderConfig(**fields)


def _int_if_whole(value: float) -> float | int:
  return int(value) if float(value).is_integer() else value


def hf_config_from_decoder(config: DecoderConfig, *, bos_token_id: int, pad_token_id: int,
                           torch_dtype: str) -> dict:
  """The transformers config.json (as a dict) of a decoder; inverse of decoder_config_from_hf."""
  kind = model_type(config)
  hf = dict(
      architectures=[_ARCHITECTURES[kind]], model_type=kind, vocab_size=config.vocab_size,
      hidden_size=config.embed_dim, intermediate_size=config.mlp_dim,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      max_position_embeddings=config.max_seq_len, rope_theta=config.rope_base,
      rms_norm_eps=config.rms_norm_eps, hidden_activation=_HIDDEN_ACTIVATION,
      tie_word_embeddings=True, attention_bias=False, bos_token_id=bos_token_id,
      eos_token_id=config.eos_token_id, pad_token_id=pad_token_id, torch_dtype=torch_dtype)
  if kind == GEMMA2:
    hf.update(
        # transformers' validator insists on an int (the published ones are).
        query_pre_attn_scalar=_int_if_whole(config.query_pre_attn_scalar or config.head_dim),
        attn_logit_softcapping=config.attn_logit_softcap,
        final_logit_softcapping=config.logit_softcap,
        # transformers needs a window even when every layer is global.
        sliding_window=config.sliding_window or config.max_seq_len,
        layer_types=list(config.layer_types
                         or [config_lib.FULL_ATTENTION] * config.num_layers))
  return hf

