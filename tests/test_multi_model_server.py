"""One inference server, several named models: geometric-mixture and classifier-free-guidance
generation, scoring with decoders, reward and preference models, independent versions. Real
gRPC on loopback."""
import concurrent.futures
import math

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
from chorus.models import reward_models

VOCAB_SIZE = 32
CONFIG = InferenceServerConfig(max_batch_size=8, max_wait_ms=20.0, request_timeout_s=60.0)
SEQUENCE = core.SequenceSpec(prompt_len=8, completion_len=8)
# (kind, vocab size, init seed) of each served model; 'wide' cannot be mixed with the rest.
MODELS = {'policy': ('decoder', VOCAB_SIZE, 0), 'reference': ('decoder', VOCAB_SIZE, 1),
          'anchor': ('decoder', VOCAB_SIZE, 2), 'reward': ('reward', VOCAB_SIZE, 3),
          'preference': ('preference', VOCAB_SIZE, 4), 'wide': ('decoder', VOCAB_SIZE + 1, 5)}
PROMPTS = [[1, 5], [1, 6, 7, 8, 9, 10, 11, 12], [1, 13, 14], [1], [1, 20, 21, 22, 23]]
NULL_CAPTION = 30
_TIMEOUT_S = 60.0


def _config(name):
  return models.DecoderConfig.tiny(MODELS[name][1])


def _params(name, seed_offset=0):
  return models.init_params(_config(name), jax.random.PRNGKey(MODELS[name][2] + seed_offset))


@pytest.fixture(scope='module')
def served_models():
  # No warm_up: each test compiles only the batch buckets it uses, keeping the file fast.
  served = {name: ServedModel(name, _config(name), _params(name), 10 * index + 1, CONFIG,
                              SEQUENCE, kind=kind)
            for index, (name, (kind, _, _)) in enumerate(MODELS.items())}
  yield served
  for model in served.values():
    model.close()


@pytest.fixture(scope='module')
def address(served_models):
  server, port = start_server(served_models)
  yield f'127.0.0.1:{port}'
  server.stop(grace=None)


@pytest.fixture(scope='module')
def client(address):
  with InferenceClient(address, timeout_s=_TIMEOUT_S) as inference_client:
    inference_client.wait_until_ready(_TIMEOUT_S)
    yield inference_client


def _publish(address, client, name, params) -> int:
  """Serves `params` as the next version of model `name`; returns that version."""
  version = client.status()[name]['param_version'] + 1
  with ParameterPublisher(address, model=name, timeout_s=_TIMEOUT_S) as publisher:
    publisher.publish(params, version)
  return version


def _token_logprobs(prompts, completions, log_probs_fn):
  """Per-completion log-probs of its tokens under log_probs_fn(prompt batch) [B, T, V]."""
  prompt_tokens, prompt_mask = models.left_pad_prompts(prompts, SEQUENCE.prompt_len)
  tokens, mask = models.right_pad_completions(completions, SEQUENCE.completion_len)
  log_probs = np.asarray(log_probs_fn(prompt_tokens, prompt_mask, tokens, mask))
  gathered = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
  return [gathered[row, :len(c)] for row, c in enumerate(completions)]


def _geometric_mixture_logprobs(prompts, completions, params, mixture_params, coef,
                                temperature):
  """log pi^(1-b) pi_mix^b / Z (tempered) of each token, from two cache-free passes."""
  config = _config('policy')

  def log_probs(prompt_tokens, prompt_mask, tokens, mask):
    logits, _ = models.forward_completions(config, params, prompt_tokens, prompt_mask,
                                           tokens, mask)
    mixture_logits, _ = models.forward_completions(config, mixture_params, prompt_tokens,
                                                   prompt_mask, tokens, mask)
    return jax.nn.log_softmax(((1 - coef) * logits + coef * mixture_logits) / temperature,
                              axis=-1)

  return _token_logprobs(prompts, completions, log_probs)


