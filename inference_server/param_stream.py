"""Parameters as a stream of bounded chunks: the learner's pushes to the inference servers.

A push is one client-streaming call (`StreamParams`): a header naming the model, the
version and every tensor (path, dtype, shape), then the tensors' bytes in order, packed
into chunks of `chunk_bytes` (the last one shorter), each chunk carrying the CRC-32 of
every tensor it completes. Small tensors share a message: gRPC's cost is mostly per
message, and a model's norms and biases are many small tensors. No message holds more
than `chunk_bytes`, so no message-size cap limits the model size, and the sender holds on
the host the tensors of one chunk at a time (or one tensor larger than a chunk).

The messages are `ParamChunk`s of inference.proto, but this module writes and reads their
protobuf wire format itself (`encode_chunk`, `decode_chunk`): protobuf's Python parser
copies every chunk's bytes (0.58 CPU-s per GiB on the server, benchmarks/RESULTS.md).
Here the sender joins a chunk's pieces once and the server reads the bytes in place.

The server assembles the new version beside the one it serves (`Assembly`): as soon as a
tensor's bytes are in, they are checked (size, checksum, finite values) and moved to the
device, so the server holds at most one extra copy of the parameters (in buffers kept for
the next pushes: `HostBuffers`). It swaps only once every tensor arrived whole and
checked; a stream that breaks or ends early leaves the served version untouched.
Floating tensors may travel as bfloat16 (half the bytes), cast back to the served dtype
on arrival.
"""
import collections
from collections.abc import Callable, Iterator, Sequence
import ctypes
import dataclasses
import gc
import struct
import sys
import threading
import zlib

import jax
import ml_dtypes
import numpy as np

from chorus.inference_server import inference_pb2

DEFAULT_CHUNK_BYTES = 4 << 20
WIRE_DTYPES = ('', 'bfloat16')  # '': each tensor's own dtype.


def _path_text(path) -> str:
  return '/'.join(str(getattr(key, 'key', getattr(key, 'idx', key))) for key in path)


