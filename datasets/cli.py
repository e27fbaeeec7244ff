"""`chorus datasets`: inspect, summarise, export, filter, merge and repair RLDS episodes.

Every subcommand reads one or more writer directories (e.g. run_dir/rlds/actor_000), or
folders of them such as a run's rlds/, as one dataset in the order given. A damaged
file stops the command with its name; --skip-corrupt reads everything else instead and
lists what it left out.

  chorus datasets inspect runs/x/rlds
  chorus datasets stats runs/x/rlds --plot stats.png
  chorus datasets export runs/x/rlds --output episodes.jsonl
  chorus datasets filter runs/x/rlds --output demos --min-reward 1 --terminated-only
  chorus datasets merge runs/x/rlds runs/y/rlds --output all
  chorus datasets repair runs/x/rlds

Episodes that a killed actor wrote after its last closed file are read from its journal
(see chorus/datasets/rlds_writer.py); `repair` moves them into a closed file, so that
any tfds reader (tfds.builder_from_directories) sees them too.
"""
import argparse
from collections.abc import Callable, Mapping
import json
import os
import sys

import numpy as np

from chorus import core
from chorus import models
from chorus import schema as schema_lib
from chorus.datasets import rlds_files
from chorus.datasets import rlds_reader
from chorus.datasets import rlds_repair
from chorus.datasets import rlds_writer

_TOKENIZER = models.CharTokenizer()
_STAT_COLUMNS = ('count', 'mean', 'std', 'min', 'p50', 'p90', 'max')
_POLICY_LAG_DEFINITION = (
    'policy_lag = (newest param_version in these episodes) - param_version: how many '
    'learner updates (param versions count learner steps) the policy that sampled an '
    'episode trails the newest one recorded. The lag at training time, which depends on '
    'when the learner sampled the episode, is not recorded in RLDS.')


class _Failure(Exception):
  """A reason to stop a command with exit status 1; the message is printed."""


def _text(tokens) -> str | None:
  """Tokens as CharTokenizer text; None if an id is outside its vocabulary."""
  ids = np.asarray(tokens)
  if ids.size and (ids.min() < 0 or ids.max() >= _TOKENIZER.vocab_size):
    return None  # Another tokenizer's episodes.
  return _TOKENIZER.decode(ids)


def _read(args, max_episodes: int | None = None) -> rlds_reader.EpisodeRead:
  """Reads the command's directories, reporting on stderr what --skip-corrupt left out."""
  try:
    result = rlds_reader.read_episodes(args.directories, skip_corrupt=args.skip_corrupt,
                                       max_episodes=max_episodes)
  except rlds_files.CorruptEpisodeFileError as error:
    raise _Failure(f'{error.path} {error.reason}.\nAdd --skip-corrupt to read every other '
                   'episode and list the files left out.') from error
  except (FileNotFoundError, ValueError) as error:
    raise _Failure(str(error)) from error
  for skipped in result.skipped:
    print(f'chorus datasets {args.datasets_command}: skipped damaged data: {skipped}.',
          file=sys.stderr)
  return result


def _inspect(args) -> int:
  result = _read(args, max_episodes=args.num_episodes)
  features = result.features
  name_width = max(map(len, [*features.keys(), *features['steps'].feature.keys()])) + 2
  print('RLDS step features (one step per completion token):')
  for name, feature in sorted(features['steps'].feature.items()):
    print(f'  {name:<{name_width}}{feature!r}')
  print('Episode features:')
  for name, feature in sorted(features.items()):
    if name != 'steps':
      print(f'  {name:<{name_width}}{feature!r}')
  directory_width = max(map(len, result.episodes_per_directory)) + 2
  print('Episodes:')
  for directory, count in result.episodes_per_directory.items():
    journalled = result.from_journal.get(directory)
    note = (f'  ({journalled} from its journal, in no closed file yet: '
            '`chorus datasets repair` moves them into one)' if journalled else '')
    print(f'  {directory:<{directory_width}}{count:>8}{note}')
  print(f'  {"total":<{directory_width}}{result.num_episodes:>8}')
  for index, t in enumerate(result.trajectories):
    print(f'Episode {index}: task {t.task!r}, actor {t.actor_id}, episode {t.episode_id}, '
          f'prompt_id {t.prompt_id!r}')
    token_fields = [f.name for f in result.schema.fields
                    if f.kind in (schema_lib.PROMPT, schema_lib.COMPLETION, schema_lib.TOKENS)]
    for name in token_fields:
      tokens = np.asarray(t.value(name))
      text = _text(tokens)
      print(f'  {name + ":":<20}{text!r}' if text is not None else
            f'  {name}: {tokens.tolist()}')
    components = ''.join(f', {name} {value:.6g}' for name, value in t.reward_components.items())
    ending = 'terminated' if t.terminated else 'truncated'
    extras = ''.join(f'; {name} {_summary(value)}' for name, value in t.extras.items()
                     if name not in token_fields)
    print(f'  reward {t.reward:.6g}{components}; param_version {t.param_version}; '
          f'length {len(t.completion_tokens)}, {ending}{extras}')
  return 0


