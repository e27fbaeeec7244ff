"""text_vtrace from a pretrained checkpoint, end to end through the real launcher.

The checkpoint is a tiny Gemma 2 (a sliding window shorter than prompt + completion)
written by transformers, with a SentencePiece tokenizer trained on digit-reversal text.
The run warm-starts from its weights (value head fresh), runs V-trace RL with actors,
and is then exported, read back by transformers, and sampled.
"""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

import hf_checkpoints
from chorus import models
from chorus.launch import cli
from chorus.launch import policy_io

pytestmark = pytest.mark.slow

_RUN = ['--num-actors', '2', '--max-learner-steps', '240', '--seed', '0',
        '--set', 'task.num_eval_prompts=64', '--set', 'evaluation.every_s=0']


@pytest.fixture(scope='module', name='run_dir')
def fixture_run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('pretrained_run')
  tokenizer = hf_checkpoints.train_sentencepiece(str(root / 'tokenizer.model'))
  hf_checkpoints.write_gemma(
      str(root / 'gemma2'), 'gemma2',
      vocab_size=models.SentencePieceTokenizer(tokenizer).vocab_size,
      tokenizer_model=tokenizer, scramble=False, hidden_size=64, intermediate_size=256,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
      query_pre_attn_scalar=16, sliding_window=8)
  run_dir = str(root / 'run')
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--config', 'text_vtrace',
       '--run-dir', run_dir, '--set', f'model.pretrained={root / "gemma2"}'] + _RUN,
      capture_output=True, text=True, timeout=1500, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return run_dir


def test_held_out_reward_rises_from_the_warm_started_checkpoint(run_dir):
  with open(os.path.join(run_dir, 'summary.json')) as file:
    summary = json.load(file)
  print(f'initial_eval_reward {summary["initial_eval_reward"]:.3f} -> final_eval_reward '
        f'{summary["final_eval_reward"]:.3f}')
  assert summary['learner_steps'] == 240
  assert summary['final_eval_reward'] > summary['initial_eval_reward'] + 0.03


def test_the_tuned_policy_exports_to_transformers_and_samples(run_dir, tmp_path):
  output = str(tmp_path / 'exported')
  with contextlib.redirect_stdout(io.StringIO()):
    assert cli.main(['export', '--run-dir', run_dir, '--output', output]) == 0
  policy, step = policy_io.from_run(run_dir)
  assert step == 240
  theirs = transformers.AutoModelForCausalLM.from_pretrained(output).eval()
  prompt_ids = [policy.tokenizer.bos_id] + policy.tokenizer.encode('rev 3141>')
  mask = np.ones((1, len(prompt_ids)), bool)
  ours = models.Decoder(policy.config).apply(
      {'params': policy.params}, np.asarray([prompt_ids], np.int32),
      models.positions_from_mask(mask), mask).logits
  np.testing.assert_allclose(hf_checkpoints.logits(theirs, [prompt_ids]), ours, atol=1e-4)
  with contextlib.redirect_stdout(io.StringIO()) as stdout:
    assert cli.main(['sample', '--model', output, '--prompt', 'rev 3141>',
                     '--temperature', '0', '--max-new-tokens', '8']) == 0
  assert stdout.getvalue().strip().isdigit()  # The tuned policy answers in digits.
