"""Episodes as RLDS: one writer directory per actor, read back as one dataset.

Writing goes through `rlds.tfds.episode_writer.EpisodeWriter` (tfds' SequentialWriter);
reading through `tfds.builder_from_directories`, so any RLDS/TFDS tool can read a run.

On disk, one directory per writer (e.g. run_dir/rlds/actor_003):

    dataset_info.json                      split 'train': lengths of the closed files
    features.json                          the schema below
    chorus_episodes-train.tfrecord-00000   closed files of `max_episodes_per_file` episodes
    chorus_episodes-train.tfrecord-00001   ...; the last one may still be open

Steps are tokens (tfds stacks an episode's steps, so every step field has one fixed
shape). A completion of T tokens is exactly T steps; there is no extra observation-only
step after the last action. Step t:
  observation   int32, the token before the action: the last prompt token for t = 0,
                completion token t - 1 after that.
  action        int32, completion token t.
  reward        float32, 0 except the trajectory's reward on the last step.
  discount      float32, 1 except 0 on the last step of a terminated (EOS) episode.
  is_first      t == 0.
  is_last       t == T - 1; its action is real (EOS when terminated).
  is_terminal   is_last and terminated. Unlike RLDS' default convention, where the
                terminal step carries only an observation, here it also carries the
                last action, so tools that drop the action of is_last steps lose a token.
  behaviour_logprob  float32 step metadata, log mu(action | prefix).
Episode metadata: prompt_tokens (int32 [P], P >= 1), reward and temperature (float64,
stored as raw bytes because tf.train.Example rounds floats to float32), terminated,
param_version (int64), model_name, prompt_id, task (text), actor_id, episode_id, seed
(int64), and the reward's terms as two parallel tensors, reward_component_names (string
[N]) and reward_component_values (float64 [N], raw bytes): plain tensors, which any
tf.data/TFDS tool reads and filters without parsing, where a JSON string would need a
parser. Every field of core.Trajectory round-trips exactly.

When episodes become readable, and what a crash loses (measured on this machine,
tensorflow-datasets 4.9.4, a child process writing 20-50-token episodes, then SIGKILL):
- A file becomes readable the moment the `write` that fills it returns (EpisodeWriter
  closes it and rewrites dataset_info.json inside that call), or on `close()`.
- Killed after 7 writes at 3 episodes per file: episodes 0-5 read back exactly; the open
  file was 0 bytes (TFRecordWriter buffers) and episode 6 was gone.
- tfds rewrites dataset_info.json and features.json in place after every episode. Of 48
  kills at random moments of a tight loop of 1-episode files, 36 left one of them empty,
  which makes the whole directory unreadable; kills spread over one write broke
  dataset_info.json 3 times in 16. A reader polling a live writer found features.json
  empty 30% and dataset_info.json 16% of the time. So readers retry for about a second,
  and `repair_episode_directory` rebuilds a broken directory's metadata from its
  complete files; `EpisodeLogger` runs it when it reopens one, so a restarted actor
  continues its directory.
Together: a SIGKILL loses at most `max_episodes_per_file` episodes of that writer (its
open file, or a file closed in the instant before the metadata listed it). The default,
100, makes files of about 0.2 MB (64-token completions) to 1 MB (512). Writing one
episode takes about 3.5 ms at 64 tokens and 20 ms at 512 (tfds encodes each step in
Python); reading one back about 3 ms.

Damaged files (a disk filled up, a copy cut short, bytes appended): `read_episodes` and
`read_trajectories` check every listed file before decoding, since TF's own error names
no file. A file cut short, with a broken record or with bytes after its last record, or
a directory whose metadata does not parse, raises CorruptEpisodeFileError naming the
file; with skip_corrupt=True the episodes before the damage are read, the rest of that
file (or that whole directory, for metadata) is left out and listed. The check reads each
file once more, about 40 ms per 100-episode file on this machine.
"""
from collections.abc import Sequence
import dataclasses
import json
import logging
import os
import re
import time

