"""The `chorus` command."""
import argparse
import dataclasses
import datetime
import json
import os
import sys

from chorus import configs
from chorus import plugins as plugins_lib
from chorus.datasets import cli as datasets_cli
from chorus.launch import experiment
from chorus.launch import model_commands


def _experiment_config(args, command: str):
  """The experiment of --config, --plugin, --set and the flags; None after printing an error."""
  config = configs.get_config(args.config)
  try:
    # Before the overrides: they may name the plugins' agents and tasks.
    plugins_lib.import_plugins(args.plugin)
  except ImportError as error:
    print(f'chorus {command}: {error}', file=sys.stderr)
    return None
  config = dataclasses.replace(config, plugins=config.plugins + tuple(args.plugin))
  overrides = list(args.set)
  for flag, field in (('num_actors', 'num_actors'), ('max_learner_steps', 'learner.max_steps'),
                      ('seed', 'seed'), ('replay_dataset', 'replay_dataset'),
                      ('skip_corrupt', 'skip_corrupt')):
    value = getattr(args, flag, None)
    if value is not None:
      overrides.append(f'{field}={value}')
  try:
    config = experiment.apply_overrides(config, overrides)
    config.check()
  except (ValueError, FileNotFoundError) as error:  # Damaged datasets are ValueErrors too.
    print(f'chorus {command}: {error}', file=sys.stderr)
    return None
  return config


def _default_run_dir(args, config) -> str:
  return args.run_dir or os.path.join(
      'runs', f'{config.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}')


def _run(args) -> int:
  config = _experiment_config(args, 'run')
  if config is None:
    return 2
  run_dir = _default_run_dir(args, config)
  from chorus.launch import run  # pylint: disable=g-import-not-at-top  (imports JAX)
  try:
    summary = run.run_experiment(config, run_dir, launcher=args.launcher,
                                 ray_address=args.ray_address)
  except KeyboardInterrupt:
    print('Stopped; every node was shut down.', file=sys.stderr)
    return 130
  keys = ('learner_steps', 'episodes', 'initial_eval_reward', 'final_eval_reward',
          'tokens_per_second', 'mean_policy_lag', 'wall_seconds')
  shown = {key: summary[key] for key in keys}
  shown.update(initial_win_rate_vs_reference=summary['initial_eval'].get('win_rate'),
               final_win_rate_vs_reference=summary['final_eval'].get('win_rate'))
  print(json.dumps(shown, indent=2))
  print(f'Summary, curves, RLDS and checkpoints in {os.path.abspath(run_dir)}')
  return 0


def _merge_runs(args) -> int:
  config = _experiment_config(args, 'merge-runs')
  if config is None:
    return 2
  from chorus.launch import merging  # pylint: disable=g-import-not-at-top  (imports JAX)
  try:
    settings = merging.MergeSettings(num_runs=args.runs, iterations=args.iterations,
                                     liti_rate=args.liti_rate)
  except ValueError as error:
    print(f'chorus merge-runs: {error}', file=sys.stderr)
    return 2
  run_dir = _default_run_dir(args, config)
  try:
    summary = merging.merge_runs(config, run_dir, settings)
  except KeyboardInterrupt:
    print('Stopped; every node was shut down.', file=sys.stderr)
    return 130
  print(json.dumps({key: summary[key] for key in ('gain_at_equal_kl', 'wall_seconds')},
                   indent=2))
  print(f'KL-reward front in {os.path.abspath(run_dir)}/front.json and front.png')
  return 0


def _evaluate(args) -> int:
  from chorus.launch import evaluate  # pylint: disable=g-import-not-at-top  (imports JAX)
  print(json.dumps(evaluate.evaluate_on_dataset(args.run_dir, args.dataset, step=args.step,
                                                temperature=args.temperature), indent=2))
  return 0


def _interpolate(args) -> int:
  from chorus.launch import evaluate  # pylint: disable=g-import-not-at-top  (imports JAX)
  weights = [float(w) for w in args.weights.split(',')]
  print(json.dumps(evaluate.interpolate_runs(args.run_a, args.run_b, weights,
                                             temperature=args.temperature), indent=2))
  return 0


