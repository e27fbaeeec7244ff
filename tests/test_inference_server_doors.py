"""The inference server's doors: sampling settings in range, frozen models, sane versions,
and error messages that never echo a payload; a real server on loopback, real clients."""
import grpc
import jax
import pytest

from chorus import core
from chorus import models
from chorus.inference_server import inference_pb2
from chorus.inference_server import health_pb2
from chorus.inference_server import health_pb2_grpc
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server import request_limits
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import InferenceError
from chorus.inference_server.client import ParameterPublisher
from chorus.inference_server.config import GRPC_OPTIONS
from chorus.inference_server.config import InferenceServerConfig
from chorus.inference_server import served_model as served_model_lib
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.service import start_server

VOCAB_SIZE = 32
CONFIG = InferenceServerConfig(max_batch_size=4, max_wait_ms=20.0, request_timeout_s=60.0)
SEQUENCE = core.SequenceSpec(prompt_len=8, completion_len=4)
_TIMEOUT_S = 60.0


@pytest.fixture(name='params', scope='module')
def fixture_params():
  return models.init_params(models.DecoderConfig.tiny(VOCAB_SIZE), jax.random.PRNGKey(0))


@pytest.fixture(name='address', scope='module')
def fixture_address(params):
  decoder = models.DecoderConfig.tiny(VOCAB_SIZE)
  served = {'policy': ServedModel('policy', decoder, params, 0, CONFIG, SEQUENCE),
            'reference': ServedModel('reference', decoder, params, 0, CONFIG, SEQUENCE,
                                     accepts_pushes=False)}
  for model in served.values():
    model.warm_up()
  server, port = start_server(served, guided=['policy'])
  yield f'127.0.0.1:{port}'
  server.stop(grace=None)
  for model in served.values():
    model.close()


@pytest.fixture(name='client', scope='module')
def fixture_client(address):
  with InferenceClient(address, timeout_s=_TIMEOUT_S) as inference_client:
    inference_client.wait_until_ready(timeout_s=_TIMEOUT_S)
    yield inference_client


def _refused(call) -> InferenceError:
  with pytest.raises(InferenceError) as raised:
    call()
  return raised.value


@pytest.mark.parametrize('temperature', [1e-45, 1e-38, 1e-3, 1e3, 3.4e38])
def test_generate_refuses_temperatures_outside_the_sane_range(client, temperature):
  error = _refused(lambda: client.generate([[1, 2]], temperature=temperature))
  assert error.code == grpc.StatusCode.INVALID_ARGUMENT
  assert 'temperature' in str(error)
  assert client.generate([[1, 2]], temperature=core.MIN_TEMPERATURE).completions


@pytest.mark.parametrize('temperature', [1e-45, 1e3])
def test_score_refuses_temperatures_outside_the_sane_range(client, temperature):
  error = _refused(lambda: client.score_logprobs([[1, 2]], [[3, 4]], temperature=temperature))
  assert error.code == grpc.StatusCode.INVALID_ARGUMENT
  assert 'temperature' in str(error)


@pytest.mark.parametrize('scale', [3.4e38, core.MAX_GUIDANCE_SCALE * 2, -1.0])
def test_generate_refuses_guidance_outside_the_sane_range(client, scale):
  error = _refused(lambda: client.generate([[1, 2]], guidance_scale=scale,
                                           unconditional_prompts=[[1]]))
  assert error.code == grpc.StatusCode.INVALID_ARGUMENT
  assert 'guidance_scale' in str(error)
  assert client.generate([[1, 2]], guidance_scale=3.0, unconditional_prompts=[[1]]).completions


def test_a_frozen_model_refuses_every_push_and_keeps_serving_its_version(address, client,
                                                                           params):
  with ParameterPublisher(address, model='reference', timeout_s=_TIMEOUT_S) as publisher:
    for version, resume in ((1, False), (5, True)):
      with pytest.raises(InferenceError) as raised:
        publisher.publish(params, version, resume=resume)
      assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
      assert 'read-only' in str(raised.value)
  assert client.status()['reference']['param_version'] == 0
  assert client.generate([[1, 2]], model='reference').param_version == 0


def test_a_push_far_ahead_is_refused_and_the_learner_keeps_pushing(address, client, params):
  with ParameterPublisher(address, model='policy', timeout_s=_TIMEOUT_S) as publisher:
    for version in (2**63 - 1, served_model_lib.MAX_VERSION_JUMP + 10**6):
      with pytest.raises(InferenceError) as raised:
        publisher.publish(params, version)
      assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
      assert 'ahead' in str(raised.value)
    negative = _refused(lambda: publisher.publish(params, -1, resume=True))
    assert negative.code == grpc.StatusCode.INVALID_ARGUMENT
    before = client.status()['policy']['param_version']
    publisher.publish(params, before + 1)  # The learner's own next version still goes in.
  assert client.status()['policy']['param_version'] == before + 1


def test_a_learners_resume_may_jump_ahead(params):
  model = ServedModel('policy', models.DecoderConfig.tiny(VOCAB_SIZE), params, 0, CONFIG,
                      SEQUENCE)
  try:
    far = served_model_lib.MAX_VERSION_JUMP * 4
    with pytest.raises(served_model_lib.RefusedVersionError):
      model.check_version(far)
    model.check_version(far, resume=True)  # A restarted server meets a learner far along.
  finally:
    model.close()


