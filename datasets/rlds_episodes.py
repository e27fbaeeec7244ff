"""Episodes as RLDS: one writer directory per actor, read back as one dataset.

Writing goes through `rlds.tfds.episode_writer.EpisodeWriter` (tfds' SequentialWriter);
reading through `tfds.builder_from_directories`, so any RLDS/TFDS tool can read a run.

On disk, one directory per writer (e.g. run_dir/rlds/actor_003):

    dataset_info.json                      split 'train': lengths of the closed files
    features.json                          the schema below
    chorus_episodes-train.tfrecord-00000   closed files of `max_episodes_per_file` episodes
    chorus_episodes-train.tfrecord-00001   ...; the last one may still be open
    episodes.journal                       the open file's episodes (see below)

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
  reference_logprob  float32 step metadata, Trajectory.reference_logprobs[t]; 0 when the
                trajectory has none (see has_reference_logprobs).
Episode metadata: prompt_tokens (int32 [P], P >= 1), reward and temperature (float64,
stored as raw bytes because tf.train.Example rounds floats to float32), terminated,
param_version (int64), model_name, prompt_id, task (text), actor_id, episode_id, seed
(int64), and the reward's terms as two parallel tensors, reward_component_names (string
[N]) and reward_component_values (float64 [N], raw bytes): plain tensors, which any
tf.data/TFDS tool reads and filters without parsing, where a JSON string would need a
parser. The optional fields of Nash-MD and BOND, absent (None) for other algorithms:
  has_reference_logprobs    bool; False: reference_logprobs is None (steps hold 0).
  paired_completion_tokens  int32 [T']; empty means None (core.Trajectory refuses an
                            empty pair, so the empty tensor is unambiguous).
  win_probability           float64, raw bytes; 0 when absent.
  has_win_probability       bool; False: win_probability is None.
Every field of core.Trajectory round-trips exactly, None included.

What a crash loses: at most the episode whose `write` was in progress.
tfds makes a file readable only when it closes it, and rewrites dataset_info.json and
features.json in place after every episode (measured on this machine, tensorflow-datasets
4.9.4, SIGKILLed child writers: the open file is 0 bytes after a kill, since
TFRecordWriter buffers; of 48 kills of a tight loop of 1-episode files, 36 left a
metadata file empty, which makes the whole directory unreadable; a reader polling a live
writer found features.json empty 30% and dataset_info.json 16% of the time). So files
cannot be closed after every episode, and closing every `max_episodes_per_file` alone
would lose up to that many. Hence the journal (chorus/datasets/journal.py):
- `EpisodeLogger.write` appends the episode to episodes.journal (one length-prefixed,
  CRC-checked record, one os.write) before handing it to tfds, and empties the journal
  each time tfds has closed and listed a file. The journal holds at most the open file's
  episodes; each record carries the episode's index in the directory, so recovery never
  duplicates an episode that a file already holds.
- `read_episodes` / `read_trajectories` (and chorus.datasets.replay) read the journal,
  then the metadata, and add the journalled episodes that no listed file holds (logged:
  the writer is running, or was killed). A torn last record (the kill came during the
  append) is the episode in progress: dropped, with a log line.
- `repair_episode_directory` (run by `EpisodeLogger` when it reopens a directory, so a
  restarted actor does it, and by `chorus datasets repair DIR`) writes those episodes
  into a new closed file, rebuilds the metadata from the intact files and empties the
  journal, so plain `tfds.builder_from_directories` readers see them too. Killed midway,
  it is simply run again.
- `episode_dataset` (raw tfds) sees closed files only.
Costs measured on this machine (2 busy cores, local disk): a journal append takes about
35 us for a 64-token episode (1.2 kB record) and 60 us at 512 tokens (6.5 kB), against
8 ms and 27 ms for the whole `write` (tfds encodes each step in Python; 3.5 ms and 20 ms
on an idle machine): under 1%. `fsync_journal=True`, which also survives a machine
crash, adds 1.5-3.5 ms per episode. Reading a journalled episode re-encodes it with tfds,
about the cost of writing it. The default, 100 episodes per file, makes files of about
0.2 MB (64-token completions) to 1 MB (512).

Damaged files (a disk filled up, a copy cut short, bytes appended): `read_episodes` and
`read_trajectories` check every listed file before decoding, since TF's own error names
no file. A file cut short, with a broken record or with bytes after its last record, or
a directory whose metadata does not parse, raises CorruptEpisodeFileError naming the
file; with skip_corrupt=True the episodes before the damage are read, the rest of that
file (or that whole directory, for metadata) is left out and listed. The check reads each
file once more, about 40 ms per 100-episode file on this machine.
"""
from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
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
from chorus.datasets import journal as journal_lib

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
      step_metadata_info={'behaviour_logprob': np.float32, 'reference_logprob': np.float32},
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
          'has_reference_logprobs': np.bool_,
          'paired_completion_tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32),
          'win_probability': exact_float64,
          'has_win_probability': np.bool_,
      })


