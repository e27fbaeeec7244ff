"""Generated tokens per second: N actors behind one batching server vs N unbatched actors.

Two set-ups on the same cores, for each number of actors N:

  seed:      one inference server process (real gRPC on 127.0.0.1, `ServedModel` with
             dynamic batching) and N actor processes, each looping over
             `InferenceClient.generate` with one random short prompt per request.
  unbatched: N actor processes, each holding the same parameters and calling the
             jitted sampler itself with batch size 1.

Every process starts, loads the model, compiles and makes one warm-up call, then
reports ready; the measured window opens only when all of them are ready, so start-up
and compilation are excluded. Each actor counts the tokens it was sent back (EOS
included, the same count in both set-ups); the request still running when the window
closes is credited for the part of it that fell inside the window.

Usage (from the repository root):

  .venv/bin/python benchmarks/inference_batching.py [--num-actors 1 4 16 32]
      [--model small] [--seconds 20] [--max-wait-ms 5 20] [--output benchmarks/RESULTS.md]

One SEED server runs per --max-wait-ms value, so the cost of the batching deadline
shows next to its benefit.

Results go into the "Inference batching" section of the output markdown file (other
sections of that file are kept). Nothing here asserts a target: it measures.

This script runs the measurements and writes the report; the children's roles are in
inference_batching_roles, one measurement in inference_batching_measure, and starting,
stopping and metering processes in inference_batching_processes.
"""
import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
from typing import Any

# Nothing heavy is imported at module level: spawned children re-import this script, and
# must set their thread limits before JAX loads.
from chorus.benchmarks import inference_batching_measure as measure_lib
from chorus.benchmarks import inference_batching_processes as processes
from chorus.benchmarks import inference_batching_roles as roles

SECTION_TITLE = 'Inference batching'


def _machine() -> str:
  model = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpuinfo = f.read()
    fields = {key: re.search(rf'^{key}\s*:\s*(.+)$', cpuinfo, re.MULTILINE)
              for key in ('model name', 'cpu family', 'model')}
    if fields['model name']:
      model = fields['model name'].group(1).strip()
    if fields['cpu family'] and fields['model']:
      # Virtual machines often show only the brand ("AMD EPYC"); family/model date it.
      model += (f' (family {fields["cpu family"].group(1).strip()}, '
                f'model {fields["model"].group(1).strip()})')
  except OSError:
    pass
  memory = ''
  try:
    with open('/proc/meminfo') as f:
      match = re.search(r'^MemTotal:\s+(\d+) kB', f.read(), re.MULTILINE)
    memory = f', {int(match.group(1)) / 2**20:.0f} GiB RAM' if match else ''
  except OSError:
    pass
  return f'{model}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}'


def _seed_label(max_wait_ms: float) -> str:
  return f'SEED, max_wait_ms {max_wait_ms:g}'