def _guided_logprobs(prompts, unconditional, completions, params, guidance_scale,
                     temperature):
  """Per-completion log-probs under log softmax((g * l(.|prompt) + (1 - g) *
  l(.|unconditional)) / T), from two cache-free passes of the policy."""
  config = _config('policy')
  unconditional_batch = models.left_pad_prompts(unconditional, SEQUENCE.prompt_len)

  def log_probs(prompt_tokens, prompt_mask, tokens, mask):
    conditional, _ = models.forward_completions(config, params, prompt_tokens, prompt_mask,
                                                tokens, mask)
    unconditional_logits, _ = models.forward_completions(config, params, *unconditional_batch,
                                                         tokens, mask)
    return jax.nn.log_softmax((guidance_scale * conditional
                               + (1 - guidance_scale) * unconditional_logits) / temperature,
                              axis=-1)

  return _token_logprobs(prompts, completions, log_probs)


def _assert_serves(client):
  """Good requests of each kind succeed (the server survived what came before)."""
  assert len(client.generate([[1, 4]], max_new_tokens=2).completions) == 1
  assert client.score_rewards([[1, 4]], [[5]]).rewards.shape == (1,)


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_mixture_logprobs_are_the_normalised_geometric_mean_and_both_versions_reported(
    address, client, temperature):
  policy_params, reference_params = _params('policy', 100), _params('reference', 100)
  policy_version = _publish(address, client, 'policy', policy_params)
  reference_version = _publish(address, client, 'reference', reference_params)
  coef = 0.3
  result = client.generate(PROMPTS, mixture_model='reference', mixture_coef=coef,
                           temperature=temperature)

  assert result.param_version == policy_version
  assert result.mixture_param_version == reference_version
  completions = [c.tokens for c in result.completions]
  expected = _geometric_mixture_logprobs(PROMPTS, completions, policy_params, reference_params,
                                         coef, temperature)
  policy_alone = _geometric_mixture_logprobs(PROMPTS, completions, policy_params,
                                             reference_params, 0.0, temperature)
  for completion, mixed, alone in zip(result.completions, expected, policy_alone):
    np.testing.assert_allclose(completion.logprobs, mixed, atol=1e-4)
    assert np.abs(mixed - alone).max() > 1e-3  # Not the policy's own log-probs.


def test_mixture_reads_each_models_current_params_when_its_batch_starts(address, client):
  policy_params = _params('policy', 200)
  policy_version = _publish(address, client, 'policy', policy_params)
  for offset in (201, 202):
    anchor_params = _params('anchor', offset)
    anchor_version = _publish(address, client, 'anchor', anchor_params)
    result = client.generate(PROMPTS[:2], mixture_model='anchor', mixture_coef=0.5,
                             num_samples=2)
    assert (result.param_version, result.mixture_param_version) == (policy_version,
                                                                    anchor_version)
    prompts = [prompt for prompt in PROMPTS[:2] for _ in range(2)]
    expected = _geometric_mixture_logprobs(prompts, [c.tokens for c in result.completions],
                                           policy_params, anchor_params, 0.5, 1.0)
    for completion, logprobs in zip(result.completions, expected):
      np.testing.assert_allclose(completion.logprobs, logprobs, atol=1e-4)


def test_plain_and_mixture_requests_in_flight_together_each_get_their_own_distribution(
    address, client):
  policy_params, reference_params = _params('policy', 300), _params('reference', 300)
  _publish(address, client, 'policy', policy_params)
  _publish(address, client, 'reference', reference_params)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    plain = pool.submit(client.generate, PROMPTS)
    mixed = pool.submit(client.generate, PROMPTS, mixture_model='reference', mixture_coef=0.6)
    plain, mixed = plain.result(), mixed.result()

  assert plain.mixture_param_version is None
  for result, coef in ((plain, 0.0), (mixed, 0.6)):
    expected = _geometric_mixture_logprobs(PROMPTS, [c.tokens for c in result.completions],
                                           policy_params, reference_params, coef, 1.0)
    for completion, logprobs in zip(result.completions, expected):
      np.testing.assert_allclose(completion.logprobs, logprobs, atol=1e-4)


@pytest.mark.parametrize('guidance_scale,temperature,per_prompt', [
    (3.0, 1.0, False), (1.5, 0.7, True)], ids=['one_unconditional_prompt', 'one_per_prompt'])
