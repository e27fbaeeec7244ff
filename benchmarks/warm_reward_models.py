"""WARM on the task's noisy pairs: M reward models from one init, alone, ensembled, averaged.

Runs only the learned reward model's setup step of an experiment (text_bond by default)
with `agent.reward_model.num_models=M` and prints the held-out pairwise accuracy it logs
for each member, for their prediction ensemble (mean score, M forward passes) and for
their weight average (the served model, one forward pass), overall and correct-vs-swap.

Usage (from the repository root):

  .venv/bin/python benchmarks/warm_reward_models.py --run-dir /tmp/warm [--models 3]
      [--config text_bond] [--set FIELD=VALUE ...]
"""
import argparse
import os
import resource
import time

from chorus import configs
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.metrics import read_metrics


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--run-dir', required=True)
  parser.add_argument('--config', default='text_bond')
  parser.add_argument('--models', type=int, default=3)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  args = parser.parse_args()
  config = experiment.apply_overrides(
      configs.get_config(args.config),
      [f'agent.reward_model.num_models={args.models}', *args.set])
  os.makedirs(args.run_dir, exist_ok=True)
  load, start = os.getloadavg(), time.monotonic()
  nodes.setup(config, args.run_dir, lambda: False, step='reward_model')
  usage = resource.getrusage(resource.RUSAGE_SELF)
  print(f'wall {time.monotonic() - start:.0f} s, CPU {usage.ru_utime + usage.ru_stime:.0f} s, '
        f'load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, '
        f'after {" ".join(f"{x:.2f}" for x in os.getloadavg())}')
  print(f'reward model: {config.agent.reward_model}')
  print('| model | overall | vs swap | vs drop | vs extra | vs substitute | vs random |')
  print('|:---|---:|---:|---:|---:|---:|---:|')
  for record in read_metrics(os.path.join(args.run_dir, 'metrics.jsonl'), node='reward_model'):
    if record.get('kind') != 'reward_model_eval':
      continue
    member = record.get('member')
    name = ('weight average (served)' if member is None else
            f'prediction ensemble of {args.models}' if member == 'ensemble' else
            f'member {member}')
    values = [record['accuracy']] + [record.get(f'accuracy_correct_vs_{kind}', float('nan'))
                                     for kind in ('swap', 'drop', 'extra', 'substitute',
                                                  'random')]
    print(f'| {name} | ' + ' | '.join(f'{v:.3f}' for v in values) + ' |')


if __name__ == '__main__':
  main()
