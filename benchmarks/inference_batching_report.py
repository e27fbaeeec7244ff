"""The inference benchmark's report: markdown sections of RESULTS.md and their PNG plots.

Imported by the parent process only (matplotlib loads lazily, in the plotting functions).
"""
import os
import platform
from typing import Any

from chorus.benchmarks import inference_batching_measure as measure_lib
from chorus.benchmarks import inference_batching_processes as processes
from chorus.benchmarks import inference_batching_roles as roles

SCALING_TITLE = 'Inference batching'
MIXTURE_TITLE = 'Nash-MD mixture sampling: KV caches against a no-cache re-run'
UNBATCHED = 'unbatched'


def _load_line(info: dict[str, Any]) -> str:
  before, after = info['load_before'], info['load_after']
  return (f'1-minute load average {before[0]:.2f} before and {after[0]:.2f} after '
          f'(5-minute: {before[1]:.2f} / {after[1]:.2f}) on {os.cpu_count()} cores')


def scaling_section(command: str, info: dict[str, Any], settings: roles.Settings,
                    servers: list[roles.ServerSettings],
                    measurements: list[measure_lib.Measurement], plot: str | None) -> str:
  """The "Inference batching" section: one table row per set-up and number of actors."""
  config = info['config']
  lines = [
      f'## {SCALING_TITLE}',
      '',
      'Generated tokens per second, and per CPU-second, of N actor processes in three kinds '
      'of set-up on the same cores. "Unbatched": N processes that each hold the model and '
      'call the jitted sampler (`make_sampler`) on their own requests. "Dynamic": one '
      'inference server process (real gRPC on 127.0.0.1) batching requests with a size cap '
      'and a deadline, each batch decoding until its longest row is done. "Continuous": the '
      'same server with the decode-step scheduler (`inference.scheduler=\'continuous\'`): '
      f'{settings.max_batch_size} slots; between decode calls finished rows leave and '
      'waiting rows are prefilled into free slots. Served actors loop over '
      '`InferenceClient.generate`.',
      '',
      f'- Command: `{command}`',
      f'- Date: {info["date"]}',
      f'- Machine: {info["machine"]}; {_load_line(info)}: the machine is shared, see '
      '"machine busy"',
      f'- Software: Python {platform.python_version()}, jax {info["jax_version"]} (CPU backend)',
      f'- Model: `DecoderConfig.{settings.model}`, {info["num_params"]:,} parameters '
      f'({config["num_layers"]} layers, width {config["embed_dim"]}, {config["num_heads"]} '
      f'query / {config["num_kv_heads"]} KV heads, vocab {config["vocab_size"]}), random '
      f'parameters (seed {settings.seed}), {config["dtype"]}',
      f'- Requests: prompts of BOS + {settings.min_prompt_tokens - 1}-'
      f'{settings.max_prompt_tokens - 1} random tokens, left-padded to '
      f'{settings.max_prompt_len}; mixed lengths: each request\'s max_new_tokens uniform in '
      f'{settings.min_new_tokens}-{settings.max_new_tokens} (random weights rarely sample '
      f'EOS); temperature {settings.temperature}; {settings.prompts_per_request} prompt(s) per '
      'request (per unbatched call)',
      f'- Servers: max_batch_size (slots) {settings.max_batch_size}; '
      + '; '.join(server.label for server in servers)
      + '; every batch and insert bucket compiled in warm-up; XLA '
      + ('multi-threaded (its default: one Eigen thread per core)' if settings.server_multi_thread
         else f'single-threaded (one core, and `{processes.SINGLE_THREAD_XLA_FLAGS}`)'),
      f'- Actors (all set-ups): `XLA_FLAGS={processes.SINGLE_THREAD_XLA_FLAGS}`, '
      + ', '.join(f'{k}={v}' for k, v in processes.SINGLE_THREAD_ENV.items() if 'THREADS' in k)
      + '; processes started with multiprocessing "spawn"',
      f'- Window: {settings.seconds:g} s per measurement, opened once every process had '
      'loaded the model, compiled and made one warm-up call; the request running when the '
      'window closes is credited pro rata. Set-ups alternate at each N; servers not under '
      'test stay up, idle.',
      '',
      '| Actors | Set-up | Tokens/s | Tokens per CPU-s | vs unbatched (per CPU-s) | Fill '
      '| p50 latency (ms) | p95 latency (ms) | Requests | Compilations in window '
      '| CPU used / machine busy | Server share of CPU | RSS (GiB) |',
      '|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  unbatched = {m.num_actors: m for m in measurements if m.setup == UNBATCHED}
  for m in sorted(measurements, key=lambda m: (m.num_actors, m.setup != UNBATCHED, m.setup)):
    base = unbatched.get(m.num_actors)
    versus = (f'{m.tokens_per_cpu_second / base.tokens_per_cpu_second:.2f}x'
              if base and m is not base else '')
    fill = f'{m.fill:.0%}' if m.fill is not None else ''
    compilations = '' if m.server_compilations is None else str(m.server_compilations)
    server_share = '' if m.server_share is None else f'{m.server_share:.0%}'
    lines.append(
        f'| {m.num_actors} | {m.setup} | {m.tokens_per_second:.0f} '
        f'| {m.tokens_per_cpu_second:.0f} | {versus} | {fill} | {m.p50_latency_ms:.0f} '
        f'| {m.p95_latency_ms:.0f} | {m.requests} | {compilations} '
        f'| {m.cpu_share:.0%} / {m.machine_busy:.0%} | {server_share} '
        f'| {m.rss_bytes / 2**30:.1f} |')
  lines += [
      '',
      'Latency is per request (served: the `generate` round trip; unbatched: one sampler '
      'call). Fill = generated tokens / (decoder rows x decode steps the server computed, '
      'padding rows and idle slots included), from the GetStatus counters\' increase in the '
      'window: the share of the batch doing useful work step by step. "CPU used" is the '
      'user+system CPU time of the set-up\'s processes (server included) over window x cores; '
      '"machine busy" is the same for every process on the machine; "server share" is the '
      'server process\'s part of the set-up\'s CPU time (the rest is the actors). Tokens per '
      'CPU-s = '
      'tokens/s / CPU-seconds used per second: the figure least moved by other programs '
      'sharing the machine. RSS is summed over the set-up\'s processes, sampled mid-window.',
      '',
  ]
  if plot:
    lines += [f'![tokens per CPU-second and fill against actors]({plot})', '']
  return '\n'.join(lines)


def mixture_section(command: str, info: dict[str, Any], rows: list[dict],
                    mixture_coef: float, plot: str | None) -> str:
  """The Nash-MD section: cached against no-cache seconds per call of one batch."""
  lines = [
      f'## {MIXTURE_TITLE}',
      '',
      'Sampling B completions from the token-level geometric mixture of a policy and a '
      f'reference (b = {mixture_coef:g}), as Nash-MD\'s opponent needs. "Cached": the '
      'server\'s mixture sampler (`make_mixture_sampler`): one KV cache per model, one '
      'decoder step per model and token. "No cache": for each new token both models '
      're-run the whole prefix, as TRL\'s Nash-MD mixture does; each prefix is padded to a '
      'multiple of 16 tokens so that XLA compiles a few shapes (compiled before timing), '
      'which adds about 8 tokens to each re-run. Same keys, same mixture: "same rows" counts '
      'the rows whose tokens both drew identically. Random weights; both models the same '
      'size. Times are of one call for the whole batch, in one process (XLA\'s default '
      'threads).',
      '',
      f'- Command: `{command}`',
      f'- Date: {info["date"]}; machine: {info["machine"]}; {_load_line(info)}',
      '',
      '| Model | Batch | New tokens | Cached (s, wall / CPU) | No cache (s, wall / CPU) '
      '| Speed-up (wall) | Speed-up (CPU) | Same rows |',
      '|:---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for row in rows:
    lines.append(
        f'| {row["model"]} | {row["batch_size"]} | {row["new_tokens"]} '
        f'| {row["cached_wall_s"]:.3f} / {row["cached_cpu_s"]:.3f} '
        f'| {row["no_cache_wall_s"]:.2f} / {row["no_cache_cpu_s"]:.2f} '
        f'| {row["no_cache_wall_s"] / row["cached_wall_s"]:.1f}x '
        f'| {row["no_cache_cpu_s"] / row["cached_cpu_s"]:.1f}x '
        f'| {row["same_rows"]} / {row["batch_size"]} |')
  lines.append('')
  if plot:
    lines += [f'![cached and no-cache mixture sampling against new tokens]({plot})', '']
  return '\n'.join(lines)


def plot_scaling(measurements: list[measure_lib.Measurement], path: str):
  """Tokens per CPU-second, tokens/s and fill against actors, one line per set-up."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  setups = sorted({m.setup for m in measurements}, key=lambda s: (s != UNBATCHED, s))
  for setup in setups:
    points = sorted((m for m in measurements if m.setup == setup), key=lambda m: m.num_actors)
    actors = [m.num_actors for m in points]
    axes[0].plot(actors, [m.tokens_per_cpu_second for m in points], 'o-', label=setup)
    axes[1].plot(actors, [m.tokens_per_second for m in points], 'o-', label=setup)
    if setup != UNBATCHED:
      axes[2].plot(actors, [100 * m.fill for m in points], 'o-', label=setup)
  for axis, label in zip(axes, ('tokens per CPU-second', 'tokens per second (wall)',
                                'fill (% of rows doing useful work)')):
    axis.set_xscale('log', base=2)
    axis.set_xlabel('actor processes')
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def plot_mixture(rows: list[dict], path: str):
  """CPU-seconds per call against new tokens, cached and not, one line pair per model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axis = plt.subplots(figsize=(6, 4.2))
  for model in sorted({row['model'] for row in rows}):
    points = [row for row in rows if row['model'] == model]
    tokens = [row['new_tokens'] for row in points]
    axis.plot(tokens, [row['cached_cpu_s'] for row in points], 'o-', label=f'{model}, cached')
    axis.plot(tokens, [row['no_cache_cpu_s'] for row in points], 's--',
              label=f'{model}, no cache')
  axis.set_yscale('log')
  axis.set_xlabel('new tokens per row')
  axis.set_ylabel('CPU-seconds per batch')
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
