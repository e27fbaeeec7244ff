"""The `chorus` command.

Building the parser imports nothing heavy: TensorFlow, JAX and Reverb load only inside the
commands that need them, so `chorus --help` and `chorus configs` answer at once. Errors in
what the user gave (configs, flags, files) end with one line on stderr and status 2.
"""
import argparse
import dataclasses
import datetime
import errno
import json
import os
import sys

# Before anything imports TensorFlow: its C++ start-up logging is noise on a terminal.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from chorus import configs
from chorus import plugins as plugins_lib
from chorus.launch import model_commands
from chorus.launch import run_dir as layout

_DEFAULT_CONFIG = 'text_vtrace'
# A run directory that fails under the launcher: read-only, full, over quota, or unreadable.
_DISK_ERRORS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EIO)
# What the user gave is wrong (not the run): one line on stderr, status 2.
_USAGE_ERRORS = (ValueError, FileNotFoundError, ImportError, TypeError, KeyError)
# `chorus datasets` builds its parser only when called (it imports TensorFlow).
_DATASETS_HELP = 'inspect, summarise, export, filter, merge or repair recorded RLDS episodes'


def _fail(command: str, error) -> int:
  message = error.args[0] if isinstance(error, KeyError) and error.args else error
  print(f'chorus {command}: {message}', file=sys.stderr)
  return 2


def _task_overrides(args) -> list[str]:
  """`--set` overrides choosing the user's task: --prompts/--reward or --task."""
  task, prompts, reward = (getattr(args, flag, None) for flag in ('task', 'prompts', 'reward'))
  if task and (prompts or reward):
    raise ValueError('--task replaces the task; give either --task MODULE:CLASS or '
                     '--prompts FILE --reward MODULE:FUNCTION, not both.')
  if bool(prompts) != bool(reward):
    raise ValueError('--prompts FILE and --reward MODULE:FUNCTION go together.')
  if prompts:
    if not os.path.isfile(prompts):
      raise FileNotFoundError(f'Prompt file {os.path.abspath(prompts)} does not exist.')
    return ['task=prompt_file', f'task.path={os.path.abspath(prompts)}',
            f'task.reward={reward}']
  if task:
    return ['task=user_task', f'task.cls={task}']
  return []


def _check_config_name(name: str) -> None:
  """ValueError naming the available configs unless `name` is one (imports nothing)."""
  if name not in configs.CONFIG_NAMES:
    raise ValueError(f'Unknown config {name!r}; available: {", ".join(configs.CONFIG_NAMES)}.')


def _build_config(args):
  """The experiment config of `chorus run`'s flags, checked; raises _USAGE_ERRORS."""
  name = args.config or _DEFAULT_CONFIG
  _check_config_name(name)  # Before the import that takes seconds.
  from chorus.launch import experiment  # pylint: disable=g-import-not-at-top  (imports JAX)
  config = configs.get_config(name)
  # Before the overrides: they may name the plugins' agents and tasks.
  plugins_lib.import_plugins(args.plugin)
  config = dataclasses.replace(config, plugins=config.plugins + tuple(args.plugin))
  overrides = _task_overrides(args) + list(args.set)
  for flag, field in (('num_actors', 'num_actors'), ('max_learner_steps', 'learner.max_steps'),
                      ('seed', 'seed'), ('replay_dataset', 'replay_dataset'),
                      ('skip_corrupt', 'skip_corrupt')):
    value = getattr(args, flag, None)
    if value is not None:
      overrides.append(f'{field}={value}')
  config = experiment.apply_overrides(config, overrides)
  config.check()  # Damaged datasets are ValueErrors too.
  return config


# `chorus run` flags that make or change an experiment; --resume takes the run's own.
_EXPERIMENT_FLAGS = ('config', 'prompts', 'reward', 'task', 'run_dir', 'num_actors', 'seed',
                     'replay_dataset', 'skip_corrupt', 'plugin', 'set')


def _resumed_config(args):
  """The config of the run in `--resume RUN_DIR`, with a new step budget if one is given."""
  given = [f'--{flag.replace("_", "-")}' for flag in _EXPERIMENT_FLAGS if getattr(args, flag)]
  if given:
    raise ValueError(f'--resume continues a run with its own config; leave out '
                     f'{", ".join(given)} (--max-learner-steps, --launcher and --ray-address '
                     'may go with it).')
  layout.check_run_dir(args.resume, resume=True)
  from chorus.launch import experiment  # pylint: disable=g-import-not-at-top  (imports JAX)
  with open(layout.config_path(args.resume)) as file:
    config = experiment.load_experiment(json.load(file))
  if args.max_learner_steps is not None:
    config = experiment.apply_overrides(config,
                                        [f'learner.max_steps={args.max_learner_steps}'])
  config.check()
  return config


class _TerminalProgress:
  """On a terminal, one progress line rewritten in place on stderr; other lines below it."""

  def __init__(self):
    self._pending = False

  def progress(self, line: str):
    sys.stderr.write('\r\033[K' + line)
    sys.stderr.flush()
    self._pending = True

  def print(self, *args):
    if self._pending:
      sys.stderr.write('\n')
      self._pending = False
    print(*args, flush=True)


def _default_run_dir(args, config) -> str:
  return args.run_dir or os.path.join(
      'runs', f'{config.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}')


def _isolate_network(args) -> None:
  """Re-executes this command in a network namespace of its own (network_namespace.py);
  there, brings its loopback up."""
  from chorus.launch import network_namespace  # pylint: disable=g-import-not-at-top
  if network_namespace.inside():
    network_namespace.bring_up_loopback()
    return
  if args.launcher != 'local':
    raise ValueError('--isolate-network keeps every node on this machine; it goes with '
                     '--launcher local only.')
  network_namespace.check_available()
  network_namespace.reexec_isolated(args.argv)


