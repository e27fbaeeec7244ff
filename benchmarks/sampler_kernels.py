"""Sampler throughput (plain, geometric mixture, CFG) and the bf16 behaviour/learner gap.

Runs the inference server's jitted samplers directly (no gRPC, no batcher) on whatever
JAX device is there, for float32 and bfloat16 compute:
- generated tokens per second of one batch, for plain sampling, Nash-MD's geometric
  mixture (two models, two KV caches) and classifier-free guidance (one model, two
  prompts, two KV caches);
- how far the sampler's log-probs (what actors record as log mu) are from the learner's
  float32 `forward_completions` log-probs of the same tokens at the same parameters:
  mean and max |log mu - log pi| and the share of tokens with |log rho| > 0.1 (what
  V-trace's importance weights then see with no policy lag at all).

It imports only models/ and inference_server/sampler.py, so it runs where JAX and Flax
are installed without TensorFlow or Reverb (the accelerator machine's own image), with
the repository importable as `chorus`:

    .venv/bin/python benchmarks/sampler_kernels.py --model tiny --new-tokens 32
    mkdir -p /tmp/p && ln -s $PWD /tmp/p/chorus && PYTHONPATH=/tmp/p \
        python3 benchmarks/sampler_kernels.py --output results.json
"""
import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from chorus import models
from chorus.inference_server import sampler as sampler_lib


def _time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Compile.
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / repeats


def measure(config: models.DecoderConfig, batch_size: int, prompt_len: int, new_tokens: int,
            repeats: int) -> dict:
  """Tokens/s of the three samplers and the sampler-vs-learner log-prob gap."""
  rng = np.random.default_rng(0)
  params = models.init_params(config, jax.random.PRNGKey(0))
  # A second model (the reference of the mixture): perturbed weights.
  other = jax.tree_util.tree_map(lambda x: x * 1.01, params)
  prompts = [list(rng.integers(3, config.vocab_size, rng.integers(4, prompt_len + 1)))
             for _ in range(batch_size)]
  prompt_tokens, prompt_mask = models.left_pad_prompts(prompts, prompt_len)
  unconditional = models.left_pad_prompts([[models.BOS_ID, 3]] * batch_size, prompt_len)
  temperature = np.ones(batch_size, np.float32)
  max_new = np.full(batch_size, new_tokens, np.int32)
  key = jax.random.PRNGKey(1)
  plain = sampler_lib.make_sampler(config, prompt_len, new_tokens)
  mixture = sampler_lib.make_mixture_sampler(config, config, prompt_len, new_tokens)
  guided = sampler_lib.make_guided_sampler(config, prompt_len, new_tokens)
  calls = {
      'plain': lambda: plain(params, prompt_tokens, prompt_mask, temperature, max_new, key),
      'mixture': lambda: mixture(params, other, np.full(batch_size, 0.25, np.float32),
                                 prompt_tokens, prompt_mask, temperature, max_new, key),
      'guided': lambda: guided(params, np.full(batch_size, 3.0, np.float32), prompt_tokens,
                               prompt_mask, *unconditional, temperature, max_new, key),
  }
  result = {}
  for name, call in calls.items():
    seconds = _time(call, repeats)
    output = jax.device_get(call())
    result[f'{name}_tokens_per_second'] = float(output.lengths.sum() / seconds)
  # The learner's view: float32 forward pass of the same parameters on the sampled tokens.
  output = jax.device_get(calls['plain']())
  steps = np.arange(new_tokens)[None, :]
  mask = steps < output.lengths[:, None]
  learner_config = dataclasses.replace(config, dtype='float32')
  logits, _ = models.forward_completions(learner_config, params, prompt_tokens, prompt_mask,
                                         output.tokens, mask)
  learner = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                                           output.tokens[..., None], -1)[..., 0])
  gap = np.abs(output.logprobs - learner)[mask]
  result.update(mean_abs_log_rho=float(gap.mean()), max_abs_log_rho=float(gap.max()),
                share_abs_log_rho_over_0_1=float((gap > 0.1).mean()),
                tokens_compared=int(mask.sum()))
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', choices=('tiny', 'small'), default='small')
  parser.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 256])
  parser.add_argument('--prompt-len', type=int, default=16)
  parser.add_argument('--new-tokens', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--output', help='write the results as JSON here too')
  args = parser.parse_args(argv)
  base = getattr(models.DecoderConfig, args.model)(256)
  base = dataclasses.replace(base, max_seq_len=max(base.max_seq_len,
                                                   args.prompt_len + args.new_tokens))
  rows = []
  for dtype in ('float32', 'bfloat16'):
    for batch_size in args.batch_sizes:
      row = dict(device=str(jax.devices()[0]), model=args.model, dtype=dtype,
                 batch_size=batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
      row.update(measure(dataclasses.replace(base, dtype=dtype), batch_size, args.prompt_len,
                         args.new_tokens, args.repeats))
      print(json.dumps(row), flush=True)
      rows.append(row)
  if args.output:
    with open(args.output, 'w') as file:
      json.dump(rows, file, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