def tensors(tree) -> list[tuple[str, jax.Array | np.ndarray]]:
  """(path, array) of every leaf of a parameter tree, in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(_path_text(path), leaf) for path, leaf in leaves]


def _wire_dtype(dtype: np.dtype, wire_dtype: str) -> np.dtype:
  if wire_dtype == 'bfloat16' and np.issubdtype(dtype, np.floating):
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def push_chunks(params, *, model: str, version: int, resume: bool = False,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                wire_dtype: str = '') -> Iterator[bytes]:
  """The serialized `ParamChunk` messages of one push of `params` (see the module docstring).

  Args:
    params: the parameter tree (device or host arrays).
    model: the served model's name.
    version: the version to serve.
    resume: a restarted learner going back to its checkpoint's version.
    chunk_bytes: the most tensor bytes in one message.
    wire_dtype: '' sends each tensor as it is; 'bfloat16' sends floating tensors at half
      size (the server casts them back to its dtype).
  """
  if chunk_bytes < 1:
    raise ValueError(f'chunk_bytes must be >= 1, got {chunk_bytes}.')
  if wire_dtype not in WIRE_DTYPES:
    raise ValueError(f'wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}.')
  leaves = tensors(params)
  yield inference_pb2.ParamChunk(header=inference_pb2.ParamsHeader(
      model=model, version=version, resume=resume, tensors=[
          inference_pb2.TensorHeader(
              path=path, dtype=_wire_dtype(np.dtype(leaf.dtype), wire_dtype).name,
              shape=list(np.shape(leaf)))
          for path, leaf in leaves])).SerializeToString()
  pieces, size, crcs = [], 0, []  # The chunk being filled.
  for _, leaf in leaves:
    host = np.asarray(jax.device_get(leaf))
    wire = np.ascontiguousarray(host.astype(_wire_dtype(host.dtype, wire_dtype), copy=False))
    data = memoryview(wire.reshape(-1).view(np.uint8))  # Bytes, whatever the dtype.
    start = 0
    while True:
      piece = data[start:start + chunk_bytes - size]
      pieces.append(piece)
      size += len(piece)
      start += len(piece)
      ends = start == len(data)
      if ends:
        crcs.append(zlib.crc32(data))
      if size == chunk_bytes:
        yield encode_chunk(pieces, crcs)
        pieces, size, crcs = [], 0, []
      if ends:
        break
  if crcs:
    yield encode_chunk(pieces, crcs)


# Protobuf wire format (protobuf.dev/programming-guides/encoding): a field's key is the
# varint (number << 3 | wire type); ParamChunk's `data` (2) and `header` (1) are
# length-delimited (type 2), `tensor_crc32` (3) is packed fixed32 (type 2) or, as a parser
# must also accept, one fixed32 (type 5) per value.
_DATA_KEY, _CRCS_KEY = bytes([2 << 3 | 2]), bytes([3 << 3 | 2])


def _varint_bytes(value: int) -> bytes:
  out = bytearray()
  while value >= 0x80:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def encode_chunk(pieces: Sequence[bytes | memoryview], crcs: Sequence[int]) -> bytes:
  """A serialized `ParamChunk` whose data is `pieces` joined (the one copy) and whose
  tensor_crc32 is `crcs`: the bytes protobuf's SerializeToString writes for it."""
  size = sum(len(piece) for piece in pieces)
  parts = [_DATA_KEY, _varint_bytes(size), *pieces] if size else []
  if crcs:
    parts += [_CRCS_KEY, _varint_bytes(4 * len(crcs)), struct.pack(f'<{len(crcs)}I', *crcs)]
  return b''.join(parts)


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One parsed `ParamChunk`: `data` is a view of the received message, not a copy."""
  header: inference_pb2.ParamsHeader | None
  data: memoryview
  crcs: tuple[int, ...]


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
  value = shift = 0
  while shift < 64:
    if position >= len(view):
      raise PushError('A chunk ends inside a varint; it is not a serialized ParamChunk.')
    byte = view[position]
    value |= (byte & 0x7F) << shift
    position += 1
    if byte < 0x80:
      return value, position
    shift += 7
  raise PushError('A chunk holds a varint over 64 bits; it is not a serialized ParamChunk.')


def decode_chunk(message: bytes) -> Chunk:
  """Parses a serialized `ParamChunk` as protobuf does (unknown fields skipped, the last
  `data` wins), leaving its data in place. Raises PushError on malformed bytes."""
  view = memoryview(message)
  header, data, crcs, position = None, memoryview(b''), [], 0
  while position < len(view):
    key, position = _read_varint(view, position)
    field, wire_type = key >> 3, key & 7
    if wire_type == 0:
      _, position = _read_varint(view, position)
      continue
    if wire_type == 2:
      size, position = _read_varint(view, position)
    elif wire_type in (1, 5):
      size = 8 if wire_type == 1 else 4
    else:
      raise PushError(f'A chunk holds wire type {wire_type}, which ParamChunk never has; it '
                      'is not a serialized ParamChunk.')
    value, position = view[position:position + size], position + size
    if position > len(view):
      raise PushError('A chunk ends inside a field; it is not a serialized ParamChunk.')
    if field == 1 and wire_type == 2:
      header = inference_pb2.ParamsHeader.FromString(value.tobytes())
    elif field == 2 and wire_type == 2:
      data = value
    elif field == 3 and wire_type in (2, 5):
      if len(value) % 4:
        raise PushError('A chunk\'s checksums are not a whole number of fixed32 values.')
      crcs.extend(struct.unpack(f'<{len(value) // 4}I', value))
  return Chunk(header, data, tuple(crcs))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory_for_chunks() -> None:
  """Makes this process's malloc reuse the memory of freed chunk-sized blocks.

  Each pushed chunk is a few MiB, allocated by gRPC and Python on both ends and freed at
  once. By default glibc hands such blocks back to the kernel (unmapped, or trimmed from
  the top of a heap), and the next chunk is faulted in page by page: about 100,000 page
  faults per GB pushed, the largest part of a server's CPU per push. Here blocks under
  32 MiB come from the heap, and up to 256 MiB of freed heap is kept. Larger blocks (big
  tensors) are still mapped on their own. A no-op where malloc is not glibc's.
  """
  mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
  if mallopt is not None:
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


class HostBuffers:
  """The host buffers a model's pushes are assembled in, reused from push to push.

  A fresh buffer costs the kernel a page fault per page written: 0.2-2.5 CPU-s per GB on
  this machine, more than the copy into it (0.17). A model's pushes have the same tensor
  sizes every time, so a buffer is reused once nothing reads it any more. What reads it
  holds a reference: on CPU, JAX serves a tensor from its buffer (device_put does not
  copy) and references the numpy array while any device array uses it; on an
  accelerator, device_put references it until its transfer is done. So with pushes in a
  row a model's buffers hold two versions: the one served and the one being assembled
  (three while a batch still reads a superseded version).
  """

  def __init__(self):
    self._buffers: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    self._lock = threading.Lock()  # Two pushes at once take different buffers.

  @property
  def nbytes(self) -> int:
    """The bytes of every buffer held, in use or free."""
    return sum(size * len(buffers) for size, buffers in self._buffers.items())

  @staticmethod
  def reclaim() -> None:
    """Lets the buffers of superseded versions be taken again; call before a push.

    JAX drops its references to the numpy arrays of deleted device arrays only when it
    collects garbage, which it does in the garbage collector's callbacks. A collection of
    the youngest generation is cheap and runs them.
    """
    gc.collect(0)

  def take(self, size: int) -> np.ndarray:
    """A uint8 buffer of `size` bytes that nothing else references."""
    with self._lock:
      buffers = self._buffers[size]
      for buffer in buffers:
        # References: the list, this loop's variable and getrefcount's argument.
        if sys.getrefcount(buffer) == 3:
          return buffer
      buffers.append(np.empty(size, np.uint8))
      return buffers[-1]


def _all_finite(values: np.ndarray) -> bool:
  """Whether every value is finite. Their sum is finite if they are, at a tenth of the cost
  of an element-wise isfinite; only a sum that is not (a non-finite value, or finite values
  overflowing) needs the element-wise check."""
  with np.errstate(over='ignore', invalid='ignore'):
    if np.isfinite(np.sum(values)):
      return True
  return bool(np.isfinite(values).all())


@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """What a served model's tensor must be: its path, shape and dtype."""
  path: str
  shape: tuple[int, ...]
  dtype: np.dtype


