"""The decoder's architecture: one config for Chorus's tiny models and the Gemma family.

Field names follow the Gemma papers and the Gemma reference code where those name a
feature (`query_pre_attn_scalar`, `sliding_window`, `use_post_attn_norm`, soft-caps); the
sizes keep MaxText's names (`embed_dim`, `mlp_dim`, `num_kv_heads`). The named configs
are the published architectures; `chorus.models.load_pretrained` reads the same fields
from a Hugging Face config.json.
"""
import dataclasses

from chorus.models import tokenizer

SUPPORTED_DTYPES = ('float32', 'bfloat16')
FULL_ATTENTION = 'full_attention'
SLIDING_ATTENTION = 'sliding_attention'
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
# The Gemma SentencePiece vocabulary, and its special ids (pad 0, eos 1, bos 2).
GEMMA_VOCAB_SIZE = 256_000
GEMMA_EOS_ID = 1


LORA_TARGETS = ('query', 'key', 'value', 'out', 'gate', 'up', 'down')


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (LoRA, arXiv 2106.09685) on the decoder's projections.

  A target's kernel W acts as W + (alpha / rank) * A @ B, A [in, rank] (random) and
  B [rank, out] (zeros, so a fresh adapter changes nothing), reshaped to W's shape. With
  adapters, learners train only A and B over the frozen weights (models/lora.py).

  Attributes:
    rank: the adapters' rank; 0 adds none (the whole model trains).
    alpha: scale numerator: the adapter's update is (alpha / rank) * A @ B.
    targets: which projections get adapters: attention 'query', 'key', 'value', 'out'
      and MLP 'gate', 'up', 'down'.
  """
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 0:
      raise ValueError(f'lora.rank must be an int >= 0 (0: no adapters); got {self.rank!r}.')
    if not self.alpha > 0:
      raise ValueError(f'lora.alpha must be > 0; got {self.alpha!r}.')
    unknown = sorted(set(self.targets) - set(LORA_TARGETS))
    if unknown or not self.targets:
      raise ValueError(f'lora.targets {list(self.targets)} must be a non-empty subset of '
                       f'{list(LORA_TARGETS)}.')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Sizes and architecture of a decoder.

  Attributes:
    vocab_size: number of token ids.
    num_layers: number of transformer blocks.
    embed_dim: width of the residual stream (d_model; HF `hidden_size`).
    num_heads: query heads per block.
    num_kv_heads: key/value heads per block (grouped-query attention; 1 is multi-query).
      Must divide `num_heads`.
    head_dim: width of one head, independent of embed_dim / num_heads; even, for RoPE.
    mlp_dim: hidden width of the GeGLU MLP (HF `intermediate_size`).
    max_seq_len: longest prompt + completion the model is meant to see.
    rope_base: RoPE wavelength base (HF `rope_theta`).
    logit_softcap: if set, final logits are `cap * tanh(logits / cap)` (Gemma 2's
      `final_logit_softcapping`, 30).
    dtype: compute and KV-cache dtype ('float32' or 'bfloat16'); logits and values are
      float32.
    attn_logit_softcap: if set, attention logits are soft-capped the same way before
      masking (Gemma 2's `attn_logit_softcapping`, 50).
    query_pre_attn_scalar: attention logits are q.k / sqrt(query_pre_attn_scalar); None
      is head_dim (Gemma; Gemma 2 27B uses embed_dim / num_heads = 144).
    sliding_window: how many tokens, itself included, a query of a 'sliding_attention'
      layer sees (Gemma 2: 4096).
    layer_types: per layer, 'full_attention' (global) or 'sliding_attention' (local);
      empty: every layer global. Gemma 2 alternates, local first.
    use_post_attn_norm: RMSNorm the attention output before the residual add (Gemma 2).
    use_post_ffw_norm: RMSNorm the MLP output before the residual add (Gemma 2).
    rms_norm_eps: epsilon of every RMSNorm.
    param_dtype: dtype parameters are created and loaded in ('float32' or 'bfloat16');
      train in float32, serve large checkpoints in bfloat16.
    eos_token_id: the id that ends a completion (samplers stop at it); the tokenizer's.
    lora: low-rank adapters on the projections (rank 0: none), applied on the fly.
  """
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  rope_base: float = 10_000.0
  logit_softcap: float | None = None
  dtype: str = 'float32'
  attn_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  rms_norm_eps: float = 1e-6
  param_dtype: str = 'float32'
  eos_token_id: int = tokenizer.EOS_ID
  lora: LoraConfig = LoraConfig()

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads',
                 'head_dim', 'mlp_dim', 'max_seq_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'DecoderConfig.{name} must be a positive int; got {value!r}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} '
          '(each key/value head serves a whole group of query heads).')
    if self.head_dim % 2:
      raise ValueError(f'head_dim must be even for RoPE; got {self.head_dim}.')
    for name in ('logit_softcap', 'attn_logit_softcap', 'query_pre_attn_scalar',
                 'sliding_window'):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f'{name} must be positive or None; got {value!r}.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in SUPPORTED_DTYPES:
        raise ValueError(f'{name} must be one of {SUPPORTED_DTYPES}; got '
                         f'{getattr(self, name)!r}.')
    if self.layer_types:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f'layer_types has {len(self.layer_types)} entries for '
                         f'num_layers={self.num_layers}; give one per layer or none.')
      unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if unknown:
        raise ValueError(f'layer_types {unknown} are not among {LAYER_TYPES}.')
      if SLIDING_ATTENTION in self.layer_types and self.sliding_window is None:
        raise ValueError("'sliding_attention' layers need sliding_window, the number of "
                         'tokens a local layer sees; set it.')
    if not 0 <= self.eos_token_id < self.vocab_size:
      raise ValueError(f'eos_token_id={self.eos_token_id} is not a token id of a '
                       f'vocabulary of {self.vocab_size}.')

  def layer_window(self, layer: int) -> int | None:
    """How many tokens a query of `layer` sees, itself included; None: all before it."""
    if self.layer_types and self.layer_types[layer] == SLIDING_ATTENTION:
      return self.sliding_window
    return None

  @classmethod
  def tiny(cls, vocab_size: int) -> 'DecoderConfig':
    """About 0.1M parameters: trains in seconds on a CPU; for tests and demos."""
    return cls(vocab_size=vocab_size, num_layers=2, embed_dim=64, num_heads=4,
               num_kv_heads=2, head_dim=16, mlp_dim=256, max_seq_len=64)

  @classmethod
  def small(cls, vocab_size: int) -> 'DecoderConfig':
    """About 13M parameters: big enough that batching matters when serving."""
    return cls(vocab_size=vocab_size, num_layers=6, embed_dim=384, num_heads=6,
               num_kv_heads=2, head_dim=64, mlp_dim=1536, max_seq_len=256)

  @classmethod
  def gemma_2b(cls, vocab_size: int = GEMMA_VOCAB_SIZE) -> 'DecoderConfig':
    """Gemma 2B (Gemma Team 2024, table 1): multi-query attention."""
    return _gemma(vocab_size, num_layers=18, embed_dim=2048, num_heads=8, num_kv_heads=1,
                  mlp_dim=16_384)

  @classmethod
  def gemma_7b(cls, vocab_size: int = GEMMA_VOCAB_SIZE) -> 'DecoderConfig':
    """Gemma 7B: multi-head attention."""
    return _gemma(vocab_size, num_layers=28, embed_dim=3072, num_heads=16, num_kv_heads=16,
                  mlp_dim=24_576)

  @classmethod
  def gemma2_2b(cls, vocab_size: int = GEMMA_VOCAB_SIZE) -> 'DecoderConfig':
    """Gemma 2 2B (Gemma Team 2024b, table 1)."""
    return _gemma2(vocab_size, num_layers=26, embed_dim=2304, num_heads=8, num_kv_heads=4,
                   head_dim=256, mlp_dim=9216, query_pre_attn_scalar=256)

  @classmethod
  def gemma2_9b(cls, vocab_size: int = GEMMA_VOCAB_SIZE) -> 'DecoderConfig':
    """Gemma 2 9B."""
    return _gemma2(vocab_size, num_layers=42, embed_dim=3584, num_heads=16, num_kv_heads=8,
                   head_dim=256, mlp_dim=14_336, query_pre_attn_scalar=256)

  @classmethod
  def gemma2_27b(cls, vocab_size: int = GEMMA_VOCAB_SIZE) -> 'DecoderConfig':
    """Gemma 2 27B: queries scaled by embed_dim / num_heads = 144, not head_dim = 128."""
    return _gemma2(vocab_size, num_layers=46, embed_dim=4608, num_heads=32, num_kv_heads=16,
                   head_dim=128, mlp_dim=36_864, query_pre_attn_scalar=144)


def _gemma(vocab_size: int, **sizes) -> DecoderConfig:
  return DecoderConfig(vocab_size=vocab_size, head_dim=sizes.pop('head_dim', 256),
                       max_seq_len=8192, eos_token_id=GEMMA_EOS_ID, **sizes)


def _gemma2(vocab_size: int, *, num_layers: int, **sizes) -> DecoderConfig:
  return _gemma(vocab_size, num_layers=num_layers, logit_softcap=30.0,
                attn_logit_softcap=50.0, sliding_window=4096,
                layer_types=(SLIDING_ATTENTION, FULL_ATTENTION) * (num_layers // 2),
                use_post_attn_norm=True, use_post_ffw_norm=True, **sizes)

