"""Streamed parameter pushes: chunks, checks, and a swap only when everything arrived whole."""
import struct
import tracemalloc
import zlib

from google.protobuf import message as message_module
import grpc
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from chorus import core
from chorus import models
from chorus.inference_server import inference_pb2
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server import param_stream
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import InferenceError
from chorus.inference_server.client import ParameterPublisher
from chorus.inference_server.config import InferenceServerConfig
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.service import start_server

_CONFIG = models.DecoderConfig.tiny(models.CharTokenizer().vocab_size)
_SPEC = core.SequenceSpec(8, 8)


def _params(seed: int):
  return models.init_params(_CONFIG, jax.random.PRNGKey(seed))


def _layout(params):
  return [param_stream.TensorLayout(path, tuple(np.shape(leaf)), np.dtype(leaf.dtype))
          for path, leaf in param_stream.tensors(params)]


def _push(params, **kwargs) -> list[inference_pb2.ParamChunk]:
  """The messages of a push as protobuf's own parser reads them (easy to damage)."""
  return [inference_pb2.ParamChunk.FromString(message)
          for message in param_stream.push_chunks(params, **kwargs)]


def _assemble(chunks, layout):
  """Assembles protobuf messages as the server does: serialized, then decode_chunk."""
  chunks = (param_stream.decode_chunk(chunk.SerializeToString()) for chunk in chunks)
  assembly = param_stream.Assembly(next(chunks).header, layout)
  for chunk in chunks:
    assembly.add(chunk)
  return assembly.arrays()


