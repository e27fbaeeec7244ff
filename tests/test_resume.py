"""`chorus run --resume`: a run continues from its newest checkpoint, with real processes
(and over TLS)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from chorus.datasets import read_trajectories
from chorus.metrics import read_metrics
from tls_files import write_tls_dir

pytestmark = pytest.mark.slow

_SHORT = [
    '--num-actors', '2', '--seed', '1', '--set', 'warm_start.steps=30',
    '--set', 'learner.batch_size=8', '--set', 'learner.log_every=2',
    '--set', 'learner.checkpoint_every=2', '--set', 'inference.max_batch_size=8',
    '--set', 'task.num_eval_prompts=16', '--set', 'evaluation.every_s=0',
    '--set', 'replay.min_size_to_sample=8',
]


def _chorus(*args: str) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, '-m', 'chorus.launch.cli', 'run', *args],
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _summary(run_dir: str) -> dict:
  with open(os.path.join(run_dir, 'summary.json')) as file:
    return json.load(file)


def _stop_after_checkpoint(run_dir: str, *args: str, after_step: int) -> int:
  """Runs `chorus run ARGS`, Ctrl-C once the learner has a checkpoint past `after_step`;
  returns the newest checkpoint's step at that moment."""
  run = subprocess.Popen([sys.executable, '-m', 'chorus.launch.cli', 'run', *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  checkpoints = os.path.join(run_dir, 'checkpoints', 'learner')
  deadline = time.monotonic() + 600
  steps = []
  while time.monotonic() < deadline and run.poll() is None:
    if os.path.isdir(checkpoints):
      steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
      if steps and max(steps) > after_step:
        break
    time.sleep(0.1)
  run.send_signal(signal.SIGINT)
  output, _ = run.communicate(timeout=300)
  assert run.returncode == 130, output[-3000:]
  return max(steps)


def test_a_run_resumes_from_its_checkpoint_after_a_stop_and_to_a_larger_budget(tmp_path):
  run_dir = str(tmp_path / 'run')
  # Over TLS (certificates written here), which a resume keeps from config.json: every
  # node's inference traffic and the launcher's own evaluation go through it. One run
  # tests both, as a separate TLS run would add a minute to the suite.
  tls_dir = write_tls_dir(tmp_path / 'tls')
  _chorus('--run-dir', run_dir, '--max-learner-steps', '4', *_SHORT,
          '--set', f'inference.tls_dir={tls_dir}')
  finished = _summary(run_dir)
  episodes_before = len(read_trajectories(os.path.join(run_dir, 'rlds')))
  assert finished['learner_steps'] == 4

  # A larger budget, stopped by Ctrl-C part-way: no summary is written then.
  os.remove(os.path.join(run_dir, 'summary.json'))
  stopped_at = _stop_after_checkpoint(run_dir, '--resume', run_dir, '--max-learner-steps', '60',
                                      after_step=6)
  assert 6 < stopped_at < 60
  assert not os.path.exists(os.path.join(run_dir, 'summary.json'))

  result = _chorus('--resume', run_dir)  # To the budget it was stopped short of.
  assert result.stdout.count('warm_start: done before') == 1
  summary = _summary(run_dir)
  assert sorted(summary) == sorted(finished)
  assert summary['learner_steps'] == 60
  assert summary['final_eval']['param_versions'] == [60]
  with open(os.path.join(run_dir, 'config.json')) as file:
    assert json.load(file)['learner']['max_steps'] == 60
  with open(os.path.join(run_dir, 'logs', 'learner.log')) as file:
    resumed_at = [int(step) for step in re.findall(r'Learner resumed at step (\d+)', file.read())]
  assert resumed_at[0] == 4 and resumed_at[-1] >= stopped_at
  learner = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='learner')
  assert {r['step'] for r in learner} == set(range(2, 61, 2))
  # The warm start ran once; the actors appended to the run's RLDS record.
  with open(os.path.join(run_dir, 'logs', 'warm_start.log')) as file:
    assert file.read().count('starting role warm_start') == 1
  episodes = read_trajectories(os.path.join(run_dir, 'rlds'))
  assert len(episodes) > episodes_before
  assert max(e.param_version for e in episodes) > stopped_at  # Sampled after the resume.
  with open(os.path.join(run_dir, 'logs', 'inference_server_0.log')) as file:
    started = re.findall(r'Inference server on 127\.0\.0\.1:\d+ \((\w+)\)', file.read())
  assert started == ['TLS'] * 3  # The run and its two resumes.
