"""The files of RLDS writer directories: their layout, and finding damage in them.

On disk, one directory per writer (e.g. run_dir/rlds/actor_003):

    dataset_info.json                      split 'train': lengths of the closed files
    features.json                          the tfds schema (see rlds_schema.py)
    chorus_schema.json                     the chorus.schema fields it was written with
    chorus_episodes-train.tfrecord-00000   closed files of `max_episodes_per_file` episodes
    chorus_episodes-train.tfrecord-00001   ...; the last one may still be open
    episodes.journal                       the open file's episodes (rlds_writer.py)

Damaged files (a disk filled up, a copy cut short, bytes appended): readers check every
listed file before decoding, since TF's own error names no file. A file cut short, with
a broken record or with bytes after its last record, or a directory whose metadata does
not parse, raises CorruptEpisodeFileError naming the file; with skip_corrupt=True the
episodes before the damage are read, the rest of that file (or that whole directory, for
metadata) is left out and listed. The check reads each file once more, about 40 ms per
100-episode file on this machine.
"""
import dataclasses
import json
import os
import re

from etils import epath
from google.protobuf import json_format
import tensorflow as tf

from chorus.datasets import journal as journal_lib

SPLIT = 'train'
VERSION = '1.0.0'
FILE_FORMAT = 'tfrecord'
# The file naming of tfds' SequentialWriter, so repaired metadata points at its files.
FILE_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}'
METADATA_FILES = ('dataset_info.json', 'features.json')
# What tfds raises on a dataset_info.json / features.json caught empty or half written.
METADATA_ERRORS = (json.JSONDecodeError, json_format.ParseError)
# A TFRecord record is its length (8 bytes), their CRC (4), the data and its CRC (4).
_TFRECORD_FRAMING_BYTES = 16

Directories = str | os.PathLike | list[str | os.PathLike] | tuple[str | os.PathLike, ...]


class CorruptEpisodeFileError(ValueError):
  """A file of a writer directory (episodes or metadata) that does not read back whole.

  Attributes:
    path: the damaged file.
    reason: what is wrong with it, as a clause after its path.
  """

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path, self.reason = os.fspath(path), reason
    super().__init__(
        f'{self.path} {reason}. Pass skip_corrupt=True (`--skip-corrupt` of `chorus run` and '
        '`chorus datasets`) to read every other episode and list what was left out.')


@dataclasses.dataclass(frozen=True)
class SkippedFile:
  """A damaged file that a reader with skip_corrupt=True left out, whole or in part.

  Attributes:
    path: the file.
    reason: what is wrong with it, as a clause after its path.
    episodes_read: its episodes before the damage, which were read (0 for metadata).
  """
  path: str
  reason: str
  episodes_read: int

  def __str__(self) -> str:
    kept = f'read {self.episodes_read} of its episodes' if self.episodes_read else (
        'read nothing from it')
    return f'{self.path} {self.reason}; {kept}'


def broken_metadata_file(directory: str) -> str | None:
  """The metadata file of a started writer directory that is missing or does not parse."""
  paths = [os.path.join(directory, name) for name in METADATA_FILES]
  if not any(os.path.exists(path) for path in paths):
    return None
  for path in paths:
    try:
      with open(path, encoding='utf-8') as f:
        json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
      return path
  return None


def listed_shards(directory: str) -> tuple[list[int], int]:
  """Episodes per closed file that a directory's dataset_info.json lists, and their bytes."""
  try:
    with open(os.path.join(directory, 'dataset_info.json'), encoding='utf-8') as f:
      info = json.load(f)
  except FileNotFoundError:
    return [], 0
  splits = [split for split in info.get('splits', []) if split.get('name') == SPLIT]
  return ([int(length) for split in splits for length in split.get('shardLengths', [])],
          sum(int(split.get('numBytes', 0)) for split in splits))


def listed_episodes(directory: str) -> int:
  """Episodes in the closed files that a directory's dataset_info.json lists (0 if none)."""
  return sum(listed_shards(directory)[0])


def _tf_error_text(error: tf.errors.OpError) -> str:
  # Drops the eager-op decoration: '{{function_node ...}} corrupted record at 12 [Op:...]'.
  return re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:.*$', '', error.message, flags=re.DOTALL)


def read_records(path: str) -> tuple[list[int], str | None]:
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


def record_sizes(path: epath.Path) -> list[int]:
  """Byte sizes of the records of a complete file; [] if missing, empty or cut short."""
  if not path.exists():
    return []
  sizes, damage = read_records(os.fspath(path))
  return [] if damage else sizes


def intact_episodes(path: str, listed: int) -> tuple[int, str | None]:
  """How many leading episodes of a file read back whole, and what is wrong, if anything."""
  if not os.path.exists(path):
    return 0, f'is missing, though dataset_info.json lists {listed} episodes in it'
  sizes, damage = read_records(path)
  if damage:
    return len(sizes), (f'is damaged after {len(sizes)} of the {listed} episodes '
                        f'dataset_info.json lists ({damage})')
  if len(sizes) < listed:
    return len(sizes), (f'holds {len(sizes)} whole episodes where dataset_info.json lists '
                        f'{listed}: it was cut short')
  return len(sizes), None


def write_records(path: str, records: list[bytes]) -> None:
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
    writer.flush()


def is_writer_directory(path: str) -> bool:
  return os.path.isdir(path) and any(
      name in METADATA_FILES or name == journal_lib.JOURNAL_NAME or
      f'-{SPLIT}.{FILE_FORMAT}-' in name for name in os.listdir(path))


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
    if os.path.isdir(path) and not is_writer_directory(path):
      members = [member for member in sorted(os.path.join(path, name)
                                             for name in os.listdir(path))
                 if is_writer_directory(member)]
    directories.extend(members or [path])
  return directories
