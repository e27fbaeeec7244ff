"""Reading RLDS writer directories back: checked, journal included, as one dataset.

Readers check every listed file before decoding (rlds_files.py) and add the episodes of
a running or killed writer's open file from its journal (rlds_writer.py), so everything
a writer's `write` returned for is read back; `episode_dataset` is the raw tfds view of
the closed files.
"""
from collections.abc import Callable, Iterator
import dataclasses
import functools
import logging
import os
import time

import numpy as np
from rlds import rlds_types
import tensorflow as tf
import tensorflow_datasets as tfds

from chorus import core
from chorus import schema as schema_lib
from chorus.datasets import journal as journal_lib
from chorus.datasets import rlds_files
from chorus.datasets import rlds_records
from chorus.datasets import rlds_schema

# A live writer rewrites its metadata in about a millisecond; a second of retries tells
# that apart from a file left broken by a crash.
_METADATA_READ_ATTEMPTS = 20
_METADATA_RETRY_SECONDS = 0.05

_LOG = logging.getLogger(__name__)


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
    schema: the chorus.schema the episodes were written with.
  """
  trajectories: list[core.Trajectory]
  episodes_per_directory: dict[str, int]
  skipped: list[rlds_files.SkippedFile]
  features: tfds.features.FeaturesDict
  from_journal: dict[str, int] = dataclasses.field(default_factory=dict)
  schema: schema_lib.TrajectorySchema = schema_lib.CORE_SCHEMA

  @property
  def num_episodes(self) -> int:
    return sum(self.episodes_per_directory.values())


class _MissingMetadata(FileNotFoundError):
  """A metadata file missing beside the other (momentarily, while a writer creates them)."""


def _retry_while_rewritten(load, directories: list[str]):
  """Calls `load`, retrying while a live writer has its metadata files half written."""
  for attempt in range(_METADATA_READ_ATTEMPTS):
    try:
      return load()
    except _MissingMetadata as error:
      if attempt == _METADATA_READ_ATTEMPTS - 1:
        raise rlds_files.CorruptEpisodeFileError(
            error.args[0], 'is missing beside the directory\'s other metadata file, so its '
            'episodes cannot be decoded. Rebuild it with `chorus datasets repair DIR` once no '
            'process writes there') from error
      time.sleep(_METADATA_RETRY_SECONDS)
    except rlds_files.METADATA_ERRORS as error:
      if attempt == _METADATA_READ_ATTEMPTS - 1:
        broken = next(filter(None, map(rlds_files.broken_metadata_file, directories)), None)
        raise rlds_files.CorruptEpisodeFileError(
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

  def load():
    # tfds writes the two files one after the other when the first file closes.
    for name in rlds_files.METADATA_FILES:
      if not os.path.exists(os.path.join(directory, name)):
        raise _MissingMetadata(os.path.join(directory, name))
    return tfds.builder_from_directory(directory)

  builder = _retry_while_rewritten(load, [directory])
  split = builder.info.splits.get(rlds_files.SPLIT)
  return builder if split and split.num_examples else None


def _no_episodes_error(paths: list[str],
                       skipped: list[rlds_files.SkippedFile]) -> FileNotFoundError:
  left_out = f' (left out as damaged: {[s.path for s in skipped]})' if skipped else ''
  return FileNotFoundError(
      f'No readable RLDS episodes in {paths}{left_out}: each is missing, or holds neither a '
      'closed file nor a journalled episode. Check the paths.')


def _builder(directories: rlds_files.Directories) -> tfds.core.DatasetBuilder:
  paths = rlds_files.episode_directories(directories)
  readable = [path for path in paths if _directory_builder(path)]
  if not readable:
    raise _no_episodes_error(paths, [])
  return _retry_while_rewritten(lambda: tfds.builder_from_directories(readable), readable)


def episode_dataset(directories: rlds_files.Directories) -> tf.data.Dataset:
  """The raw RLDS episodes of the closed files of one or several writer directories.

  Directories with nothing readable yet are skipped, and folders of writer directories
  expanded (`episode_directories`). Episodes come in the order of the directories, then
  in write order; `steps` is a nested tf.data.Dataset, as RLDS tools expect. Journalled
  episodes (of an open file) are not included: `read_episodes` includes them, and
  `repair_episode_directory` moves a killed writer's into a file. Files are not checked
  first: a damaged one fails the iteration, without naming the file (TF does not);
  `read_episodes` checks each file and can skip damaged ones.
  """
  return _builder(directories).as_dataset(split=rlds_files.SPLIT, shuffle_files=False)


def _stack_steps(episode):
  # T steps as one batch: one element whose fields are [T] arrays.
  return dict(episode, steps=episode[rlds_types.STEPS].batch(2**31 - 1).get_single_element())


@dataclasses.dataclass
class EpisodeSources:
  """The checked episode records of writer directories, before decoding (see `episode_sources`).

  Records are numbered in read order; `records()` yields (record id, serialized episode),
  so that a record whose bytes pass the file check but do not decode as an episode is
  named by its file and position (`trajectories` reports it: raises, or with
  `skip_corrupt` lists it in `skipped` and goes on).

  Attributes:
    directories: the writer directories, folders expanded.
    segments: in read order, (path, count) for the first `count` records of an episode
      file, or (journal path, serialized episodes) for a directory's journalled ones.
    features: the tfds schema that decodes every record.
    episodes_per_directory, skipped, from_journal, schema: as in EpisodeRead.
    to_trajectory: decoded episode (numpy, steps stacked) -> core.Trajectory.
    skip_corrupt: report undecodable records in `skipped` instead of raising.
  """
  directories: list[str]
  segments: list[tuple[str, int] | tuple[str, list[bytes]]]
  features: tfds.features.FeaturesDict
  episodes_per_directory: dict[str, int]
  skipped: list[rlds_files.SkippedFile]
  from_journal: dict[str, int]
  to_trajectory: Callable[[dict], core.Trajectory]
  schema: schema_lib.TrajectorySchema
  skip_corrupt: bool = False

  @property
  def num_episodes(self) -> int:
    return sum(self.episodes_per_directory.values())

  def _segment_sizes(self) -> list[int]:
    return [count if isinstance(count, int) else len(count) for _, count in self.segments]

  def locate(self, record_id: int) -> tuple[str, int]:
    """(file, position in it) of a record id."""
    for (path, _), size in zip(self.segments, self._segment_sizes()):
      if record_id < size:
        return path, record_id
      record_id -= size
    raise IndexError(f'No record {record_id} in these sources.')

  def records(self) -> tf.data.Dataset:
    """Every (record id, serialized episode), in read order."""
    datasets, files, first_id = [], [], 0

    def flush_files():
      if files:
        paths, counts, first_ids = zip(*files)
        slices = tf.data.Dataset.from_tensor_slices(
            (list(paths), np.asarray(counts, np.int64), np.asarray(first_ids, np.int64)))
        # take(count) stops before any damage found by the check, so it is never read.
        datasets.append(slices.flat_map(lambda path, count, first: tf.data.Dataset.zip((
            tf.data.Dataset.range(first, first + count),
            tf.data.TFRecordDataset(path).take(count)))))
        files.clear()

    for (path, content), size in zip(self.segments, self._segment_sizes()):
      if isinstance(content, int):
        files.append((path, content, first_id))
      else:
        flush_files()
        datasets.append(tf.data.Dataset.from_tensor_slices(
            (np.arange(first_id, first_id + size, dtype=np.int64), tf.constant(content))))
      first_id += size
    flush_files()
    return functools.reduce(lambda a, b: a.concatenate(b), datasets)

  def decoded(self, records: tf.data.Dataset) -> tf.data.Dataset:
    """(id, serialized) -> (id, decoded episode with steps stacked into [T] arrays).

    Records that do not decode are dropped here; `trajectories` names them.
    """
    return records.map(
        lambda record_id, record: (record_id, self.features.deserialize_example(record)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors().map(
            lambda record_id, episode: (record_id, _stack_steps(episode)))

  def trajectories(self, records: tf.data.Dataset | None = None,
                   expected_ids=None) -> Iterator[core.Trajectory]:
    """The episodes of `records` (default: all, in read order) as Trajectories.

    Args:
      records: a dataset made from `records()` (shuffled, taken, ...).
      expected_ids: the ids `records` holds (default: every id); those that did not
        decode are reported once the pass is over.

    Raises:
      CorruptEpisodeFileError: a record does not decode and skip_corrupt is False.
    """
    records = self.records() if records is None else records
    expected = set(range(sum(self._segment_sizes())) if expected_ids is None
                   else expected_ids)
    seen = set()
    decoded = self.decoded(records).prefetch(tf.data.AUTOTUNE)
    for record_id, episode in decoded.as_numpy_iterator():
      try:
        trajectory = self.to_trajectory(episode)
      except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        self._report_undecodable(int(record_id), f'is not a Chorus episode ({error})')
        seen.add(int(record_id))
        continue
      seen.add(int(record_id))
      yield trajectory
    for record_id in sorted(expected - seen):
      self._report_undecodable(record_id, 'does not decode with the directory\'s features')

  def _report_undecodable(self, record_id: int, problem: str) -> None:
    path, position = self.locate(record_id)
    reason = f'has a record (episode {position} of the file) that {problem}'
    if not self.skip_corrupt:
      raise rlds_files.CorruptEpisodeFileError(path, reason)
    if any(s.path == path and s.reason == reason for s in self.skipped):
      return  # Reported in an earlier pass over the records.
    _LOG.warning('Skipped damaged RLDS data: %s %s.', path, reason)
    size = next(len(c) if isinstance(c, list) else c for p, c in self.segments if p == path)
    self.skipped.append(rlds_files.SkippedFile(path, reason, size - 1))
    directory = next(d for d in self.episodes_per_directory
                     if os.path.samefile(d, os.path.dirname(path)))
    self.episodes_per_directory[directory] -= 1


def _journalled(directory: str, journal: journal_lib.JournalRead,
                num_listed: int) -> list[bytes]:
  """The serialized episodes of a directory's journal that its listed files do not hold."""
  if journal.dropped_bytes and journal.torn:
    _LOG.warning('%s: dropped the last %d bytes of %s, %s: the episode whose write was in '
                 'progress (still being written, or its writer died).', directory,
                 journal.dropped_bytes, journal_lib.JOURNAL_NAME, journal.problem)
  trajectories = list(journal_lib.iter_new_records(journal, num_listed))
  if trajectories:
    _LOG.info('%s: read %d episodes from %s that no closed file holds yet (its writer is '
              'running, or was killed: `chorus datasets repair %s` then moves them into a '
              'file that any tfds reader sees).', directory, len(trajectories),
              journal_lib.JOURNAL_NAME, directory)
  schema = _directory_schema(directory)
  return [rlds_records.serialize_episode(t, schema) for t in trajectories]


