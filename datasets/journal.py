"""A writer directory's episode journal: what a crash would otherwise lose.

An episode file is written and listed only once it is full, so the episodes of the open
file live only in the writer's memory. `EpisodeLogger` therefore also appends every
episode, before its `write` returns, to `episodes.journal` beside the episode files, and
empties the journal each time it has written and listed a file (every
`max_episodes_per_file` episodes). The journal thus holds at most the open file's episodes.

A record is one `os.write` to a file opened O_APPEND:

    magic     4 bytes   b'CHJ2'
    length    uint32 LE bytes of the payload
    crc32     uint32 LE zlib.crc32 of the payload
    payload   uint32 LE header length, a UTF-8 JSON header, then the arrays' raw bytes

The header holds `index`, the episode's position in its writer directory (0 for the
first episode ever written there), every field of the writer's chorus.schema that is
not an array (numbers, text and reward components, as JSON; JSON floats are written as
Python's repr, which round-trips float64 exactly) and, per array field (tokens and
per-token values), its name, dtype and length. Records describe themselves, so reading
needs no schema. `index` makes recovery idempotent: an episode whose index is below the
number of episodes in the closed files is already in a file (the writer was killed
after the file was listed and before the journal was emptied).

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
from chorus import schema as schema_lib

JOURNAL_NAME = 'episodes.journal'

_MAGIC = b'CHJ2'  # Version 2: self-describing records of any schema.
_RECORD_HEADER = struct.Struct('<4sII')
_PAYLOAD_HEADER = struct.Struct('<I')
_ARRAY_KINDS = (schema_lib.PROMPT, schema_lib.COMPLETION, schema_lib.PER_TOKEN,
                schema_lib.TOKENS)
_CORE_NAMES = frozenset(field.name for field in dataclasses.fields(core.Trajectory)) - {'extras'}


def journal_path(directory: str | os.PathLike) -> str:
  return os.path.join(os.fspath(directory), JOURNAL_NAME)


def _json_value(field: schema_lib.Field, value):
  if field.kind == schema_lib.COMPONENTS:
    return [[name, float(component)] for name, component in value.items()]
  if field.kind == schema_lib.TEXT:
    return str(value)
  return bool(value) if field.dtype == 'bool' else np.asarray(value).item()


def encode_record(index: int, trajectory: core.Trajectory,
                  schema: schema_lib.TrajectorySchema) -> bytes:
  """One journal record of `trajectory`, the `index`-th episode of its writer directory."""
  arrays, array_headers, values = [], [], {}
  for field in schema.fields:
    value = trajectory.value(field.name)
    if field.kind in _ARRAY_KINDS:
      array = np.ascontiguousarray(value, dtype=field.dtype).reshape(-1)
      arrays.append(array.tobytes())
      array_headers.append([field.name, field.dtype, len(array)])
    else:
      values[field.name] = _json_value(field, value)
  header = json.dumps({'index': index, 'values': values, 'arrays': array_headers,
                       'components': [field.name for field in schema.fields
                                      if field.kind == schema_lib.COMPONENTS]}).encode('utf-8')
  payload = b''.join([_PAYLOAD_HEADER.pack(len(header)), header, *arrays])
  return _RECORD_HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> tuple[int, core.Trajectory]:
  (header_length,) = _PAYLOAD_HEADER.unpack_from(payload)
  offset = _PAYLOAD_HEADER.size + header_length
  header = json.loads(payload[_PAYLOAD_HEADER.size:offset].decode('utf-8'))
  fields = dict(header['values'])
  for name in header['components']:
    fields[name] = dict(map(tuple, fields[name]))
  for name, dtype, length in header['arrays']:
    fields[name] = np.frombuffer(payload, dtype, length, offset).copy()
    offset += length * np.dtype(dtype).itemsize
  extras = {name: value for name, value in fields.items() if name not in _CORE_NAMES}
  core_fields = {name: value for name, value in fields.items() if name in _CORE_NAMES}
  return header['index'], core.Trajectory(**core_fields, extras=extras)


@dataclasses.dataclass(frozen=True)
class JournalRead:
  """What a journal holds.

  Attributes:
    records: (index, trajectory) of each whole record, in write order.
    dropped_bytes: bytes after the last whole record, 0 for a clean journal.
    problem: why the bytes were dropped, as a clause; None when none were.
    torn: the dropped bytes are a record cut short at the end of the journal: the
      episode whose write was in progress when the writer died, or a last record whose
      checksum does not match (a machine crash can leave its blocks unwritten). False for
      damage no crash leaves: bytes that are no record, a bad checksum with records after
      it, a record that does not decode.
  """
  records: list[tuple[int, core.Trajectory]]
  dropped_bytes: int = 0
  problem: str | None = None
  torn: bool = False


def read_journal(directory: str | os.PathLike) -> JournalRead:
  """The whole records of a directory's journal; a torn or garbled tail is left out."""
  try:
    with open(journal_path(directory), 'rb') as file:
      data = file.read()
  except FileNotFoundError:
    return JournalRead([])
  records, offset = [], 0
  while offset < len(data):
    problem, torn = None, False
    if len(data) - offset < _RECORD_HEADER.size:
      head = data[offset:offset + len(_MAGIC)]
      problem, torn = 'a record header cut short', head == _MAGIC[:len(head)]
    else:
      magic, length, crc = _RECORD_HEADER.unpack_from(data, offset)
      start = offset + _RECORD_HEADER.size
      payload = data[start:start + length]
      if magic != _MAGIC:
        problem = 'bytes that are not a journal record'
      elif len(payload) < length:
        problem, torn = f'a record cut short ({len(payload)} of {length} bytes)', True
      elif zlib.crc32(payload) != crc:
        problem = 'a record whose checksum does not match'
        torn = start + length == len(data)
      else:
        try:
          records.append(_decode_payload(payload))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
          problem = f'a record that does not decode ({error})'
    if problem:
      return JournalRead(records, len(data) - offset, problem, torn)
    offset = start + length
  return JournalRead(records)


class JournalWriter:
  """Appends journal records to one directory's journal (one writer process per directory).

  Args:
    directory: the writer directory.
    schema: the fields of the trajectories it journals.
    fsync: also fsync after each record, so it survives a machine crash, not just the
      death of the process.
  """

  def __init__(self, directory: str | os.PathLike, schema: schema_lib.TrajectorySchema, *,
               fsync: bool = False):
    self._fd = os.open(journal_path(directory), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    self._schema = schema
    self._fsync = fsync

  def append(self, index: int, trajectory: core.Trajectory) -> None:
    record = encode_record(index, trajectory, self._schema)
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
