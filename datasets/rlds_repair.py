"""A writer directory's metadata, and repairing a killed writer's directory so that any tfds
reader sees all its episodes."""
import dataclasses
import logging
import os
import shutil
import tempfile

from etils import epath
import tensorflow_datasets as tfds

from chorus.datasets import journal as journal_lib
from chorus.datasets import rlds_files
from chorus.datasets import rlds_records
from chorus.datasets import rlds_schema

_LOG = logging.getLogger(__name__)


def file_template(directory: str | os.PathLike,
                  dataset_name: str = rlds_schema.DEFAULT_DATASET_NAME
                  ) -> tfds.core.ShardedFileTemplate:
  """Names the episode files of a writer directory the way tfds' SequentialWriter does."""
  return tfds.core.ShardedFileTemplate(
      data_dir=epath.Path(directory), template=rlds_files.FILE_TEMPLATE,
      dataset_name=dataset_name, split=rlds_files.SPLIT, filetype_suffix=rlds_files.FILE_FORMAT)


def write_metadata(directory: str | os.PathLike, schema, dataset_name: str,
                   shard_lengths: list[int], num_bytes: int) -> None:
  """Writes dataset_info.json (listing the closed files) and features.json, each atomically.

  tfds writes them in place, so a kill mid-write leaves an empty or half file that makes
  the whole directory unreadable; here each is written beside and renamed over the old one.
  """
  identity = tfds.core.DatasetIdentity(
      name=dataset_name, version=tfds.core.Version(rlds_files.VERSION),
      data_dir=os.fspath(directory), module_name='')
  info = tfds.rlds.rlds_base.build_info(rlds_schema.dataset_config(schema, dataset_name),
                                        identity)
  info.set_file_format(rlds_files.FILE_FORMAT)
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name=rlds_files.SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes,
      filename_template=file_template(directory, dataset_name))]))
  staging = tempfile.mkdtemp(prefix='.metadata-', dir=directory)
  try:
    info.write_to_directory(staging)
    for name in rlds_files.METADATA_FILES:
      os.replace(os.path.join(staging, name), os.path.join(directory, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class RepairReport:
  """What `repair_episode_directory` did to one writer directory.

  Attributes:
    directory: the writer directory.
    num_episodes: episodes the repaired directory holds, all in closed, listed files.
    recovered: journalled episodes written into a new closed file (those of the file that
      was open when the writer died).
    recovered_file: that file; None when nothing was recovered.
    dropped_bytes: bytes of the journal after its last whole record, dropped, 0 if none.
    dropped_reason: what those bytes were, as a clause; None if none.
    dropped_torn: the dropped bytes were a record cut short by the kill (the episode
      whose write was in progress); False: damage that no crash of the writer leaves.
  """
  directory: str
  num_episodes: int
  recovered: int = 0
  recovered_file: str | None = None
  dropped_bytes: int = 0
  dropped_reason: str | None = None
  dropped_torn: bool = False

  def __str__(self) -> str:
    text = f'{self.directory}: {self.num_episodes} episodes in closed files'
    if self.recovered:
      text += (f', of which {self.recovered} recovered from its journal into '
               f'{os.path.basename(self.recovered_file)}')
    if self.dropped_bytes:
      what = ('the episode in progress at the kill' if self.dropped_torn
              else f'damage in {journal_lib.JOURNAL_NAME}')
      text += f'; dropped {what} ({self.dropped_bytes} bytes: {self.dropped_reason})'
    return text


def repair_episode_directory(directory: str | os.PathLike, *,
                             dataset_name: str = rlds_schema.DEFAULT_DATASET_NAME
                             ) -> RepairReport:
  """Makes a killed writer's directory whole again, readable by any tfds tool.

  Keeps the episode files in order while each reads back whole and non-empty and stops
  at the first that does not (the file that was open at the kill; a later writer
  overwrites it). Then writes the journalled episodes that no kept file holds (the open
  file's) into a new closed file, rebuilds dataset_info.json and features.json, and
  empties the journal. A torn last journal record, the episode whose write was in
  progress, is dropped. Running it again changes nothing. Run it only while no process
  writes to the directory: `EpisodeLogger` runs it when it reopens a directory, and
  `chorus datasets repair DIR` runs it by hand.

  The directory's chorus_schema.json (written when the directory was created) says how
  to encode the recovered episodes and rebuild the metadata.

  Returns:
    A RepairReport; `num_episodes` is what the directory now holds.

  Raises:
    FileNotFoundError: the directory has no chorus_schema.json (it was not written by
      Chorus' EpisodeLogger), so its schema is unknown.
  """
  data_dir = epath.Path(directory)
  schema = rlds_schema.read_schema(os.fspath(data_dir))
  if schema is None:
    raise FileNotFoundError(
        f'{data_dir} has no {rlds_schema.SCHEMA_FILE}, so it was not written by Chorus\' '
        'EpisodeLogger and cannot be repaired by it.')
  journal = journal_lib.read_journal(data_dir)  # Before the files, as readers do.
  template = file_template(data_dir, dataset_name)
  shard_lengths, num_bytes = [], 0
  while sizes := rlds_files.record_sizes(
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
    records = [rlds_records.serialize_episode(t, schema) for _, t in recovered]
    recovered_file = os.fspath(
        template.sharded_filepath(shard_index=len(shard_lengths), num_shards=None))
    rlds_files.write_records(recovered_file, records)
    shard_lengths.append(len(records))
    num_bytes += sum(map(len, records))
  write_metadata(data_dir, schema, dataset_name, shard_lengths, num_bytes)
  # Only now: a kill before this leaves the journal to redo the same recovery.
  journal_lib.truncate_journal(data_dir)
  report = RepairReport(os.fspath(data_dir), sum(shard_lengths), len(recovered),
                        recovered_file, journal.dropped_bytes, journal.problem, journal.torn)
  if recovered or journal.dropped_bytes:
    _LOG.warning('Repaired RLDS directory %s.', report)
  return report
