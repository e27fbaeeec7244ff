"""Replaying a recorded RLDS dataset into training: offline soft-Q, then `chorus evaluate`.

Real processes: a run records episodes of a fixed behaviour policy (the warm start, kept
fixed by a learning rate of 0), then a second run trains soft-Q on that dataset through a
Reverb table with no actors, and the trained checkpoint is evaluated on the dataset's
prompts.
"""
import json
import os
import subprocess
import sys

import pytest

from chorus.datasets import read_trajectories
from chorus.metrics import read_metrics

pytestmark = pytest.mark.slow

_COMMON = [
    '--seed', '2', '--set', 'warm_start.steps=150', '--set', 'task.num_eval_prompts=1024',
    '--set', 'evaluation.every_s=0', '--set', 'inference.max_batch_size=32',
    '--set', 'learner.log_every=10', '--set', 'replay.min_size_to_sample=128',
]


def _chorus(*args: str) -> str:
  result = subprocess.run([sys.executable, '-m', 'chorus.launch.cli', *args], capture_output=True,
                          text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _summary(run_dir: str) -> dict:
  with open(os.path.join(run_dir, 'summary.json')) as file:
    return json.load(file)


def test_offline_soft_q_beats_the_behaviour_policy_that_recorded_the_dataset(tmp_path):
  recorded = str(tmp_path / 'recorded')
  _chorus('run', '--config', 'text_soft_q', '--run-dir', recorded, '--num-actors', '2',
          '--max-learner-steps', '40', '--set', 'learner.learning_rate=0', *_COMMON)
  dataset = os.path.join(recorded, 'rlds')
  episodes = read_trajectories(dataset)
  assert len(episodes) >= 256
  assert {e.param_version for e in episodes} <= set(range(41))
  # With learning_rate 0 the run evaluated the behaviour policy twice: at its start and end.
  # Their mean halves the sampling noise. Two evaluations of that one policy differed by
  # 0.035 on 128 prompts and by 0.017 on the 1024 used here.
  recorded_summary = _summary(recorded)
  behaviour_reward = (recorded_summary['initial_eval_reward'] +
                      recorded_summary['final_eval_reward']) / 2

  offline = str(tmp_path / 'offline')
  _chorus('run', '--config', 'text_soft_q', '--run-dir', offline, '--replay-dataset', dataset,
          '--max-learner-steps', '600', *_COMMON)
  summary = _summary(offline)
  assert summary['episodes'] == 0  # No actors: every trajectory came from the dataset.
  replayed = read_metrics(os.path.join(offline, 'metrics.jsonl'), node='dataset_replayer')
  assert replayed[-1]['episodes'] == len(episodes)
  # Same seed, same warm start: the offline run starts from the behaviour policy.
  assert summary['initial_eval_reward'] == pytest.approx(
      recorded_summary['initial_eval_reward'], abs=0.03)
  # Measured gains: +0.033 (128 eval prompts), +0.061 (256), +0.067 (1024). On 1024 prompts
  # the difference's sampling noise is about 0.011, so +0.02 is two of it above no gain,
  # and well below the gain. The old +0.05 on 128 prompts failed a fresh run.
  assert summary['final_eval_reward'] > behaviour_reward + 0.02

  result = json.loads(_chorus('evaluate', '--run-dir', offline, '--dataset', dataset))
  assert result['step'] == 600
  assert result['dataset_episodes'] == len(episodes)
  assert result['checkpoint_reward'] > result['dataset_reward'] + 0.05
