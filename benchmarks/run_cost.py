"""CPU per episode and time to reward of the default run (`make run`), on several seeds.

Runs `chorus run --config text_vtrace --seed S` for each seed, one after the other, and
reports from each run's summary.json (launch/cost.py says how it is counted): CPU-ms per
episode summed over every process of the RL phase, the CPU- and wall-seconds of RL until
the evaluator's held-out reward first reached 0.90 and 0.95, the learner's duty cycle and
where the CPU went. Plots held-out reward against CPU-seconds of RL, one line per seed.

Usage (from the repository root):

  .venv/bin/python benchmarks/run_cost.py [--seeds 0 1 2] [--set FIELD=VALUE ...]
      [--runs-dir DIR] [--output benchmarks/RESULTS.md | -]
  .venv/bin/python benchmarks/run_cost.py --report RUN_DIR [RUN_DIR ...] --output -
      # reports runs made before, without running anything
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from chorus.benchmarks import results
from chorus.launch import cost
from chorus.launch import report
from chorus.metrics import read_metrics

SECTION_TITLE = 'Default run: CPU per episode and time to reward'
PLOT_NAME = 'run_cost.png'


def run(seed: int, run_dir: str, overrides: list[str]) -> None:
  """One `chorus run` of the default config; its load average is kept beside its summary."""
  load_before = results.load_average()
  command = [sys.executable, '-m', 'chorus.launch.cli', 'run', '--config', 'text_vtrace',
             '--seed', str(seed), '--run-dir', run_dir]
  for override in overrides:
    command += ['--set', override]
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
  with open(os.path.join(run_dir, 'load.json'), 'w') as file:
    json.dump(dict(before=load_before, after=results.load_average()), file)


def report_row(run_dir: str) -> dict:
  """A run's numbers, recounted from its metrics.jsonl with this version's accounting."""
  with open(os.path.join(run_dir, 'summary.json')) as file:
    summary = json.load(file)
  records = read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
  rl_window = tuple(summary['cost']['rl_window'])
  ledger = cost.CpuLedger(records)
  evals = sorted((r for r in records if r.get('kind') == 'eval' and r['time'] >= rl_window[0]),
                 key=lambda r: r['time'])
  load = {}
  if os.path.exists(os.path.join(run_dir, 'load.json')):
    with open(os.path.join(run_dir, 'load.json')) as file:
      load = json.load(file)
  return dict(
      seed=summary['config']['seed'], config=summary['config'], episodes=summary['episodes'],
      final_reward=summary['final_eval_reward'], load=load,
      cost=report.run_cost(records, rl_window, summary['episodes']),
      time_to_reward=cost.time_to_reward(records, ledger, rl_window[0]),
      # Held-out reward against CPU-seconds of RL: the initial evaluation, then the evaluator's.
      curve=([0.0] + [ledger.total(rl_window[0], r['time']) for r in evals],
             [summary['initial_eval_reward']] + [r['reward'] for r in evals]))


def _reached(row: dict, threshold: str, key: str) -> str:
  reached = row['time_to_reward'][threshold]
  if key.endswith('after_startup') and not row['cost']['rl_startup_cpu_seconds']:
    return '-'  # A run from before nodes marked their start-up.
  return f'{reached[key]:.1f}' if reached else 'never'


def _format_section(command: str, rows: list[dict], plot_path: str) -> str:
  config = rows[0]['config']
  lines = [
      f'## {SECTION_TITLE}',
      '',
      'Each seed is one `chorus run --config text_vtrace` (what `make run` runs). CPU is '
      'user + system CPU-seconds of every process of the run (each node meters itself, '
      'children included; the launcher too), counted over the RL phase: from the start of '
      'actors, learner and evaluator to the learner\'s last step (launch/cost.py). "after '
      'start-up" leaves out the imports and config loading of the nodes started for RL. '
      'Time to reward is the first evaluator record (256 held-out prompts, every '
      f'{config["evaluation"]["every_s"]:g} s) at or above the reward.',
      '',
      f'- Command: `{command}`',
      f'- Date: {results.now()}; machine: {results.machine()}',
      f'- Config: {config["num_actors"]} actor loops in '
      f'{-(-config["num_actors"] // config["actors_per_process"])} process(es), '
      f'{config["actor"]["prompts_per_request"]} prompts per request, batch '
      f'{config["learner"]["batch_size"]}, Adam {config["learner"]["learning_rate"]:g}, '
      f'KL {config["agent"]["kl_coef"]:g}, queue {config["replay"]["max_size"]}, '
      f'{config["learner"]["max_steps"]} steps, sequence '
      f'{config["sequence"]["prompt_len"]}+{config["sequence"]["completion_len"]} tokens',
      '',
      '| seed | episodes | CPU-ms / episode (after start-up) | RL CPU-s | CPU-s to 0.90 '
      '(after start-up) | CPU-s to 0.95 (after start-up) | wall s to 0.95 | learner duty '
      'cycle | final reward | load before / after |',
      '|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|',
  ]
  for row in rows:
    run_cost = row['cost']
    load = (f'{row["load"]["before"]:.1f} / {row["load"]["after"]:.1f}' if row['load']
            else f'- / {run_cost["load_average_1min"]:.1f}')
    after_startup = (f'{run_cost["cpu_ms_per_episode_after_startup"]:.2f}'
                     if run_cost['rl_startup_cpu_seconds'] else '-')
    lines.append(
        f'| {row["seed"]} | {row["episodes"]} | {run_cost["cpu_ms_per_episode"]:.2f} '
        f'({after_startup}) '
        f'| {run_cost["rl_cpu_seconds"]:.0f} '
        f'| {_reached(row, "0.90", "cpu_seconds")} '
        f'({_reached(row, "0.90", "cpu_seconds_after_startup")}) '
        f'| {_reached(row, "0.95", "cpu_seconds")} '
        f'({_reached(row, "0.95", "cpu_seconds_after_startup")}) '
        f'| {_reached(row, "0.95", "wall_seconds")} | {run_cost["learner_duty_cycle"]:.2f} '
        f'| {row["final_reward"]:.3f} | {load} |')
  nodes = sorted({node for row in rows for node in row['cost']['rl_cpu_seconds_by_node']})
  lines += ['', 'CPU-ms per episode by process (RL phase, mean over the seeds; start-up included):',
            '', '| process | CPU-ms / episode |', '|:---|---:|']
  for node in nodes:
    per_episode = np.mean([1000 * row['cost']['rl_cpu_seconds_by_node'].get(node, 0.0)
                           / row['episodes'] for row in rows])
    if per_episode > 0:  # Setup nodes ended before RL.
      lines.append(f'| {node} | {per_episode:.3f} |')
  lines += ['', f'![held-out reward against CPU-seconds of RL]({os.path.basename(plot_path)})']
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: str) -> None:
  fig, ax = plt.subplots(figsize=(7, 4))
  for row in rows:
    ax.plot(*row['curve'], 'o-', markersize=3, label=f'seed {row["seed"]}')
  for threshold in cost.REWARD_THRESHOLDS:
    ax.axhline(threshold, color='grey', linewidth=0.8, linestyle='--')
  ax.set_xlabel('CPU-seconds of RL (every process)')
  ax.set_ylabel('held-out reward (temperature 1)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--runs-dir', default=None, help='where the runs go (default: a temp dir)')
  parser.add_argument('--report', nargs='+', metavar='RUN_DIR', help='report these runs only')
  parser.add_argument('--output', default=results.RESULTS_PATH, help='markdown file, or -')
  args = parser.parse_args(argv)
  run_dirs = args.report
  if not run_dirs:
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix='run_cost-')
    run_dirs = [os.path.join(runs_dir, f'seed{seed}') for seed in args.seeds]
    for seed, run_dir in zip(args.seeds, run_dirs):
      run(seed, run_dir, args.set)
  rows = [report_row(run_dir) for run_dir in run_dirs]
  # Beside the markdown it illustrates; with --output -, beside the runs.
  plot_path = os.path.join(os.path.dirname(os.path.abspath(
      args.output if args.output != '-' else run_dirs[0])), PLOT_NAME)
  plot(rows, plot_path)
  command = ' '.join(['.venv/bin/python', 'benchmarks/run_cost.py'] +
                     [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
  section = _format_section(command, rows, plot_path)
  print(section)
  print(f'Plot: {plot_path}')
  if args.output != '-':
    results.write_section(args.output, SECTION_TITLE, section)


if __name__ == '__main__':
  main()