def _format_section(command: str, info: dict[str, Any], settings: roles.Settings,
                    max_wait_ms: list[float],
                    measurements: list[measure_lib.Measurement]) -> str:
  config = info['config']
  lines = [
      f'## {SECTION_TITLE}',
      '',
      'Generated tokens per second of N actor processes in two set-ups on the same cores. '
      '"SEED": one inference server process (real gRPC on 127.0.0.1, `ServedModel` with '
      'dynamic batching) answers N actor processes that each loop over '
      '`InferenceClient.generate` with one prompt per request. "Unbatched": N processes '
      'that each hold the model and call the jitted sampler (`make_sampler`) with batch '
      'size 1. Same parameters, same prompt distribution; tokens counted as returned '
      '(EOS included) in both.',
      '',
      f'- Command: `{command}`',
      f'- Date: {info["date"]}',
      f'- Machine: {info["machine"]}; 1-minute load average before the run '
      f'{info["load_before"]:.2f} (the machine is shared, see "machine busy")',
      f'- Software: Python {platform.python_version()}, jax {info["jax_version"]} (CPU backend)',
      f'- Model: `DecoderConfig.{settings.model}`, {info["num_params"]:,} parameters '
      f'({config["num_layers"]} layers, width {config["embed_dim"]}, {config["num_heads"]} '
      f'query / {config["num_kv_heads"]} KV heads, vocab {config["vocab_size"]}), random '
      f'parameters (seed {settings.seed}), {config["dtype"]}',
      f'- Generation: prompts of BOS + {settings.min_prompt_tokens - 1}-'
      f'{settings.max_prompt_tokens - 1} random tokens, left-padded to '
      f'{settings.max_prompt_len}; max_new_tokens {settings.max_new_tokens}; temperature '
      f'{settings.temperature}; one prompt per request / call',
      f'- Server: max_batch_size {settings.max_batch_size}, max_wait_ms '
      f'{" and ".join(f"{w:g}" for w in max_wait_ms)} (one server each), every batch bucket '
      'compiled in warm-up; XLA '
      + ('multi-threaded (its default: one Eigen thread per core), as the one compute '
         'process on the machine' if settings.server_multi_thread
         else f'single-threaded (`{processes.SINGLE_THREAD_XLA_FLAGS}`)'),
      f'- Actors (both set-ups): `XLA_FLAGS={processes.SINGLE_THREAD_XLA_FLAGS}`, '
      + ', '.join(f'{k}={v}' for k, v in processes.SINGLE_THREAD_ENV.items()
                  if 'THREADS' in k)
      + '; processes started with multiprocessing "spawn"',
      f'- Window: {settings.seconds:g} s per measurement, opened once every process had '
      'loaded the model, compiled and made one warm-up call (start-up excluded); the request '
      'running when the window closes is credited pro rata. The set-ups alternate at each N; '
      'servers not under test stay up, idle.',
      '',
      '| Actors | Set-up | Tokens/s | vs unbatched | Tokens per CPU-s | vs unbatched '
      '| Mean latency (ms) | p95 latency (ms) | Server requests / batches | Mean batch size '
      '| CPU used / machine busy | RSS (GiB) |',
      '|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  unbatched = {m.num_actors: m for m in measurements if m.setup == 'unbatched'}
  for m in sorted(measurements, key=lambda m: (m.num_actors, m.setup != 'unbatched')):
    base = unbatched.get(m.num_actors)
    versus = lambda value, base_value: (f'{value / base_value:.2f}x'
                                        if base and m is not base else '')
    server = (f'{m.server_requests} / {m.server_batches}'
              if m.server_batches is not None else '')
    batch_size = f'{m.mean_batch_size:.1f}' if m.mean_batch_size is not None else ''
    lines.append(
        f'| {m.num_actors} | {m.setup} | {m.tokens_per_second:.0f} '
        f'| {versus(m.tokens_per_second, base and base.tokens_per_second)} '
        f'| {m.tokens_per_cpu_second:.0f} '
        f'| {versus(m.tokens_per_cpu_second, base and base.tokens_per_cpu_second)} '
        f'| {m.mean_latency_ms:.0f} | {m.p95_latency_ms:.0f} | {server} | {batch_size} '
        f'| {m.cpu_share:.0%} / {m.machine_busy:.0%} | {m.rss_bytes / 2**30:.1f} |')
  lines += [
      '',
      'Latency is per request (SEED: `generate` round trip; unbatched: one sampler call). '
      '"Server requests / batches" are the GetStatus counters\' increase during the window '
      '(requests counted on arrival, batches on completion); mean batch size is prompts per '
      'completed batch. "CPU used" is the user+system CPU time of the set-up\'s processes '
      '(server included) over window x cores; "machine busy" is the same for every process '
      'on the machine. Tokens per CPU-s = tokens/s / CPU-seconds used per second: the '
      'figure least moved by other programs sharing the machine. RSS is summed over the '
      'set-up\'s processes, sampled mid-window.',
      '',
  ]
  return '\n'.join(lines)


def _write_section(path: str, section: str):
  """Replaces this benchmark's section of `path`, keeping any other sections.

  A "### Reading" subsection (prose written by a person about a run) is kept at the end
  of the new section; its title names the run it was written for, so a rerun shows
  when the prose is older than the numbers.
  """
  text = ''
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if not text.strip():
    text = '# Benchmark results\n\n'
  pattern = re.compile(rf'^## {re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)',
                       re.MULTILINE | re.DOTALL)
  match = pattern.search(text)
  if match:
    reading = re.search(r'^### Reading.*', match.group(0), re.MULTILINE | re.DOTALL)
    if reading:
      section = section.rstrip('\n') + '\n\n' + reading.group(0).rstrip('\n') + '\n'
    text = text[:match.start()] + section + '\n' + text[match.end():]
  else:
    text = text.rstrip('\n') + '\n\n' + section + '\n'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text.rstrip('\n') + '\n')


