"""What one actor costs per episode, where its CPU goes, and what the servers cost beside it.

Starts the default experiment's warm start, Reverb server and inference server as real
node processes (the local launcher), then runs one actor loop in this process, wired as
the actor node wires it (`launch.nodes.actor_loop`): real gRPC, a real Reverb queue
(sized so it never fills: nothing samples it), real RLDS files. Two windows of
`--episodes` episodes each, after a warm-up:
  1. unprofiled: CPU-ms per episode of this process (every thread: the loop, gRPC's and
     Reverb's C++ threads), of the loop's thread alone, and of the inference and Reverb
     servers (/proc/PID/stat);
  2. under cProfile with a per-thread CPU clock (`time.thread_time`): the loop thread's
     CPU split by what it does. The shares are applied to the unprofiled loop-thread
     cost, since the profiler itself slows Python code down.

Usage (from the repository root):

  .venv/bin/python benchmarks/actor_cost.py [--episodes 2000] [--set FIELD=VALUE ...]
      [--output benchmarks/RESULTS.md | -]
"""
import argparse
import cProfile
import json
import os
import pstats
import resource
import shlex
import sys
import tempfile
import time

from chorus.benchmarks import results
from chorus.configs import text_vtrace
from chorus.inference_server.client import InferenceClient
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.launch import program as program_lib
from chorus.launch import run_dir as layout
from chorus.launch.local import LocalLauncher

SECTION_TITLE = 'Actor cost'
# Where the loop thread's CPU goes: (label, [(file suffix, function), ...]) whose inclusive
# cProfile times make each part; parts nest as `_parts` computes them.
_FUNCTIONS = {
    'loop': [('actors/actor.py', 'run')],
    'rollout': [('actors/rollouts.py', '__call__')],
    'grpc': [('inference_server/client.py', '_call')],
    'reward': [('actors/reverse_digits.py', 'reward_components')],
    'prompts': [('actors/reverse_digits.py', 'train_prompt')],
    'replay': [('replay/writer.py', 'write')],
    'rlds': [('datasets/rlds_writer.py', 'write')],
    'journal': [('datasets/journal.py', 'append')],
    'digest': [('core.py', 'update')],
    'metrics': [('metrics.py', 'write')],
}


def _inclusive_seconds(stats: pstats.Stats) -> dict[str, float]:
  seconds = dict.fromkeys(_FUNCTIONS, 0.0)
  for (path, _, function), (_, _, _, cumulative, _) in stats.stats.items():
    for part, names in _FUNCTIONS.items():
      if any(path.endswith(suffix) and function == name for suffix, name in names):
        seconds[part] += cumulative
  return seconds


def _parts(seconds: dict[str, float]) -> dict[str, float]:
  """Shares of the loop thread's CPU, each part without the parts nested in it."""
  parts = {
      'request building and reading the reply': (
          seconds['rollout'] - seconds['grpc'] - seconds['reward']),
      'gRPC call (Generate)': seconds['grpc'],
      'reward': seconds['reward'],
      'prompt sampling': seconds['prompts'],
      'Reverb write': seconds['replay'],
      'RLDS write (record, files, metadata)': seconds['rlds'] - seconds['journal'],
      'journal append': seconds['journal'],
      'episode digest': seconds['digest'],
      'metrics lines': seconds['metrics'],
  }
  parts['trajectory building and the loop'] = seconds['loop'] - sum(parts.values())
  return {name: value / seconds['loop'] for name, value in parts.items()}


def _pids(run_dir: str) -> dict[str, int]:
  with open(os.path.join(run_dir, 'nodes', 'processes.jsonl')) as file:
    return {record['node']: record['pid'] for record in map(json.loads, file)}


