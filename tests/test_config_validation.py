"""Config and input errors: one line on stderr and exit status 2, before any process starts."""
import os
import subprocess
import sys
import time

import pytest

from chorus import core
from chorus.actors.actor import ActorConfig
from chorus.inference_server.config import InferenceServerConfig
from chorus.launch import experiment
from chorus.learners.loop import LearnerConfig

_BAD_RUNS = {
    'negative_batch_size': ['--set', 'learner.batch_size=-1'],
    'negative_max_steps': ['--max-learner-steps', '-5'],
    'unknown_task': ['--set', 'task=no_such_task'],
    'unknown_config': ['--config', 'no_such_config'],
    'no_actors': ['--set', 'num_actors=0'],
    'no_batch_slots': ['--set', 'inference.max_batch_size=0'],
    'negative_server_cores': ['--set', 'inference.cpu_cores=-1'],
    'nan_learning_rate': ['--set', 'learner.learning_rate=nan'],
    'warmup_past_the_decay': ['--set', 'learner.learning_rate_warmup=600'],
    'near_zero_temperature': ['--set', 'actor.temperature=1e-40'],
    'infinite_agent_coefficient': ['--set', 'agent.kl_coef=inf'],
}


@pytest.mark.parametrize('flags', list(_BAD_RUNS.values()), ids=list(_BAD_RUNS))
def test_bad_config_exits_2_with_one_line_before_any_node_starts(flags, tmp_path):
  run_dir = tmp_path / 'run'
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', str(run_dir), *flags],
      capture_output=True, text=True, timeout=60, check=False, env=dict(os.environ))
  elapsed = time.monotonic() - start
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('chorus run: '), lines
  assert 'Traceback' not in result.stderr
  assert not run_dir.exists()  # Nothing was launched, not even the run directory.
  assert elapsed < 30, elapsed


@pytest.mark.parametrize('field, value', [
    ('batch_size', 0), ('learning_rate', float('nan')), ('learning_rate', -1e-3),
    ('max_steps', -5), ('max_grad_norm', float('inf')), ('max_consecutive_skips', 0),
    ('learning_rate_warmup', -1)])
def test_learner_config_rejects_out_of_range_fields(field, value):
  with pytest.raises(ValueError, match=f'learner.{field}'):
    LearnerConfig(**{field: value})


@pytest.mark.parametrize('temperature', [0.0, 1e-40, 1e-3, 1e3, float('nan'), float('inf')])
def test_actor_config_rejects_temperatures_outside_the_servers_range(temperature):
  with pytest.raises(ValueError, match='actor.temperature'):
    ActorConfig(temperature=temperature)


def test_boundary_values_are_accepted():
  ActorConfig(temperature=core.MIN_TEMPERATURE)
  ActorConfig(temperature=core.MAX_TEMPERATURE)
  LearnerConfig(learning_rate=0.0, max_steps=1)  # A frozen learner records the reference.
  InferenceServerConfig(max_batch_size=1, max_wait_ms=0.0)


def test_overrides_are_validated_like_constructed_configs():
  config = experiment.ExperimentConfig()
  with pytest.raises(ValueError, match='evaluation.greedy_temperature'):
    experiment.apply_overrides(config, ['evaluation.greedy_temperature=1e-30'])
  with pytest.raises(ValueError, match='inference.request_timeout_s'):
    experiment.apply_overrides(config, ['inference.request_timeout_s=-1'])
  with pytest.raises(ValueError, match='replay.max_size'):
    experiment.apply_overrides(config, ['replay.max_size=0'])
