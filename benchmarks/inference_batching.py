"""Serving benchmarks: tokens per (CPU-)second against actors, and Nash-MD mixture sampling.

Two parts, each writing its own section of RESULTS.md and a PNG beside it:

  scaling  ("Inference batching", inference_batching.png): for each number of actors N,
           N actor processes generate through
             unbatched:   nothing: each holds the parameters and calls the jitted
                          sampler itself with batch size 1;
             dynamic:     one inference server process (real gRPC on 127.0.0.1) with the
                          dynamic batcher, one server per --max-wait-ms value;
             continuous:  the same with the decode-step scheduler, one server per
                          --decode-steps-per-call value.
           Requests have mixed lengths (max_new_tokens uniform in --new-tokens MIN MAX).
           Reported: tokens/s, tokens per CPU-second (all of the set-up's processes),
           fill, p50/p95 latency, compilations during the window, machine load.
  mixture  ("Nash-MD mixture sampling", inference_mixture.png): the geometric-mixture
           sampler with KV caches against re-running both models over the whole prefix
           for every token, at --mixture-new-tokens.

Usage (from the repository root):

  .venv/bin/python benchmarks/inference_batching.py [--parts scaling mixture]
      [--num-actors 1 4 16 32 64] [--model small] [--seconds 20] [--new-tokens 4 64]
      [--prompts-per-request 1] [--setups unbatched dynamic continuous] [--max-wait-ms 5]
      [--decode-steps-per-call 1] [--max-batch-size 32]
      [--mixture-models tiny small] [--mixture-new-tokens 32 128 256]
      [--output benchmarks/RESULTS.md]

Every process starts, loads the model, compiles and makes one warm-up call, then reports
ready; the measured window opens when all of them are ready, so start-up and compilation
are excluded. Nothing here asserts a target: it measures. The children's roles are in
inference_batching_roles (and _mixture), one measurement in inference_batching_measure,
processes in inference_batching_processes, tables and plots in inference_batching_report.
"""
import argparse
import datetime
import os
import shlex
import shutil
import signal
import sys
import tempfile
from typing import Any

# Nothing heavy is imported at module level: spawned children re-import this script, and
# must set their thread limits before JAX loads.
from chorus.benchmarks import inference_batching_measure as measure_lib
from chorus.benchmarks import inference_batching_mixture as mixture_lib
from chorus.benchmarks import inference_batching_processes as processes
from chorus.benchmarks import inference_batching_report as report
from chorus.benchmarks import inference_batching_roles as roles
from chorus.benchmarks import results

# b of the mixture: the Nash-MD agent's default weight of the reference.
_MIXTURE_COEF = 0.125


def _print_measurement(m: measure_lib.Measurement):
  fill = f', fill {m.fill:.0%}, server {m.server_share:.0%} of CPU' if m.fill is not None else ''
  print(f'  N={m.num_actors:<3d} {m.setup:32s} {m.tokens_per_second:7.0f} tokens/s, '
        f'{m.tokens_per_cpu_second:5.0f} per CPU-s{fill}, {m.requests} requests, p50 '
        f'{m.p50_latency_ms:.0f} ms, CPU {m.cpu_share:.0%} (machine {m.machine_busy:.0%}), '
        f'RSS {m.rss_bytes / 2**30:.1f} GiB', flush=True)


def _run_scaling(args, children: processes.Children, settings: roles.Settings,
                 info: dict[str, Any]) -> tuple[list[roles.ServerSettings],
                                                list[measure_lib.Measurement]]:
  children.start('prepare', roles.prepare, True, settings)
  info.update(children.wait_for('done', ['prepare'], args.ready_timeout_s)['prepare'])
  children.stop(['prepare'])
  print(f'{settings.model}: {info["num_params"]:,} parameters; {info["machine"]}', flush=True)
  server_settings = (
      [roles.ServerSettings('dynamic', max_wait_ms=w) for w in args.max_wait_ms
       if 'dynamic' in args.setups]
      + [roles.ServerSettings('continuous', decode_steps_per_call=k)
         for k in args.decode_steps_per_call if 'continuous' in args.setups])
  servers, status_clients, stop_servers = [], [], children.Event()
  if server_settings:
    # Not at the top: every spawned child re-imports this script, and most need no gRPC.
    from chorus.inference_server import client as client_lib  # pylint: disable=g-import-not-at-top
  measurements = []
  try:
    for index, server_setting in enumerate(server_settings):
      name = f'server-{index}'
      children.start(name, roles.serve, not settings.server_multi_thread, settings,
                     server_setting, stop_servers, one_core=not settings.server_multi_thread)
      # One at a time: two servers compiling at once would each take twice as long.
      port = children.wait_for('ready', [name], args.ready_timeout_s)[name]['port']
      status_client = client_lib.InferenceClient(f'127.0.0.1:{port}')
      status_clients.append(status_client)
      servers.append(measure_lib.Server(server_setting.label, f'127.0.0.1:{port}',
                                        children.processes[name].pid,
                                        lambda c=status_client: c.status()[roles.MODEL_NAME]))
    # The set-ups alternate at each N, so that a change in the load other programs put
    # on the machine hits all of them alike.
    for num_actors in args.num_actors:
      for server in ([None] if 'unbatched' in args.setups else []) + servers:
        measurement = measure_lib.measure(children, settings, num_actors, server,
                                          args.ready_timeout_s)
        measurements.append(measurement)
        _print_measurement(measurement)
    stop_servers.set()
    children.stop([f'server-{index}' for index in range(len(servers))])
  finally:
    for status_client in status_clients:
      status_client.close()
  return server_settings, measurements