def _process_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(config: experiment.ExperimentConfig, episodes: int, warmup: int) -> dict:
  """Runs the two windows (see the module docstring); returns costs per episode and shares."""
  run_dir = tempfile.mkdtemp(prefix='actor_cost-')
  with open(layout.config_path(run_dir), 'w') as file:
    json.dump(experiment.to_dict(config), file)
  program = program_lib.make_program(config)
  launcher = LocalLauncher(run_dir, config.launcher)
  try:
    for node in (n for n in program if n.kind == program_lib.SETUP):
      launcher.run_to_completion(node, lambda: False)
    launcher.start([n for n in program if n.kind == program_lib.SERVICE])
    servers = {name: pid for name, pid in _pids(run_dir).items()
               if name in launcher.addresses}
    client = InferenceClient(launcher.addresses[program_lib.inference_server_name(0)])
    client.wait_until_ready(timeout_s=300)
    rollout = config.builder().make_rollout(client, config.make_task(), config.actor)
    with nodes.actor_loop(config, run_dir, 0, rollout,
                          launcher.addresses[program_lib.replay_server_name(0)]) as actor:
      actor.run(lambda: False, max_episodes=warmup)
      start_episodes, start_wall = actor.episodes, time.monotonic()
      start = dict(process=_process_cpu(), thread=time.thread_time(),
                   **{name: results.process_cpu_seconds(pid) for name, pid in servers.items()})
      actor.run(lambda: False, max_episodes=start_episodes + episodes)
      done = actor.episodes - start_episodes
      wall = time.monotonic() - start_wall
      end = dict(process=_process_cpu(), thread=time.thread_time(),
                 **{name: results.process_cpu_seconds(pid) for name, pid in servers.items()})
      profiler = cProfile.Profile(time.thread_time)
      profiler.enable()
      actor.run(lambda: False, max_episodes=actor.episodes + episodes)
      profiler.disable()
    client.close()
  finally:
    launcher.close()
  ms_per_episode = {name: 1000 * (end[name] - start[name]) / done for name in start}
  return dict(ms_per_episode=ms_per_episode, episodes=done, episodes_per_second=done / wall,
              shares=_parts(_inclusive_seconds(pstats.Stats(profiler))))


def _format_section(command: str, config: experiment.ExperimentConfig, result: dict,
                    load_before: float, load_after: float) -> str:
  ms = result['ms_per_episode']
  server = ms[program_lib.inference_server_name(0)]
  lines = [
      f'## {SECTION_TITLE}',
      '',
      'One actor loop of the default experiment (`configs/text_vtrace.py`), wired as the '
      'actor node wires it, against a real inference server and Reverb server (node '
      'processes); see `benchmarks/actor_cost.py`. CPU-ms per episode in an unprofiled '
      'window; the split of the loop thread\'s CPU comes from a second, profiled window '
      '(cProfile with a per-thread CPU clock) and is scaled to the unprofiled cost.',
      '',
      f'- Command: `{command}`',
      results.date_machine_load(load_before, load_after),
      f'- Actor: {config.actor.prompts_per_request} prompts per request, '
      f'{result["episodes"]} episodes per window ({result["episodes_per_second"]:.0f} '
      'episodes/s alone: one actor, nothing else asking the server)',
      '',
      '| process | CPU-ms per episode | vs inference server |',
      '|:---|---:|---:|',
      f'| actor process (every thread) | {ms["process"]:.3f} | {ms["process"] / server:.0%} |',
      f'| of which the actor loop\'s thread | {ms["thread"]:.3f} | {ms["thread"] / server:.0%} |',
  ]
  lines += [f'| {name} | {value:.3f} | {value / server:.0%} |' for name, value in ms.items()
            if name not in ('process', 'thread')]
  lines += ['', '| the actor loop\'s thread | share | CPU-ms per episode |', '|:---|---:|---:|']
  lines += [f'| {name} | {share:.0%} | {share * ms["thread"]:.3f} |'
            for name, share in sorted(result['shares'].items(), key=lambda item: -item[1])]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--episodes', type=int, default=2000, help='episodes per window')
  parser.add_argument('--warmup', type=int, default=200)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='overrides of configs/text_vtrace.py, as `chorus run --set`')
  parser.add_argument('--output', default=results.RESULTS_PATH, help='markdown file, or -')
  args = parser.parse_args(argv)
  # Nothing samples the queue, so it must hold every episode; no evaluator, no learner.
  config = experiment.apply_overrides(
      text_vtrace.get_config(), ['replay.max_size=1000000', 'evaluation.every_s=0'] + args.set)
  load_before = results.load_average()
  result = measure(config, args.episodes, args.warmup)
  command = ' '.join(['.venv/bin/python', 'benchmarks/actor_cost.py'] +
                     [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
  section = _format_section(command, config, result, load_before, results.load_average())
  print(section)
  if args.output != '-':
    results.write_section(args.output, SECTION_TITLE, section)


if __name__ == '__main__':
  main()
