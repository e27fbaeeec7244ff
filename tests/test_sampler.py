"""Tests of the batched KV-cache sampler against the cache-free forward pass."""
import jax
import numpy as np
import pytest

from chorus import models
from chorus.inference_server import sampler as sampler_lib

PROMPT_LEN = 8
MAX_NEW_TOKENS = 12
PROMPTS = [[1, 5], [1, 6, 7, 8, 9, 10, 11, 12], [1, 13, 14, 15], [1], [1, 20, 21, 22, 23, 24]]


def _setup(vocab_size, max_new_tokens=MAX_NEW_TOKENS, seed=0):
  config = models.DecoderConfig.tiny(vocab_size)
  params = models.init_params(config, jax.random.PRNGKey(seed))
  return config, params, sampler_lib.make_sampler(config, PROMPT_LEN, max_new_tokens)


@pytest.fixture(scope='module')
def tiny_setup():
  return _setup(vocab_size=37)


@pytest.fixture(scope='module')
def small_vocab_setup():
  # With 8 ids and a high temperature EOS comes up often, so both endings occur.
  return _setup(vocab_size=8)


def _sample(sample, params, temperature, max_new_tokens, seed, prompts=PROMPTS):
  tokens, mask = models.left_pad_prompts(prompts, PROMPT_LEN)
  batch = len(prompts)
  output = sample(params, tokens, mask,
                  np.broadcast_to(np.float32(temperature), (batch,)).copy(),
                  np.broadcast_to(np.int32(max_new_tokens), (batch,)).copy(),
                  jax.random.PRNGKey(seed))
  return tokens, mask, jax.tree_util.tree_map(np.asarray, output)


def test_logprobs_equal_forward_completions_at_the_sampled_tokens(tiny_setup):
  config, params, sample = tiny_setup
  temperature = np.array([0.5, 1.0, 2.0, 0.7, 1.5], np.float32)
  prompt_tokens, prompt_mask, output = _sample(sample, params, temperature,
                                               MAX_NEW_TOKENS, seed=1)
  completion_mask = np.arange(MAX_NEW_TOKENS)[None] < output.lengths[:, None]
  logits, _ = models.forward_completions(config, params, prompt_tokens, prompt_mask,
                                         output.tokens, completion_mask)
  log_probs = jax.nn.log_softmax(logits / temperature[:, None, None], axis=-1)
  expected = np.take_along_axis(np.asarray(log_probs), output.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(output.logprobs, np.where(completion_mask, expected, 0.0),
                             atol=1e-4)
  assert np.all(output.logprobs[completion_mask] < 0)


def test_rows_end_at_eos_or_their_own_limit_and_are_padded_after(small_vocab_setup):
  _, params, sample = small_vocab_setup
  prompts = PROMPTS * 4
  row_max = np.resize([1, 3, 5, MAX_NEW_TOKENS], len(prompts)).astype(np.int32)
  prompt_tokens, prompt_mask = models.left_pad_prompts(prompts, PROMPT_LEN)
  output = jax.tree_util.tree_map(np.asarray, sample(
      params, prompt_tokens, prompt_mask, np.full(len(prompts), 3.0, np.float32), row_max,
      jax.random.PRNGKey(2)))

  assert output.terminated.any() and not output.terminated.all()
  for row, length in enumerate(output.lengths):
    assert 1 <= length <= row_max[row]
    assert np.all(output.tokens[row, length:] == models.PAD_ID)
    assert np.all(output.logprobs[row, length:] == 0.0)
    assert not np.any(output.tokens[row, :length - 1] == models.EOS_ID)
    assert output.terminated[row] == (output.tokens[row, length - 1] == models.EOS_ID)
    if not output.terminated[row]:
      assert length == row_max[row]


def test_low_temperature_returns_the_strongly_preferred_token(tiny_setup):
  config, params, sample = tiny_setup
  # Tied embeddings: scaling the embedding scales the logits, making them peaked.
  peaked = dict(params, embedder={'embedding': params['embedder']['embedding'] * 8.0})
  prompts = [[1, 9, 10]] * 16
  prompt_tokens, prompt_mask = models.left_pad_prompts(prompts, PROMPT_LEN)
  logits, _ = models.forward_completions(config, peaked, prompt_tokens[:1], prompt_mask[:1],
                                         np.zeros((1, 1), np.int32), np.ones((1, 1), bool))
  probs = np.asarray(jax.nn.softmax(logits[0, 0]))
  preferred = int(probs.argmax())
  assert probs[preferred] > 0.5
  _, _, output = _sample(sample, peaked, 0.05, 1, seed=3, prompts=prompts)
  np.testing.assert_array_equal(output.tokens[:, 0], preferred)


def test_first_token_frequencies_follow_the_tempered_distribution():
  config, params, sample = _setup(vocab_size=8, max_new_tokens=1, seed=4)
  temperature = 0.7
  prompts = [[1, 3, 4, 5]] * 4096
  prompt_tokens, _, output = _sample(sample, params, temperature, 1, seed=5, prompts=prompts)
  _, mask = models.left_pad_prompts(prompts[:1], PROMPT_LEN)
  logits, _ = models.forward_completions(config, params, prompt_tokens[:1], mask,
                                         np.zeros((1, 1), np.int32), np.ones((1, 1), bool))
  expected = np.asarray(jax.nn.softmax(logits[0, 0] / temperature))
  observed = np.bincount(output.tokens[:, 0], minlength=config.vocab_size) / len(prompts)
  # Expected total variation from sampling noise here is about 0.02.
  assert 0.5 * np.abs(observed - expected).sum() < 0.05


def test_same_rng_gives_the_same_output(tiny_setup):
  _, params, sample = tiny_setup
  first = _sample(sample, params, 1.0, MAX_NEW_TOKENS, seed=6)[2]
  again = _sample(sample, params, 1.0, MAX_NEW_TOKENS, seed=6)[2]
  other = _sample(sample, params, 1.0, MAX_NEW_TOKENS, seed=7)[2]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first.tokens, other.tokens)


def test_sampler_rejects_non_positive_temperature_and_bad_limits(tiny_setup):
  _, params, sample = tiny_setup
  with pytest.raises(ValueError, match='temperature must be > 0'):
    _sample(sample, params, 0.0, MAX_NEW_TOKENS, seed=0)
  with pytest.raises(ValueError, match=f'must be in 1..{MAX_NEW_TOKENS}'):
    _sample(sample, params, 1.0, MAX_NEW_TOKENS + 1, seed=0)
  with pytest.raises(ValueError, match='exceeds the model max_seq_len'):
    sampler_lib.make_sampler(models.DecoderConfig.tiny(37), 60, 10)
