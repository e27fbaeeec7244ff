"""Low-rank adapters: splitting them from the frozen weights, adding and merging them.

A decoder whose config has `lora.rank > 0` carries `lora_a` and `lora_b` beside each
target kernel (models/decoder.py applies them on the fly). Learners train only those
(`split` / `combine`), checkpoints and pushes carry only those, and `merge` folds them
into the kernels, giving the same function with the adapter-free config: what a server
serves after a push and what `chorus export` writes.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from chorus.models import decoder as decoder_lib
from chorus.models.decoder_config import DecoderConfig
from chorus.models.decoder_config import LoraConfig

ADAPTER_NAMES = ('lora_a', 'lora_b')


def _is_adapter(path) -> bool:
  return bool(path) and getattr(path[-1], 'key', None) in ADAPTER_NAMES


def has_adapters(params) -> bool:
  """Whether a parameter tree holds LoRA adapters."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  return any(_is_adapter(path) for path, _ in leaves)


def _filtered_path(tree: dict, keep, prefix: tuple) -> dict:
  """The sub-tree of the leaves whose key path `keep` accepts (empty dicts dropped)."""
  kept = {}
  for name, value in tree.items():
    path = prefix + (name,)
    if isinstance(value, dict):
      sub = _filtered_path(value, keep, path)
      if sub:
        kept[name] = sub
    elif keep(path):
      kept[name] = value
  return kept


def split(params) -> tuple[dict, dict]:
  """(frozen weights, adapters) of a parameter tree with adapters."""
  adapters = _filtered_path(params, lambda path: path[-1] in ADAPTER_NAMES, ())
  frozen = _filtered_path(params, lambda path: path[-1] not in ADAPTER_NAMES, ())
  return frozen, adapters


def combine(frozen: dict, adapters: dict) -> dict:
  """The full parameter tree of `split`'s two halves."""
  combined = dict(frozen)
  for name, value in adapters.items():
    combined[name] = combine(frozen.get(name, {}), value) if isinstance(value, dict) else value
  return combined


def add_adapters(params, config: DecoderConfig, rng: jax.Array) -> dict:
  """`params` of the adapter-free architecture, with fresh adapters of `config.lora`.

  The adapters start as the decoder initialises them (B = 0), so the result computes the
  same function as `params`.
  """
  if not config.lora.rank:
    raise ValueError('add_adapters needs a config with lora.rank > 0.')
  fresh = decoder_lib.init_params(config, rng)
  _, adapters = split(fresh)
  return combine(params, jax.tree_util.tree_map(
      lambda adapter: adapter.astype(jnp.dtype(config.param_dtype)), adapters))


def without_lora(config: DecoderConfig) -> DecoderConfig:
  """The same architecture without adapters."""
  return dataclasses.replace(config, lora=LoraConfig())


def merge(params, config: DecoderConfig) -> dict:
  """Folds every adapter into its kernel: W + scale * (A @ B).reshape(W.shape).

  Returns the parameters of `without_lora(config)`, the same function.
  """
  frozen, adapters = split(params)
  scale = config.lora.scale

  def fold(frozen_tree, adapter_tree):
    merged = {}
    for name, value in frozen_tree.items():
      if isinstance(value, dict):
        adapter = adapter_tree.get(name, {})
        if 'lora_a' in adapter:
          kernel = value['kernel']
          delta = (adapter['lora_a'] @ adapter['lora_b']).reshape(kernel.shape)
          merged[name] = {**value, 'kernel': (kernel + scale * delta).astype(kernel.dtype)}
        else:
          merged[name] = fold(value, adapter)
      else:
        merged[name] = value
    return merged

  return fold(frozen, adapters)


def num_parameters(tree) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))
