"""Chorus's Gemma and Gemma 2 against transformers, on checkpoints transformers wrote.

Every comparison is float32 within 1e-4. The Gemma 2 model's sliding window (4 tokens)
is far shorter than the sequences, and its soft-caps, post-norms and
query_pre_attn_scalar differ from Gemma's defaults, so each feature moves the logits.
"""
import contextlib
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import hf_checkpoints
from chorus import models
from chorus.launch import cli
from chorus.launch import policy_io

WINDOW = 4
GEMMA2_FEATURES = dict(sliding_window=WINDOW, query_pre_attn_scalar=12,
                       attn_logit_softcapping=5.0, final_logit_softcapping=8.0)
KINDS = ('gemma', 'gemma2')
SEQUENCE_LEN = 14
TOLERANCE = 1e-4


@pytest.fixture(scope='module', name='checkpoints')
def fixture_checkpoints(tmp_path_factory):
  """kind -> (checkpoint directory, the transformers model that wrote it)."""
  root = tmp_path_factory.mktemp('gemma')
  tokenizer = hf_checkpoints.train_sentencepiece(str(root / 'tokenizer.model'))
  vocab_size = models.SentencePieceTokenizer(tokenizer).vocab_size
  return {kind: (str(root / kind), hf_checkpoints.write_gemma(
      str(root / kind), kind, vocab_size=vocab_size, tokenizer_model=tokenizer,
      **(GEMMA2_FEATURES if kind == 'gemma2' else {}))) for kind in KINDS}


def _token_ids(vocab_size: int, rows: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, vocab_size, size=(rows, SEQUENCE_LEN))


def _chorus_logits(pretrained: models.Pretrained, token_ids) -> np.ndarray:
  mask = np.ones(np.shape(token_ids), bool)
  return np.asarray(models.Decoder(pretrained.config).apply(
      {'params': pretrained.params}, jnp.asarray(token_ids, jnp.int32),
      models.positions_from_mask(mask), mask).logits)


@pytest.mark.parametrize('kind', KINDS)
def test_full_forward_logits_equal_transformers(checkpoints, kind):
  directory, reference = checkpoints[kind]
  pretrained = models.load_pretrained(directory)
  token_ids = _token_ids(pretrained.config.vocab_size)
  expected = hf_checkpoints.logits(reference, token_ids)
  assert np.abs(expected).max() > 1.0  # The weights are large enough to matter.
  np.testing.assert_allclose(_chorus_logits(pretrained, token_ids), expected, atol=TOLERANCE)


@pytest.mark.parametrize('kind', KINDS)
def test_kv_cached_decoding_equals_transformers_past_the_sliding_window(checkpoints, kind):
  directory, reference = checkpoints[kind]
  pretrained = models.load_pretrained(directory)
  config = pretrained.config
  token_ids = _token_ids(config.vocab_size, rows=1, seed=1)
  expected = hf_checkpoints.logits(reference, token_ids)[0]
  model = models.Decoder(config)
  step = jax.jit(lambda params, tokens, positions, cache, index: model.apply(
      {'params': params}, tokens, positions, jnp.ones(tokens.shape, bool), cache=cache,
      cache_index=index))
  cache = models.init_cache(config, 1, SEQUENCE_LEN)
  prefill_len = 3
  output = step(pretrained.params, token_ids[:, :prefill_len], jnp.arange(prefill_len)[None],
                cache, 0)
  logits = list(output.logits[0])
  for index in range(prefill_len, SEQUENCE_LEN):
    output = step(pretrained.params, token_ids[:, index:index + 1], jnp.asarray([[index]]),
                  output.cache, index)
    logits.append(output.logits[0, 0])
  np.testing.assert_allclose(np.stack(logits), expected, atol=TOLERANCE)