def test_guided_generation_returns_num_samples_per_prompt_from_the_guided_distribution(
    address, client, guidance_scale, temperature, per_prompt):
  params = _params('policy', 600)
  version = _publish(address, client, 'policy', params)
  prompts, num_samples = PROMPTS[1:4], 2
  unconditional = ([[1, NULL_CAPTION], [1, NULL_CAPTION, 31], [1, 29]] if per_prompt
                   else [[1, NULL_CAPTION]])
  result = client.generate(prompts, num_samples=num_samples, temperature=temperature,
                           guidance_scale=guidance_scale, unconditional_prompts=unconditional)

  assert (result.param_version, result.mixture_param_version) == (version, None)
  assert len(result.completions) == len(prompts) * num_samples
  rows = [index for index in range(len(prompts)) for _ in range(num_samples)]
  row_prompts = [prompts[index] for index in rows]
  row_unconditional = [unconditional[index % len(unconditional)] for index in rows]
  completions = [c.tokens for c in result.completions]
  expected = _guided_logprobs(row_prompts, row_unconditional, completions, params,
                              guidance_scale, temperature)
  unguided = _guided_logprobs(row_prompts, row_unconditional, completions, params, 1.0,
                              temperature)
  for completion, guided, plain in zip(result.completions, expected, unguided):
    assert 1 <= len(completion.tokens) <= SEQUENCE.completion_len
    np.testing.assert_allclose(completion.logprobs, guided, atol=1e-4)
    assert np.abs(guided - plain).max() > 1e-3  # Not the unguided log-probs.
  _assert_serves(client)


def test_score_logprobs_equal_forward_completions_and_what_generate_returned(address, client):
  params = _params('policy', 400)
  version = _publish(address, client, 'policy', params)
  generated = client.generate(PROMPTS, temperature=1.0)
  scores = client.score_logprobs(PROMPTS, generated.completions)

  assert scores.param_version == version
  for completion, logprobs, total in zip(generated.completions, scores.logprobs,
                                         scores.total_logprobs):
    np.testing.assert_allclose(logprobs, completion.logprobs, atol=1e-4)
    np.testing.assert_allclose(total, logprobs.sum(), rtol=1e-5)
  # Another temperature divides the logits, as sampling at it would.
  completions = [c.tokens for c in generated.completions]
  config = _config('policy')
  for temperature in (1.0, 0.5):
    expected = _token_logprobs(PROMPTS, completions, lambda *batch, t=temperature: (
        jax.nn.log_softmax(models.forward_completions(config, params, *batch)[0] / t,
                           axis=-1)))
    scored = client.score_logprobs(PROMPTS, completions, temperature=temperature)
    for logprobs, want in zip(scored.logprobs, expected):
      np.testing.assert_allclose(logprobs, want, atol=1e-4)


def test_reward_scores_equal_the_reward_model_function(client, served_models):
  completions = [[3, 4, 2], [9], [5, 6, 7, 8, 9, 10, 11, 12], [2], [30, 31]]
  result = client.score_rewards(PROMPTS, completions)

  params, version = served_models['reward'].params_and_version()
  assert result.param_version == version
  expected = reward_models.reward_scores(
      _config('reward'), params, *models.left_pad_prompts(PROMPTS, SEQUENCE.prompt_len),
      *models.right_pad_completions(completions, SEQUENCE.completion_len))
  np.testing.assert_allclose(result.rewards, expected, atol=1e-5)


def test_preferences_equal_the_preference_function_and_are_antisymmetric(client,
                                                                         served_models):
  first = [[3, 4, 2], [9], [5, 6, 7, 8, 9, 10, 11, 12], [2], [30, 31]]
  second = [[4, 4], [9, 10, 11], [5, 6, 7, 8, 9, 10, 11, 12], [7, 2], [31]]
  forward = client.score_preferences(PROMPTS, first, second)
  backward = client.score_preferences(PROMPTS, second, first)

  params, version = served_models['preference'].params_and_version()
  assert forward.param_version == backward.param_version == version
  expected = reward_models.preference_probabilities(
      _config('preference'), params,
      *models.left_pad_prompts(PROMPTS, SEQUENCE.prompt_len),
      *models.right_pad_completions(first, SEQUENCE.completion_len),
      *models.right_pad_completions(second, SEQUENCE.completion_len))
  np.testing.assert_allclose(forward.probabilities, expected, atol=1e-5)
  np.testing.assert_allclose(forward.probabilities + backward.probabilities, 1.0, atol=1e-5)
  np.testing.assert_allclose(forward.probabilities[2], 0.5, atol=1e-6)  # Same completion.


