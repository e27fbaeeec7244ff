"""Hugging Face-layout checkpoints in and out: config.json, safetensors, tokenizer files.

Loading streams the weights: every tensor is read, converted to the decoder's layout and
dtype on its own, with its file opened only meanwhile (safetensors maps a file into
memory, and mapped pages count as resident until it is closed), so peak memory is about
one copy of the weights. Names and shapes are checked from the files' headers before any
weight is read. The value head has no place in the format: loading starts it fresh, an
export leaves it out.
"""
import json
import os
import shutil
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from chorus import core
from chorus.models import decoder
from chorus.models import hf_layout
from chorus.models import text_tokenizers
from chorus.models.decoder_config import DecoderConfig

CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# transformers reads only safetensors files whose metadata names a framework.
_METADATA = {'format': 'pt'}


class Pretrained(NamedTuple):
  """A loaded checkpoint: architecture, parameters (value head fresh) and tokenizer."""
  config: DecoderConfig
  params: decoder.Params
  tokenizer: core.Tokenizer


def read_config(directory: str, *, dtype: str = 'float32',
                param_dtype: str = 'float32') -> DecoderConfig:
  """The DecoderConfig of a checkpoint directory's config.json."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; a Hugging Face-layout checkpoint '
                            'directory holds config.json, its safetensors and its tokenizer.')
  with open(path, encoding='utf-8') as file:
    return hf_layout.decoder_config_from_hf(json.load(file), dtype=dtype,
                                            param_dtype=param_dtype)


def _tensor_files(directory: str) -> dict[str, str]:
  """Each tensor's name -> the safetensors file holding it."""
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path, encoding='utf-8') as file:
      weight_map = json.load(file)['weight_map']
    return {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
  path = os.path.join(directory, SINGLE_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (sharded '
                            'safetensors); write the weights with save_pretrained.')
  with safetensors.safe_open(path, framework='numpy') as file:
    return {name: path for name in file.keys()}


def _shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
  """Each tensor's shape, read from the files' headers."""
  shapes = {}
  for path in sorted(set(files.values())):
    with safetensors.safe_open(path, framework='numpy') as file:
      for name in file.keys():
        if files.get(name) == path:
          shapes[name] = tuple(file.get_slice(name).get_shape())
  return shapes


def _check_tensors(specs: list[hf_layout.TensorSpec], shapes: dict[str, tuple[int, ...]],
                   directory: str):
  """Raises ValueError naming every missing, unexpected and mis-shaped tensor."""
  expected = {spec.name: spec.shape for spec in specs}
  problems = []
  missing = [name for name in expected if name not in shapes]
  if missing:
    problems.append(f'missing tensors {missing}')
  unexpected = sorted(set(shapes) - set(expected) - {hf_layout.TIED_OUTPUT_NAME})
  if unexpected:
    problems.append(f'unexpected tensors {unexpected}')
  problems += [f'tensor {name!r} has shape {list(shapes[name])}, config.json implies '
               f'{list(shape)}' for name, shape in expected.items()
               if name in shapes and shapes[name] != shape]
  if problems:
    raise ValueError(f'The checkpoint in {directory} does not match its config.json: '
                     + '; '.join(problems) + '.')


def _set(tree: dict, path: tuple[str, ...], value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def fresh_value_head(config: DecoderConfig, rng: jax.Array) -> decoder.Params:
  """Parameters of a new value head, initialised as the decoder initialises its own."""
  return nn.Dense(1, param_dtype=jnp.dtype(config.param_dtype)).init(
      rng, jnp.zeros((1, config.embed_dim), jnp.float32))['params']


def load_params(directory: str, config: DecoderConfig,
                rng: jax.Array | None = None) -> decoder.Params:
  """The decoder parameters of a checkpoint, in `config.param_dtype`, value head fresh.

  `rng` initialises the value head (default: PRNGKey(0)).

  Raises:
    FileNotFoundError: no safetensors in `directory`.
    ValueError: a tensor is missing, unexpected or mis-shaped (all are named).
  """
  specs = hf_layout.tensor_layout(config)
  files = _tensor_files(directory)
  _check_tensors(specs, _shapes(files), directory)
  dtype = jnp.dtype(config.param_dtype)
  params = {'value_head': fresh_value_head(
      config, jax.random.PRNGKey(0) if rng is None else rng)}
  for spec in specs:
    with safetensors.safe_open(files[spec.name], framework='flax') as file:
      array = file.get_tensor(spec.name)
    _set(params, spec.path, spec.to_flax(array).astype(dtype))
    del array  # Keeps only the converted copy.
  return params


def load_pretrained(directory: str, *, dtype: str = 'float32', param_dtype: str = 'float32',
                    rng: jax.Array | None = None) -> Pretrained:
  """A Hugging Face-layout Gemma or Gemma 2 checkpoint directory, ready to run.

  Args:
    directory: holds config.json, model.safetensors (or shards and
      model.safetensors.index.json) and tokenizer.model or tokenizer.json.
    dtype: compute and KV-cache dtype of the decoder.
    param_dtype: dtype the weights are cast to as they are read.
    rng: initialises the value head, which checkpoints do not have (default:
      PRNGKey(0)).

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: config.json is not a supported architecture, the tensors do not match
      it, or the tokenizer does not fit the model.
  """
  config = read_config(directory, dtype=dtype, param_dtype=param_dtype)
  tokenizer = text_tokenizers.load_tokenizer(directory)
  check_tokenizer(config, tokenizer, directory)
  return Pretrained(config, load_params(directory, config, rng), tokenizer)


def check_tokenizer(config: DecoderConfig, tokenizer: core.Tokenizer, directory: str):
  """Raises ValueError if `tokenizer` cannot be the tokenizer of a model of `config`."""
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f'The tokenizer in {directory} has {tokenizer.vocab_size} ids but the '
                     f'model only {config.vocab_size}; they are not one checkpoint.')
  if tokenizer.eos_id != config.eos_token_id:
    raise ValueError(f'The tokenizer in {directory} ends text with id {tokenizer.eos_id} but '
                     f'config.json says eos_token_id={config.eos_token_id}.')


def save_pretrained(directory: str, config: DecoderConfig, params: decoder.Params, *,
                    bos_token_id: int, pad_token_id: int, tokenizer_files: tuple[str, ...] = (),
                    max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes a checkpoint in the layout `load_pretrained` and transformers read.

  Tensors are written in the parameters' dtype, in shards of at most `max_shard_bytes`
  (one model.safetensors when they fit, else shards and model.safetensors.index.json);
  the value head is left out. `tokenizer_files` are copied beside them.

  Returns:
    The paths written.
  """
  os.makedirs(directory, exist_ok=True)
  specs = hf_layout.tensor_layout(config)
  dtype = np.asarray(params['embedder']['embedding']).dtype
  hf_config = hf_layout.hf_config_from_decoder(
      config, bos_token_id=bos_token_id, pad_token_id=pad_token_id, torch_dtype=dtype.name)
  shards, sizes = [[]], [0]
  for spec in specs:
    size = int(np.prod(spec.shape)) * dtype.itemsize
    if shards[-1] and sizes[-1] + size > max_shard_bytes:
      shards.append([])
      sizes.append(0)
    shards[-1].append(spec)
    sizes[-1] += size
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  written = [_write_json(os.path.join(directory, CONFIG_FILE), hf_config)]
  for name, shard in zip(names, shards):
    tensors = {}
    for spec in shard:
      leaf = params
      for key in spec.path:
        leaf = leaf[key]
      tensors[spec.name] = np.ascontiguousarray(jax.device_get(spec.to_checkpoint(
          jnp.asarray(leaf, dtype))))
    path = os.path.join(directory, name)
    safetensors.numpy.save_file(tensors, path, metadata=_METADATA)
    written.append(path)
  if len(shards) > 1:
    weight_map = {spec.name: name for name, shard in zip(names, shards) for spec in shard}
    written.append(_write_json(os.path.join(directory, INDEX_FILE), {
        'metadata': {'total_size': sum(sizes)}, 'weight_map': weight_map}))
  for path in tokenizer_files:
    written.append(shutil.copy(path, os.path.join(directory, os.path.basename(path))))
  return written


def _write_json(path: str, data: dict) -> str:
  with open(path, 'w', encoding='utf-8') as file:
    json.dump(data, file, indent=2)
  return path