@functools.cache
def _chorus_features(dataset_name: str) -> tfds.features.FeaturesDict:
  """The tfds features of Chorus episodes (to encode journalled episodes as records)."""
  identity = tfds.core.DatasetIdentity(
      name=dataset_name, version=tfds.core.Version(_VERSION), data_dir='/unused',
      module_name='')
  return tfds.rlds.rlds_base.build_info(_dataset_config(dataset_name), identity).features


def _episode(trajectory: core.Trajectory) -> rlds_types.Episode:
  """The RLDS episode of a trajectory: one step per completion token."""
  prompt_tokens = np.asarray(trajectory.prompt_tokens, np.int32)
  if prompt_tokens.ndim != 1 or prompt_tokens.size == 0:
    raise ValueError(
        f'prompt_tokens has shape {prompt_tokens.shape}; an episode needs a non-empty 1-D '
        'prompt (at least BOS), whose last token is the first step\'s observation.')
  actions = np.asarray(trajectory.completion_tokens, np.int32)
  logprobs = np.asarray(trajectory.behaviour_logprobs, np.float32)
  has_reference = trajectory.reference_logprobs is not None
  reference_logprobs = (np.asarray(trajectory.reference_logprobs, np.float32) if has_reference
                        else np.zeros(len(actions), np.float32))
  paired = trajectory.paired_completion_tokens
  has_win = trajectory.win_probability is not None
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
          metadata={'behaviour_logprob': logprobs[t],
                    'reference_logprob': reference_logprobs[t]})
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
      'has_reference_logprobs': has_reference,
      # Empty means absent: core.Trajectory refuses an empty pair.
      'paired_completion_tokens': np.asarray([] if paired is None else paired, np.int32),
      'win_probability': np.float64(trajectory.win_probability if has_win else 0.0),
      'has_win_probability': has_win,
  })