def _run_mixture(args, children: processes.Children) -> list[dict]:
  rows = []
  for model in args.mixture_models:
    settings = mixture_lib.MixtureSettings(
        model=model, batch_size=args.mixture_batch_size, prompt_len=16,
        new_tokens=tuple(args.mixture_new_tokens), mixture_coef=_MIXTURE_COEF, repeats=3,
        seed=args.seed)
    name = f'mixture-{model}'
    children.start(name, mixture_lib.measure_role, False, settings)
    result = children.wait_for('done', [name], args.ready_timeout_s + 3600)[name]
    children.stop([name])
    for row in result:
      print(f'  mixture {model}, {row["new_tokens"]} new tokens: cached '
            f'{row["cached_cpu_s"]:.3f} CPU-s, no cache {row["no_cache_cpu_s"]:.2f} CPU-s '
            f'({row["no_cache_cpu_s"] / row["cached_cpu_s"]:.1f}x), same rows '
            f'{row["same_rows"]}/{row["batch_size"]}', flush=True)
    rows += result
  return rows


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--parts', nargs='+', choices=['scaling', 'mixture'],
                      default=['scaling', 'mixture'])
  parser.add_argument('--num-actors', type=int, nargs='+', default=[1, 4, 16, 32, 64])
  parser.add_argument('--model', choices=['tiny', 'small'], default='small')
  parser.add_argument('--seconds', type=float, default=20.0,
                      help='length of each measured window')
  parser.add_argument('--setups', nargs='+', choices=['unbatched', 'dynamic', 'continuous'],
                      default=['unbatched', 'dynamic', 'continuous'])
  parser.add_argument('--new-tokens', type=int, nargs=2, default=[4, 64],
                      metavar=('MIN', 'MAX'), help='range of each request\'s max_new_tokens')
  parser.add_argument('--prompts-per-request', type=int, default=1,
                      help='prompts in each request (each unbatched call)')
  parser.add_argument('--max-batch-size', type=int, default=32,
                      help='the servers\' max_batch_size: the continuous scheduler\'s slots')
  parser.add_argument('--max-wait-ms', type=float, nargs='+', default=[5.0],
                      help='one dynamic server (and measurement) per value')
  parser.add_argument('--decode-steps-per-call', type=int, nargs='+', default=[1],
                      help='one continuous server (and measurement) per value')
  parser.add_argument('--single-thread-server', action='store_true',
                      help='run each server on one core (which bounds XLA\'s threads) with '
                      'the actors\' one-thread XLA flag')
  parser.add_argument('--mixture-models', nargs='+', choices=['tiny', 'small'],
                      default=['tiny', 'small'])
  parser.add_argument('--mixture-new-tokens', type=int, nargs='+', default=[32, 128, 256])
  parser.add_argument('--mixture-batch-size', type=int, default=8)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--ready-timeout-s', type=float, default=900.0)
  parser.add_argument('--output', default=os.path.join(os.path.dirname(__file__), 'RESULTS.md'),
                      help='markdown file whose sections are rewritten (PNGs go beside it); '
                      '"-" prints only')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if min(args.num_actors) < 1 or not 1 <= args.new_tokens[0] <= args.new_tokens[1]:
    raise SystemExit(f'--num-actors must all be >= 1 and --new-tokens MIN MAX must have '
                     f'1 <= MIN <= MAX; got {args.num_actors} and {args.new_tokens}.')
  # A SIGTERM to the benchmark must still run the clean-up below.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  workdir = tempfile.mkdtemp(prefix='chorus_inference_batching_')
  settings = roles.Settings(
      model=args.model, seconds=args.seconds, min_new_tokens=args.new_tokens[0],
      max_new_tokens=args.new_tokens[1], max_prompt_len=16, min_prompt_tokens=2,
      max_prompt_tokens=8, temperature=1.0, prompts_per_request=args.prompts_per_request,
      max_batch_size=args.max_batch_size,
      server_multi_thread=not args.single_thread_server, seed=args.seed, workdir=workdir)
  command = ' '.join([os.path.relpath(sys.executable)] + [shlex.quote(a) for a in sys.argv])
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
              machine=results.machine(), load_before=os.getloadavg(),
              jax_version=metadata.version('jax'))
  children = processes.Children()
  try:
    if 'scaling' in args.parts:
      server_settings, measurements = _run_scaling(args, children, settings, info)
    mixture_rows = _run_mixture(args, children) if 'mixture' in args.parts else []
  finally:
    children.terminate()
    shutil.rmtree(workdir, ignore_errors=True)
  info['load_after'] = os.getloadavg()

  directory = os.path.dirname(os.path.abspath(args.output))
  sections = []
  if 'scaling' in args.parts:
    plot = None if args.output == '-' else 'inference_batching.png'
    if plot:
      report.plot_scaling(measurements, os.path.join(directory, plot))
    sections.append((report.SCALING_TITLE, report.scaling_section(
        command, info, settings, server_settings, measurements, plot)))
  if mixture_rows:
    plot = None if args.output == '-' else 'inference_mixture.png'
    if plot:
      report.plot_mixture(mixture_rows, os.path.join(directory, plot))
    sections.append((report.MIXTURE_TITLE, report.mixture_section(
        command, info, mixture_rows, _MIXTURE_COEF, plot)))
  for title, section in sections:
    print()
    print(section)
    if args.output != '-':
      results.write_section(args.output, title, section)
      print(f'Wrote the "{title}" section of {args.output}.')


if __name__ == '__main__':
  main()
