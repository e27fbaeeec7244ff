"""Tests of the batched scorer (per-token log-probs, rewards, preferences) as pure functions."""
import jax
import numpy as np
import pytest

from chorus import models
from chorus.inference_server import scoring
from chorus.models import reward_models

PROMPT_LEN = 8
COMPLETION_LEN = 6
VOCAB_SIZE = 29
PROMPTS = [[1, 5], [1, 6, 7, 8, 9, 10, 11, 12], [1, 13, 14], [1]]
COMPLETIONS = [[3, 4, 5], [7], [8, 9, 10, 11, 12, 2], [6, 6]]
COMPARISONS = [[4, 4], [7, 8, 9], [8, 9, 10, 11, 12, 2], [2]]


@pytest.fixture(scope='module')
def setup():
  config = models.DecoderConfig.tiny(VOCAB_SIZE)
  params = models.init_params(config, jax.random.PRNGKey(0))
  prompt_tokens, prompt_mask = models.left_pad_prompts(PROMPTS, PROMPT_LEN)
  completion_tokens, completion_mask = models.right_pad_completions(COMPLETIONS, COMPLETION_LEN)
  comparison_tokens, comparison_mask = models.right_pad_completions(COMPARISONS, COMPLETION_LEN)
  return config, params, (prompt_tokens, prompt_mask, completion_tokens, completion_mask,
                          comparison_tokens, comparison_mask)


def test_decoder_scores_are_tempered_log_softmax_of_forward_completions(setup):
  config, params, batch = setup
  score = scoring.make_scorer('decoder', config, PROMPT_LEN, COMPLETION_LEN)
  temperature = np.array([1.0, 0.5, 2.0, 1.0], np.float32)
  logprobs = np.asarray(score(params, *batch, temperature))

  prompt_tokens, prompt_mask, completion_tokens, completion_mask = batch[:4]
  logits, _ = models.forward_completions(config, params, prompt_tokens, prompt_mask,
                                         completion_tokens, completion_mask)
  log_probs = np.asarray(jax.nn.log_softmax(logits / temperature[:, None, None], axis=-1))
  expected = np.take_along_axis(log_probs, completion_tokens[..., None], -1)[..., 0]
  assert logprobs.shape == (len(PROMPTS), COMPLETION_LEN)
  np.testing.assert_allclose(logprobs, np.where(completion_mask, expected, 0.0), atol=1e-5)
  assert np.all(logprobs[completion_mask] < 0)


@pytest.mark.parametrize('pooling', reward_models.POOLINGS)
def test_reward_scores_equal_the_reward_model_function(setup, pooling):
  config, params, batch = setup
  score = scoring.make_scorer('reward', config, PROMPT_LEN, COMPLETION_LEN, pooling)
  rewards = np.asarray(score(params, *batch, np.ones(len(PROMPTS), np.float32)))
  expected = reward_models.reward_scores(config, params, *batch[:4], pooling)
  assert rewards.shape == (len(PROMPTS),)
  np.testing.assert_allclose(rewards, expected, atol=1e-5)


def test_preference_scores_equal_the_preference_function_and_swap_to_one_minus(setup):
  config, params, batch = setup
  score = scoring.make_scorer('preference', config, PROMPT_LEN, COMPLETION_LEN)
  ones = np.ones(len(PROMPTS), np.float32)
  forward = np.asarray(score(params, *batch, ones))
  prompt_tokens, prompt_mask, completions, completion_mask, comparisons, comparison_mask = batch
  backward = np.asarray(score(params, prompt_tokens, prompt_mask, comparisons,
                              comparison_mask, completions, completion_mask, ones))
  expected = reward_models.preference_probabilities(config, params, *batch)
  np.testing.assert_allclose(forward, expected, atol=1e-5)
  np.testing.assert_allclose(forward + backward, 1.0, atol=1e-5)
  # Row 2 compares a completion with itself.
  np.testing.assert_allclose(forward[2], 0.5, atol=1e-6)
  assert np.all((forward > 0) & (forward < 1))


def test_scorer_rejects_unknown_kinds_short_contexts_and_wrong_shapes(setup):
  config, params, batch = setup
  with pytest.raises(ValueError, match="Unknown model kind 'value'"):
    scoring.make_scorer('value', config, PROMPT_LEN, COMPLETION_LEN)
  # A preference model reads the prompt and both completions: 8 + 2 * 30 > 64.
  with pytest.raises(ValueError, match='reads 68 tokens, but its max_seq_len is 64'):
    scoring.make_scorer('preference', config, PROMPT_LEN, 30)
  score = scoring.make_scorer('decoder', config, PROMPT_LEN, COMPLETION_LEN)
  with pytest.raises(ValueError, match='built for lengths 8 and 6'):
    score(params, *batch[:2], batch[2][:, :3], batch[3][:, :3], *batch[4:],
          np.ones(len(PROMPTS), np.float32))
  with pytest.raises(ValueError, match='temperature must be > 0'):
    score(params, *batch, np.zeros(len(PROMPTS), np.float32))
