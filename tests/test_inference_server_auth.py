"""The run's secret on a real inference server (a separate process, as in a run), and
standard gRPC health checking and reflection."""
import os
import subprocess
import sys
import textwrap

import grpc
import jax
import pytest

from chorus import models
from chorus.inference_server import auth
from chorus.inference_server import health_pb2
from chorus.inference_server import health_pb2_grpc
from chorus.inference_server import inference_pb2
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import InferenceError
from chorus.inference_server.client import ParameterPublisher
from chorus.inference_server.config import GRPC_OPTIONS

VOCAB_SIZE = 32
_TIMEOUT_S = 120.0

# A server process as the inference-server node runs one: its secret from its environment.
_SERVER = textwrap.dedent('''
    import sys, time
    import jax
    from chorus import core, models
    from chorus.inference_server import auth
    from chorus.inference_server.config import InferenceServerConfig
    from chorus.inference_server.served_model import ServedModel
    from chorus.inference_server.service import start_server
    decoder = models.DecoderConfig.tiny(%d)
    params = models.init_params(decoder, jax.random.PRNGKey(0))
    model = ServedModel('policy', decoder, params, 0,
                        InferenceServerConfig(max_batch_size=2, max_wait_ms=5.0),
                        core.SequenceSpec(prompt_len=4, completion_len=2))
    model.warm_up()
    server, port = start_server({'policy': model}, secret=auth.run_secret())
    print(port, flush=True)
    sys.stdin.read()  # Until the test closes our stdin.
''' % VOCAB_SIZE)


@pytest.fixture(name='server', scope='module')
def fixture_server():
  secret = auth.new_secret()
  env = dict(os.environ, **{auth.SECRET_ENV: secret})
  process = subprocess.Popen([sys.executable, '-c', _SERVER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
  try:
    port = int(process.stdout.readline())
    yield f'127.0.0.1:{port}', secret
  finally:
    process.stdin.close()
    process.wait(timeout=30)


def test_a_client_with_the_runs_secret_is_served(server):
  address, secret = server
  with InferenceClient(address, timeout_s=_TIMEOUT_S, secret=secret) as client:
    assert client.generate([[1, 2]]).completions
    assert client.status()['policy']['param_version'] == 0


@pytest.mark.parametrize('secret', ['', 'not-the-secret'], ids=['none', 'wrong'])
def test_every_call_without_the_secret_is_refused_unauthenticated(server, secret):
  address, _ = server
  with InferenceClient(address, timeout_s=_TIMEOUT_S, secret=secret) as client:
    for call in (lambda: client.generate([[1, 2]]), client.status,
                 lambda: client.score_logprobs([[1, 2]], [[3]])):
      with pytest.raises(InferenceError) as raised:
        call()
      assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
      assert 'secret' in str(raised.value)


def test_a_push_without_the_secret_is_refused_and_the_served_version_stays(server):
  address, secret = server
  params = models.init_params(models.DecoderConfig.tiny(VOCAB_SIZE), jax.random.PRNGKey(1))
  with ParameterPublisher(address, timeout_s=_TIMEOUT_S, secret='') as stranger:
    for version, resume in ((1, False), (2**63 - 1, True)):
      with pytest.raises(InferenceError) as raised:
        stranger.publish(params, version, resume=resume)
      assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
  with InferenceClient(address, timeout_s=_TIMEOUT_S, secret=secret) as client:
    assert client.status()['policy']['param_version'] == 0
  with ParameterPublisher(address, timeout_s=_TIMEOUT_S, secret=secret) as learner:
    learner.publish(params, 1)
  with InferenceClient(address, timeout_s=_TIMEOUT_S, secret=secret) as client:
    assert client.status()['policy']['param_version'] == 1


def test_health_checking_answers_serving_without_the_secret(server):
  address, _ = server
  with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ('', 'chorus.inference.InferenceService'):
      response = health.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=_TIMEOUT_S, wait_for_ready=True)
      assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as raised:
      health.Check(health_pb2.HealthCheckRequest(service='no.such.Service'), timeout=_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # A raw stub without metadata, as any stranger on the host would call.
    with pytest.raises(grpc.RpcError) as raised:
      inference_pb2_grpc.InferenceServiceStub(channel).GetStatus(
          inference_pb2.StatusRequest(), timeout=_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_reflection_describes_the_services_to_a_standard_client_without_the_secret(server):
  # pylint: disable=g-import-not-at-top  (the reflection client is only this test's)
  from google.protobuf import descriptor_pool
  from grpc_reflection.v1alpha import proto_reflection_descriptor_database as reflection_db
  address, _ = server
  with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
    database = reflection_db.ProtoReflectionDescriptorDatabase(channel)
    assert set(database.get_services()) == {
        'chorus.inference.InferenceService', 'grpc.health.v1.Health',
        'grpc.reflection.v1alpha.ServerReflection'}
    # Descriptors built from what the server sent, in a pool of their own.
    service = descriptor_pool.DescriptorPool(database).FindServiceByName(
        'chorus.inference.InferenceService')
    ours = inference_pb2.DESCRIPTOR.services_by_name['InferenceService']
    assert [method.name for method in service.methods] == [method.name for method in ours.methods]
    generate = service.methods_by_name['Generate'].input_type
    assert sorted(generate.fields_by_name) == sorted(
        inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
