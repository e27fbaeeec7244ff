"""`chorus run --resume`: a run continues from its newest checkpoint, with real processes."""
import json
import os
import subprocess
import sys

import pytest

from chorus.datasets import read_trajectories
from chorus.metrics import read_metrics

pytestmark = pytest.mark.slow

_SHORT = [
    '--num-actors', '2', '--seed', '1', '--set', 'warm_start.steps=30',
    '--set', 'learner.batch_size=8', '--set', 'learner.log_every=2',
    '--set', 'learner.checkpoint_every=2', '--set', 'inference.max_batch_size=8',
    '--set', 'task.num_eval_prompts=16', '--set', 'evaluation.every_s=0',
    '--set', 'replay.min_size_to_sample=8',
]


def _chorus(*args: str) -> dict:
  result = subprocess.run([sys.executable, '-m', 'chorus.launch.cli', 'run', *args],
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _summary(run_dir: str) -> dict:
  with open(os.path.join(run_dir, 'summary.json')) as file:
    return json.load(file)


def test_a_finished_run_resumes_from_its_checkpoint_to_a_larger_budget(tmp_path):
  run_dir = str(tmp_path / 'run')
  _chorus('--run-dir', run_dir, '--max-learner-steps', '4', *_SHORT)
  first = _summary(run_dir)
  episodes_before = len(read_trajectories(os.path.join(run_dir, 'rlds')))
  assert first['learner_steps'] == 4

  result = _chorus('--resume', run_dir, '--max-learner-steps', '8')
  assert 'warm_start: done before' in result.stdout
  second = _summary(run_dir)
  assert sorted(second) == sorted(first)
  assert second['learner_steps'] == 8
  assert second['final_eval']['param_versions'] == [8]
  with open(os.path.join(run_dir, 'config.json')) as file:
    assert json.load(file)['learner']['max_steps'] == 8
  # The learner went on from step 4: one line per 2 steps, none of steps 1-4 twice.
  learner = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='learner')
  assert [r['step'] for r in learner] == [2, 4, 6, 8]
  with open(os.path.join(run_dir, 'logs', 'learner.log')) as file:
    assert 'Learner resumed at step 4' in file.read()
  # The warm start ran once; the actors appended to the run's RLDS record.
  with open(os.path.join(run_dir, 'logs', 'warm_start.log')) as file:
    assert file.read().count('starting role warm_start') == 1
  episodes = read_trajectories(os.path.join(run_dir, 'rlds'))
  assert len(episodes) > episodes_before
  assert max(e.param_version for e in episodes) > 4  # Sampled by the resumed policy.
