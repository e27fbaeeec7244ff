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


def test_sampler_rejects_negative_temperature_and_bad_limits(tiny_setup):
  _, params, sample = tiny_setup
  with pytest.raises(ValueError, match=r'temperature must be >= 0 \(0 is greedy\)'):
    _sample(sample, params, -0.5, MAX_NEW_TOKENS, seed=0)
  with pytest.raises(ValueError, match=f'must be in 1..{MAX_NEW_TOKENS}'):
    _sample(sample, params, 1.0, MAX_NEW_TOKENS + 1, seed=0)
  with pytest.raises(ValueError, match='exceeds the model max_seq_len'):
    sampler_lib.make_sampler(models.DecoderConfig.tiny(37), 60, 10)


# The geometric mixture of two decoders (Nash-MD's opponent).


def _peaked(params, scale):
  """Tied embeddings: scaling the embedding sharpens the logits."""
  return dict(params, embedder={'embedding': params['embedder']['embedding'] * scale})


def _mixture_log_probs(config, params, mixture_params, coef, temperature, prompt_tokens,
                       prompt_mask, completion_tokens, completion_mask):
  """log softmax(((1 - b) * logits + b * mixture_logits) / temperature), from two
  independent cache-free passes: [B, T, V]."""
  logits, _ = models.forward_completions(config, params, prompt_tokens, prompt_mask,
                                         completion_tokens, completion_mask)
  mixture_logits, _ = models.forward_completions(config, mixture_params, prompt_tokens,
                                                 prompt_mask, completion_tokens,
                                                 completion_mask)
  coef = np.asarray(coef, np.float32)[:, None, None]
  temperature = np.asarray(temperature, np.float32)[:, None, None]
  return np.asarray(jax.nn.log_softmax(((1 - coef) * logits + coef * mixture_logits)
                                       / temperature, axis=-1))


@pytest.fixture(scope='module')
def mixture_setup():
  config = models.DecoderConfig.tiny(37)
  params = models.init_params(config, jax.random.PRNGKey(10))
  mixture_params = models.init_params(config, jax.random.PRNGKey(11))
  return (config, params, mixture_params,
          sampler_lib.make_mixture_sampler(config, config, PROMPT_LEN, MAX_NEW_TOKENS))


def _sample_mixture(sample, params, mixture_params, coef, temperature, seed, prompts=PROMPTS,
                    max_new_tokens=MAX_NEW_TOKENS):
  tokens, mask = models.left_pad_prompts(prompts, PROMPT_LEN)
  batch = len(prompts)
  output = sample(params, mixture_params, np.broadcast_to(np.float32(coef), (batch,)).copy(),
                  tokens, mask, np.broadcast_to(np.float32(temperature), (batch,)).copy(),
                  np.full(batch, max_new_tokens, np.int32), jax.random.PRNGKey(seed))
  return tokens, mask, jax.tree_util.tree_map(np.asarray, output)


