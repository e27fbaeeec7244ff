"""End-to-end tests of the gRPC inference server through its real clients, on loopback."""
import ipaddress
import math
import pathlib
import subprocess
import sys
import threading

import grpc
import jax
import numpy as np
import pytest

from chorus import core
from chorus import models
from chorus.inference_server import inference_pb2
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.client import InferenceError
from chorus.inference_server.client import ParameterPublisher
from chorus.inference_server.config import InferenceServerConfig
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.service import start_server

MODEL = 'policy'
VOCAB_SIZE = 32
INITIAL_VERSION = 3
# Small limits keep the four compiled batch buckets (1, 2, 4, 8) cheap.
CONFIG = InferenceServerConfig(max_batch_size=8, max_wait_ms=50.0, request_timeout_s=60.0)
SEQUENCE = core.SequenceSpec(prompt_len=8, completion_len=8)
PROMPTS = [[1, 5], [1, 6, 7, 8, 9, 10, 11, 12], [1, 13, 14], [1], [1, 20, 21, 22, 23]]
_CLIENT_TIMEOUT_S = 60.0


@pytest.fixture(scope='module')
def decoder_config():
  return models.DecoderConfig.tiny(VOCAB_SIZE)


@pytest.fixture(scope='module')
def initial_params(decoder_config):
  return models.init_params(decoder_config, jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def served_model(decoder_config, initial_params):
  model = ServedModel(MODEL, decoder_config, initial_params, INITIAL_VERSION, CONFIG, SEQUENCE)
  model.warm_up()
  yield model
  model.close()


@pytest.fixture(scope='module')
def address(served_model):
  server, port = start_server({MODEL: served_model})
  yield f'127.0.0.1:{port}'
  server.stop(grace=None)


@pytest.fixture(scope='module')
def client(address):
  with InferenceClient(address, timeout_s=_CLIENT_TIMEOUT_S) as inference_client:
    inference_client.wait_until_ready(timeout_s=_CLIENT_TIMEOUT_S)
    yield inference_client


@pytest.fixture(scope='module')
def publisher(address):
  with ParameterPublisher(address, model=MODEL, timeout_s=_CLIENT_TIMEOUT_S) as param_publisher:
    yield param_publisher


@pytest.fixture(scope='module')
def other_params(decoder_config):
  return models.init_params(decoder_config, jax.random.PRNGKey(1))


def _served_version(client) -> int:
  return client.status()[MODEL]['param_version']


def _assert_serves(client, expected_version=None):
  """A good request succeeds (the server survived whatever came before)."""
  result = client.generate([[1, 4, 5]], max_new_tokens=2)
  assert len(result.completions) == 1
  if expected_version is not None:
    assert result.param_version == expected_version


def test_generate_returns_one_valid_completion_per_prompt(client):
  max_new_tokens = 3
  result = client.generate(PROMPTS, model=MODEL, max_new_tokens=max_new_tokens,
                           temperature=1.5)

  assert result.param_version == _served_version(client)
  assert len(result.completions) == len(PROMPTS)
  for completion in result.completions:
    length = len(completion.tokens)
    assert 1 <= length <= max_new_tokens
    assert len(completion.logprobs) == length
    assert np.all((completion.tokens >= 0) & (completion.tokens < VOCAB_SIZE))
    assert np.all(completion.logprobs <= 0)
    assert completion.terminated == (completion.tokens[-1] == models.EOS_ID)
    assert not np.any(completion.tokens[:-1] == models.EOS_ID)
    if not completion.terminated:
      assert length == max_new_tokens


def test_zero_max_new_tokens_means_the_server_limit(client):
  result = client.generate(PROMPTS, max_new_tokens=0)
  for completion in result.completions:
    assert 1 <= len(completion.tokens) <= SEQUENCE.completion_len
    if not completion.terminated:
      assert len(completion.tokens) == SEQUENCE.completion_len


def _assert_logprobs_are_the_models(decoder_config, params, prompts, result, temperature):
  """Each returned log-prob equals log_softmax(logits / T) of one forward pass per row."""
  steps = SEQUENCE.completion_len
  completion_tokens = np.full((len(prompts), steps), models.PAD_ID, np.int32)
  completion_mask = np.zeros((len(prompts), steps), bool)
  for row, completion in enumerate(result.completions):
    completion_tokens[row, :len(completion.tokens)] = completion.tokens
    completion_mask[row, :len(completion.tokens)] = True
  prompt_tokens, prompt_mask = models.left_pad_prompts(prompts, SEQUENCE.prompt_len)
  logits, _ = models.forward_completions(decoder_config, params, prompt_tokens, prompt_mask,
                                         completion_tokens, completion_mask)
  log_probs = np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))
  expected = np.take_along_axis(log_probs, completion_tokens[..., None], axis=-1)[..., 0]
  for row, completion in enumerate(result.completions):
    np.testing.assert_allclose(completion.logprobs, expected[row, :len(completion.tokens)],
                               atol=1e-4)