from etils import epath
from google.protobuf import json_format
import numpy as np
from rlds import rlds_types
from rlds.tfds import episode_writer
import tensorflow as tf
import tensorflow_datasets as tfds

from chorus import core

DEFAULT_DATASET_NAME = 'chorus_episodes'
DEFAULT_MAX_EPISODES_PER_FILE = 100

_SPLIT = 'train'
_VERSION = '1.0.0'
_FILE_FORMAT = 'tfrecord'
# The file naming of tfds' SequentialWriter, so repaired metadata points at its files.
_FILE_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}'
_METADATA_FILES = ('dataset_info.json', 'features.json')
# A TFRecord record is its length (8 bytes), their CRC (4), the data and its CRC (4).
_TFRECORD_FRAMING_BYTES = 16
# What tfds raises on a dataset_info.json / features.json caught empty or half written.
_METADATA_ERRORS = (json.JSONDecodeError, json_format.ParseError)
# A live writer rewrites its metadata in about a millisecond; a second of retries tells
# that apart from a file left broken by a crash.
_METADATA_READ_ATTEMPTS = 20
_METADATA_RETRY_SECONDS = 0.05

_LOG = logging.getLogger(__name__)

Directories = str | os.PathLike | Sequence[str | os.PathLike]


def _dataset_config(dataset_name: str) -> episode_writer.DatasetConfig:
  # tf.train.Example keeps floats as float32, so a plain float64 feature comes back
  # rounded; raw bytes keep a Python float exact.
  exact_float64 = tfds.features.Tensor(
      shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES)
  return episode_writer.DatasetConfig(
      name=dataset_name,
      observation_info=np.int32,
      action_info=np.int32,
      reward_info=np.float32,
      discount_info=np.float32,
      step_metadata_info={'behaviour_logprob': np.float32},
      episode_metadata_info={
          'prompt_tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32),
          'reward': exact_float64,
          'terminated': np.bool_,
          'param_version': np.int64,
          'temperature': exact_float64,
          'model_name': tfds.features.Text(),
          'prompt_id': tfds.features.Text(),
          'task': tfds.features.Text(),
          'actor_id': np.int64,
          'episode_id': np.int64,
          'seed': np.int64,
          'reward_component_names': tfds.features.Tensor(shape=(None,), dtype=np.str_),
          'reward_component_values': tfds.features.Tensor(
              shape=(None,), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
      })


def _episode(trajectory: core.Trajectory) -> rlds_types.Episode:
  """The RLDS episode of a trajectory: one step per completion token."""
  prompt_tokens = np.asarray(trajectory.prompt_tokens, np.int32)
  if prompt_tokens.ndim != 1 or prompt_tokens.size == 0:
    raise ValueError(
        f'prompt_tokens has shape {prompt_tokens.shape}; an episode needs a non-empty 1-D '
        'prompt (at least BOS), whose last token is the first step\'s observation.')
  actions = np.asarray(trajectory.completion_tokens, np.int32)
  logprobs = np.asarray(trajectory.behaviour_logprobs, np.float32)
  observations = np.concatenate([prompt_tokens[-1:], actions[:-1]])
  last = len(actions) - 1
  steps = [
      rlds_types.build_step(
          observation=observations[t],
          action=actions[t],
          reward=np.float32(trajectory.reward if t == last else 0.0),
          discount=np.float32(0.0 if t == last and trajectory.terminated else 1.0),
          is_terminal=t == last and bool(trajectory.terminated),
          is_first=t == 0,
          is_last=t == last,
          metadata={'behaviour_logprob': logprobs[t]})
      for t in range(len(actions))
  ]
  return rlds_types.build_episode(steps, {
      'prompt_tokens': prompt_tokens,
      'reward': np.float64(trajectory.reward),
      'terminated': bool(trajectory.terminated),
      'param_version': np.int64(trajectory.param_version),
      'temperature': np.float64(trajectory.temperature),
      'model_name': trajectory.model_name,
      'prompt_id': trajectory.prompt_id,
      'task': trajectory.task,
      'actor_id': np.int64(trajectory.actor_id),
      'episode_id': np.int64(trajectory.episode_id),
      'seed': np.int64(trajectory.seed),
      'reward_component_names': np.asarray(list(trajectory.reward_components), np.object_),
      'reward_component_values': np.asarray(list(trajectory.reward_components.values()),
                                            np.float64),
  })


class EpisodeLogger:
  """Writes each trajectory as one RLDS episode into its own directory.

  One logger per directory and one writer process per directory: an actor writes to
  its own, e.g. run_dir/rlds/actor_003. An existing directory is appended to, after
  being repaired if a killed writer left its metadata broken, so a restarted actor
  continues where the closed files end.

  Usage:
    with EpisodeLogger(run_dir / 'rlds' / 'actor_003') as logger:
      logger.write(trajectory)
  """

  def __init__(self, directory: str | os.PathLike, *,
               dataset_name: str = DEFAULT_DATASET_NAME,
               max_episodes_per_file: int = DEFAULT_MAX_EPISODES_PER_FILE):
    """Opens (creating if missing) a writer directory.

    Args:
      directory: this writer's directory.
      dataset_name: the tfds name; every directory read together must share it.
      max_episodes_per_file: episodes per file. A file is readable once full, so this
        bounds what a crash of the writing process loses; smaller means more files.
    """
    if max_episodes_per_file < 1:
      raise ValueError(
          f'max_episodes_per_file must be >= 1, got {max_episodes_per_file}; it bounds the '
          'episodes lost on a crash (1 makes every episode readable as soon as it is written).')
    self._directory = os.fspath(directory)
    # EpisodeWriter fails on a missing directory.
    os.makedirs(self._directory, exist_ok=True)
    if _broken_metadata_file(self._directory):
      kept = repair_episode_directory(self._directory, dataset_name=dataset_name)
      _LOG.warning('Rebuilt the broken RLDS metadata of %s (its writer was killed); kept '
                   '%d episodes of complete files.', self._directory, kept)
    self._writer = episode_writer.EpisodeWriter(
        self._directory, _dataset_config(dataset_name),
        max_episodes_per_file=max_episodes_per_file, version=_VERSION, overwrite=False)

  @property
  def directory(self) -> str:
    return self._directory

  def write(self, trajectory: core.Trajectory) -> None:
    """Appends one episode; it is readable once its file is full or the logger closed."""
    if self._writer is None:
      raise RuntimeError(f'The EpisodeLogger of {self._directory} is closed; open a new one '
                         'on the same directory to append more episodes.')
    self._writer.add_episode(_episode(trajectory))

  def close(self) -> None:
    """Closes the open file, making every written episode readable. Idempotent."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> 'EpisodeLogger':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _broken_metadata_file(directory: str) -> str | None:
  """The metadata file of a started writer directory that is missing or does not parse."""
  paths = [os.path.join(directory, name) for name in _METADATA_FILES]
  if not any(os.path.exists(path) for path in paths):
    return None
  for path in paths:
    try:
      with open(path, encoding='utf-8') as f:
        json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
      return path
  return None


def _tf_error_text(error: tf.errors.OpError) -> str:
  # Drops the eager-op decoration: '{{function_node ...}} corrupted record at 12 [Op:...]'.
  return re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:.*$', '', error.message, flags=re.DOTALL)


def _read_records(path: str) -> tuple[list[int], str | None]:
  """Byte sizes of a file's leading intact records, and what is wrong after them, if anything."""
  sizes = []
  try:
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      sizes.append(len(record))
  except tf.errors.DataLossError as error:
    return sizes, _tf_error_text(error)
  # TF ends a file quietly at a tail shorter than a record header, so count the bytes.
  extra_bytes = os.path.getsize(path) - sum(size + _TFRECORD_FRAMING_BYTES for size in sizes)
  if extra_bytes:
    return sizes, f'{extra_bytes} bytes after the last whole record'
  return sizes, None


def _record_sizes(path: epath.Path) -> list[int]:
  """Byte sizes of the records of a complete file; [] if missing, empty or cut short."""
  if not path.exists():
    return []
  sizes, damage = _read_records(os.fspath(path))
  return [] if damage else sizes


def repair_episode_directory(directory: str | os.PathLike, *,
                             dataset_name: str = DEFAULT_DATASET_NAME) -> int:
  """Rebuilds a writer directory's metadata from its episode files.

  For a directory whose writer was killed while tfds rewrote dataset_info.json or
  features.json. Keeps files in order while each reads back whole and non-empty, and
  stops at the first that does not (the file that was open); a later writer overwrites
  it. Only run it while no process writes to the directory.

  Returns:
    The number of episodes the repaired directory holds.
  """
  data_dir = epath.Path(directory)
  template = tfds.core.ShardedFileTemplate(
      data_dir=data_dir, template=_FILE_TEMPLATE, dataset_name=dataset_name, split=_SPLIT,
      filetype_suffix=_FILE_FORMAT)
  shard_lengths, num_bytes = [], 0
  while sizes := _record_sizes(
      template.sharded_filepath(shard_index=len(shard_lengths), num_shards=None)):
    shard_lengths.append(len(sizes))
    num_bytes += sum(sizes)
  identity = tfds.core.DatasetIdentity(
      name=dataset_name, version=tfds.core.Version(_VERSION), data_dir=os.fspath(data_dir),
      module_name='')
  info = tfds.rlds.rlds_base.build_info(_dataset_config(dataset_name), identity)
  info.set_file_format(_FILE_FORMAT)
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name=_SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes,
      filename_template=template)]))
  info.write_to_directory(data_dir)
  return sum(shard_lengths)