def test_models_update_independently_reward_models_included(address, client):
  before = client.status()
  anchor_version = _publish(address, client, 'anchor', _params('anchor', 500))
  after_anchor = client.status()
  assert after_anchor['anchor']['param_version'] == anchor_version
  for name in MODELS:
    if name != 'anchor':
      assert after_anchor[name]['param_version'] == before[name]['param_version']

  prompts, completions = PROMPTS[:2], [[3, 4], [5]]
  old_rewards = client.score_rewards(prompts, completions).rewards
  new_params = _params('reward', 500)
  reward_version = _publish(address, client, 'reward', new_params)
  result = client.score_rewards(prompts, completions)
  assert result.param_version == reward_version
  expected = reward_models.reward_scores(
      _config('reward'), new_params,
      *models.left_pad_prompts(prompts, SEQUENCE.prompt_len),
      *models.right_pad_completions(completions, SEQUENCE.completion_len))
  np.testing.assert_allclose(result.rewards, expected, atol=1e-5)
  assert not np.allclose(result.rewards, old_rewards)
  status = client.status()
  assert status['policy']['param_version'] == before['policy']['param_version']
  assert {name: status[name]['kind'] for name in MODELS} == {
      name: kind for name, (kind, _, _) in MODELS.items()}
  assert status['reward']['scored_sequences'] >= 4


def test_reward_model_rejects_params_of_another_architecture(address, client):
  served = client.status()['reward']['param_version']
  with ParameterPublisher(address, model='reward', timeout_s=_TIMEOUT_S) as publisher:
    with pytest.raises(InferenceError) as raised:
      publisher.publish(_params('wide'), served + 1)
  assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
  assert "Push to 'reward' refused: Tensor" in str(raised.value)
  assert client.status()['reward']['param_version'] == served