@pytest.mark.parametrize('temperature', [1.0, 0.6])
def test_mixture_logprobs_are_the_normalised_geometric_mean_at_every_step(mixture_setup,
                                                                           temperature):
  config, params, mixture_params, sample = mixture_setup
  coef = np.array([0.0, 0.25, 0.5, 0.8, 1.0], np.float32)
  prompt_tokens, prompt_mask, output = _sample_mixture(sample, params, mixture_params, coef,
                                                       temperature, seed=12)
  completion_mask = np.arange(MAX_NEW_TOKENS)[None] < output.lengths[:, None]
  # Teacher forcing: every sampled token is scored under pi^(1-b) * pi_mixture^b / Z given
  # the same prefix, computed without the sampler's KV caches.
  log_probs = _mixture_log_probs(config, params, mixture_params, coef,
                                 np.full(len(PROMPTS), temperature), prompt_tokens,
                                 prompt_mask, output.tokens, completion_mask)
  expected = np.take_along_axis(log_probs, output.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(output.logprobs, np.where(completion_mask, expected, 0.0),
                             atol=1e-4)
  # The same tokens under the first model alone score differently where b > 0.
  alone = _mixture_log_probs(config, params, mixture_params, np.zeros(len(PROMPTS)),
                             np.full(len(PROMPTS), temperature), prompt_tokens, prompt_mask,
                             output.tokens, completion_mask)
  alone = np.take_along_axis(alone, output.tokens[..., None], -1)[..., 0]
  differs = np.abs(alone - expected).max(axis=1) > 1e-3
  np.testing.assert_array_equal(differs, coef > 0)


def test_mixture_first_token_frequencies_follow_the_normalised_geometric_mean():
  config = models.DecoderConfig.tiny(8)
  params = models.init_params(config, jax.random.PRNGKey(20))
  mixture_params = models.init_params(config, jax.random.PRNGKey(21))
  sample = sampler_lib.make_mixture_sampler(config, config, PROMPT_LEN, 1)
  # A high temperature spreads the mass, so the two models and the mixture are far apart.
  coef, temperature = 0.4, 2.0
  prompts = [[1, 3, 4, 5]] * 8192
  prompt_tokens, prompt_mask, output = _sample_mixture(
      sample, params, mixture_params, coef, temperature, seed=15, prompts=prompts,
      max_new_tokens=1)
  first = [np.asarray(jax.nn.softmax(models.forward_completions(
      config, p, prompt_tokens[:1], prompt_mask[:1], np.zeros((1, 1), np.int32),
      np.ones((1, 1), bool))[0][0, 0] / temperature)) for p in (params, mixture_params)]
  geometric_mean = first[0] ** (1 - coef) * first[1] ** coef
  expected = geometric_mean / geometric_mean.sum()
  observed = np.bincount(output.tokens[:, 0], minlength=config.vocab_size) / len(prompts)
  total_variation = lambda p, q: 0.5 * np.abs(p - q).sum()
  # The test can tell the mixture from either model alone.
  assert min(total_variation(expected, first[0]), total_variation(expected, first[1])) > 0.08
  # Expected total variation from sampling noise here is about 0.012.
  assert total_variation(observed, expected) < 0.04


def test_mixture_coef_zero_samples_the_model_and_one_samples_the_mixture_model(mixture_setup):
  config, params, mixture_params, sample = mixture_setup
  single = sampler_lib.make_sampler(config, PROMPT_LEN, MAX_NEW_TOKENS)
  for coef, alone_params in ((0.0, params), (1.0, mixture_params)):
    mixed = _sample_mixture(sample, params, mixture_params, coef, 0.9, seed=16)[2]
    alone = _sample(single, alone_params, 0.9, MAX_NEW_TOKENS, seed=16)[2]
    np.testing.assert_array_equal(mixed.tokens, alone.tokens)
    np.testing.assert_array_equal(mixed.lengths, alone.lengths)
    np.testing.assert_allclose(mixed.logprobs, alone.logprobs, atol=1e-5)


def test_mixture_sampler_rejects_bad_coefs_and_models_without_a_shared_vocabulary(
    mixture_setup):
  _, params, mixture_params, sample = mixture_setup
  for coef in (-0.1, 1.5, np.nan):
    with pytest.raises(ValueError, match=r'mixture_coef must hold one value in \[0, 1\]'):
      _sample_mixture(sample, params, mixture_params, coef, 1.0, seed=0)
  with pytest.raises(ValueError, match='needs one vocabulary'):
    sampler_lib.make_mixture_sampler(models.DecoderConfig.tiny(37),
                                     models.DecoderConfig.tiny(38), PROMPT_LEN, 4)


# Classifier-free guidance: one model, the prompt and an unconditional prompt.

NULL_CAPTION = 30
# Unconditional prompts of other lengths than the prompts, so positions differ per pass.
UNCONDITIONAL = [[1, NULL_CAPTION], [1, NULL_CAPTION], [1, NULL_CAPTION, 31, 32], [1, 33],
                 [1, NULL_CAPTION]]


@pytest.fixture(scope='module')
def guided_setup():
  config = models.DecoderConfig.tiny(37)
  params = models.init_params(config, jax.random.PRNGKey(30))
  return config, params, sampler_lib.make_guided_sampler(config, PROMPT_LEN, MAX_NEW_TOKENS)


def _sample_guided(sample, params, guidance_scale, temperature, seed, prompts=PROMPTS,
                   unconditional=UNCONDITIONAL):
  tokens, mask = models.left_pad_prompts(prompts, PROMPT_LEN)
  unconditional_tokens, unconditional_mask = models.left_pad_prompts(unconditional, PROMPT_LEN)
  batch = len(prompts)
  output = sample(params, np.broadcast_to(np.float32(guidance_scale), (batch,)).copy(), tokens,
                  mask, unconditional_tokens, unconditional_mask,
                  np.full(batch, temperature, np.float32), np.full(batch, MAX_NEW_TOKENS, np.int32),
                  jax.random.PRNGKey(seed))
  return tokens, mask, jax.tree_util.tree_map(np.asarray, output)


def _guided_token_logprobs(config, params, guidance_scale, temperature, prompts, unconditional,
                           completion_tokens, completion_mask):
  """log softmax((g * l(.|cond) + (1 - g) * l(.|uncond)) / T) at the given tokens [B, T],
  from two independent cache-free passes (teacher forcing)."""
  logits = [models.forward_completions(
      config, params, *models.left_pad_prompts(conditioning, PROMPT_LEN), completion_tokens,
      completion_mask)[0] for conditioning in (prompts, unconditional)]
  scale = np.asarray(guidance_scale, np.float32)[:, None, None]
  log_probs = jax.nn.log_softmax((scale * logits[0] + (1 - scale) * logits[1]) / temperature,
                                 axis=-1)
  token_logprobs = np.take_along_axis(np.asarray(log_probs), completion_tokens[..., None],
                                      -1)[..., 0]
  return np.where(completion_mask, token_logprobs, 0.0)


@pytest.mark.parametrize('temperature', [1.0, 0.6])
def test_guided_logprobs_are_the_guided_distribution_at_every_step(guided_setup, temperature):
  config, params, sample = guided_setup
  guidance_scale = np.array([1.0, 3.0, 3.0, 3.0, 1.0], np.float32)
  _, _, output = _sample_guided(sample, params, guidance_scale, temperature, seed=31)
  completion_mask = np.arange(MAX_NEW_TOKENS)[None] < output.lengths[:, None]
  expected = _guided_token_logprobs(config, params, guidance_scale, temperature, PROMPTS,
                                    UNCONDITIONAL, output.tokens, completion_mask)
  np.testing.assert_allclose(output.logprobs, expected, atol=1e-4)
  # The same tokens without guidance score differently exactly where g != 1.
  unguided = _guided_token_logprobs(config, params, np.ones(len(PROMPTS)), temperature,
                                    PROMPTS, UNCONDITIONAL, output.tokens, completion_mask)
  differs = np.abs(unguided - expected).max(axis=1) > 1e-3
  np.testing.assert_array_equal(differs, guidance_scale != 1)


def test_guidance_scale_one_samples_what_the_plain_sampler_samples(guided_setup):
  config, params, sample = guided_setup
  plain = sampler_lib.make_sampler(config, PROMPT_LEN, MAX_NEW_TOKENS)
  guided = _sample_guided(sample, params, 1.0, 0.9, seed=32)[2]
  alone = _sample(plain, params, 0.9, MAX_NEW_TOKENS, seed=32)[2]
  np.testing.assert_array_equal(guided.tokens, alone.tokens)
  np.testing.assert_array_equal(guided.lengths, alone.lengths)
  np.testing.assert_allclose(guided.logprobs, alone.logprobs, atol=1e-5)
  # A scale that matters changes what is drawn with the same rng.
  assert not np.array_equal(_sample_guided(sample, params, 3.0, 0.9, seed=32)[2].tokens,
                            alone.tokens)


def test_guided_sampler_rejects_bad_scales_and_unconditional_prompts_of_another_shape(
    guided_setup):
  _, params, sample = guided_setup
  for scale in (-0.5, np.nan, np.inf):
    with pytest.raises(ValueError, match='guidance_scale must hold one finite value >= 0'):
      _sample_guided(sample, params, scale, 1.0, seed=0)
  tokens, mask = models.left_pad_prompts(PROMPTS, PROMPT_LEN)
  with pytest.raises(ValueError, match="must have the prompts' shape"):
    sample(params, np.full(len(PROMPTS), 3.0, np.float32), tokens, mask, tokens[:2], mask[:2],
           np.ones(len(PROMPTS), np.float32), np.full(len(PROMPTS), 2, np.int32),
           jax.random.PRNGKey(0))