def _configs(args) -> int:
  if args.name is None:
    width = max(map(len, configs.CONFIG_NAMES)) + 2
    for name in configs.CONFIG_NAMES:
      print(f'{name:<{width}}{configs.description(name)}')
  else:
    print(json.dumps(experiment.to_dict(configs.get_config(args.name)), indent=2))
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='chorus', description='Chorus: RL for token models.')
  commands = parser.add_subparsers(dest='command', required=True)
  run_parser = commands.add_parser('run', help='run an experiment locally, one process per node')
  run_parser.add_argument('--config', default='text_vtrace',
                          help=f'experiment name, one of {configs.CONFIG_NAMES} '
                          '(default: text_vtrace)')
  run_parser.add_argument('--run-dir', help='output directory (default: runs/NAME-TIMESTAMP)')
  run_parser.add_argument('--num-actors', type=int, help='actor processes (default: config)')
  run_parser.add_argument('--max-learner-steps', type=int, help='learner updates (default: config)')
  run_parser.add_argument('--seed', type=int, help='random seed (default: config)')
  run_parser.add_argument('--replay-dataset', metavar='PATH',
                          help='train from a recorded RLDS dataset (a run\'s rlds/ folder) '
                          'instead of actors: offline soft-Q through Reverb, or inverse '
                          'soft-Q on demonstrations (default: config, usually none)')
  run_parser.add_argument('--skip-corrupt', action='store_const', const=True,
                          help='read recorded datasets around damaged files and records, '
                          'logging what was left out (default: stop and name the first)')
  run_parser.add_argument('--launcher', choices=('local', 'ray'), default='local',
                          help='where nodes run: processes on this machine (default) or a Ray '
                          'cluster')
  run_parser.add_argument('--ray-address',
                          help='Ray cluster to join, e.g. 10.0.0.5:6379 (default: RAY_ADDRESS or '
                          'a new local Ray instance)')
  run_parser.add_argument('--plugin', action='append', default=[], metavar='MODULE',
                          help='a module or .py file to import in every process first: it '
                          'may define agents and tasks of its own (repeatable)')
  run_parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                          help='override any config field, e.g. --set learner.batch_size=64; '
                          'see `chorus configs NAME` for fields and defaults')
  run_parser.set_defaults(handler=_run)
  merge_parser = commands.add_parser(
      'merge-runs', help='M runs from one init, merged by SLERP of their task vectors and '
      'interpolated towards the init (LITI), I times; writes the KL-reward front')
  merge_parser.add_argument('--config', required=True,
                            help=f'experiment of each run, one of {configs.CONFIG_NAMES}')
  merge_parser.add_argument('--run-dir', help='output directory (default: runs/NAME-TIMESTAMP)')
  merge_parser.add_argument('--runs', type=int, default=2, help='M, runs per iteration '
                            '(default: 2)')
  merge_parser.add_argument('--iterations', type=int, default=2, help='I (default: 2)')
  merge_parser.add_argument('--liti-rate', type=float, default=0.3,
                            help='eta of init <- (1 - eta) init + eta merged (default: 0.3)')
  merge_parser.add_argument('--max-learner-steps', type=int,
                            help='learner updates of each run (default: config)')
  merge_parser.add_argument('--seed', type=int, help='seed of run 0; run m of iteration i '
                            'uses seed + 1000 i + m (default: config)')
  merge_parser.add_argument('--plugin', action='append', default=[], metavar='MODULE',
                            help='as for run')
  merge_parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                            help='override a config field of every run, as for run')
  merge_parser.set_defaults(handler=_merge_runs)
  evaluate_parser = commands.add_parser(
      'evaluate', help="a run's learner checkpoint on the prompts of a recorded RLDS dataset")
  evaluate_parser.add_argument('--run-dir', required=True, help='the run whose checkpoint to load')
  evaluate_parser.add_argument('--dataset', required=True,
                               help='RLDS dataset directory whose prompts to evaluate on')
  evaluate_parser.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
  evaluate_parser.add_argument('--temperature', type=float, default=1.0,
                               help='sampling temperature (default: 1.0)')
  evaluate_parser.set_defaults(handler=_evaluate)
  interpolate_parser = commands.add_parser(
      'interpolate', help="evaluate interpolations (1-w)*A + w*B of two runs' final weights")
  interpolate_parser.add_argument('--run-a', required=True, help='run directory of weight 0')
  interpolate_parser.add_argument('--run-b', required=True, help='run directory of weight 1')
  interpolate_parser.add_argument('--weights', default='0,0.25,0.5,0.75,1',
                                  help='comma-separated w values (default: 0,0.25,0.5,0.75,1)')
  interpolate_parser.add_argument('--temperature', type=float, default=1.0,
                                  help='sampling temperature (default: 1.0)')
  interpolate_parser.set_defaults(handler=_interpolate)
  configs_parser = commands.add_parser('configs', help='list experiments or show one with defaults')
  configs_parser.add_argument('name', nargs='?')
  configs_parser.set_defaults(handler=_configs)
  datasets_cli.add_datasets_parser(commands)
  model_commands.add_model_parsers(commands)
  args = parser.parse_args(argv)
  return args.handler(args)


if __name__ == '__main__':
  sys.exit(main())