# (call on the client, status code, substrings the message must contain)
_BAD_REQUESTS = {
    'generate_from_reward_model': (
        lambda c: c.generate([[1, 2]], model='reward'), grpc.StatusCode.FAILED_PRECONDITION,
        ["'reward'", 'kind', 'cannot generate']),
    'generate_from_preference_model': (
        lambda c: c.generate([[1, 2]], model='preference'),
        grpc.StatusCode.FAILED_PRECONDITION, ["'preference'", 'cannot generate']),
    'unknown_mixture_model': (
        lambda c: c.generate([[1, 2]], mixture_model='nope', mixture_coef=0.5),
        grpc.StatusCode.NOT_FOUND, ["mixture_model 'nope'", 'reference']),
    'mixture_with_reward_model': (
        lambda c: c.generate([[1, 2]], mixture_model='reward', mixture_coef=0.5),
        grpc.StatusCode.FAILED_PRECONDITION, ["'reward'", 'two decoder models']),
    'mixture_with_other_vocabulary': (
        lambda c: c.generate([[1, 2]], mixture_model='wide', mixture_coef=0.5),
        grpc.StatusCode.INVALID_ARGUMENT, [f'vocab_size={VOCAB_SIZE + 1}', 'share']),
    'mixture_coef_above_one': (
        lambda c: c.generate([[1, 2]], mixture_model='reference', mixture_coef=1.5),
        grpc.StatusCode.INVALID_ARGUMENT, ['mixture_coef must be in [0, 1]', 'got 1.5']),
    'mixture_coef_negative': (
        lambda c: c.generate([[1, 2]], mixture_model='reference', mixture_coef=-0.25),
        grpc.StatusCode.INVALID_ARGUMENT, ['mixture_coef must be in [0, 1]', 'got -0.25']),
    'mixture_coef_nan': (
        lambda c: c.generate([[1, 2]], mixture_model='reference', mixture_coef=math.nan),
        grpc.StatusCode.INVALID_ARGUMENT, ['mixture_coef must be in [0, 1]']),
    'mixture_coef_without_mixture_model': (
        lambda c: c.generate([[1, 2]], mixture_coef=0.5), grpc.StatusCode.INVALID_ARGUMENT,
        ['without a mixture_model']),
    'mixture_rows_over_max_batch_size': (
        lambda c: c.generate([[1, 2]] * 3, num_samples=3, mixture_model='reference',
                             mixture_coef=0.5),
        grpc.StatusCode.INVALID_ARGUMENT, ['9 rows', 'at most 8']),
    'guidance_scale_negative': (
        lambda c: c.generate([[1, 2]], guidance_scale=-1.0, unconditional_prompts=[[1, 30]]),
        grpc.StatusCode.INVALID_ARGUMENT, ['guidance_scale must be a finite number >= 0',
                                           'got -1.0']),
    'guidance_scale_nan': (
        lambda c: c.generate([[1, 2]], guidance_scale=math.nan,
                             unconditional_prompts=[[1, 30]]),
        grpc.StatusCode.INVALID_ARGUMENT, ['guidance_scale must be a finite number >= 0']),
    'guidance_without_unconditional_prompts': (
        lambda c: c.generate([[1, 2]], guidance_scale=3.0), grpc.StatusCode.INVALID_ARGUMENT,
        ['guidance_scale=3.0 needs unconditional_prompts', 'got 0 for 1 prompts']),
    'unconditional_prompts_count_mismatch': (
        lambda c: c.generate([[1, 2], [1, 3], [1, 4]], guidance_scale=3.0,
                             unconditional_prompts=[[1, 30], [1, 30]]),
        grpc.StatusCode.INVALID_ARGUMENT, ['one per prompt', 'got 2 for 3 prompts']),
    'unconditional_prompts_without_guidance': (
        lambda c: c.generate([[1, 2]], unconditional_prompts=[[1, 30]]),
        grpc.StatusCode.INVALID_ARGUMENT, ['1 unconditional_prompts without a guidance_scale']),
    'guidance_with_mixture': (
        lambda c: c.generate([[1, 2]], guidance_scale=3.0, unconditional_prompts=[[1, 30]],
                             mixture_model='reference', mixture_coef=0.5),
        grpc.StatusCode.INVALID_ARGUMENT, ["together with mixture_model='reference'",
                                           'Drop one']),
    'unconditional_prompt_over_prompt_len': (
        lambda c: c.generate([[1, 2]], guidance_scale=3.0,
                             unconditional_prompts=[[1] * (SEQUENCE.prompt_len + 1)]),
        grpc.StatusCode.INVALID_ARGUMENT, [f'Unconditional prompt 0 has '
                                           f'{SEQUENCE.prompt_len + 1} tokens',
                                           f'1 to {SEQUENCE.prompt_len}']),
    'unconditional_prompt_token_outside_vocabulary': (
        lambda c: c.generate([[1, 2]], guidance_scale=3.0,
                             unconditional_prompts=[[1, VOCAB_SIZE + 3]]),
        grpc.StatusCode.INVALID_ARGUMENT, ['Unconditional prompt 0', f'[{VOCAB_SIZE + 3}]',
                                           'outside the vocabulary']),
    'guidance_on_reward_model': (
        lambda c: c.generate([[1, 2]], model='reward', guidance_scale=3.0,
                             unconditional_prompts=[[1, 30]]),
        grpc.StatusCode.FAILED_PRECONDITION, ["'reward'", 'cannot generate']),
    'guided_rows_over_max_batch_size': (
        lambda c: c.generate([[1, 2]] * 3, num_samples=3, guidance_scale=3.0,
                             unconditional_prompts=[[1, 30]]),
        grpc.StatusCode.INVALID_ARGUMENT, ['9 rows', 'at most 8']),
    'score_more_completions_than_prompts': (
        lambda c: c.score_logprobs([[1, 2]], [[3], [4]]), grpc.StatusCode.INVALID_ARGUMENT,
        ['1 prompts but 2 completions']),
    'score_preferences_missing_comparisons': (
        lambda c: c.score_preferences([[1, 2], [1, 3]], [[3], [4]], [[5]]),
        grpc.StatusCode.INVALID_ARGUMENT, ['one comparison per completion', '1 comparisons']),
    'score_preferences_without_comparisons': (
        lambda c: c.score_preferences([[1, 2]], [[3]], []), grpc.StatusCode.INVALID_ARGUMENT,
        ['one comparison per completion', '0 comparisons']),
    'score_empty_completion': (
        lambda c: c.score_rewards([[1, 2], [1, 3]], [[3], []]),
        grpc.StatusCode.INVALID_ARGUMENT, ['Completion 1 has 0 tokens']),
    'score_completion_over_completion_len': (
        lambda c: c.score_logprobs([[1, 2]], [[3] * (SEQUENCE.completion_len + 1)]),
        grpc.StatusCode.INVALID_ARGUMENT, [f'{SEQUENCE.completion_len + 1} tokens',
                                           f'1 to {SEQUENCE.completion_len}']),
    'score_comparison_token_outside_vocabulary': (
        lambda c: c.score_preferences([[1, 2]], [[3]], [[4, VOCAB_SIZE]]),
        grpc.StatusCode.INVALID_ARGUMENT, ['Comparison 0', f'[{VOCAB_SIZE}]',
                                           'outside the vocabulary']),
    'score_empty_batch': (
        lambda c: c.score_rewards([], []), grpc.StatusCode.INVALID_ARGUMENT, ['Empty batch']),
    'score_logprobs_of_reward_model': (
        lambda c: c.score_logprobs([[1, 2]], [[3]], model='reward'),
        grpc.StatusCode.FAILED_PRECONDITION, ["'reward' is a reward model", "not 'decoder'"]),
    'score_zero_temperature': (
        lambda c: c.score_logprobs([[1, 2]], [[3]], temperature=0.0),
        grpc.StatusCode.INVALID_ARGUMENT, ['temperature', 'got 0.0']),
    'score_unknown_model': (
        lambda c: c.score_rewards([[1, 2]], [[3]], model='nope'), grpc.StatusCode.NOT_FOUND,
        ["model 'nope'"]),
}