def _run(args) -> int:
  try:
    if args.isolate_network:
      _isolate_network(args)  # Before anything else: the command starts again, isolated.
    if args.resume:
      config, run_dir = _resumed_config(args), args.resume
    else:
      config = _build_config(args)
      run_dir = _default_run_dir(args, config)
      layout.check_run_dir(run_dir, resume=False)
  except (*_USAGE_ERRORS, OSError) as error:
    return _fail('run', error)
  from chorus.launch import report  # pylint: disable=g-import-not-at-top
  from chorus.launch import run  # pylint: disable=g-import-not-at-top  (imports JAX)
  from chorus.launch.local import NodeFailed  # pylint: disable=g-import-not-at-top
  # A terminal gets a line updated every second; logs and pipes a plain line every 5 s.
  terminal = _TerminalProgress() if sys.stderr.isatty() and sys.stdout.isatty() else None
  display = (dict(print_fn=terminal.print, progress_fn=terminal.progress, progress_every_s=1.0)
             if terminal else {})
  try:
    summary = run.run_experiment(config, run_dir, launcher=args.launcher,
                                 ray_address=args.ray_address, resume=bool(args.resume),
                                 **display)
  except KeyboardInterrupt:
    print('Stopped; every node was shut down.', file=sys.stderr)
    return 130
  except NodeFailed as error:  # The node's own error (a diverged learner, say) and log tail.
    print(f'chorus run: {error}', file=sys.stderr)
    return 1
  except OSError as error:  # The launcher's own files or sockets; the nodes are stopped.
    hint = (f' The run directory cannot be written: free space or make it writable, then '
            f'continue with `chorus run --resume {run_dir}`.'
            if error.errno in _DISK_ERRORS else '')
    print(f'chorus run: the run stopped: {error}. Every node was shut down.{hint}',
          file=sys.stderr)
    return 1
  print(report.summary_table(summary))
  print(f'Summary, curves, RLDS and checkpoints in {os.path.abspath(run_dir)}')
  problems = run.summary_problems(summary)
  if problems:
    print(f'chorus run: the run failed: {"; ".join(problems)}.', file=sys.stderr)
    return 1
  return 0


def _merge_runs(args) -> int:
  try:
    config = _build_config(args)
  except _USAGE_ERRORS as error:
    return _fail('merge-runs', error)
  from chorus.launch import merging  # pylint: disable=g-import-not-at-top  (imports JAX)
  try:
    settings = merging.MergeSettings(num_runs=args.runs, iterations=args.iterations,
                                     liti_rate=args.liti_rate)
  except ValueError as error:
    return _fail('merge-runs', error)
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
    return 0
  try:
    _check_config_name(args.name)
  except ValueError as error:
    return _fail('configs', error)
  from chorus.launch import experiment  # pylint: disable=g-import-not-at-top  (imports JAX)
  print(json.dumps(experiment.to_dict(configs.get_config(args.name)), indent=2))
  return 0


def _datasets(argv: list[str]) -> int:
  """`chorus datasets ...`, parsed by the parser of chorus.datasets.cli (imports TF)."""
  from chorus.datasets import cli as datasets_cli  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='chorus')
  datasets_cli.add_datasets_parser(parser.add_subparsers(dest='command', required=True))
  args = parser.parse_args(argv)
  return args.handler(args)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ['datasets']:
    return _datasets(argv)
  parser = argparse.ArgumentParser(prog='chorus', description='Chorus: RL for token models.')
  commands = parser.add_subparsers(dest='command', required=True)
  run_parser = commands.add_parser('run', help='run an experiment locally, one process per node')
  run_parser.add_argument('--config',
                          help=f'experiment name, one of {", ".join(configs.CONFIG_NAMES)} '
                          f'(default: {_DEFAULT_CONFIG}; `chorus configs` describes them)')
  run_parser.add_argument('--resume', metavar='RUN_DIR',
                          help='continue a stopped run (or a finished one, with a larger '
                          '--max-learner-steps) from its newest learner checkpoint, with its '
                          'own config; setup steps that finished are not run again')
  run_parser.add_argument('--prompts', metavar='FILE',
                          help='train on your own prompts: a .jsonl, .csv or .parquet file with '
                          'a "prompt" per row, an optional "completion" (a demonstration) and '
                          'any other fields; needs --reward (see docs/tasks.md)')
  run_parser.add_argument('--reward', metavar='MODULE:FUNCTION',
                          help='the reward of --prompts: FUNCTION(prompt, completion, row) -> '
                          'float or dict of floats, MODULE importable or a path to a .py file')
  run_parser.add_argument('--task', metavar='MODULE:CLASS',
                          help='your own task class, implementing chorus.core.Task')
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
  run_parser.add_argument('--isolate-network', action='store_true',
                          help='run the launcher and every node in a loopback-only network '
                          'namespace of their own, so that no process outside the run can '
                          'reach its ports (Reverb included); local launcher only; needs '
                          'root or unprivileged user namespaces (default: off)')
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
  commands.add_parser('datasets', help=_DATASETS_HELP)  # Listed here, parsed by _datasets.
  model_commands.add_model_parsers(commands)
  args = parser.parse_args(argv)
  args.argv = argv  # For a command that starts itself again (`run --isolate-network`).
  return args.handler(args)


if __name__ == '__main__':
  sys.exit(main())