def _directory_schema(directory: str) -> schema_lib.TrajectorySchema:
  """The schema a writer directory was created with (the core one if it has no schema file)."""
  return rlds_schema.read_schema(directory) or schema_lib.CORE_SCHEMA


def episode_sources(directories: rlds_files.Directories, *, skip_corrupt: bool = False,
                    mapping=None) -> EpisodeSources:
  """Checks every file of writer directories and lists what can be decoded, without decoding.

  The shared first half of `read_episodes` and the streaming readers of
  chorus.datasets.replay. Arguments and errors as in `read_episodes`.
  """
  paths = rlds_files.episode_directories(directories)
  segments, episodes_per_directory, skipped, from_journal = [], {}, [], {}
  features, schema_directory, schema = None, None, schema_lib.CORE_SCHEMA
  for directory in paths:
    episodes_per_directory[directory] = 0
    # The journal before the metadata: a file that closes in between is then listed
    # (a live writer empties its journal only after tfds lists the file).
    has_journal = (os.path.exists(journal_lib.journal_path(directory)) and
                   os.path.getsize(journal_lib.journal_path(directory)) > 0)
    journal = journal_lib.read_journal(directory) if has_journal else None
    try:
      builder = _directory_builder(directory)
    except rlds_files.CorruptEpisodeFileError as error:
      if not skip_corrupt:
        raise
      skipped.append(rlds_files.SkippedFile(
          error.path, f'{error.reason}; its directory was left out', 0))
      continue
    if builder is None and journal is None:
      continue
    directory_features = (builder.info.features if builder is not None
                          else rlds_schema.features(_directory_schema(directory)))
    if features is None:
      features, schema_directory = directory_features, directory
      schema = _directory_schema(directory)
    elif directory_features.to_json() != features.to_json():
      raise ValueError(
          f'{directory} was written with a different episode schema from {schema_directory} '
          '(compare their features.json); read them separately.')
    num_listed = 0
    if builder is not None:
      split = builder.info.splits[rlds_files.SPLIT]
      num_listed = sum(split.shard_lengths)
      for path, listed in zip(split.filepaths, split.shard_lengths, strict=True):
        intact, damage = rlds_files.intact_episodes(os.fspath(path), listed)
        if damage:
          if not skip_corrupt:
            raise rlds_files.CorruptEpisodeFileError(path, damage)
          skipped.append(rlds_files.SkippedFile(os.fspath(path), damage, intact))
        if intact:
          segments.append((os.fspath(path), intact))
          episodes_per_directory[directory] += intact
    if journal is not None:
      if journal.dropped_bytes and not journal.torn:
        damage = (f'holds {journal.dropped_bytes} bytes of damage after its '
                  f'{len(journal.records)} whole records ({journal.problem})')
        if not skip_corrupt:
          raise rlds_files.CorruptEpisodeFileError(journal_lib.journal_path(directory), damage)
        skipped.append(rlds_files.SkippedFile(journal_lib.journal_path(directory), damage,
                                              len(journal.records)))
      journalled = _journalled(directory, journal, num_listed)
      if journalled:
        segments.append((journal_lib.journal_path(directory), journalled))
        episodes_per_directory[directory] += len(journalled)
        from_journal[directory] = len(journalled)
  if not segments:
    raise _no_episodes_error(paths, skipped)
  if mapping is not None:
    mapping.check(features, schema_directory)
  return EpisodeSources(paths, segments, features, episodes_per_directory, skipped,
                        from_journal,
                        rlds_schema.trajectory if mapping is None else mapping.trajectory,
                        schema, skip_corrupt)


def read_episodes(directories: rlds_files.Directories, *, skip_corrupt: bool = False,
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
  records, expected_ids = sources.records(), None
  if max_episodes is not None:
    records = records.take(max_episodes)
    expected_ids = range(min(max_episodes, sources.num_episodes))
  return EpisodeRead(trajectories=list(sources.trajectories(records, expected_ids)),
                     episodes_per_directory=sources.episodes_per_directory,
                     skipped=sources.skipped, features=sources.features,
                     from_journal=sources.from_journal, schema=sources.schema)


def read_trajectories(directories: rlds_files.Directories, *, skip_corrupt: bool = False,
                      mapping=None) -> list[core.Trajectory]:
  """Every readable episode of one or several writer directories, as Trajectories.

  As `read_episodes(directories, skip_corrupt=..., mapping=...).trajectories`; files left
  out as damaged are logged as warnings.
  """
  result = read_episodes(directories, skip_corrupt=skip_corrupt, mapping=mapping)
  for skipped in result.skipped:
    _LOG.warning('Skipped damaged RLDS data: %s.', skipped)
  return result.trajectories
