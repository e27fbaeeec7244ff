"""The sampler takes temperature 0 as greedy and stops at the config's own EOS id."""
import dataclasses

import jax
import numpy as np

from chorus import models
from chorus.inference_server import sampler

VOCAB_SIZE = 29
PROMPTS = [[1, 5, 6, 7], [1, 9]]
PROMPT_LEN, MAX_NEW_TOKENS = 6, 5


def _sample(config, params, temperature, seed):
  tokens, mask = models.left_pad_prompts(PROMPTS, PROMPT_LEN)
  sample = sampler.make_sampler(config, PROMPT_LEN, MAX_NEW_TOKENS)
  return sample(params, tokens, mask, np.full(len(PROMPTS), temperature, np.float32),
                np.full(len(PROMPTS), MAX_NEW_TOKENS, np.int32), jax.random.PRNGKey(seed))


def _first_argmax(config, params) -> np.ndarray:
  tokens, mask = models.left_pad_prompts(PROMPTS, PROMPT_LEN)
  logits = models.Decoder(config).apply({'params': params}, tokens,
                                        models.positions_from_mask(mask), mask).logits
  return np.asarray(logits[:, -1].argmax(-1))


def test_temperature_zero_takes_the_argmax_with_log_prob_zero_whatever_the_seed():
  config = models.DecoderConfig.tiny(VOCAB_SIZE)
  params = models.init_params(config, jax.random.PRNGKey(0))
  first, second = _sample(config, params, 0.0, seed=1), _sample(config, params, 0.0, seed=2)
  np.testing.assert_array_equal(first.tokens, second.tokens)
  np.testing.assert_array_equal(first.tokens[:, 0], _first_argmax(config, params))
  np.testing.assert_array_equal(first.logprobs, 0.0)


def test_sampling_stops_at_the_configs_eos_token_id():
  config = models.DecoderConfig.tiny(VOCAB_SIZE)
  params = models.init_params(config, jax.random.PRNGKey(3))
  greedy_first = _first_argmax(config, params)
  # The first row's greedy first token becomes EOS: that row ends after one token.
  stopping = dataclasses.replace(config, eos_token_id=int(greedy_first[0]))
  output = _sample(stopping, params, 0.0, seed=0)
  assert int(output.lengths[0]) == 1 and bool(output.terminated[0])
  assert int(output.tokens[0, 0]) == greedy_first[0]