def _summary(value) -> str:
  """A short text of an extra field's value: numbers as they are, arrays by their sum."""
  if isinstance(value, np.ndarray) and value.ndim:
    return f'sum {float(np.sum(value)):.6g} over {value.size}'
  return f'{value:.6g}' if isinstance(value, float) else str(value)


def _distributions(trajectories: list[core.Trajectory]) -> dict[str, np.ndarray]:
  """Named per-episode values: reward, completion length, policy lag, each reward term."""
  versions = np.asarray([t.param_version for t in trajectories], np.int64)
  values = {
      'reward': np.asarray([t.reward for t in trajectories], np.float64),
      'completion_length': np.asarray([len(t.completion_tokens) for t in trajectories]),
      'policy_lag': versions.max() - versions,
  }
  for t in trajectories:
    for name in t.reward_components:
      key = f'reward/{name}'
      if key not in values:  # Counted over the episodes that have the term.
        values[key] = np.asarray([u.reward_components[name] for u in trajectories
                                  if name in u.reward_components], np.float64)
  return values


def _stats_row(name: str, values: np.ndarray, name_width: int) -> str:
  """One table row: count, mean, std (ddof=0), min, p50, p90 (linear), max, as %.6g."""
  p50, p90 = np.percentile(values, [50, 90])
  numbers = (np.mean(values), np.std(values), np.min(values), p50, p90, np.max(values))
  return f'{name:<{name_width}}{len(values):>12}' + ''.join(f'{x:>12.6g}' for x in numbers)


def _plot(distributions: Mapping[str, np.ndarray], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for --plot)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = ('reward', 'completion_length', 'policy_lag')
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8))
  for axis, name in zip(axes, names):
    values = distributions[name]
    bins = 'auto'
    if name != 'reward' and np.ptp(values) < 100:  # One bar per integer value.
      bins = np.arange(values.min(), values.max() + 2) - 0.5
    axis.hist(values, bins=bins)
    axis.set_title(f'{name} (n={len(values)}, mean {np.mean(values):.3g})')
    axis.set_xlabel(name)
    axis.set_ylabel('episodes')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _stats(args) -> int:
  result = _read(args)
  distributions = _distributions(result.trajectories)
  name_width = max(map(len, distributions)) + 2
  print(f'{result.num_episodes} episodes from {len(result.episodes_per_directory)} '
        'directories.')
  print(f'{"":<{name_width}}' + ''.join(f'{column:>12}' for column in _STAT_COLUMNS))
  for name, values in distributions.items():
    print(_stats_row(name, values, name_width))
  print('std is over the episodes (ddof=0); p50 and p90 interpolate linearly.')
  print(_POLICY_LAG_DEFINITION)
  if args.plot:
    _plot(distributions, args.plot)
    print(f'Histograms in {args.plot}')
  return 0


def _json_value(value):
  if isinstance(value, np.ndarray):
    return value.tolist()  # float32 log-probs become the float64 of the same value.
  if isinstance(value, Mapping):
    return dict(value)
  return value


def _episode_record(trajectory: core.Trajectory, schema: schema_lib.TrajectorySchema) -> dict:
  """Every field of a trajectory as JSON values, and each token field as text too.

  Text fields are named NAME_text (X_tokens: X_text), null where the tokens are outside
  the CharTokenizer vocabulary.
  """
  record = {field.name: _json_value(trajectory.value(field.name)) for field in schema.fields}
  for field in schema.fields:
    if field.kind in (schema_lib.PROMPT, schema_lib.COMPLETION, schema_lib.TOKENS):
      stem = field.name[:-len('_tokens')] if field.name.endswith('_tokens') else field.name
      record[f'{stem}_text'] = _text(trajectory.value(field.name))
  return record


def _export(args) -> int:
  result = _read(args)
  with open(args.output, 'w', encoding='utf-8') as file:
    for trajectory in result.trajectories:
      file.write(json.dumps(_episode_record(trajectory, result.schema),
                            ensure_ascii=False) + '\n')
  print(f'Wrote {len(result.trajectories)} episodes to {args.output}')
  return 0


def _write_dataset(trajectories: list[core.Trajectory], output: str,
                   schema: schema_lib.TrajectorySchema) -> None:
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise _Failure(f'{output} already exists and is not an empty directory; give a new one '
                   '(filter and merge write a new dataset and never append to one).')
  with rlds_writer.EpisodeLogger(output, schema=schema) as logger:
    for trajectory in trajectories:
      logger.write(trajectory)