def test_logprobs_equal_tempered_log_softmax_of_forward_completions(client, publisher,
                                                                    decoder_config,
                                                                    other_params):
  # Serves known parameters, so the check does not depend on what earlier tests published.
  version = _served_version(client) + 1
  publisher.publish(other_params, version)
  temperature = 0.7
  result = client.generate(PROMPTS, max_new_tokens=SEQUENCE.completion_len,
                           temperature=temperature)
  assert result.param_version == version

  _assert_logprobs_are_the_models(decoder_config, other_params, PROMPTS, result, temperature)


# (generate kwargs, status code, substrings the message must contain)
_BAD_REQUESTS = {
    'unknown_model': (dict(prompts=[[1, 2]], model='no-such-model'),
                      grpc.StatusCode.NOT_FOUND, ['no-such-model', MODEL]),
    'token_id_at_vocab_size': (dict(prompts=[[1, VOCAB_SIZE]]),
                               grpc.StatusCode.INVALID_ARGUMENT,
                               [f'[{VOCAB_SIZE}]', 'outside the vocabulary']),
    'negative_token_id': (dict(prompts=[[1, 2], [1, -3]]), grpc.StatusCode.INVALID_ARGUMENT,
                          ['Prompt 1', '[-3]']),
    'prompt_over_length_limit': (dict(prompts=[[1] * (SEQUENCE.prompt_len + 1)]),
                                 grpc.StatusCode.INVALID_ARGUMENT,
                                 [f'{SEQUENCE.prompt_len + 1} tokens']),
    'empty_prompt': (dict(prompts=[[]]), grpc.StatusCode.INVALID_ARGUMENT, ['0 tokens']),
    'empty_batch': (dict(prompts=[]), grpc.StatusCode.INVALID_ARGUMENT,
                    ['Empty batch', 'at least one prompt']),
    'zero_temperature': (dict(prompts=[[1, 2]], temperature=0.0),
                         grpc.StatusCode.INVALID_ARGUMENT, ['temperature', 'got 0.0']),
    'negative_temperature': (dict(prompts=[[1, 2]], temperature=-1.0),
                             grpc.StatusCode.INVALID_ARGUMENT, ['temperature', 'got -1.0']),
    'nan_temperature': (dict(prompts=[[1, 2]], temperature=math.nan),
                        grpc.StatusCode.INVALID_ARGUMENT, ['temperature', 'got nan']),
    'too_many_prompts': (dict(prompts=[[1, 2]] * (CONFIG.max_batch_size + 1)),
                         grpc.StatusCode.INVALID_ARGUMENT,
                         [f'{CONFIG.max_batch_size + 1} prompts',
                          f'at most {CONFIG.max_batch_size}']),
    'rows_over_max_batch_size': (dict(prompts=[[1, 2]] * 3, num_samples=3),
                                 grpc.StatusCode.INVALID_ARGUMENT,
                                 ['3 prompts x 3 samples = 9 rows',
                                  f'at most {CONFIG.max_batch_size}']),
    'negative_num_samples': (dict(prompts=[[1, 2]], num_samples=-1),
                             grpc.StatusCode.INVALID_ARGUMENT, ['num_samples', 'got -1']),
    'max_new_tokens_over_limit': (dict(prompts=[[1, 2]],
                                       max_new_tokens=SEQUENCE.completion_len + 1),
                                  grpc.StatusCode.INVALID_ARGUMENT,
                                  ['max_new_tokens', f'got {SEQUENCE.completion_len + 1}']),
    'negative_max_new_tokens': (dict(prompts=[[1, 2]], max_new_tokens=-1),
                                grpc.StatusCode.INVALID_ARGUMENT, ['max_new_tokens', 'got -1']),
}


@pytest.mark.parametrize('kwargs,code,message_parts', list(_BAD_REQUESTS.values()),
                         ids=list(_BAD_REQUESTS))
def test_bad_generate_request_gets_a_clear_status_and_the_server_keeps_serving(
    client, kwargs, code, message_parts):
  kwargs = dict(kwargs)
  with pytest.raises(InferenceError) as raised:
    client.generate(kwargs.pop('prompts'), **kwargs)

  assert raised.value.code == code
  for part in message_parts:
    assert part in str(raised.value)
  _assert_serves(client)


