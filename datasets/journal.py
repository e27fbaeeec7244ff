"""A writer directory's episode journal: what a crash would otherwise lose.

tfds makes an episode file readable only when it closes it, so the episodes of the open
file live only in the writer's memory. `EpisodeLogger` therefore also appends every
episode, before handing it to tfds, to `episodes.journal` beside the episode files, and
empties the journal each time tfds closes a file (every `max_episodes_per_file`
episodes). The journal thus holds at most the open file's episodes.

A record is one `os.write` to a file opened O_APPEND:

    magic     4 bytes   b'CHJ1'
    length    uint32 LE bytes of the payload
    crc32     uint32 LE zlib.crc32 of the payload
    payload   uint32 LE header length, a UTF-8 JSON header, then the arrays' raw bytes

The header holds `index`, the episode's position in its writer directory (0 for the
first episode ever written there), the scalar fields of core.Trajectory (JSON floats are
written as Python's repr, which round-trips float64 exactly) and, per array field, its
dtype and length; absent optional fields (reference_logprobs, paired_completion_tokens,
win_probability) are JSON null. `index` makes recovery idempotent: an episode whose
index is below the number of episodes in the closed files is already in a file (the
writer was killed after tfds listed the file and before the journal was emptied).

A record cut short, or whose CRC does not match, ends the journal: it is the episode
whose write was in progress when the process died (`write` had not returned), so it is
dropped with a log line, never raised as an error.

The journal survives the death of the process (the bytes are in the OS page cache after
`os.write`); `fsync=True` also makes it survive a crash of the machine, at a cost.
"""
from collections.abc import Iterator
import dataclasses
import json
import os
import struct
import zlib

import numpy as np

from chorus import core

JOURNAL_NAME = 'episodes.journal'

_MAGIC = b'CHJ1'
_RECORD_HEADER = struct.Struct('<4sII')
_PAYLOAD_HEADER = struct.Struct('<I')
# Array fields in payload order; None entries are absent.
_ARRAY_FIELDS = (('prompt_tokens', np.int32), ('completion_tokens', np.int32),
                 ('behaviour_logprobs', np.float32), ('reference_logprobs', np.float32),
                 ('paired_completion_tokens', np.int32))
_SCALAR_FIELDS = ('reward', 'terminated', 'param_version', 'temperature', 'model_name',
                  'prompt_id', 'actor_id', 'episode_id', 'task', 'seed', 'win_probability')


def journal_path(directory: str | os.PathLike) -> str:
  return os.path.join(os.fspath(directory), JOURNAL_NAME)


def encode_record(index: int, trajectory: core.Trajectory) -> bytes:
  """One journal record of `trajectory`, the `index`-th episode of its writer directory."""
  arrays, shapes = [], []
  for name, dtype in _ARRAY_FIELDS:
    value = getattr(trajectory, name)
    if value is None:
      shapes.append(None)
      continue
    array = np.ascontiguousarray(value, dtype=dtype)
    arrays.append(array.tobytes())
    shapes.append(len(array))
  scalars = {name: getattr(trajectory, name) for name in _SCALAR_FIELDS}
  scalars.update(reward=float(scalars['reward']), terminated=bool(scalars['terminated']),
                 param_version=int(scalars['param_version']),
                 temperature=float(scalars['temperature']), actor_id=int(scalars['actor_id']),
                 episode_id=int(scalars['episode_id']), seed=int(scalars['seed']))
  if scalars['win_probability'] is not None:
    scalars['win_probability'] = float(scalars['win_probability'])
  header = json.dumps({
      'index': index, 'scalars': scalars, 'lengths': shapes,
      'reward_components': [[name, float(value)]
                            for name, value in trajectory.reward_components.items()],
  }).encode('utf-8')
  payload = b''.join([_PAYLOAD_HEADER.pack(len(header)), header, *arrays])
  return _RECORD_HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> tuple[int, core.Trajectory]:
  (header_length,) = _PAYLOAD_HEADER.unpack_from(payload)
  offset = _PAYLOAD_HEADER.size + header_length
  header = json.loads(payload[_PAYLOAD_HEADER.size:offset].decode('utf-8'))
  fields = dict(header['scalars'])
  for (name, dtype), length in zip(_ARRAY_FIELDS, header['lengths'], strict=True):
    if length is None:
      fields[name] = None
      continue
    size = length * np.dtype(dtype).itemsize
    fields[name] = np.frombuffer(payload, dtype, length, offset).copy()
    offset += size
  fields['reward_components'] = dict(map(tuple, header['reward_components']))
  return header['index'], core.Trajectory(**fields)


@dataclasses.dataclass(frozen=True)
class JournalRead:
  """What a journal holds.

  Attributes:
    records: (index, trajectory) of each whole record, in write order.
    dropped_bytes: bytes after the last whole record (the episode whose write was in
      progress when the writer died), 0 for a clean journal.
    problem: why the bytes were dropped, as a clause; None when none were.
  """
  records: list[tuple[int, core.Trajectory]]
  dropped_bytes: int = 0
  problem: str | None = None


def read_journal(directory: str | os.PathLike) -> JournalRead:
  """The whole records of a directory's journal; a torn or garbled tail is left out."""
  try:
    with open(journal_path(directory), 'rb') as file:
      data = file.read()
  except FileNotFoundError:
    return JournalRead([])
  records, offset = [], 0
  while offset < len(data):
    problem = None
    if len(data) - offset < _RECORD_HEADER.size:
      problem = 'a record header cut short'
    else:
      magic, length, crc = _RECORD_HEADER.unpack_from(data, offset)
      start = offset + _RECORD_HEADER.size
      payload = data[start:start + length]
      if magic != _MAGIC:
        problem = 'bytes that are not a journal record'
      elif len(payload) < length:
        problem = f'a record cut short ({len(payload)} of {length} bytes)'
      elif zlib.crc32(payload) != crc:
        problem = 'a record whose checksum does not match'
      else:
        try:
          records.append(_decode_payload(payload))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
          problem = f'a record that does not decode ({error})'
    if problem:
      return JournalRead(records, len(data) - offset, problem)
    offset = start + length
  return JournalRead(records)


class JournalWriter:
  """Appends journal records to one directory's journal (one writer process per directory).

  Args:
    directory: the writer directory.
    fsync: also fsync after each record, so it survives a machine crash, not just the
      death of the process.
  """

  def __init__(self, directory: str | os.PathLike, *, fsync: bool = False):
    self._fd = os.open(journal_path(directory), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    self._fsync = fsync

  def append(self, index: int, trajectory: core.Trajectory) -> None:
    record = encode_record(index, trajectory)
    written = os.write(self._fd, record)
    if written != len(record):
      raise OSError(f'Wrote {written} of {len(record)} bytes of an episode to the journal; '
                    'is the disk full?')
    if self._fsync:
      os.fsync(self._fd)

  def clear(self) -> None:
    """Empties the journal: every episode in it is now in a closed, listed file."""
    os.ftruncate(self._fd, 0)
    if self._fsync:
      os.fsync(self._fd)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def truncate_journal(directory: str | os.PathLike) -> None:
  """Empties a directory's journal if it has one."""
  path = journal_path(directory)
  if os.path.exists(path):
    os.truncate(path, 0)


def iter_new_records(journal: JournalRead, num_listed: int) -> Iterator[core.Trajectory]:
  """The journal's episodes that are not in the first `num_listed` episodes of the files."""
  for index, trajectory in journal.records:
    if index >= num_listed:
      yield trajectory