@pytest.mark.parametrize('chunk_bytes', [1000, 64, 1 << 20])
def test_a_push_reassembles_every_tensor_exactly_in_bounded_chunks(chunk_bytes):
  params = _params(0)
  chunks = _push(params, model='policy', version=3, chunk_bytes=chunk_bytes)
  assert all(len(chunk.data) <= chunk_bytes for chunk in chunks)
  # Packed: every chunk but the last is full, small tensors sharing one.
  assert all(len(chunk.data) == chunk_bytes for chunk in chunks[1:-1])
  assert sum(len(chunk.tensor_crc32) for chunk in chunks) == len(param_stream.tensors(params))
  assert chunks[0].header.version == 3 and not chunks[0].data
  arrays = _assemble(chunks, _layout(params))
  for got, (_, expected) in zip(arrays, param_stream.tensors(params), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_empty_and_boundary_sized_tensors_pack_and_come_back():
  # Bytes: 0, 8 (ends a chunk exactly), 0, 12 (spans two chunks), 4.
  tree = {'a': np.zeros(0, np.float32), 'b': np.arange(2, dtype=np.float32),
          'c': np.zeros((0, 3), np.int32), 'd': np.arange(3, dtype=np.float32) + 5,
          'e': np.array([7], np.int32)}
  chunks = _push(tree, model='p', version=1, chunk_bytes=8)
  assert [len(c.data) for c in chunks[1:]] == [8, 8, 8]
  assert [len(c.tensor_crc32) for c in chunks[1:]] == [2, 1, 2]
  for got, (_, expected) in zip(_assemble(chunks, _layout(tree)), param_stream.tensors(tree),
                                strict=True):
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_bfloat16_on_the_wire_halves_the_bytes_and_comes_back_as_float32():
  params = _params(0)
  full = sum(len(c.data) for c in _push(params, model='p', version=1))
  chunks = _push(params, model='p', version=1, wire_dtype='bfloat16')
  assert sum(len(c.data) for c in chunks) == full // 2
  arrays = _assemble(chunks, _layout(params))
  for got, (_, expected) in zip(arrays, param_stream.tensors(params)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(expected).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_finite_values_whose_sum_overflows_are_served():
  tree = {'w': np.array([3e38, 3e38, -1.0], np.float32)}
  got = _assemble(_push(tree, model='p', version=1), _layout(tree))
  np.testing.assert_array_equal(np.asarray(got[0]), tree['w'])


def test_the_wire_format_is_protobufs_own_both_ways():
  # What push_chunks writes is what protobuf writes for the same message, and decode_chunk
  # reads it as protobuf does.
  messages = list(param_stream.push_chunks(_params(0), model='p', version=2, chunk_bytes=1000))
  for message in messages:
    parsed = inference_pb2.ParamChunk.FromString(message)
    assert parsed.SerializeToString() == message
    decoded = param_stream.decode_chunk(message)
    assert bytes(decoded.data) == parsed.data
    assert decoded.crcs == tuple(parsed.tensor_crc32)
    assert decoded.header == (parsed.header if parsed.HasField('header') else None)
  assert param_stream.decode_chunk(messages[0]).header.version == 2


def test_decode_chunk_reads_what_other_protobuf_writers_may_send():
  # Checksums unpacked (a fixed32 field each), a field this version does not know, and
  # `data` twice (the last one counts): all valid protobuf.
  message = (b'\x12\x01z\x12\x03abc' + b'\x1d' + struct.pack('<I', 7) + b'\x1d'
             + struct.pack('<I', 9) + b'\x20\x05')
  parsed = inference_pb2.ParamChunk.FromString(message)
  decoded = param_stream.decode_chunk(message)
  assert bytes(decoded.data) == parsed.data == b'abc'
  assert decoded.crcs == tuple(parsed.tensor_crc32) == (7, 9)


@pytest.mark.parametrize('message', [b'\x12\x05abc', b'\x12', b'\x1a\x03abc', b'\x0f',
                                     b'\xff' * 11])
def test_decode_chunk_refuses_what_protobuf_refuses(message):
  with pytest.raises(param_stream.PushError, match='not a'):
    param_stream.decode_chunk(message)
  with pytest.raises(message_module.DecodeError):
    inference_pb2.ParamChunk.FromString(message)


def _corrupted(kind: str):
  """The chunks of a push damaged one way."""
  params = _params(0)
  chunks = _push(params, model='p', version=1, chunk_bytes=4096)
  if kind == 'flipped_byte':
    data = bytearray(chunks[1].data)
    data[0] ^= 0xFF
    chunks[1].data = bytes(data)
  elif kind == 'nan':
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad['final_norm']['scale'] = bad['final_norm']['scale'].at[0].set(jnp.nan)
    chunks = _push(bad, model='p', version=1, chunk_bytes=4096)
  elif kind == 'cut':
    chunks = chunks[:len(chunks) // 2]
  elif kind == 'extra_bytes':
    chunks.append(inference_pb2.ParamChunk(data=b'more'))
  elif kind == 'missing_checksum':
    next(c for c in chunks[1:] if c.tensor_crc32).tensor_crc32.pop()
  elif kind == 'misplaced_checksum':
    next(c for c in chunks[1:] if not c.tensor_crc32).tensor_crc32.append(0)
  elif kind == 'wrong_shape':
    chunks[0].header.tensors[0].shape[0] += 1
  return chunks, _layout(params)


@pytest.mark.parametrize('kind, message', [
    ('flipped_byte', 'checksum that does not match'),
    ('nan', 'final_norm/scale holds NaN or infinite values'),
    ('cut', r'ended after \d+ of 22 tensors'),
    ('extra_bytes', 'Bytes after the last tensor'),
    ('missing_checksum', 'checksum must come with'),
    ('misplaced_checksum', 'and only with'),
    ('wrong_shape', 'is sent with shape'),
])
def test_a_damaged_push_is_refused_with_the_reason(kind, message):
  chunks, layout = _corrupted(kind)
  with pytest.raises(param_stream.PushError, match=message):
    _assemble(chunks, layout)


@pytest.fixture(name='server', scope='module')
def fixture_server():
  served = ServedModel('policy', _CONFIG, _params(0), version=0,
                       config=InferenceServerConfig(max_batch_size=2), sequence=_SPEC)
  grpc_server, port = start_server({'policy': served}, '127.0.0.1:0')
  yield f'127.0.0.1:{port}', served
  grpc_server.stop(grace=1).wait()
  served.close()


def test_a_stream_cut_half_way_leaves_the_old_version_served_and_answering(server):
  address, served = server
  before = served.param_version
  chunks = _push(_params(1), model='policy', version=before + 1, chunk_bytes=4096)

  def cut_short():
    yield from chunks[:len(chunks) // 2]
    raise RuntimeError('the learner died mid-push')

  with grpc.insecure_channel(address) as channel:
    with pytest.raises(grpc.RpcError):
      inference_pb2_grpc.InferenceServiceStub(channel).StreamParams(cut_short(), timeout=30)
    # A stream that simply ends early is refused too, naming where it stopped.
    with pytest.raises(grpc.RpcError) as raised:
      inference_pb2_grpc.InferenceServiceStub(channel).StreamParams(
          iter(chunks[:len(chunks) // 2]), timeout=30)
  assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert 'the served version is unchanged' in raised.value.details()
  with InferenceClient(address) as client:
    assert client.status()['policy']['param_version'] == before
    assert client.generate([[1, 5]]).param_version == before
  with ParameterPublisher(address, timeout_s=30) as publisher:
    publisher.publish(_params(1), before + 1)  # The refused pushes used up nothing.
  assert served.param_version == before + 1


def test_a_refused_push_never_echoes_its_bytes(server):
  address, _ = server
  secret = b'SECRET-PAYLOAD' * 100
  header = inference_pb2.ParamChunk(header=inference_pb2.ParamsHeader(
      model='policy', version=10**6, tensors=[
          inference_pb2.TensorHeader(path=p, dtype=t.dtype.name, shape=list(t.shape))
          for p, t in ((t.path, t) for t in _layout(_params(0)))]))
  with grpc.insecure_channel(address) as channel:
    with pytest.raises(grpc.RpcError) as raised:
      inference_pb2_grpc.InferenceServiceStub(channel).StreamParams(
          iter([header, inference_pb2.ParamChunk(data=secret, tensor_crc32=[zlib.crc32(secret)])]),
          timeout=30)
  assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert b'SECRET' not in raised.value.details().encode()


def _embedding_decoder(vocab_size: int, values):
  """A one-layer decoder whose embedding (vocab_size x 8192) holds nearly all its bytes,
  and one parameter tree of it per value, every entry that value."""
  config = models.DecoderConfig(vocab_size=vocab_size, num_layers=1, embed_dim=8192,
                                num_heads=1, num_kv_heads=1, head_dim=8, mlp_dim=8,
                                max_seq_len=16)
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.PRNGKey(0)))
  return config, [jax.tree_util.tree_map(lambda s, v=v: np.full(s.shape, v, s.dtype), shapes)
                  for v in values]


def test_pushes_in_a_row_reuse_buffers_and_never_write_over_a_version_still_read():
  # numpy reports its buffers to tracemalloc: here the host memory of the versions (on CPU,
  # device_put serves the assembly's buffers without a copy).
  config, versions = _embedding_decoder(vocab_size=512, values=range(8))
  tree_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(versions[0]))
  served = ServedModel('policy', config, versions[0], version=0,
                       config=InferenceServerConfig(max_batch_size=1), sequence=_SPEC)
  grpc_server, port = start_server({'policy': served}, '127.0.0.1:0')
  embedding = lambda params: np.asarray(params['embedder']['embedding'])
  tracemalloc.start()
  try:
    chunk_bytes = 1 << 20
    with ParameterPublisher(f'127.0.0.1:{port}', timeout_s=60, chunk_bytes=chunk_bytes) as pub:
      before = tracemalloc.get_traced_memory()[0]
      for version in range(1, 5):
        tracemalloc.reset_peak()
        pub.publish(versions[version], version)
        held, peak = (size - before for size in tracemalloc.get_traced_memory())
        # At most one copy beside the served one, in the buffers of the next push; while
        # pushing, also the chunks in flight (the learner's, the server's read ahead).
        assert held < 2.1 * tree_bytes, (version, held / tree_bytes)
        assert peak < 2 * tree_bytes + 8 * chunk_bytes, (version, peak / tree_bytes)
      assert served.push_buffers.nbytes == 2 * tree_bytes
      # A batch still reading version 4: its buffers are not reused while it does.
      read = served.params_and_version()[0]
      for version in (5, 6):
        pub.publish(versions[version], version)
      assert (embedding(read) == 4).all()
      assert served.push_buffers.nbytes == 3 * tree_bytes
      del read
      pub.publish(versions[7], 7)
      assert served.push_buffers.nbytes == 3 * tree_bytes
    assert (embedding(served.params_and_version()[0]) == 7).all()
  finally:
    tracemalloc.stop()
    grpc_server.stop(grace=1).wait()
    served.close()


@pytest.mark.slow
def test_a_push_of_a_tree_over_one_gib_is_served():
  # One big embedding (33k x 8192 float32 = 1.08 GB) in a one-layer decoder.
  config, (zeros,) = _embedding_decoder(vocab_size=33_000, values=[0])
  assert sum(x.nbytes for x in jax.tree_util.tree_leaves(zeros)) > 2**30
  served = ServedModel('policy', config, zeros, version=0, config=InferenceServerConfig(),
                       sequence=_SPEC)
  grpc_server, port = start_server({'policy': served}, '127.0.0.1:0')
  try:
    ones = jax.tree_util.tree_map(np.ones_like, zeros)
    with ParameterPublisher(f'127.0.0.1:{port}', timeout_s=600) as publisher:
      publisher.publish(ones, 1)
    assert served.param_version == 1
    assert float(served.params_and_version()[0]['embedder']['embedding'][-1, -1]) == 1.0
  finally:
    grpc_server.stop(grace=1).wait()
    served.close()