def test_num_samples_gives_n_completions_per_prompt_prompt_major_from_one_version(
    client, publisher, decoder_config, other_params):
  version = _served_version(client) + 1
  publisher.publish(other_params, version)
  prompts, num_samples, temperature = [[1, 5], [1, 13, 14, 15], [1, 20]], 2, 2.0
  result = client.generate(prompts, num_samples=num_samples, temperature=temperature)

  assert len(result.completions) == len(prompts) * num_samples
  assert result.param_version == version
  assert result.mixture_param_version is None
  # Prompt-major: completion i belongs to prompt i // num_samples. Its log-probs match the
  # forward pass on that prompt only, which pins the order.
  row_prompts = [prompt for prompt in prompts for _ in range(num_samples)]
  _assert_logprobs_are_the_models(decoder_config, other_params, row_prompts, result,
                                  temperature)
  # A prompt's samples are independent draws, not copies.
  assert any(not np.array_equal(result.completions[2 * i].tokens,
                                result.completions[2 * i + 1].tokens) for i in range(3))


def test_full_request_of_max_batch_size_rows_is_served(client):
  result = client.generate([[1, 2, 3]] * (CONFIG.max_batch_size // 2), num_samples=2,
                           max_new_tokens=2)
  assert len(result.completions) == CONFIG.max_batch_size


def test_full_request_of_max_batch_size_prompts_is_served(client):
  result = client.generate([[1, 2, 3]] * CONFIG.max_batch_size, max_new_tokens=2)
  assert len(result.completions) == CONFIG.max_batch_size


def test_newer_params_are_served_after_update(client, publisher, other_params):
  version = _served_version(client) + 5  # Versions may skip; they only have to increase.
  publisher.publish(other_params, version)

  status = client.status()[MODEL]
  assert status['param_version'] == version
  assert client.generate([[1, 2]]).param_version == version


@pytest.mark.parametrize('version_offset', [0, -1], ids=['same_version', 'older_version'])
def test_stale_params_version_fails_precondition_and_keeps_the_served_version(
    client, publisher, other_params, version_offset):
  served = _served_version(client)
  with pytest.raises(InferenceError) as raised:
    publisher.publish(other_params, served + version_offset)

  assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
  assert f'already serves version {served}' in str(raised.value)
  assert f'version {served + version_offset} is not newer' in str(raised.value)
  assert _served_version(client) == served
  _assert_serves(client, expected_version=served)


def test_resuming_learner_may_go_back_to_its_checkpoint_version(client, publisher, other_params):
  served = _served_version(client)
  publisher.publish(other_params, served + 10)
  publisher.publish(other_params, served + 5, resume=True)  # Steps served+6..10 were lost.
  assert _served_version(client) == served + 5
  _assert_serves(client, expected_version=served + 5)
  publisher.publish(other_params, served + 6)
  assert _served_version(client) == served + 6


@pytest.mark.parametrize('wrong_config', [
    models.DecoderConfig.tiny(VOCAB_SIZE + 1),
    models.DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=3, embed_dim=64, num_heads=4,
                         num_kv_heads=2, head_dim=16, mlp_dim=256, max_seq_len=64),
], ids=['other_vocab_size', 'other_num_layers'])
def test_params_of_another_architecture_are_invalid_and_not_served(client, publisher,
                                                                   other_params, wrong_config):
  served = _served_version(client)
  wrong_params = models.init_params(wrong_config, jax.random.PRNGKey(2))
  with pytest.raises(InferenceError) as raised:
    publisher.publish(wrong_params, served + 1)

  assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert f'Push to {MODEL!r} refused' in str(raised.value)
  assert (f'embedder/embedding is sent with shape ({VOCAB_SIZE + 1}, 64); the model has '
          f'({VOCAB_SIZE}, 64)' in str(raised.value)
          or "unexpected ['layer_2/" in str(raised.value))
  _assert_serves(client, expected_version=served)
  # The rejected push did not use up its version number.
  publisher.publish(other_params, served + 1)
  assert _served_version(client) == served + 1


def test_update_params_of_unknown_model_is_not_found(address, other_params):
  with ParameterPublisher(address, model='no-such-model',
                          timeout_s=_CLIENT_TIMEOUT_S) as wrong_publisher:
    with pytest.raises(InferenceError) as raised:
      wrong_publisher.publish(other_params, 10**6)
  assert raised.value.code == grpc.StatusCode.NOT_FOUND
  assert 'no-such-model' in str(raised.value)


