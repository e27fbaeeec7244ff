"""Parameters as a stream of bounded chunks: the learner's pushes to the inference servers.

A push is one client-streaming call (`StreamParams`): a header naming the model, the
version and every tensor (path, dtype, shape), then the tensors' bytes in order, packed
into chunks of `chunk_bytes` (the last one shorter), each chunk carrying the CRC-32 of
every tensor it completes. Small tensors share a message: gRPC's cost is mostly per
message, and a model's norms and biases are many small tensors. No message holds more
than `chunk_bytes`, so no message-size cap limits the model size, and the sender holds on
the host the tensors of one chunk at a time (or one tensor larger than a chunk).

The server assembles the new version beside the one it serves (`Assembly`): as soon as a
tensor's bytes are in, they are checked (size, checksum, finite values) and moved to the
device, so the server holds at most one extra copy of the parameters and one tensor's
buffer. It swaps only once every tensor arrived whole and checked; a stream that breaks
or ends early leaves the served version untouched. Floating tensors may travel as
bfloat16 (half the bytes), cast back to the served dtype on arrival.
"""
from collections.abc import Callable, Iterator, Sequence
import dataclasses
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
                wire_dtype: str = '') -> Iterator[inference_pb2.ParamChunk]:
  """The messages of one push of `params` (see the module docstring).

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
          for path, leaf in leaves]))
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
        yield inference_pb2.ParamChunk(data=b''.join(pieces), tensor_crc32=crcs)
        pieces, size, crcs = [], 0, []
      if ends:
        break
  if crcs:
    yield inference_pb2.ParamChunk(data=b''.join(pieces), tensor_crc32=crcs)


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
  """

  def __init__(self, header: inference_pb2.ParamsHeader, layout: Sequence[TensorLayout],
               place: Callable[[np.ndarray], jax.Array] = jax.device_put):
    self._place = place
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
    self._buffer = np.empty(size, np.uint8)
    self._filled = 0
    self._crc = 0

  @property
  def complete(self) -> bool:
    return self._index == len(self._tensors)

  def add(self, chunk: inference_pb2.ParamChunk) -> None:
    """Takes the next chunk; raises PushError on anything but the expected bytes."""
    if chunk.HasField('header'):
      raise PushError('A second header in one push; send one header, then the bytes.')
    data, crcs, offset = memoryview(chunk.data), list(chunk.tensor_crc32), 0
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
    # A float64 sum of float32 or narrower values cannot overflow: it is finite exactly
    # when every value is, at a third of the cost of an element-wise isfinite.
    if np.issubdtype(served.dtype, np.floating) and not np.isfinite(
        np.sum(host, dtype=np.float64)):
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