class CorruptEpisodeFileError(ValueError):
  """A file of a writer directory (episodes or metadata) that does not read back whole.

  Attributes:
    path: the damaged file.
    reason: what is wrong with it, as a clause after its path.
  """

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path, self.reason = os.fspath(path), reason
    super().__init__(
        f'{self.path} {reason}. Pass skip_corrupt=True (`chorus datasets ... --skip-corrupt`) '
        'to read every other episode and list what was left out.')


@dataclasses.dataclass(frozen=True)
class SkippedFile:
  """A damaged file that `read_episodes(..., skip_corrupt=True)` left out, whole or in part.

  Attributes:
    path: the file.
    reason: what is wrong with it, as a clause after its path.
    episodes_read: its episodes before the damage, which were read (0 for metadata).
  """
  path: str
  reason: str
  episodes_read: int

  def __str__(self) -> str:
    kept = (f'read the {self.episodes_read} episodes before the damage'
            if self.episodes_read else 'read nothing from it')
    return f'{self.path} {self.reason}; {kept}'


@dataclasses.dataclass(frozen=True)
class EpisodeRead:
  """What `read_episodes` found.

  Attributes:
    trajectories: the episodes, in the order of the writer directories, then write order.
    episodes_per_directory: readable episodes of each writer directory (after expanding
      folders of them), all counted even when `max_episodes` decoded fewer.
    skipped: damaged files left out, whole or in part; empty unless skip_corrupt.
    features: the tfds schema: RLDS `steps` features and the episode metadata.
  """
  trajectories: list[core.Trajectory]
  episodes_per_directory: dict[str, int]
  skipped: list[SkippedFile]
  features: tfds.features.FeaturesDict

  @property
  def num_episodes(self) -> int:
    return sum(self.episodes_per_directory.values())


