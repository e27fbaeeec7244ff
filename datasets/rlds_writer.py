"""Writing episodes as RLDS, one writer directory per actor, crash-safely.

A writer directory holds the files that tfds' SequentialWriter (and so
`rlds.tfds.episode_writer.EpisodeWriter`) would write: TFRecord files of tf.train.Example
episodes, named as tfds names them, and dataset_info.json / features.json listing the
closed ones. So `tfds.builder_from_directories` and any RLDS/TFDS tool read a run;
reading (rlds_reader.py) goes through it. rlds_schema.py says how a trajectory becomes
an episode, rlds_records.py builds its record, rlds_files.py says what a directory holds.

Why not SequentialWriter itself: it encodes every step in Python and rewrites both
metadata files in place after every episode (measured on this machine, tensorflow-datasets
4.9.4: 6 ms per episode, 80 % of it the metadata), and a kill during a rewrite leaves a
metadata file empty (36 of 48 kills of a tight loop of 1-episode files), which makes the
whole directory unreadable. `EpisodeLogger` keeps the open file's episodes as encoded
records in memory, writes a file when it has `max_episodes_per_file` of them (or at
close), and only then rewrites the metadata, atomically (rlds_repair.write_metadata).

What a crash loses: at most the episode whose `write` was in progress. The episodes of
the open file live only in the writer's memory, hence the journal
(chorus/datasets/journal.py):
- `EpisodeLogger.write` appends the episode to episodes.journal (one length-prefixed,
  CRC-checked record, one os.write) before it returns, and empties the journal each time
  a file is written and listed. The journal holds at most the open file's episodes; each
  record carries the episode's index in the directory, so recovery never duplicates an
  episode that a file already holds.
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
Costs per 12-token episode on this machine: the journal append about 20 us, the record
about 70 us; each file costs a write and a metadata rewrite (about 20 ms per 100
episodes). `fsync_journal=True`, which also survives a machine crash, adds 1.5-3.5 ms per
episode. The default, 100 episodes per file, makes files of about 0.2 MB (64-token
completions) to 1 MB (512).
"""
import logging
import os

from chorus import core
from chorus import schema as schema_lib
from chorus.datasets import journal as journal_lib
from chorus.datasets import rlds_files
from chorus.datasets import rlds_records
from chorus.datasets import rlds_repair
from chorus.datasets import rlds_schema

DEFAULT_MAX_EPISODES_PER_FILE = 100

_LOG = logging.getLogger(__name__)


class EpisodeLogger:
  """Writes each trajectory as one RLDS episode into its own directory, crash-safely.

  One logger per directory and one writer process per directory: an actor writes to
  its own, e.g. run_dir/rlds/actor_003. Every episode also goes to the directory's
  journal before `write` returns (see the module docstring), so a crash loses at most
  the episode whose `write` was in progress. An existing directory is appended to, after
  `repair_episode_directory` has rebuilt broken metadata and moved journalled episodes
  of a killed writer into a closed file, so a restarted actor continues its directory.

  Usage:
    with EpisodeLogger(run_dir / 'rlds' / 'actor_003') as logger:
      logger.write(trajectory)
  """

  def __init__(self, directory: str | os.PathLike, *,
               schema: schema_lib.TrajectorySchema = schema_lib.CORE_SCHEMA,
               dataset_name: str = rlds_schema.DEFAULT_DATASET_NAME,
               max_episodes_per_file: int = DEFAULT_MAX_EPISODES_PER_FILE,
               fsync_journal: bool = False):
    """Opens (creating if missing) a writer directory.

    Args:
      directory: this writer's directory.
      schema: the fields of the trajectories it writes (the experiment's agent's); a
        directory written before keeps the schema it was created with.
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
          'episodes go in one file before it is written and listed.')
    self._directory = os.fspath(directory)
    self._max_episodes_per_file = max_episodes_per_file
    os.makedirs(self._directory, exist_ok=True)
    written_with = rlds_schema.read_schema(self._directory)
    if written_with is not None and written_with != schema:
      raise ValueError(f'{self._directory} holds episodes of another schema (extras '
                       f'{[f.name for f in written_with.extras]}, not '
                       f'{[f.name for f in schema.extras]}); write to another directory.')
    if written_with is None:
      rlds_schema.write_schema(self._directory, schema)
    self._schema = schema
    self._dataset_name = dataset_name
    if (rlds_files.broken_metadata_file(self._directory) or
        os.path.exists(journal_lib.journal_path(self._directory)) and
        os.path.getsize(journal_lib.journal_path(self._directory))):
      report = rlds_repair.repair_episode_directory(self._directory, dataset_name=dataset_name)
      _LOG.warning('Reopened the RLDS directory of a writer that was killed: %s', report)
    self._shard_lengths, self._num_bytes = rlds_files.listed_shards(self._directory)
    if not os.path.exists(os.path.join(self._directory, 'dataset_info.json')):
      self._write_metadata()  # A new directory reads as an empty dataset at once.
    self._open_records: list[bytes] = []
    self._journal = journal_lib.JournalWriter(self._directory, schema, fsync=fsync_journal)
    self._closed = False

  @property
  def directory(self) -> str:
    return self._directory

  def write(self, trajectory: core.Trajectory) -> None:
    """Appends one episode. Once this returns, the episode survives a crash of the process."""
    if self._closed:
      raise RuntimeError(f'The EpisodeLogger of {self._directory} is closed; open a new one '
                         'on the same directory to append more episodes.')
    # Raises on a bad trajectory before anything is written.
    record = rlds_records.serialize_episode(trajectory, self._schema)
    self._journal.append(sum(self._shard_lengths) + len(self._open_records), trajectory)
    self._open_records.append(record)
    if len(self._open_records) == self._max_episodes_per_file:
      self._write_file()

  def _write_metadata(self):
    rlds_repair.write_metadata(self._directory, self._schema, self._dataset_name,
                               self._shard_lengths, self._num_bytes)

  def _write_file(self):
    """Writes the open file's episodes as a closed, listed file, then empties the journal."""
    template = rlds_repair.file_template(self._directory, self._dataset_name)
    rlds_files.write_records(
        os.fspath(template.sharded_filepath(shard_index=len(self._shard_lengths),
                                            num_shards=None)), self._open_records)
    self._shard_lengths.append(len(self._open_records))
    self._num_bytes += sum(map(len, self._open_records))
    self._write_metadata()
    # Only now: a kill before this leaves the episodes in the journal, and a repair keeps
    # exactly one copy of each (the file if it is whole and listed, else the journal's).
    self._journal.clear()
    self._open_records = []

  def close(self) -> None:
    """Writes the open file, making every written episode readable by any tfds tool."""
    if not self._closed:
      if self._open_records:
        self._write_file()
      self._journal.close()
      self._closed = True

  def __enter__(self) -> 'EpisodeLogger':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