@pytest.mark.parametrize('kind', KINDS)
def test_greedy_chorus_sample_equals_transformers_generate(checkpoints, kind):
  directory, reference = checkpoints[kind]
  prompt, max_new_tokens = 'rev 31415>', 12
  policy = policy_io.from_checkpoint(directory)
  prompt_ids = [policy.tokenizer.bos_id] + policy.tokenizer.encode(prompt)
  generated = reference.generate(
      torch.as_tensor([prompt_ids]), do_sample=False,
      max_new_tokens=max_new_tokens)[0, len(prompt_ids):].tolist()
  assert len(prompt_ids) + len(generated) > 2 * WINDOW
  ids, text = policy_io.complete_text(policy, prompt, max_new_tokens=max_new_tokens,
                                      temperature=0.0, seed=0)
  assert ids == generated
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    assert cli.main(['sample', '--model', directory, '--prompt', prompt, '--temperature', '0',
                     '--max-new-tokens', str(max_new_tokens)]) == 0
  assert stdout.getvalue() == text + '\n' == policy.tokenizer.decode(generated) + '\n'


@pytest.mark.parametrize('kind', KINDS)
def test_export_loads_back_and_into_transformers_with_the_same_logits(checkpoints, kind,
                                                                      tmp_path):
  directory, reference = checkpoints[kind]
  pretrained = models.load_pretrained(directory)
  written = models.save_pretrained(str(tmp_path), pretrained.config, pretrained.params,
                                   bos_token_id=pretrained.tokenizer.bos_id,
                                   pad_token_id=pretrained.tokenizer.pad_id,
                                   tokenizer_files=pretrained.tokenizer.files)
  assert {os.path.basename(path) for path in written} == {
      'config.json', 'model.safetensors', 'tokenizer.model'}
  token_ids = _token_ids(pretrained.config.vocab_size, seed=2)
  expected = hf_checkpoints.logits(reference, token_ids)
  reloaded = models.load_pretrained(str(tmp_path))
  assert reloaded.config == pretrained.config
  np.testing.assert_allclose(_chorus_logits(reloaded, token_ids), expected, atol=TOLERANCE)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(theirs) is type(reference)
  np.testing.assert_allclose(hf_checkpoints.logits(theirs, token_ids), expected, atol=TOLERANCE)


def test_sharded_checkpoint_loads_like_one_file(checkpoints, tmp_path):
  pretrained = models.load_pretrained(checkpoints['gemma2'][0])
  written = models.save_pretrained(str(tmp_path), pretrained.config, pretrained.params,
                                   bos_token_id=2, pad_token_id=0, max_shard_bytes=40_000)
  shards = [path for path in written if path.endswith('.safetensors')]
  assert len(shards) > 2 and os.path.exists(tmp_path / 'model.safetensors.index.json')
  params = models.pretrained.load_params(str(tmp_path), pretrained.config)
  del params['value_head'], pretrained.params['value_head']  # Fresh in each load.
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, pretrained.params)


@pytest.mark.parametrize('change, message', [
    (lambda tensors: tensors.pop('model.layers.1.mlp.up_proj.weight'),
     r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
    (lambda tensors: tensors.update({'model.layers.0.extra.weight': np.zeros(3, np.float32)}),
     r"unexpected tensors \['model.layers.0.extra.weight'\]"),
    (lambda tensors: tensors.update({'model.layers.2.self_attn.k_proj.weight': np.zeros(
        (16, 48), np.float32)}),
     r"tensor 'model.layers.2.self_attn.k_proj.weight' has shape \[16, 48\], config.json "
     r'implies \[32, 48\]'),
])
def test_a_tensor_missing_unexpected_or_misshaped_is_named(checkpoints, tmp_path, change,
                                                           message):
  directory = checkpoints['gemma2'][0]
  tensors = safetensors.numpy.load_file(os.path.join(directory, 'model.safetensors'))
  change(tensors)
  for name in ('config.json', 'tokenizer.model'):
    (tmp_path / name).write_bytes(open(os.path.join(directory, name), 'rb').read())
  safetensors.numpy.save_file(tensors, str(tmp_path / 'model.safetensors'))
  with pytest.raises(ValueError, match=message):
    models.load_pretrained(str(tmp_path))