@pytest.mark.parametrize('call,code,message_parts', list(_BAD_REQUESTS.values()),
                         ids=list(_BAD_REQUESTS))
def test_bad_request_gets_a_clear_status_and_the_server_keeps_serving(client, call, code,
                                                                      message_parts):
  with pytest.raises(InferenceError) as raised:
    call(client)
  assert raised.value.code == code
  for part in message_parts:
    assert part in str(raised.value)
  _assert_serves(client)


@pytest.mark.parametrize('model,extra,message_parts', [
    ('reward', dict(comparisons=[inference_pb2.TokenSequence(tokens=[3])]),
     ['comparisons are for preference models only']),
    ('reward', dict(temperature=0.5), ['temperature applies to decoder models only']),
], ids=['comparisons_for_reward_model', 'temperature_for_reward_model'])
def test_score_fields_for_another_kind_are_invalid(address, client, model, extra,
                                                  message_parts):
  request = inference_pb2.ScoreRequest(
      model=model, prompts=[inference_pb2.TokenSequence(tokens=[1, 2])],
      completions=[inference_pb2.TokenSequence(tokens=[3])], **extra)
  with grpc.insecure_channel(address) as channel:
    with pytest.raises(grpc.RpcError) as raised:
      inference_pb2_grpc.InferenceServiceStub(channel).Score(request, timeout=_TIMEOUT_S)
  assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  for part in message_parts:
    assert part in raised.value.details()
  _assert_serves(client)


def test_preference_model_whose_context_cannot_hold_both_completions_is_refused():
  short = models.DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=1, embed_dim=16, num_heads=2,
                               num_kv_heads=1, head_dim=8, mlp_dim=32, max_seq_len=20)
  with pytest.raises(ValueError, match='reads 24 tokens, but its max_seq_len is 20'):
    ServedModel('preference', short, models.init_params(short, jax.random.PRNGKey(0)), 1, CONFIG,
                SEQUENCE, kind='preference')
  with pytest.raises(ValueError, match="unknown kind 'critic'"):
    ServedModel('critic', short, {}, 1, CONFIG, SEQUENCE, kind='critic')


def test_models_served_with_different_sequence_lengths_are_not_mixed(served_models):
  # Both passes of a mixture share one padded batch, so they need the same lengths.
  shorter = ServedModel('short_reference', _config('reference'), _params('reference'), 1, CONFIG,
                        core.SequenceSpec(prompt_len=4, completion_len=8))
  try:
    with pytest.raises(ValueError, match='one SequenceSpec'):
      served_models['policy'].add_mixture(shorter)
  finally:
    shorter.close()
