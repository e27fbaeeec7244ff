"""Tests of the decoder: cache consistency, padding, config checks, serialization."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chorus import models

VOCAB_SIZE = 37
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12, 13], [1, 20, 21, 22, 23]]
PROMPT_LEN = 8
COMPLETION_LEN = 6

CONFIGS = {
    'tiny_gqa': models.DecoderConfig.tiny(VOCAB_SIZE),
    'multi_query_softcap': models.DecoderConfig(
        vocab_size=VOCAB_SIZE, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=1,
        head_dim=8, mlp_dim=64, max_seq_len=32, logit_softcap=5.0),
    # Gemma 2's features, with a window shorter than the prompts.
    'local_global_windowed': models.DecoderConfig(
        vocab_size=VOCAB_SIZE, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
        head_dim=12, mlp_dim=64, max_seq_len=32, logit_softcap=5.0, attn_logit_softcap=4.0,
        query_pre_attn_scalar=20.0, sliding_window=3,
        layer_types=('sliding_attention', 'full_attention'), use_post_attn_norm=True,
        use_post_ffw_norm=True),
}


def _completions(batch_size, seed=0):
  return np.random.RandomState(seed).randint(
      3, VOCAB_SIZE, size=(batch_size, COMPLETION_LEN)).astype(np.int32)


@pytest.mark.parametrize('config_name', sorted(CONFIGS))
def test_cached_incremental_decoding_matches_forward_completions(config_name):
  config = CONFIGS[config_name]
  params = models.init_params(config, jax.random.PRNGKey(0))
  prompt_tokens, prompt_mask = models.left_pad_prompts(PROMPTS, PROMPT_LEN)
  completion = _completions(len(PROMPTS))
  completion_mask = np.ones_like(completion, bool)
  expected_logits, expected_values = models.forward_completions(
      config, params, prompt_tokens, prompt_mask, completion, completion_mask)

  model = models.Decoder(config)
  step = jax.jit(lambda params, tokens, positions, mask, cache, index: model.apply(
      {'params': params}, tokens, positions, mask, cache=cache, cache_index=index))
  prompt_lengths = prompt_mask.sum(axis=1)
  cache = models.init_cache(config, len(PROMPTS), PROMPT_LEN + COMPLETION_LEN)
  prefill = step(params, prompt_tokens, models.positions_from_mask(prompt_mask),
                 prompt_mask, cache, 0)
  assert np.all(np.isfinite(prefill.logits)) and np.all(np.isfinite(prefill.values))
  logits, values, cache = [prefill.logits[:, -1]], [prefill.values[:, -1]], prefill.cache
  # One two-token chunk first, then single tokens, so multi-token writes at a nonzero
  # cache index are covered too.
  chunks = [(0, 2)] + [(t, t + 1) for t in range(2, COMPLETION_LEN)]
  for start, stop in chunks:
    positions = prompt_lengths[:, None] + np.arange(start, stop)[None]
    output = step(params, completion[:, start:stop], positions,
                  completion_mask[:, start:stop], cache, PROMPT_LEN + start)
    logits.extend(jnp.moveaxis(output.logits, 1, 0))
    values.extend(jnp.moveaxis(output.values, 1, 0))
    cache = output.cache

  incremental_logits = jnp.stack(logits[:COMPLETION_LEN], axis=1)
  incremental_values = jnp.stack(values, axis=1)
  assert incremental_values.shape == expected_values.shape == (3, COMPLETION_LEN + 1)
  np.testing.assert_allclose(incremental_logits, expected_logits, atol=1e-4)
  np.testing.assert_allclose(incremental_values, expected_values, atol=1e-4)


def test_forward_completions_aligns_logits_with_the_token_they_predict():
  config = CONFIGS['tiny_gqa']
  params = models.init_params(config, jax.random.PRNGKey(1))
  prompt_tokens, prompt_mask = models.left_pad_prompts(PROMPTS, PROMPT_LEN)
  completion = _completions(len(PROMPTS))
  logits, values = models.forward_completions(
      config, params, prompt_tokens, prompt_mask, completion, np.ones_like(completion, bool))
  # The first completion token is predicted from the prompt alone.
  prompt_only = models.Decoder(config).apply(
      {'params': params}, prompt_tokens, models.positions_from_mask(prompt_mask), prompt_mask)
  np.testing.assert_allclose(logits[:, 0], prompt_only.logits[:, -1], atol=1e-5)
  np.testing.assert_allclose(values[:, 0], prompt_only.values[:, -1], atol=1e-5)
  assert logits.shape == (3, COMPLETION_LEN, VOCAB_SIZE)


@pytest.mark.parametrize('config_name', ['tiny_gqa', 'local_global_windowed'])
def test_more_left_padding_does_not_change_outputs_of_real_tokens(config_name):
  config = CONFIGS[config_name]
  params = models.init_params(config, jax.random.PRNGKey(2))
  completion = _completions(len(PROMPTS))
  completion_mask = np.ones_like(completion, bool)
  outputs = []
  for prompt_len in (PROMPT_LEN, PROMPT_LEN + 5):
    prompt_tokens, prompt_mask = models.left_pad_prompts(PROMPTS, prompt_len)
    outputs.append(models.forward_completions(
        config, params, prompt_tokens, prompt_mask, completion, completion_mask))
  np.testing.assert_allclose(outputs[0][0], outputs[1][0], atol=1e-5)
  np.testing.assert_allclose(outputs[0][1], outputs[1][1], atol=1e-5)


def test_fully_padded_query_rows_are_finite():
  config = CONFIGS['tiny_gqa']
  params = models.init_params(config, jax.random.PRNGKey(3))
  tokens = jnp.zeros((2, 4), jnp.int32)
  mask = jnp.array([[False] * 4, [False, False, True, True]])
  output = models.Decoder(config).apply(
      {'params': params}, tokens, models.positions_from_mask(mask), mask)
  assert np.all(np.isfinite(output.logits)) and np.all(np.isfinite(output.values))


def test_num_kv_heads_must_divide_num_heads():
  with pytest.raises(ValueError, match='num_kv_heads=3 must divide num_heads=4'):
    models.DecoderConfig(vocab_size=10, num_layers=1, embed_dim=16, num_heads=4,
                         num_kv_heads=3, head_dim=4, mlp_dim=32, max_seq_len=16)


def test_left_pad_prompts_pads_on_the_left_and_rejects_bad_prompts():
  tokens, mask = models.left_pad_prompts([[1, 5], [1, 6, 7]], 4)
  np.testing.assert_array_equal(tokens, [[0, 0, 1, 5], [0, 1, 6, 7]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])
  assert tokens.dtype == np.int32 and mask.dtype == bool
  with pytest.raises(ValueError, match='Prompt 1 has 5 tokens'):
    models.left_pad_prompts([[1], [1, 2, 3, 4, 5]], 4)
  with pytest.raises(ValueError, match='Prompt 0 has 0 tokens'):
    models.left_pad_prompts([[]], 4)


def test_params_bytes_round_trip_keeps_every_leaf():
  config = CONFIGS['tiny_gqa']
  params = models.init_params(config, jax.random.PRNGKey(4))
  data = models.params_to_bytes(params)
  for restored in (models.params_from_bytes(data),
                   models.params_from_bytes(data, template=params)):
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
    for original, copy in zip(jax.tree_util.tree_leaves(params),
                              jax.tree_util.tree_leaves(restored)):
      np.testing.assert_array_equal(original, copy)


def test_preset_parameter_counts_are_in_range():
  counts = {}
  for name in ('tiny', 'small'):
    config = getattr(models.DecoderConfig, name)(VOCAB_SIZE)
    shapes = jax.eval_shape(lambda c=config: models.init_params(c, jax.random.PRNGKey(0)))
    counts[name] = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
  print(f'parameter counts: {counts}')
  assert 50_000 < counts['tiny'] < 500_000
  assert 5_000_000 < counts['small'] < 20_000_000


def test_cache_shapes_follow_the_config():
  config = CONFIGS['multi_query_softcap']
  cache = models.init_cache(config, batch_size=3, cache_len=10)
  assert len(cache.keys) == len(cache.values) == config.num_layers
  assert cache.keys[0].shape == (3, 10, 1, config.head_dim)
  assert cache.key_mask.shape == (3, 10) and not cache.key_mask.any()
