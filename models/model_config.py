"""The experiment's policy network: a decoder from scratch, or a pretrained checkpoint."""
import dataclasses
import os

import jax

from chorus import core
from chorus.models import decoder as decoder_lib
from chorus.models import decoder_config as config_lib
from chorus.models import pretrained as pretrained_lib
from chorus.models import text_tokenizers
from chorus.models import tokenizer as char_tokenizer
from chorus.models.decoder_config import DecoderConfig
from chorus.models.decoder_config import LoraConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The policy network; `decoder_config`, `tokenizer` and `initial_params` resolve it.

  Attributes:
    pretrained: a Hugging Face-layout checkpoint directory (see `load_pretrained`): its
      config.json is the architecture, its weights the starting point (the value head
      starts fresh) and its tokenizer the one tasks encode with. '': `decoder` from
      random weights, and each task's own tokenizer. Stored as an absolute path.
    decoder: the architecture when `pretrained` is ''.
    dtype: compute and KV-cache dtype of a pretrained model ('float32', 'bfloat16').
    param_dtype: dtype a pretrained model's weights are cast to as they load (float32
      to train them).
    lora: low-rank adapters (rank 0: none): RL then trains only the adapters over the
      frozen warm-started weights, and pushes and checkpoints only them (models/lora.py).
      The supervised warm start trains the weights without adapters.
  """
  pretrained: str = ''
  decoder: DecoderConfig = DecoderConfig.tiny(char_tokenizer.CharTokenizer().vocab_size)
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  lora: LoraConfig = LoraConfig()

  def __post_init__(self):
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in config_lib.SUPPORTED_DTYPES:
        raise ValueError(f'model.{name} must be one of {config_lib.SUPPORTED_DTYPES}; got '
                         f'{getattr(self, name)!r}.')
    if self.decoder.lora.rank:
      raise ValueError('Set adapters with model.lora, not model.decoder.lora.')
    if self.pretrained:
      # Every node, wherever it starts, reads the same directory.
      object.__setattr__(self, 'pretrained', os.path.abspath(self.pretrained))

  def decoder_config(self) -> DecoderConfig:
    """The policy's architecture: `decoder`, or the checkpoint's config.json; with `lora`."""
    config = self.base_decoder_config()
    return dataclasses.replace(config, lora=self.lora) if self.lora.rank else config

  def base_decoder_config(self) -> DecoderConfig:
    """The architecture without adapters: what the warm start trains and the reference is."""
    if not self.pretrained:
      return self.decoder
    return pretrained_lib.read_config(self.pretrained, dtype=self.dtype,
                                      param_dtype=self.param_dtype)

  def tokenizer(self) -> core.Tokenizer | None:
    """The checkpoint's tokenizer (checked against its config); None: the task's own."""
    if not self.pretrained:
      return None
    tokenizer = text_tokenizers.load_tokenizer(self.pretrained)
    pretrained_lib.check_tokenizer(self.decoder_config(), tokenizer, self.pretrained)
    return tokenizer

  def initial_params(self, rng: jax.Array) -> decoder_lib.Params:
    """Random parameters of `decoder`, or the checkpoint's with a value head from `rng`;
    without adapters (`lora.add_adapters` adds them where RL starts)."""
    if not self.pretrained:
      return decoder_lib.init_params(self.decoder, rng)
    return pretrained_lib.load_params(self.pretrained, self.base_decoder_config(), rng)