def _print_measurement(m: measure_lib.Measurement):
  server = (f', server {m.server_requests} requests / {m.server_batches} batches'
            if m.server_batches is not None else '')
  print(f'  N={m.num_actors:<3d} {m.setup:22s} {m.tokens_per_second:7.0f} tokens/s, '
        f'{m.tokens_per_cpu_second:5.0f} per CPU-s, {m.requests} requests, mean latency '
        f'{m.mean_latency_ms:.0f} ms, CPU {m.cpu_share:.0%} (machine {m.machine_busy:.0%}), '
        f'RSS {m.rss_bytes / 2**30:.1f} GiB{server}', flush=True)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num-actors', type=int, nargs='+', default=[1, 4, 16, 32])
  parser.add_argument('--model', choices=['tiny', 'small'], default='small')
  parser.add_argument('--seconds', type=float, default=20.0,
                      help='length of each measured window')
  parser.add_argument('--setups', nargs='+', choices=['seed', 'unbatched'],
                      default=['seed', 'unbatched'])
  parser.add_argument('--max-new-tokens', type=int, default=32)
  parser.add_argument('--max-batch-size', type=int, default=32)
  parser.add_argument('--max-wait-ms', type=float, nargs='+', default=[5.0, 20.0],
                      help='one SEED server (and measurement) per value')
  parser.add_argument('--single-thread-server', action='store_true',
                      help='give the server the actors\' one-thread XLA flag too')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--ready-timeout-s', type=float, default=900.0)
  parser.add_argument('--output', default=os.path.join(os.path.dirname(__file__), 'RESULTS.md'),
                      help='markdown file whose "Inference batching" section is rewritten; '
                      '"-" prints only')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if min(args.num_actors) < 1:
    raise SystemExit(f'--num-actors must all be >= 1, got {args.num_actors}.')
  if args.max_batch_size < max(args.num_actors):
    print(f'Note: max_batch_size {args.max_batch_size} < {max(args.num_actors)} actors: '
          'some requests will wait for a second batch.', file=sys.stderr)
  # A SIGTERM to the benchmark must still run the clean-up below.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  workdir = tempfile.mkdtemp(prefix='chorus_inference_batching_')
  settings = roles.Settings(model=args.model, seconds=args.seconds,
                      max_new_tokens=args.max_new_tokens, max_prompt_len=16,
                      min_prompt_tokens=2, max_prompt_tokens=8, temperature=1.0,
                      max_batch_size=args.max_batch_size,
                      server_multi_thread=not args.single_thread_server, seed=args.seed,
                      workdir=workdir)
  max_wait_ms = args.max_wait_ms if 'seed' in args.setups else []
  command = ' '.join([os.path.relpath(sys.executable)] + [shlex.quote(a) for a in sys.argv])
  info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
              machine=_machine(), load_before=os.getloadavg()[0])
  measurements = []
  children = processes.Children()
  status_clients = []
  try:
    children.start('prepare', roles.prepare, True, settings)
    info.update(children.wait_for('done', ['prepare'], args.ready_timeout_s)['prepare'])
    children.stop(['prepare'])
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    info['jax_version'] = metadata.version('jax')
    print(f'{settings.model}: {info["num_params"]:,} parameters; {info["machine"]}', flush=True)

    servers, stop_servers = [], children.Event()
    if max_wait_ms:
      # Not at the top: every spawned child re-imports this script, and most need no gRPC.
      # pylint: disable-next=g-import-not-at-top
      from chorus.inference_server import client as client_lib
    for index, wait_ms in enumerate(max_wait_ms):
      name = f'server-{index}'
      children.start(name, roles.serve, not settings.server_multi_thread, settings, wait_ms,
                     stop_servers)
      # One at a time: two servers compiling at once would each take twice as long.
      port = children.wait_for('ready', [name], args.ready_timeout_s)[name]['port']
      status_client = client_lib.InferenceClient(f'127.0.0.1:{port}')
      status_clients.append(status_client)
      servers.append(measure_lib.Server(_seed_label(wait_ms), f'127.0.0.1:{port}',
                             children.processes[name].pid,
                             lambda c=status_client: c.status()[roles.MODEL_NAME]))
    # The set-ups alternate at each N, so that a change in the load other programs put
    # on the machine hits all of them alike.
    for num_actors in args.num_actors:
      for server in servers + (['unbatched'] if 'unbatched' in args.setups else []):
        measurement = measure_lib.measure(children, settings, num_actors,
                               None if server == 'unbatched' else server,
                               args.ready_timeout_s)
        measurements.append(measurement)
        _print_measurement(measurement)
    stop_servers.set()
    children.stop([f'server-{index}' for index in range(len(servers))])
  finally:
    for status_client in status_clients:
      status_client.close()
    children.terminate()
    shutil.rmtree(workdir, ignore_errors=True)

  section = _format_section(command, info, settings, max_wait_ms, measurements)
  print()
  print(section)
  if args.output != '-':
    _write_section(args.output, section)
    print(f'Wrote the "{SECTION_TITLE}" section of {args.output}.')


if __name__ == '__main__':
  main()