class PushError(ValueError):
  """A push that cannot be served; the message says what was wrong and never the payload."""


class Assembly:
  """One pushed version, assembled beside the served one from a stream's chunks.

  Args:
    header: the stream's first message's header.
    layout: the served model's tensors, in tree order.
    place: moves a finished host array to the device (and its sharding).
    buffers: the model's HostBuffers, to assemble in buffers of its earlier pushes.
  """

  def __init__(self, header: inference_pb2.ParamsHeader, layout: Sequence[TensorLayout],
               place: Callable[[np.ndarray], jax.Array] = jax.device_put,
               buffers: HostBuffers | None = None):
    self._place = place
    self._buffers = HostBuffers() if buffers is None else buffers
    self._buffers.reclaim()
    self._order = [tensor.path for tensor in layout]
    expected = {tensor.path: tensor for tensor in layout}
    sent = [tensor.path for tensor in header.tensors]
    if sorted(sent) != sorted(expected) or len(set(sent)) != len(sent):
      missing = sorted(set(expected) - set(sent))
      # Sent paths are the caller's text: a few, each cut short, never the whole payload.
      unexpected = [path[:64] for path in sorted(set(sent) - set(expected))[:5]]
      raise PushError(f'The push names {len(sent)} tensors where the model has '
                      f'{len(expected)}: missing {missing[:5]}, unexpected {unexpected}. '
                      'Push the full parameter tree of the served architecture.')
    self._tensors = []  # (layout, wire dtype, byte size) in the order sent.
    for tensor in header.tensors:
      served = expected[tensor.path]
      try:
        wire = np.dtype(ml_dtypes.bfloat16 if tensor.dtype == 'bfloat16' else tensor.dtype)
      except TypeError:
        raise PushError(f'Tensor {tensor.path} is sent as unknown dtype {tensor.dtype[:32]!r}.'
                        ) from None
      if tuple(tensor.shape) != served.shape:
        raise PushError(f'Tensor {tensor.path} is sent with shape {tuple(tensor.shape)}; the '
                        f'model has {served.shape}.')
      if wire != served.dtype and not (wire.name == 'bfloat16'
                                       and np.issubdtype(served.dtype, np.floating)):
        raise PushError(f'Tensor {tensor.path} is sent as {wire.name}; the model holds '
                        f'{served.dtype.name} (or takes bfloat16 for floating tensors).')
      self._tensors.append((served, wire, int(np.prod(served.shape)) * wire.itemsize))
    self._arrays: dict[str, jax.Array] = {}
    self._index = 0
    self._start_tensor()

  def _start_tensor(self) -> None:
    """A buffer for the next tensor's bytes, written in place as chunks arrive (one copy),
    and its running checksum, taken while each chunk is still in cache."""
    size = self._tensors[self._index][2] if not self.complete else 0
    self._buffer = self._buffers.take(size)
    self._filled = 0
    self._crc = 0

  @property
  def complete(self) -> bool:
    return self._index == len(self._tensors)

  def add(self, chunk: Chunk) -> None:
    """Takes the next chunk; raises PushError on anything but the expected bytes."""
    if chunk.header is not None:
      raise PushError('A second header in one push; send one header, then the bytes.')
    data, crcs, offset = chunk.data, list(chunk.crcs), 0
    while True:
      if self.complete:  # Reached on entry, or with bytes or checksums left over.
        raise PushError('Bytes after the last tensor; the push sent more than its header '
                        'said.')
      served, _, size = self._tensors[self._index]
      piece = data[offset:offset + size - self._filled]
      self._buffer[self._filled:self._filled + len(piece)] = np.frombuffer(piece, np.uint8)
      self._filled += len(piece)
      offset += len(piece)
      self._crc = zlib.crc32(piece, self._crc)
      if (self._filled == size) != bool(crcs):
        raise PushError(f'Tensor {served.path}: a checksum must come with, and only with, '
                        'the chunk that completes the tensor.')
      if self._filled < size:
        return  # The chunk ended inside this tensor.
      self._finish_tensor(crcs.pop(0))
      if offset == len(data) and not crcs:
        return

  def _finish_tensor(self, crc: int) -> None:
    """Checks the completed tensor against `crc` and its values, then places it."""
    served, wire, _ = self._tensors[self._index]
    if self._crc != crc:
      raise PushError(f'Tensor {served.path} arrived with a checksum that does not match '
                      'its bytes; it was damaged on the way.')
    host = self._buffer.view(wire).reshape(served.shape).astype(served.dtype, copy=False)
    if np.issubdtype(served.dtype, np.floating) and not _all_finite(host):
      raise PushError(f'Tensor {served.path} holds NaN or infinite values; the server '
                      'serves only finite parameters.')
    self._arrays[served.path] = self._place(host)
    self._index += 1
    self._start_tensor()

  def arrays(self) -> list[jax.Array]:
    """The assembled tensors in tree order; PushError unless every one arrived."""
    if not self.complete:
      served = self._tensors[self._index][0]
      raise PushError(f'The push ended after {self._index} of {len(self._tensors)} tensors '
                      f'(in the middle of {served.path}); the served version is unchanged.')
    return [self._arrays[path] for path in self._order]