def test_errors_never_echo_a_large_payload(address):
  # Long enough to show if echoed, short enough to pass the size limits (tested below).
  name = 'x' * 3000
  with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    requests = {
        'generate': lambda: stub.Generate(inference_pb2.GenerateRequest(
            model=name, prompts=[inference_pb2.TokenSequence(tokens=[1])], temperature=1.0),
                                          timeout=_TIMEOUT_S),
        'mixture': lambda: stub.Generate(inference_pb2.GenerateRequest(
            model='policy', mixture_model=name, prompts=[inference_pb2.TokenSequence(tokens=[1])],
            temperature=1.0), timeout=_TIMEOUT_S),
        'score': lambda: stub.Score(inference_pb2.ScoreRequest(
            model='policy', expected_kind=name, prompts=[inference_pb2.TokenSequence(tokens=[1])],
            completions=[inference_pb2.TokenSequence(tokens=[1])]), timeout=_TIMEOUT_S),
        'push': lambda: stub.StreamParams(iter([inference_pb2.ParamChunk(
            header=inference_pb2.ParamsHeader(model='policy', version=10**6, tensors=[
                inference_pb2.TensorHeader(path=name, dtype='float32', shape=[1])]))]),
                                          timeout=_TIMEOUT_S),
    }
    for what, call in requests.items():
      with pytest.raises(grpc.RpcError) as raised:
        call()
      assert raised.value.code() != grpc.StatusCode.OK, what
      assert len(raised.value.details() or '') < 2000, (what, len(raised.value.details()))


def test_the_largest_requests_a_server_can_need_fit_its_limits():
  # The protobuf encoding itself, at its worst: token ids of 5-byte varints, all rows full.
  rows, top = CONFIG.max_batch_size, 2**31 - 1
  prompt = inference_pb2.TokenSequence(tokens=[top] * SEQUENCE.prompt_len)
  completion = inference_pb2.TokenSequence(tokens=[top] * SEQUENCE.completion_len)
  generate = inference_pb2.GenerateRequest(
      model='p' * 100, mixture_model='r' * 100, prompts=[prompt] * rows,
      unconditional_prompts=[prompt] * rows, max_new_tokens=top, temperature=1.0,
      actor_run_id='a' * 100, num_samples=top, mixture_coef=0.5, guidance_scale=2.0,
      seed=2**32 - 1)
  score = inference_pb2.ScoreRequest(
      model='p' * 100, prompts=[prompt] * rows, completions=[completion] * rows,
      comparisons=[completion] * rows, temperature=1.0, expected_kind='k' * 100,
      actor_run_id='a' * 100)
  needed = request_limits.request_bytes_needed(CONFIG, SEQUENCE)
  assert generate.ByteSize() <= needed and score.ByteSize() <= needed
  # And the bound is not loose by more than the names' allowance.
  assert needed - max(generate.ByteSize(), score.ByteSize()) < 5000


def _send_raw(address, method, payload: bytes, **metadata):
  """Calls `method` with `payload` as the request's bytes (no protobuf on this side)."""
  with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
    call = channel.unary_unary(method, request_serializer=lambda raw: raw,
                               response_deserializer=lambda raw: raw)
    with pytest.raises(grpc.RpcError) as raised:
      call(payload, timeout=_TIMEOUT_S, metadata=list(metadata.items()) or None)
    return raised.value


@pytest.mark.parametrize('method', [request_limits.GENERATE, request_limits.SCORE,
                                    request_limits.STATUS, request_limits.HEALTH_CHECK])
def test_a_request_over_its_methods_limit_is_refused_unparsed(address, client, method):
  limit = request_limits.method_limits([(CONFIG, SEQUENCE)])[method]
  # Not a valid message at all: parsed, it would fail as INTERNAL, not be refused for size.
  error = _send_raw(address, method, b'\xff' * (limit + 1))
  assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
  assert f'at most {limit} bytes' in error.details() and f'has {limit + 1}' in error.details()
  assert '\\xff' not in error.details() and len(error.details()) < 400
  # The same garbage within the limit is parsed, fails as garbage (not as a fault of the
  # server's, INTERNAL, which gRPC would say), and the server serves on.
  error = _send_raw(address, method, b'\xff' * 8)
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
  assert 'does not parse as its request type' in error.details()
  assert client.generate([[1, 2]]).completions
  with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
    assert health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=_TIMEOUT_S).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_a_full_batch_of_the_longest_rows_is_served(client):
  prompts = [[VOCAB_SIZE - 1] * SEQUENCE.prompt_len] * CONFIG.max_batch_size
  assert len(client.generate(prompts, guidance_scale=2.0, unconditional_prompts=prompts,
                             max_new_tokens=SEQUENCE.completion_len).completions) == len(prompts)
  completions = [[VOCAB_SIZE - 1] * SEQUENCE.completion_len] * CONFIG.max_batch_size
  assert len(client.score_logprobs(prompts, completions).logprobs) == len(prompts)


def test_a_params_stream_of_garbage_is_refused_as_invalid_and_the_version_stays(address, client):
  served = client.status()['policy']['param_version']
  with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
    stream = channel.stream_unary('/chorus.inference.InferenceService/StreamParams',
                                  request_serializer=lambda raw: raw,
                                  response_deserializer=lambda raw: raw)
    with pytest.raises(grpc.RpcError) as raised:
      stream(iter([b'\xff' * 8, b'\x00' * 100]), timeout=_TIMEOUT_S)
  assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
  assert 'does not parse' in raised.value.details()
  assert client.status()['policy']['param_version'] == served
