"""Agents are builders: a new one is a module of its own, and the launcher runs it unchanged.

This module defines a toy agent (a trivial rollout and loss) that the real launcher runs
end to end: its processes import this module as a plugin, which registers it.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from chorus import agents
from chorus import schema
from chorus.actors import rollouts
from chorus.datasets import read_trajectories
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.metrics import read_metrics
from chorus.tests import test_local_run


@dataclasses.dataclass(frozen=True)
class EchoConfig(agents.AgentConfig, tag='test_echo'):
  """REINFORCE on the task reward, with a per-episode field of its own.

  Attributes:
    reward_scale: multiplies the reward in the loss.
  """
  reward_scale: float = 1.0


class EchoRollout:
  """The policy's completions, each carrying the share of its prompt it is as long as."""

  def __init__(self, client, task, settings):
    self._policy = rollouts.PolicyRollout(client, task, settings)

  def __call__(self, prompts):
    return [dataclasses.replace(sample, extras={'length_ratio': len(sample.completion.tokens)
                                                / len(sample.prompt.text)})
            for sample in self._policy(prompts)]


@agents.register
class EchoBuilder(agents.AgentBuilder):
  config_class = EchoConfig
  progress_metrics = (('length_ratio', 'length ratio'),)

  def trajectory_extras(self):
    return (schema.Field('length_ratio', schema.SCALAR, 'float32',
                         'completion length over prompt text length'),)

  def make_rollout(self, client, task, actor_config):
    return EchoRollout(client, task, actor_config)

  def make_learner(self, context):
    scale = self.config.reward_scale

    def loss_fn(params, aux, batch):
      del aux
      logprobs = policy.evaluate_actions(context.model, params, batch).logprobs
      sequence_logprobs = jnp.sum(jnp.where(batch.completion_mask, logprobs, 0.0), axis=1)
      loss = -jnp.mean(scale * batch.reward * sequence_logprobs)
      return loss, {'loss': loss, 'length_ratio': batch.extras['length_ratio'].mean(),
                    **policy.batch_metrics(batch)}

    return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer)


def test_a_registered_agent_is_an_experiment_config_choice():
  assert 'test_echo' in agents.tags()
  builder = agents.make_builder(EchoConfig(reward_scale=2.0))
  assert [f.name for f in builder.schema().extras] == ['length_ratio']
  assert builder.data('').source == agents.DataSource.ACTORS
  with pytest.raises(ValueError, match='off-policy agent'):
    builder.data('/some/dataset')


@pytest.mark.slow
def test_the_launcher_runs_an_agent_defined_outside_the_package_code(tmp_path):
  run_dir = str(tmp_path / 'echo')
  result = subprocess.run(
      [sys.executable, '-m', 'chorus.launch.cli', 'run', '--run-dir', run_dir,
       '--plugin', __file__, '--set', 'agent=test_echo', '--set', 'agent.reward_scale=0.5',
       *test_local_run._SMALL_RUN],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(os.path.join(run_dir, 'summary.json')) as file:
    summary = json.load(file)
  assert summary['learner_steps'] == 12
  assert summary['config']['agent'] == {'tag': 'test_echo', 'reward_scale': 0.5}
  assert summary['config']['plugins'] == [__file__]
  # The agent's own field went through replay to its loss, and into every RLDS episode.
  learner = read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='learner')
  assert learner and all(r['length_ratio'] > 0 for r in learner)
  episodes = read_trajectories(os.path.join(run_dir, 'rlds'))
  assert episodes and all(
      np.isclose(e.extras['length_ratio'],
                 len(e.completion_tokens) / len(f'rev {e.prompt_id}>'), rtol=1e-6)
      for e in episodes)