class EpisodeLogger:
  """Writes each trajectory as one RLDS episode into its own directory, crash-safely.

  One logger per directory and one writer process per directory: an actor writes to
  its own, e.g. run_dir/rlds/actor_003. Every episode also goes to the directory's
  journal before tfds sees it (see the module docstring), so a crash loses at most the
  episode whose `write` was in progress. An existing directory is appended to, after
  `repair_episode_directory` has rebuilt broken metadata and moved journalled episodes
  of a killed writer into a closed file, so a restarted actor continues its directory.

  Usage:
    with EpisodeLogger(run_dir / 'rlds' / 'actor_003') as logger:
      logger.write(trajectory)
  """

  def __init__(self, directory: str | os.PathLike, *,
               dataset_name: str = DEFAULT_DATASET_NAME,
               max_episodes_per_file: int = DEFAULT_MAX_EPISODES_PER_FILE,
               fsync_journal: bool = False):
    """Opens (creating if missing) a writer directory.

    Args:
      directory: this writer's directory.
      dataset_name: the tfds name; every directory read together must share it.
      max_episodes_per_file: episodes per file. Generic tfds readers see an episode once
        its file is closed (full, or the logger closed); Chorus readers see it at once
        through the journal.
      fsync_journal: fsync the journal after every episode, so that episodes survive a
        crash of the machine too, not only of the process (about 1-5 ms more per
        episode on a local disk; see the module docstring).
    """
    if max_episodes_per_file < 1:
      raise ValueError(
          f'max_episodes_per_file must be >= 1, got {max_episodes_per_file}; it is how many '
          'episodes go in one file before tfds closes it.')
    self._directory = os.fspath(directory)
    self._max_episodes_per_file = max_episodes_per_file
    # EpisodeWriter fails on a missing directory.
    os.makedirs(self._directory, exist_ok=True)
    if (_broken_metadata_file(self._directory) or
        os.path.exists(journal_lib.journal_path(self._directory)) and
        os.path.getsize(journal_lib.journal_path(self._directory))):
      report = repair_episode_directory(self._directory, dataset_name=dataset_name)
      _LOG.warning('Reopened the RLDS directory of a writer that was killed: %s', report)
    self._writer = episode_writer.EpisodeWriter(
        self._directory, _dataset_config(dataset_name),
        max_episodes_per_file=max_episodes_per_file, version=_VERSION, overwrite=False)
    self._next_index = _listed_episodes(self._directory)
    self._in_open_file = 0
    self._journal = journal_lib.JournalWriter(self._directory, fsync=fsync_journal)

  @property
  def directory(self) -> str:
    return self._directory

  def write(self, trajectory: core.Trajectory) -> None:
    """Appends one episode. Once this returns, the episode survives a crash of the process."""
    if self._writer is None:
      raise RuntimeError(f'The EpisodeLogger of {self._directory} is closed; open a new one '
                         'on the same directory to append more episodes.')
    episode = _episode(trajectory)  # Raises on a bad trajectory before anything is written.
    self._journal.append(self._next_index, trajectory)
    self._writer.add_episode(episode)
    self._next_index += 1
    self._in_open_file += 1
    if self._in_open_file == self._max_episodes_per_file:
      # tfds closed and listed the file inside add_episode: its episodes are safe there.
      self._journal.clear()
      self._in_open_file = 0

  def close(self) -> None:
    """Closes the open file, making every written episode readable by any tfds tool."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self._journal.clear()
      self._journal.close()

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


def _listed_episodes(directory: str) -> int:
  """Episodes in the closed files that a directory's dataset_info.json lists (0 if none)."""
  try:
    with open(os.path.join(directory, 'dataset_info.json'), encoding='utf-8') as f:
      info = json.load(f)
  except FileNotFoundError:
    return 0
  return sum(int(length) for split in info.get('splits', []) if split.get('name') == _SPLIT
             for length in split.get('shardLengths', []))


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


@dataclasses.dataclass(frozen=True)
class RepairReport:
  """What `repair_episode_directory` did to one writer directory.

  Attributes:
    directory: the writer directory.
    num_episodes: episodes the repaired directory holds, all in closed, listed files.
    recovered: journalled episodes written into a new closed file (those of the file that
      was open when the writer died).
    recovered_file: that file; None when nothing was recovered.
    dropped_bytes: bytes of a torn last journal record dropped (the episode whose write
      was in progress), 0 if none.
    dropped_reason: what those bytes were, as a clause; None if none.
  """
  directory: str
  num_episodes: int
  recovered: int = 0
  recovered_file: str | None = None
  dropped_bytes: int = 0
  dropped_reason: str | None = None

  def __str__(self) -> str:
    text = f'{self.directory}: {self.num_episodes} episodes in closed files'
    if self.recovered:
      text += (f', of which {self.recovered} recovered from its journal into '
               f'{os.path.basename(self.recovered_file)}')
    if self.dropped_bytes:
      text += (f'; dropped the episode in progress at the kill ({self.dropped_bytes} bytes: '
               f'{self.dropped_reason})')
    return text


def _write_records(path: str, records: list[bytes]) -> None:
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
    writer.flush()


