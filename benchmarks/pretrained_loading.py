"""Loads a Gemma-2-2B-shaped checkpoint and times prefill and decoding on this machine.

    python benchmarks/pretrained_loading.py [--prompt-len 32] [--decode-steps 8]

Writes a checkpoint of the published Gemma 2 2B shape (random bfloat16 weights, the real
Hugging Face layout: config.json, shards of at most 2 GiB and model.safetensors.index.json,
about 5.2 GB) into a temporary directory, which it deletes at the end. A fresh process
then loads it with `chorus.models.pretrained.load_params` (bfloat16 parameters and
compute) and reports the load time, its peak resident memory against the checkpoint's
size, and prefill and decode tokens/s at batch 1 and 8 through the decoder's KV-cached
prefill and step (compilation excluded). The page cache is warm: the file was just
written. Prints one JSON object.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import safetensors.numpy

from chorus import models
from chorus.models import hf_layout
from chorus.models import pretrained

_SHARD_BYTES = 2 * 2**30


def write_checkpoint(directory: str, config: models.DecoderConfig, seed: int = 0) -> int:
  """Writes random bfloat16 weights of `config` in shards; returns the bytes of tensors."""
  rng = np.random.default_rng(seed)
  specs = hf_layout.tensor_layout(config)
  shards, current, size, total = [], {}, 0, 0
  names = {}

  def flush():
    path = os.path.join(directory, f'shard-{len(shards):05d}.safetensors')
    safetensors.numpy.save_file(current, path, metadata={'format': 'pt'})
    shards.append(path)
    names.update({name: os.path.basename(path) for name in current})

  for spec in specs:
    nbytes = int(np.prod(spec.shape)) * 2
    if current and size + nbytes > _SHARD_BYTES:
      flush()
      current, size = {}, 0
    current[spec.name] = (rng.standard_normal(spec.shape, np.float32) * 0.02).astype(
        ml_dtypes.bfloat16)
    size += nbytes
    total += nbytes
  flush()
  hf_config = hf_layout.hf_config_from_decoder(config, bos_token_id=2, pad_token_id=0,
                                               torch_dtype='bfloat16')
  with open(os.path.join(directory, pretrained.CONFIG_FILE), 'w', encoding='utf-8') as file:
    json.dump(hf_config, file)
  with open(os.path.join(directory, pretrained.INDEX_FILE), 'w', encoding='utf-8') as file:
    json.dump({'metadata': {'total_size': total}, 'weight_map': names}, file)
  return total


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
  with open('/proc/self/statm', encoding='utf-8') as file:
    return int(file.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def measure(directory: str, prompt_len: int, decode_steps: int) -> dict:
  """Loads the checkpoint in this (fresh) process and times it; see the module docstring."""
  import jax  # pylint: disable=g-import-not-at-top  (kept out of the writing process)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from chorus.inference_server import sampler  # pylint: disable=g-import-not-at-top

  jnp.zeros(1).block_until_ready()  # JAX's own memory before the weights.
  baseline = _current_rss_bytes()
  config = pretrained.read_config(directory, dtype='bfloat16', param_dtype='bfloat16')
  start = time.perf_counter()
  params = pretrained.load_params(directory, config)
  jax.block_until_ready(params)
  result = dict(load_seconds=time.perf_counter() - start, baseline_rss_bytes=baseline,
                peak_rss_after_load_bytes=_peak_rss_bytes(),
                rss_after_load_bytes=_current_rss_bytes(),
                param_bytes=sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params)))
  logits_fn = sampler.decoder_logits(config)
  prefill = jax.jit(logits_fn.prefill, static_argnums=3)
  step = jax.jit(logits_fn.step)
  for batch in (1, 8):
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (batch, prompt_len)),
                         jnp.int32)
    mask = jnp.ones((batch, prompt_len), bool)
    cache_len = prompt_len + decode_steps + 1
    jax.block_until_ready(prefill(params, tokens, mask, cache_len))  # Compiles.
    start = time.perf_counter()
    logits, state = jax.block_until_ready(prefill(params, tokens, mask, cache_len))
    prefill_seconds = time.perf_counter() - start
    next_tokens = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)
    one = jnp.ones((batch, 1), bool)
    jax.block_until_ready(step(params, state, next_tokens, one, prompt_len))  # Compiles.
    start = time.perf_counter()
    for index in range(decode_steps):
      logits, state = step(params, state, next_tokens, one, prompt_len + index)
      next_tokens = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)
    jax.block_until_ready(next_tokens)
    decode_seconds = time.perf_counter() - start
    result[f'batch_{batch}'] = dict(
        prefill_tokens_per_second=batch * prompt_len / prefill_seconds,
        decode_tokens_per_second=batch * decode_steps / decode_seconds,
        prefill_seconds=prefill_seconds, decode_seconds_per_step=decode_seconds / decode_steps)
  result['peak_rss_bytes'] = _peak_rss_bytes()
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--prompt-len', type=int, default=32)
  parser.add_argument('--decode-steps', type=int, default=8)
  parser.add_argument('--measure', metavar='DIR', help=argparse.SUPPRESS)  # The child's part.
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.measure, args.prompt_len, args.decode_steps)))
    return 0
  with tempfile.TemporaryDirectory(prefix='gemma2-2b-') as directory:
    start = time.perf_counter()
    checkpoint_bytes = write_checkpoint(directory, models.DecoderConfig.gemma2_2b())
    write_seconds = time.perf_counter() - start
    child = subprocess.run(
        [sys.executable, __file__, '--measure', directory, '--prompt-len', str(args.prompt_len),
         '--decode-steps', str(args.decode_steps)], capture_output=True, text=True, check=True)
  result = json.loads(child.stdout.strip().splitlines()[-1])
  result.update(checkpoint_bytes=checkpoint_bytes, write_seconds=write_seconds,
                peak_rss_over_checkpoint=result['peak_rss_after_load_bytes'] / checkpoint_bytes,
                prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                load_average=os.getloadavg(), cpus=os.cpu_count())
  print(json.dumps(result, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
