"""TLS on a real inference server on loopback: certificates written by the test itself."""
import os

import grpc
import jax
import pytest

from chorus import core
from chorus import models
from chorus.inference_server import tls
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import InferenceError
from chorus.inference_server.client import ParameterPublisher
from chorus.inference_server.config import InferenceServerConfig
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.service import start_server
from tls_files import write_tls_dir

VOCAB_SIZE = 32
_CONFIG = InferenceServerConfig(max_batch_size=2, max_wait_ms=5.0)


@pytest.fixture(name='server', scope='module')
def fixture_server(tmp_path_factory):
  tls_dir = write_tls_dir(tmp_path_factory.mktemp('tls'))
  decoder = models.DecoderConfig.tiny(VOCAB_SIZE)
  model = ServedModel('policy', decoder, models.init_params(decoder, jax.random.PRNGKey(0)), 0,
                      _CONFIG, core.SequenceSpec(prompt_len=4, completion_len=2))
  model.warm_up()
  server, port = start_server({'policy': model}, tls_dir=tls_dir)
  yield port, tls_dir
  server.stop(grace=None)
  model.close()


@pytest.mark.parametrize('host', ['127.0.0.1', 'localhost'])
def test_a_client_that_trusts_the_ca_is_served_and_pushes_over_tls(server, host):
  port, tls_dir = server
  address = f'{host}:{port}'
  with InferenceClient(address, timeout_s=60, tls_dir=tls_dir) as client:
    assert len(client.generate([[1, 2]]).completions) == 1
    version = client.status()['policy']['param_version']
  params = models.init_params(models.DecoderConfig.tiny(VOCAB_SIZE), jax.random.PRNGKey(1))
  with ParameterPublisher(address, timeout_s=60, tls_dir=tls_dir) as learner:
    learner.publish(params, version + 1)
  with InferenceClient(address, timeout_s=60, tls_dir=tls_dir) as client:
    assert client.status()['policy']['param_version'] == version + 1


def test_a_plaintext_client_and_one_trusting_another_ca_are_not_served(server, tmp_path):
  port, _ = server
  other_ca = write_tls_dir(tmp_path / 'other', ca_name='Another CA')
  for tls_dir in ('', other_ca):
    # Both fail the handshake: the channel never connects, and the call (which waits for
    # a connection) ends at its deadline.
    with InferenceClient(f'127.0.0.1:{port}', timeout_s=2, tls_dir=tls_dir) as client:
      with pytest.raises(InferenceError) as raised:
        client.generate([[1, 2]])
      assert raised.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                   grpc.StatusCode.UNAVAILABLE)


def test_a_tls_dir_without_its_files_is_a_config_error(tmp_path):
  tls_dir = write_tls_dir(tmp_path / 'tls')
  os.remove(os.path.join(tls_dir, tls.PRIVATE_KEY))
  with pytest.raises(ValueError, match='lacks server.key; it needs server.crt, server.key, '
                     'ca.crt'):
    InferenceServerConfig(tls_dir=tls_dir)
  assert InferenceServerConfig(tls_dir=write_tls_dir(tmp_path / 'whole')).tls_dir
