"""An unrecoverable divergence stops a real run with a clear error and a non-zero exit.

This module is also the plugin the run imports: it registers an agent whose loss is NaN.
"""
import dataclasses
import glob
import os
import subprocess
import sys

import jax.numpy as jnp

from chorus import agents
from chorus.actors import rollouts
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.metrics import read_metrics
from chorus.tests import test_local_run


@dataclasses.dataclass(frozen=True)
class DivergentConfig(agents.AgentConfig, tag='test_divergent'):
  """REINFORCE whose loss is always NaN: every update must be skipped."""


@agents.register
class DivergentBuilder(agents.AgentBuilder):
  config_class = DivergentConfig

  def make_rollout(self, client, task, actor_config):
    return rollouts.PolicyRollout(client, task, actor_config)

  def make_learner(self, context):
    def loss_fn(params, aux, batch):
      del aux
      logprobs = policy.evaluate_actions(context.model, params, batch).logprobs
      loss = -jnp.mean(batch.reward * logprobs.sum(axis=1)) * jnp.nan
      return loss, {'loss': loss}

    return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer)


def test_a_learner_that_only_skips_stops_the_run_with_a_clear_error(tmp_path):
  run_dir = str(tmp_path / 'divergent')
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', run_dir,
       '--plugin', __file__, '--set', 'agent=test_divergent',
       '--set', 'learner.max_consecutive_skips=3', '--set', 'launcher.max_restarts=0',
       *test_local_run._SMALL_RUN],  # pylint: disable=protected-access
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'skipped 3 updates in a row' in result.stderr, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr.splitlines()[0]
  assert not os.path.exists(os.path.join(run_dir, 'summary.json'))
  skips = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='learner')
  assert [record['consecutive_skips'] for record in skips
          if record.get('kind') == 'learner_skip'] == [1, 2, 3]
  # Nothing NaN was checkpointed: the only checkpoints are none at all.
  assert not glob.glob(os.path.join(run_dir, 'checkpoints', 'learner', '[1-9]*'))
