"""Held-out reward of several finished runs on one plot, and a markdown table of them.

    .venv/bin/python benchmarks/compare_runs.py --output benchmarks/baselines_text.png \
        V-trace=/tmp/runs/vtrace GRPO=/tmp/runs/grpo PPO=/tmp/runs/ppo

Each run directory is read for its summary.json and metrics.jsonl. Left: held-out reward
(temperature 1: the evaluator node's evaluations, and the evaluations before and after RL)
against learner step; right: a learner metric (`--metric`, default the KL to the
reference) against learner step, for the runs that report it. The table (printed) has
each run's reward, greedy reward and exact match before and after, its final win rate
against the reference, its steps, episodes, mean policy lag and RL seconds.
"""
import argparse
import json
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from chorus.metrics import read_metrics


def _run(directory: str) -> tuple[dict, list[dict], list[dict]]:
  """summary.json, the evaluator's records and the learner's."""
  with open(os.path.join(directory, 'summary.json')) as file:
    summary = json.load(file)
  records = read_metrics(os.path.join(directory, 'metrics.jsonl'))
  return (summary, [r for r in records if r.get('kind') == 'eval'],
          [r for r in records if r.get('kind') == 'learner'])


def _row(label: str, summary: dict) -> str:
  before, after = summary['initial_eval'], summary['final_eval']

  def change(name):
    return f'{before[name]:.3f} -> {after[name]:.3f}'

  lag = summary.get('mean_policy_lag')
  return (f'| {label} | {change("reward")} | {change("greedy_reward")} | '
          f'{change("exact_match")} | {after["win_rate"]:.2f} | {summary["learner_steps"]} | '
          f'{summary["episodes"]} | {"—" if lag is None else f"{lag:.2f}"} | '
          f'{summary["rl_seconds"]:.0f} |')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', metavar='LABEL=RUN_DIR')
  parser.add_argument('--output', required=True, help='the PNG to write')
  parser.add_argument('--metric', default='kl_to_reference', help='learner metric, right')
  parser.add_argument('--title', default='')
  args = parser.parse_args(argv)
  fig, (by_step, metric) = plt.subplots(1, 2, figsize=(11, 4))
  print('| run | reward before -> after | greedy before -> after | exact before -> after | '
        'win vs ref | steps | episodes | mean lag | RL s |')
  print('|:---|:---|:---|:---|---:|---:|---:|---:|---:|')
  for run in args.runs:
    label, directory = run.split('=', 1)
    summary, evals, learner = _run(directory)
    print(_row(label, summary))
    steps = [0] + [r['param_version'] for r in evals] + [summary['learner_steps']]
    rewards = ([summary['initial_eval']['reward']] + [r['reward'] for r in evals]
               + [summary['final_eval']['reward']])
    line, = by_step.plot(steps, rewards, '.-', label=label)
    reported = [r for r in learner if args.metric in r]
    if reported:
      metric.plot([r['step'] for r in reported], [r[args.metric] for r in reported],
                  color=line.get_color(), label=label)
  by_step.set_ylabel('held-out reward (temperature 1)')
  metric.set_ylabel(args.metric.replace('_', ' '))
  for axis in (by_step, metric):
    axis.set_xlabel('learner step')
    axis.grid(alpha=0.3)
    axis.legend()
  fig.suptitle(args.title)
  fig.tight_layout()
  fig.savefig(args.output, dpi=90)
  print(f'Wrote {args.output}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