def repair_episode_directory(directory: str | os.PathLike, *,
                             dataset_name: str = DEFAULT_DATASET_NAME) -> RepairReport:
  """Makes a killed writer's directory whole again, readable by any tfds tool.

  Keeps the episode files in order while each reads back whole and non-empty and stops
  at the first that does not (the file that was open at the kill; a later writer
  overwrites it). Then writes the journalled episodes that no kept file holds (the open
  file's) into a new closed file, rebuilds dataset_info.json and features.json, and
  empties the journal. A torn last journal record, the episode whose write was in
  progress, is dropped. Running it again changes nothing. Run it only while no process
  writes to the directory: `EpisodeLogger` runs it when it reopens a directory, and
  `chorus datasets repair DIR` runs it by hand.

  Returns:
    A RepairReport; `num_episodes` is what the directory now holds.
  """
  data_dir = epath.Path(directory)
  journal = journal_lib.read_journal(data_dir)  # Before the files: see _directory_sources.
  template = tfds.core.ShardedFileTemplate(
      data_dir=data_dir, template=_FILE_TEMPLATE, dataset_name=dataset_name, split=_SPLIT,
      filetype_suffix=_FILE_FORMAT)
  shard_lengths, num_bytes = [], 0
  while sizes := _record_sizes(
      template.sharded_filepath(shard_index=len(shard_lengths), num_shards=None)):
    shard_lengths.append(len(sizes))
    num_bytes += sum(sizes)
  in_files = sum(shard_lengths)
  recovered = [(index, t) for index, t in journal.records if index >= in_files]
  recovered_file = None
  if recovered:
    if recovered[0][0] > in_files:
      _LOG.warning('%s: the journal starts at episode %d but the intact files hold %d; '
                   'episodes %d-%d were in a file that is damaged or gone.', data_dir,
                   recovered[0][0], in_files, in_files, recovered[0][0] - 1)
    features = _chorus_features(dataset_name)
    records = [features.serialize_example(_episode(t)) for _, t in recovered]
    recovered_file = os.fspath(
        template.sharded_filepath(shard_index=len(shard_lengths), num_shards=None))
    _write_records(recovered_file, records)
    shard_lengths.append(len(records))
    num_bytes += sum(map(len, records))
  identity = tfds.core.DatasetIdentity(
      name=dataset_name, version=tfds.core.Version(_VERSION), data_dir=os.fspath(data_dir),
      module_name='')
  info = tfds.rlds.rlds_base.build_info(_dataset_config(dataset_name), identity)
  info.set_file_format(_FILE_FORMAT)
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name=_SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes,
      filename_template=template)]))
  info.write_to_directory(data_dir)
  # Only now: a kill before this leaves the journal to redo the same recovery.
  journal_lib.truncate_journal(data_dir)
  report = RepairReport(os.fspath(data_dir), sum(shard_lengths), len(recovered),
                        recovered_file, journal.dropped_bytes, journal.problem)
  if recovered or journal.dropped_bytes:
    _LOG.warning('Repaired RLDS directory %s.', report)
  return report


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
      folders of them), journalled ones included, all counted even when `max_episodes`
      decoded fewer.
    skipped: damaged files left out, whole or in part; empty unless skip_corrupt.
    features: the tfds schema: RLDS `steps` features and the episode metadata.
    from_journal: per directory, how many of its episodes were read from its journal
      because no closed file holds them yet (its writer is running, or was killed and
      the directory not yet repaired); directories with none are left out.
  """
  trajectories: list[core.Trajectory]
  episodes_per_directory: dict[str, int]
  skipped: list[SkippedFile]
  features: tfds.features.FeaturesDict
  from_journal: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_episodes(self) -> int:
    return sum(self.episodes_per_directory.values())


def _is_writer_directory(path: str) -> bool:
  return os.path.isdir(path) and any(
      name in _METADATA_FILES or name == journal_lib.JOURNAL_NAME or
      f'-{_SPLIT}.{_FILE_FORMAT}-' in name for name in os.listdir(path))


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
            'metadata. Rebuild it with `chorus datasets repair DIR` (or '
            'chorus.datasets.repair_episode_directory, or by opening an EpisodeLogger on '
            'the directory), once no process writes there') from error
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
      f'No readable RLDS episodes in {paths}{left_out}: each is missing, or holds neither a '
      'closed file nor a journalled episode. Check the paths.')


def _builder(directories: Directories) -> tfds.core.DatasetBuilder:
  paths = episode_directories(directories)
  readable = [path for path in paths if _directory_builder(path)]
  if not readable:
    raise _no_episodes_error(paths, [])
  return _retry_while_rewritten(lambda: tfds.builder_from_directories(readable), readable)


def episode_dataset(directories: Directories) -> tf.data.Dataset:
  """The raw RLDS episodes of the closed files of one or several writer directories.

  Directories with nothing readable yet are skipped, and folders of writer directories
  expanded (`episode_directories`). Episodes come in the order of the directories, then
  in write order; `steps` is a nested tf.data.Dataset, as RLDS tools expect. Journalled
  episodes (of an open file) are not included: `read_episodes` includes them, and
  `repair_episode_directory` moves a killed writer's into a file. Files are not checked
  first: a damaged one fails the iteration, without naming the file (TF does not);
  `read_episodes` checks each file and can skip damaged ones.
  """
  return _builder(directories).as_dataset(split=_SPLIT, shuffle_files=False)


def _stack_steps(episode):
  # T steps as one batch: one element whose fields are [T] arrays.
  return dict(episode, steps=episode[rlds_types.STEPS].batch(2**31 - 1).get_single_element())


def _trajectory(episode) -> core.Trajectory:
  """The core.Trajectory of a decoded Chorus episode (numpy values, steps stacked)."""
  steps = episode[rlds_types.STEPS]
  # .get: directories written before these fields existed read back with them absent.
  paired = episode.get('paired_completion_tokens')
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
              strict=True)},
      reference_logprobs=(steps['reference_logprob']
                          if episode.get('has_reference_logprobs', False) else None),
      paired_completion_tokens=paired if paired is not None and paired.size else None,
      win_probability=(float(episode['win_probability'])
                       if episode.get('has_win_probability', False) else None))


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


@dataclasses.dataclass
class EpisodeSources:
  """The checked episode records of writer directories, before decoding (see `episode_sources`).

  Attributes:
    directories: the writer directories, folders expanded.
    segments: in read order, (path, count) for the first `count` records of an episode
      file, or a list of serialized episodes (a directory's journalled ones).
    features: the tfds schema that decodes every record.
    episodes_per_directory, skipped, from_journal: as in EpisodeRead.
    to_trajectory: decoded episode (numpy, steps stacked) -> core.Trajectory.
  """
  directories: list[str]
  segments: list[tuple[str, int] | list[bytes]]
  features: tfds.features.FeaturesDict
  episodes_per_directory: dict[str, int]
  skipped: list[SkippedFile]
  from_journal: dict[str, int]
  to_trajectory: Callable[[dict], core.Trajectory]

  @property
  def num_episodes(self) -> int:
    return sum(self.episodes_per_directory.values())

  def records(self) -> tf.data.Dataset:
    """Every serialized episode, in read order."""
    datasets, files = [], []

    def flush_files():
      if files:
        paths, counts = zip(*files)
        slices = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(counts, np.int64)))
        # take(count) stops before any damage found by the check, so it is never read.
        datasets.append(slices.flat_map(
            lambda path, count: tf.data.TFRecordDataset(path).take(count)))
        files.clear()

    for segment in self.segments:
      if isinstance(segment, tuple):
        files.append(segment)
      else:
        flush_files()
        datasets.append(tf.data.Dataset.from_tensor_slices(tf.constant(segment, tf.string)))
    flush_files()
    return functools.reduce(lambda a, b: a.concatenate(b), datasets)

  def decoded(self, records: tf.data.Dataset) -> tf.data.Dataset:
    """Serialized episodes -> decoded episodes with their steps stacked into [T] arrays."""
    return records.map(self.features.deserialize_example,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).map(_stack_steps)

  def trajectories(self, records: tf.data.Dataset | None = None) -> Iterator[core.Trajectory]:
    """The episodes of `records` (default: all, in read order) as Trajectories."""
    records = self.records() if records is None else records
    for episode in self.decoded(records).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
      yield self.to_trajectory(episode)


def _journalled(directory: str, journal: journal_lib.JournalRead, num_listed: int,
                features: tfds.features.FeaturesDict) -> list[bytes]:
  """The serialized episodes of a directory's journal that its listed files do not hold."""
  if journal.dropped_bytes:
    _LOG.warning('%s: dropped the last %d bytes of %s, %s: the episode whose write was in '
                 'progress (still being written, or its writer died).', directory,
                 journal.dropped_bytes, journal_lib.JOURNAL_NAME, journal.problem)
  trajectories = list(journal_lib.iter_new_records(journal, num_listed))
  if trajectories:
    _LOG.info('%s: read %d episodes from %s that no closed file holds yet (its writer is '
              'running, or was killed: `chorus datasets repair %s` then moves them into a '
              'file that any tfds reader sees).', directory, len(trajectories),
              journal_lib.JOURNAL_NAME, directory)
  return [features.serialize_example(_episode(t)) for t in trajectories]


def episode_sources(directories: Directories, *, skip_corrupt: bool = False,
                    mapping=None) -> EpisodeSources:
  """Checks every file of writer directories and lists what can be decoded, without decoding.

  The shared first half of `read_episodes` and the streaming readers of
  chorus.datasets.replay. Arguments and errors as in `read_episodes`.
  """
  paths = episode_directories(directories)
  segments, episodes_per_directory, skipped, from_journal = [], {}, [], {}
  features, schema_directory = None, None
  for directory in paths:
    episodes_per_directory[directory] = 0
    # The journal before the metadata: a file that closes in between is then listed
    # (a live writer empties its journal only after tfds lists the file).
    has_journal = (os.path.exists(journal_lib.journal_path(directory)) and
                   os.path.getsize(journal_lib.journal_path(directory)) > 0)
    journal = journal_lib.read_journal(directory) if has_journal else None
    try:
      builder = _directory_builder(directory)
    except CorruptEpisodeFileError as error:
      if not skip_corrupt:
        raise
      skipped.append(SkippedFile(error.path, f'{error.reason}; its directory was left out', 0))
      continue
    if builder is None and journal is None:
      continue
    directory_features = (builder.info.features if builder is not None
                          else _chorus_features(DEFAULT_DATASET_NAME))
    if features is None:
      features, schema_directory = directory_features, directory
    elif directory_features.to_json() != features.to_json():
      raise ValueError(
          f'{directory} was written with a different episode schema from {schema_directory} '
          '(compare their features.json); read them separately.')
    num_listed = 0
    if builder is not None:
      split = builder.info.splits[_SPLIT]
      num_listed = sum(split.shard_lengths)
      for path, listed in zip(split.filepaths, split.shard_lengths, strict=True):
        intact, damage = _intact_episodes(os.fspath(path), listed)
        if damage:
          if not skip_corrupt:
            raise CorruptEpisodeFileError(path, damage)
          skipped.append(SkippedFile(os.fspath(path), damage, intact))
        if intact:
          segments.append((os.fspath(path), intact))
          episodes_per_directory[directory] += intact
    if journal is not None:
      journalled = _journalled(directory, journal, num_listed, directory_features)
      if journalled:
        segments.append(journalled)
        episodes_per_directory[directory] += len(journalled)
        from_journal[directory] = len(journalled)
  if not segments:
    raise _no_episodes_error(paths, skipped)
  if mapping is not None:
    mapping.check(features, schema_directory)
  return EpisodeSources(paths, segments, features, episodes_per_directory, skipped,
                        from_journal, _trajectory if mapping is None else mapping.trajectory)


def read_episodes(directories: Directories, *, skip_corrupt: bool = False,
                  max_episodes: int | None = None, mapping=None) -> EpisodeRead:
  """Every readable episode of writer directories, each file checked before it is decoded.

  Episodes of a writer's open file are read from its journal (see the module docstring),
  so everything a running or killed writer's `write` returned for is read back.

  Args:
    directories: writer directories, or folders of them such as a run's rlds/ (see
      `episode_directories`). Those with nothing readable yet are skipped.
    skip_corrupt: leave out what is damaged, listing it in `skipped`, instead of raising:
      an episode file cut short or with broken records keeps the episodes before the
      damage; a directory whose metadata does not parse is left out whole (see
      `repair_episode_directory` to recover it).
    max_episodes: decode at most this many episodes; every file is still checked and
      counted.
    mapping: for datasets that Chorus did not write, a
      chorus.datasets.ForeignDatasetMapping saying which fields make a Trajectory.

  Returns:
    An EpisodeRead. Token arrays come back int32, log-probs float32.

  Raises:
    CorruptEpisodeFileError: a file is damaged and skip_corrupt is False.
    FileNotFoundError: nothing readable in any of the directories.
    ValueError: the directories were written with different schemas, or `mapping` names
      a field the dataset does not have.
  """
  sources = episode_sources(directories, skip_corrupt=skip_corrupt, mapping=mapping)
  records = sources.records()
  if max_episodes is not None:
    records = records.take(max_episodes)
  return EpisodeRead(trajectories=list(sources.trajectories(records)),
                     episodes_per_directory=sources.episodes_per_directory,
                     skipped=sources.skipped, features=sources.features,
                     from_journal=sources.from_journal)


def read_trajectories(directories: Directories, *, skip_corrupt: bool = False,
                      mapping=None) -> list[core.Trajectory]:
  """Every readable episode of one or several writer directories, as Trajectories.

  As `read_episodes(directories, skip_corrupt=..., mapping=...).trajectories`; files left
  out as damaged are logged as warnings.
  """
  result = read_episodes(directories, skip_corrupt=skip_corrupt, mapping=mapping)
  for skipped in result.skipped:
    _LOG.warning('Skipped damaged RLDS data: %s.', skipped)
  return result.trajectories