def _is_writer_directory(path: str) -> bool:
  return os.path.isdir(path) and any(
      name in _METADATA_FILES or f'-{_SPLIT}.{_FILE_FORMAT}-' in name
      for name in os.listdir(path))


def episode_directories(paths: Directories) -> list[str]:
  """The writer directories that `paths` name, a folder of them standing for its members.

  A run's rlds/ folder holds one writer directory per actor (actor_000, actor_001, ...);
  it expands to those, in name order. Any other path is kept as given.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  directories = []
  for path in map(os.fspath, paths):
    members = []
    if os.path.isdir(path) and not _is_writer_directory(path):
      members = [member for member in sorted(os.path.join(path, name)
                                             for name in os.listdir(path))
                 if _is_writer_directory(member)]
    directories.extend(members or [path])
  return directories


def _retry_while_rewritten(load, directories: list[str]):
  """Calls `load`, retrying while a live writer has its metadata files half written."""
  for attempt in range(_METADATA_READ_ATTEMPTS):
    try:
      return load()
    except _METADATA_ERRORS as error:
      if attempt == _METADATA_READ_ATTEMPTS - 1:
        broken = next(filter(None, map(_broken_metadata_file, directories)), None)
        raise CorruptEpisodeFileError(
            broken or ' or '.join(directories),
            f'stays unreadable ({error}): its writer was probably killed while rewriting the '
            'metadata. Rebuild it with chorus.datasets.repair_episode_directory, or by opening '
            'an EpisodeLogger on the directory, once no process writes there') from error
      time.sleep(_METADATA_RETRY_SECONDS)


def _directory_builder(directory: str) -> tfds.core.DatasetBuilder | None:
  """The tfds builder of a writer directory; None while it has no closed file."""
  if not os.path.exists(os.path.join(directory, 'dataset_info.json')):
    return None
  builder = _retry_while_rewritten(lambda: tfds.builder_from_directory(directory),
                                   [directory])
  split = builder.info.splits.get(_SPLIT)
  return builder if split and split.num_examples else None


def _no_episodes_error(paths: list[str], skipped: list[SkippedFile]) -> FileNotFoundError:
  left_out = f' (left out as damaged: {[s.path for s in skipped]})' if skipped else ''
  return FileNotFoundError(
      f'No readable RLDS episodes in {paths}{left_out}: each is missing or has no closed '
      'file yet. A writer makes episodes readable when a file fills up (every '
      'max_episodes_per_file episodes) or when it is closed; check the paths, or close the '
      'EpisodeLoggers first.')


def _builder(directories: Directories) -> tfds.core.DatasetBuilder:
  paths = episode_directories(directories)
  readable = [path for path in paths if _directory_builder(path)]
  if not readable:
    raise _no_episodes_error(paths, [])
  return _retry_while_rewritten(lambda: tfds.builder_from_directories(readable), readable)


def episode_dataset(directories: Directories) -> tf.data.Dataset:
  """The raw RLDS episodes of one or several writer directories, as one dataset.

  Directories with nothing readable yet are skipped, and folders of writer directories
  expanded (`episode_directories`). Episodes come in the order of the directories, then
  in write order; `steps` is a nested tf.data.Dataset, as RLDS tools expect. Files are
  not checked first: a damaged one fails the iteration, without naming the file (TF does
  not); `read_episodes` checks each file and can skip damaged ones.
  """
  return _builder(directories).as_dataset(split=_SPLIT, shuffle_files=False)


def _stack_steps(episode):
  # T steps as one batch: one element whose fields are [T] arrays.
  return dict(episode, steps=episode[rlds_types.STEPS].batch(2**31 - 1).get_single_element())


def _trajectory(episode) -> core.Trajectory:
  steps = episode[rlds_types.STEPS]
  return core.Trajectory(
      prompt_tokens=episode['prompt_tokens'],
      completion_tokens=steps[rlds_types.ACTION],
      behaviour_logprobs=steps['behaviour_logprob'],
      reward=float(episode['reward']),
      terminated=bool(episode['terminated']),
      param_version=int(episode['param_version']),
      temperature=float(episode['temperature']),
      model_name=episode['model_name'].decode('utf-8'),
      prompt_id=episode['prompt_id'].decode('utf-8'),
      actor_id=int(episode['actor_id']),
      episode_id=int(episode['episode_id']),
      task=episode['task'].decode('utf-8'),
      seed=int(episode['seed']),
      reward_components={
          name.decode('utf-8'): float(value) for name, value in
          zip(episode['reward_component_names'], episode['reward_component_values'],
              strict=True)})


def _intact_episodes(path: str, listed: int) -> tuple[int, str | None]:
  """How many leading episodes of a file read back whole, and what is wrong, if anything."""
  if not os.path.exists(path):
    return 0, f'is missing, though dataset_info.json lists {listed} episodes in it'
  sizes, damage = _read_records(path)
  if damage:
    return len(sizes), (f'is damaged after {len(sizes)} of the {listed} episodes '
                        f'dataset_info.json lists ({damage})')
  if len(sizes) < listed:
    return len(sizes), (f'holds {len(sizes)} whole episodes where dataset_info.json lists '
                        f'{listed}: it was cut short')
  return len(sizes), None


def _decode(files: list[tuple[str, int]], features: tfds.features.FeaturesDict,
            max_episodes: int | None) -> list[core.Trajectory]:
  """The first `count` episodes of each (path, count), in order, through one tf.data pipeline."""
  paths, counts = zip(*files)
  records = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(counts, np.int64)))
  # take(count) stops before any damage found by the check, so it is never read.
  records = records.flat_map(lambda path, count: tf.data.TFRecordDataset(path).take(count))
  if max_episodes is not None:
    records = records.take(max_episodes)
  episodes = records.map(features.deserialize_example).map(_stack_steps)
  return [_trajectory(episode) for episode in episodes.as_numpy_iterator()]


def read_episodes(directories: Directories, *, skip_corrupt: bool = False,
                  max_episodes: int | None = None) -> EpisodeRead:
  """Every readable episode of writer directories, each file checked before it is decoded.

  Args:
    directories: writer directories, or folders of them such as a run's rlds/ (see
      `episode_directories`). Those with nothing readable yet are skipped.
    skip_corrupt: leave out what is damaged, listing it in `skipped`, instead of raising:
      an episode file cut short or with broken records keeps the episodes before the
      damage; a directory whose metadata does not parse is left out whole (see
      `repair_episode_directory` to recover it).
    max_episodes: decode at most this many episodes; every file is still checked and
      counted.

  Returns:
    An EpisodeRead. Token arrays come back int32, log-probs float32.

  Raises:
    CorruptEpisodeFileError: a file is damaged and skip_corrupt is False.
    FileNotFoundError: nothing readable in any of the directories.
    ValueError: the directories were written with different schemas.
  """
  paths = episode_directories(directories)
  files, episodes_per_directory, skipped = [], {}, []
  features, schema_directory = None, None
  for directory in paths:
    episodes_per_directory[directory] = 0
    try:
      builder = _directory_builder(directory)
    except CorruptEpisodeFileError as error:
      if not skip_corrupt:
        raise
      skipped.append(SkippedFile(error.path, f'{error.reason}; its directory was left out', 0))
      continue
    if builder is None:
      continue
    if features is None:
      features, schema_directory = builder.info.features, directory
    elif builder.info.features.to_json() != features.to_json():
      raise ValueError(
          f'{directory} was written with a different episode schema from {schema_directory} '
          '(compare their features.json); read them separately.')
    split = builder.info.splits[_SPLIT]
    for path, listed in zip(split.filepaths, split.shard_lengths, strict=True):
      intact, damage = _intact_episodes(os.fspath(path), listed)
      if damage:
        if not skip_corrupt:
          raise CorruptEpisodeFileError(path, damage)
        skipped.append(SkippedFile(os.fspath(path), damage, intact))
      if intact:
        files.append((os.fspath(path), intact))
        episodes_per_directory[directory] += intact
  if not files:
    raise _no_episodes_error(paths, skipped)
  return EpisodeRead(trajectories=_decode(files, features, max_episodes),
                     episodes_per_directory=episodes_per_directory, skipped=skipped,
                     features=features)


def read_trajectories(directories: Directories, *,
                      skip_corrupt: bool = False) -> list[core.Trajectory]:
  """Every readable episode of one or several writer directories, as Trajectories.

  As `read_episodes(directories, skip_corrupt=...).trajectories`; files left out as
  damaged are logged as warnings.
  """
  result = read_episodes(directories, skip_corrupt=skip_corrupt)
  for skipped in result.skipped:
    _LOG.warning('Skipped damaged RLDS data: %s.', skipped)
  return result.trajectories