def _keeps(args) -> Callable[[core.Trajectory], bool]:
  def keep(t: core.Trajectory) -> bool:
    return ((args.min_reward is None or t.reward >= args.min_reward) and
            (args.max_reward is None or t.reward <= args.max_reward) and
            (not args.terminated_only or t.terminated) and
            (args.min_version is None or t.param_version >= args.min_version))
  return keep


def _filter(args) -> int:
  result = _read(args)
  kept = list(filter(_keeps(args), result.trajectories))
  _write_dataset(kept, args.output, result.schema)
  print(f'Kept {len(kept)} of {len(result.trajectories)} episodes in {args.output}')
  return 0


def _merge(args) -> int:
  result = _read(args)
  _write_dataset(result.trajectories, args.output, result.schema)
  print(f'Merged {len(result.trajectories)} episodes of '
        f'{len(result.episodes_per_directory)} directories into {args.output}')
  return 0


def _repair(args) -> int:
  directories = rlds_files.episode_directories(args.directories)
  missing = [d for d in directories if not os.path.isdir(d)]
  if missing:
    raise _Failure(f'No such directory: {missing}; give RLDS writer directories or folders '
                   'of them.')
  for directory in directories:
    print(rlds_repair.repair_episode_directory(directory))
  return 0


def _handler(command: Callable[[argparse.Namespace], int]):
  def handler(args) -> int:
    try:
      return command(args)
    except _Failure as failure:
      print(f'chorus datasets {args.datasets_command}: {failure}', file=sys.stderr)
      return 1
  return handler


def add_datasets_parser(subparsers) -> None:
  """Adds `datasets` and its subcommands to the `chorus` command's subparsers."""
  parser = subparsers.add_parser(
      'datasets',
      help='inspect, summarise, export, filter, merge or repair recorded RLDS episodes',
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='datasets_command', required=True)
  reading = argparse.ArgumentParser(add_help=False)
  reading.add_argument('directories', nargs='+', metavar='DIR',
                       help="RLDS writer directory, or a folder of them such as a run's rlds/")
  reading.add_argument('--skip-corrupt', action='store_true',
                       help='read around damaged files (truncated or garbled episode files, '
                       'broken metadata) and list them, instead of stopping')
  writing = argparse.ArgumentParser(add_help=False)
  writing.add_argument('--output', required=True, metavar='OUT_DIR',
                       help='new directory for the resulting RLDS dataset')

  inspect = commands.add_parser(
      'inspect', parents=[reading],
      help='schema, episodes per directory and the first episodes as text')
  inspect.add_argument('-n', '--num-episodes', type=int, default=3,
                       help='episodes to show (default: 3)')
  inspect.set_defaults(handler=_handler(_inspect))

  stats = commands.add_parser(
      'stats', parents=[reading],
      help='distributions of reward, completion length and policy lag',
      epilog=_POLICY_LAG_DEFINITION)
  stats.add_argument('--plot', metavar='PATH', help='also write their histograms as a PNG')
  stats.set_defaults(handler=_handler(_stats))

  export = commands.add_parser('export', parents=[reading],
                               help='every episode as one JSON object per line')
  export.add_argument('--output', required=True, metavar='FILE.jsonl', help='file to write')
  export.set_defaults(handler=_handler(_export))

  filter_parser = commands.add_parser(
      'filter', parents=[reading, writing],
      help='copy the episodes that pass every given test into a new dataset (e.g. a '
      'demonstration set)')
  filter_parser.add_argument('--min-reward', type=float, help='keep reward >= X')
  filter_parser.add_argument('--max-reward', type=float, help='keep reward <= X')
  filter_parser.add_argument('--terminated-only', action='store_true',
                             help='keep episodes recorded as terminated: ended with EOS, or '
                             'at a length cap that ends the task\'s episodes (every '
                             'built-in task\'s cap does)')
  filter_parser.add_argument('--min-version', type=int,
                             help='keep episodes sampled by param_version >= V')
  filter_parser.set_defaults(handler=_handler(_filter))

  merge = commands.add_parser('merge', parents=[reading, writing],
                              help='every episode of the inputs into one new dataset')
  merge.set_defaults(handler=_handler(_merge))

  repair = commands.add_parser(
      'repair', help="make killed writers' directories whole for any tfds reader",
      description='Moves the episodes that a killed writer journalled after its last closed '
      'file into a new closed file, rebuilds broken metadata and drops a torn last journal '
      'record (the episode in progress at the kill). Run it only while no process writes '
      'to the directories; running it twice changes nothing.')
  repair.add_argument('directories', nargs='+', metavar='DIR',
                      help="RLDS writer directory, or a folder of them such as a run's rlds/")
  repair.set_defaults(handler=_handler(_repair))