def test_updates_during_traffic_drop_no_request_and_versions_never_decrease(
    address, client, publisher, initial_params, other_params):
  num_clients, num_updates = 4, 12
  param_sets = [initial_params, other_params]
  base_version = _served_version(client)
  before = client.status()[MODEL]
  versions_seen = [[] for _ in range(num_clients)]
  errors = []
  all_sent_once = threading.Barrier(num_clients + 1, timeout=_CLIENT_TIMEOUT_S)
  publishing_done = threading.Event()

  def generate_in_a_loop(index):
    try:
      with InferenceClient(address, timeout_s=_CLIENT_TIMEOUT_S) as own_client:
        versions_seen[index].append(own_client.generate(PROMPTS[:1 + index % 3]).param_version)
        all_sent_once.wait()
        while not publishing_done.is_set():
          versions_seen[index].append(own_client.generate([[1, 2, index]]).param_version)
        # Sent after the last update returned, so it must see the last version.
        versions_seen[index].append(own_client.generate([[1, 3]]).param_version)
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)
      all_sent_once.abort()

  threads = [threading.Thread(target=generate_in_a_loop, args=(index,))
             for index in range(num_clients)]
  for thread in threads:
    thread.start()
  try:
    all_sent_once.wait()
    for step in range(1, num_updates + 1):
      publisher.publish(param_sets[step % 2], base_version + step)
  finally:
    publishing_done.set()
    for thread in threads:
      thread.join(_CLIENT_TIMEOUT_S)

  assert not errors
  assert not any(thread.is_alive() for thread in threads)
  final_version = base_version + num_updates
  for versions in versions_seen:
    assert versions[0] == base_version
    assert versions == sorted(versions)
    assert versions[-1] == final_version
  after = client.status()[MODEL]
  assert after['param_version'] == final_version
  assert after['param_updates'] - before['param_updates'] == num_updates
  # Every request sent got its response, and the server counted each one.
  assert after['requests'] - before['requests'] == sum(map(len, versions_seen))


def test_concurrent_requests_share_batches(address, client):
  num_clients, requests_per_client = 8, 4
  before = client.status()[MODEL]
  errors = []
  start_together = threading.Barrier(num_clients, timeout=_CLIENT_TIMEOUT_S)

  def generate_some():
    try:
      with InferenceClient(address, timeout_s=_CLIENT_TIMEOUT_S) as own_client:
        own_client.wait_until_ready(_CLIENT_TIMEOUT_S)
        start_together.wait()
        for _ in range(requests_per_client):
          assert len(own_client.generate([[1, 2, 3]], max_new_tokens=2).completions) == 1
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)
      start_together.abort()

  threads = [threading.Thread(target=generate_some) for _ in range(num_clients)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(_CLIENT_TIMEOUT_S)

  assert not errors
  after = client.status()[MODEL]
  num_requests = after['requests'] - before['requests']
  num_batches = after['batches'] - before['batches']
  assert num_requests == num_clients * requests_per_client
  assert after['sequences'] - before['sequences'] == num_requests
  assert 1 <= num_batches < num_requests


def _listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
  """Local addresses with a TCP socket listening on `port`, from /proc/net/tcp{,6}."""
  addresses = set()
  for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    path = pathlib.Path(table)
    if not path.exists():
      continue
    for line in path.read_text().splitlines()[1:]:
      fields = line.split()
      address_hex, port_hex = fields[1].split(':')
      if fields[3] != '0A' or int(port_hex, 16) != port:  # 0A is TCP_LISTEN.
        continue
      # The kernel prints each 32-bit word of the address in host (little-endian) order.
      packed = b''.join(bytes.fromhex(address_hex[i:i + 8])[::-1]
                        for i in range(0, len(address_hex), 8))
      addresses.add(ipaddress.ip_address(packed))
  return addresses


def _is_loopback(address) -> bool:
  mapped = getattr(address, 'ipv4_mapped', None)  # gRPC may listen on ::ffff:127.0.0.1.
  return (mapped or address).is_loopback


def test_server_binds_to_loopback_by_default(served_model):
  server, port = start_server({MODEL: served_model})
  try:
    with InferenceClient(f'127.0.0.1:{port}', timeout_s=_CLIENT_TIMEOUT_S) as loopback_client:
      loopback_client.wait_until_ready(_CLIENT_TIMEOUT_S)
      assert MODEL in loopback_client.status()
    if pathlib.Path('/proc/net/tcp').exists():
      listening = _listening_addresses(port)
      assert listening, f'No listening socket on port {port} in /proc/net/tcp{{,6}}.'
      assert all(_is_loopback(address) for address in listening), listening
  finally:
    server.stop(grace=None)


def test_importing_the_client_loads_neither_jax_nor_the_server():
  # Actor processes import the client only; a fresh interpreter sees what that pulls in.
  loaded = subprocess.run(
      [sys.executable, '-c', 'import sys; import chorus.inference_server.client; '
       'print(" ".join(sorted(sys.modules)))'],
      check=True, capture_output=True, text=True).stdout.split()
  assert 'jax' not in loaded
  server_modules = {'chorus.inference_server.service', 'chorus.inference_server.served_model',
                    'chorus.inference_server.lanes', 'chorus.inference_server.sampler'}
  assert not server_modules & set(loaded), sorted(server_modules & set(loaded))
