"""`model.pretrained` through the experiment config, the warm start node, export and sample."""
import contextlib
import dataclasses
import io
import json
import os

import jax
import numpy as np
import pytest

import hf_checkpoints
from chorus import configs
from chorus import models
from chorus.launch import cli
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.launch import policy_io


@pytest.fixture(scope='module', name='checkpoint')
def fixture_checkpoint(tmp_path_factory):
  """A tiny Gemma 2 checkpoint written by Chorus, with a SentencePiece tokenizer."""
  root = tmp_path_factory.mktemp('pretrained')
  tokenizer = hf_checkpoints.train_sentencepiece(str(root / 'tokenizer.model'))
  vocab_size = models.SentencePieceTokenizer(tokenizer).vocab_size
  config = models.DecoderConfig(
      vocab_size=vocab_size, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
      head_dim=8, mlp_dim=64, max_seq_len=64, eos_token_id=1, sliding_window=8,
      layer_types=('sliding_attention', 'full_attention'), use_post_attn_norm=True,
      use_post_ffw_norm=True, logit_softcap=30.0, attn_logit_softcap=50.0)
  models.save_pretrained(str(root / 'model'), config,
                         models.init_params(config, jax.random.PRNGKey(0)), bos_token_id=2,
                         pad_token_id=0, tokenizer_files=(tokenizer,))
  return str(root / 'model')


def _pretrained_config(name: str, checkpoint: str, *overrides: str):
  return experiment.apply_overrides(configs.get_config(name),
                                    [f'model.pretrained={checkpoint}', *overrides])


@pytest.mark.parametrize('name', [name for name in configs.CONFIG_NAMES
                                  if name.startswith('text_')])
def test_every_text_config_trains_a_pretrained_model_with_its_tokenizer(name, checkpoint):
  config = _pretrained_config(name, checkpoint)
  config.check()
  task = config.make_task()
  assert isinstance(task.tokenizer, models.SentencePieceTokenizer)
  assert task.encode_prompt(task.eval_prompts()[0])[0] == 2  # The checkpoint's BOS.
  assert config.model.decoder_config() == models.pretrained.read_config(checkpoint)
  assert experiment.from_dict(experiment.ExperimentConfig, experiment.to_dict(config)) == config


@pytest.mark.parametrize('name', ['music_vtrace', 'music_cfg_distill'])
def test_music_configs_refuse_a_text_checkpoint(name, checkpoint):
  with pytest.raises(ValueError, match=r"Task 'music_captions'.*model.pretrained"):
    _pretrained_config(name, checkpoint).check()


def test_a_run_config_written_before_model_config_still_loads():
  config = configs.get_config('text_vtrace')
  data = experiment.to_dict(config)
  data['model'] = data['model']['decoder']
  assert experiment.load_experiment(data) == config


def test_warm_start_starts_from_the_checkpoint_and_export_writes_what_it_trained(
    checkpoint, tmp_path):
  config = _pretrained_config('text_vtrace', checkpoint, 'warm_start.steps=3',
                              'warm_start.batch_size=4')
  loaded = config.model.initial_params(jax.random.PRNGKey(0))
  expected = models.pretrained.load_params(checkpoint, config.model.decoder_config())
  for part in ('embedder', 'layer_1', 'final_norm'):  # Everything but the fresh value head.
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[part], expected[part])
  run_dir = str(tmp_path / 'run')
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w') as file:
    json.dump(experiment.to_dict(config), file)
  nodes.warm_start(config, run_dir, should_stop=lambda: False)
  trained = nodes.warm_start_params(config, run_dir)
  assert not np.array_equal(trained['embedder']['embedding'], loaded['embedder']['embedding'])

  output = str(tmp_path / 'exported')
  with contextlib.redirect_stdout(io.StringIO()) as stdout:
    assert cli.main(['export', '--run-dir', run_dir, '--output', output]) == 0
  assert 'Exported step 0' in stdout.getvalue()
  assert sorted(os.listdir(output)) == ['config.json', 'model.safetensors', 'tokenizer.model']
  exported = models.load_pretrained(output)
  del exported.params['value_head'], trained['value_head']
  jax.tree_util.tree_map(np.testing.assert_array_equal, exported.params, trained)

  with contextlib.redirect_stdout(io.StringIO()) as stdout:
    assert cli.main(['sample', '--run-dir', run_dir, '--prompt', 'rev 123>',
                     '--temperature', '0', '--max-new-tokens', '6']) == 0
  policy, _ = policy_io.from_run(run_dir)
  _, text = policy_io.complete_text(policy, 'rev 123>', max_new_tokens=6, temperature=0.0,
                                    seed=5)
  assert stdout.getvalue() == text + '\n'  # Greedy: the seed does not matter.


def test_a_run_from_scratch_exports_with_its_character_tokenizer_as_tokenizer_json(tmp_path):
  config = experiment.apply_overrides(configs.get_config('text_vtrace'),
                                      ['warm_start.steps=2', 'warm_start.batch_size=4'])
  run_dir = str(tmp_path / 'run')
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w') as file:
    json.dump(experiment.to_dict(config), file)
  nodes.warm_start(config, run_dir, should_stop=lambda: False)
  output = str(tmp_path / 'exported')
  _, written = policy_io.export_run(run_dir, output)
  assert sorted(os.path.basename(path) for path in written) == [
      'config.json', 'model.safetensors', 'tokenizer.json']
  exported = models.load_pretrained(output)
  task = config.make_task()
  text = task.prompt_from_id('90210').text
  assert isinstance(exported.tokenizer, models.HuggingFaceTokenizer)
  assert exported.tokenizer.encode(text) == task.tokenizer.encode(text)
  assert (exported.tokenizer.bos_id, exported.tokenizer.eos_id) == (models.BOS_ID, models.EOS_ID)
  assert exported.tokenizer.decode(task.encode_completion('01209') + [5]) == '01209'
  assert exported.config == config.model.decoder


def test_sample_names_what_is_wrong_with_a_directory(tmp_path):
  with contextlib.redirect_stderr(io.StringIO()) as stderr:
    assert cli.main(['sample', '--model', str(tmp_path), '--prompt', 'x']) == 2
  assert 'config.json does not exist' in stderr.getvalue()


def test_model_dtypes_are_checked():
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    dataclasses.replace(models.ModelConfig(), dtype='float16')
