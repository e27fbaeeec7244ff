"""NaN guards: a non-finite loss, gradient or reward skips the update; a learner that only
skips stops with DivergenceError."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chorus import core
from chorus import models
from chorus.actors import demonstrations
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.learners import learner as learner_lib
from chorus.learners import loop
from chorus.metrics import MetricsWriter

B = 4


def _batch(rewards) -> core.TrajectoryBatch:
  size = len(rewards)
  zeros = np.zeros((size, 1), np.int32)
  return core.TrajectoryBatch(zeros, zeros.astype(bool), zeros, zeros.astype(bool),
                              zeros.astype(np.float32), np.asarray(rewards, np.float32),
                              np.zeros(size, bool), np.zeros(size, np.int64))


def _linear_loss(params, aux, batch):
  del aux
  loss = params * jnp.sum(batch.reward)
  return loss, {'loss': loss}


def _all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(tree))


def test_a_non_finite_reward_skips_the_update_and_leaves_the_state_alone():
  learner = learner_lib.Learner(_linear_loss, params=jnp.float32(0.0),
                                optimizer=optax.adam(0.1))
  learner.update(_batch(np.ones(B)))
  state = jax.device_get(learner.state)
  metrics = learner.update(_batch([1.0, np.nan, 1.0, 1.0]))
  assert metrics['skipped_update'] == 1.0
  assert learner.step == 1  # The skipped update is no learner step (no version).
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(learner.state), state)
  assert learner.update(_batch(np.ones(B)))['skipped_update'] == 0.0
  assert learner.step == 2


def test_a_non_finite_gradient_skips_the_update():
  def loss_fn(params, aux, batch):
    del aux, batch
    return jnp.sqrt(params), {}  # Gradient inf at 0, though the loss is finite.

  learner = learner_lib.Learner(loss_fn, params=jnp.float32(0.0), optimizer=optax.sgd(1.0))
  assert learner.update(_batch(np.ones(B)))['skipped_update'] == 1.0
  assert float(learner.params) == 0.0


class _Recorder:

  def __init__(self):
    self.published, self.checkpointed = [], []

  def publish(self, models, version):
    del models
    self.published.append(version)

  def checkpoint(self, step, state):
    del state
    self.checkpointed.append(step)


def test_the_loop_counts_skips_and_neither_publishes_nor_checkpoints_them(tmp_path):
  learner = learner_lib.Learner(_linear_loss, params=jnp.float32(0.0),
                                optimizer=optax.sgd(0.1))
  rewards = iter([np.ones(B), [np.nan] * B, np.ones(B), [np.inf] * B, np.ones(B)])
  recorder = _Recorder()
  config = loop.LearnerConfig(batch_size=B, max_steps=3, log_every=1, checkpoint_every=1)
  step = loop.run_learner(learner, (_batch(r) for r in rewards), config,
                          publish=recorder.publish, checkpoint=recorder.checkpoint,
                          metrics=MetricsWriter(str(tmp_path / 'metrics.jsonl'), 'learner'))
  assert step == 3
  assert recorder.published == recorder.checkpointed == [1, 2, 3]
  lines = (tmp_path / 'metrics.jsonl').read_text()
  assert lines.count('"learner_skip"') == 2
  assert '"skipped_updates": 2.0' in lines


def test_consecutive_skips_stop_the_learner_with_a_clear_error(tmp_path):
  learner = learner_lib.Learner(_linear_loss, params=jnp.float32(0.0),
                                optimizer=optax.sgd(0.1))
  recorder = _Recorder()
  config = loop.LearnerConfig(batch_size=B, max_steps=100, max_consecutive_skips=3)
  batches = (_batch([np.nan] * B) for _ in range(10))
  with pytest.raises(loop.DivergenceError, match='skipped 3 updates in a row'):
    loop.run_learner(learner, batches, config, publish=recorder.publish,
                     checkpoint=recorder.checkpoint,
                     metrics=MetricsWriter(str(tmp_path / 'metrics.jsonl'), 'learner'))
  assert not recorder.published and not recorder.checkpointed


def test_a_real_learner_fed_nan_rewards_keeps_finite_parameters():
  config = experiment.ExperimentConfig()
  config = dataclasses.replace(config, learner=dataclasses.replace(config.learner,
                                                                   batch_size=B))
  params = models.init_params(config.model.decoder_config(), jax.random.PRNGKey(0))
  learner = nodes.make_learner(config, params)
  batches = demonstrations.demonstration_batches(config.make_task(), 0, B, config.sequence)
  good = next(batches)
  poisoned = good._replace(reward=np.where(np.arange(B) == 1, np.nan, good.reward))
  assert learner.update(poisoned)['skipped_update'] == 1.0
  assert learner.step == 0
  assert _all_finite(learner.params)
  metrics = learner.update(next(batches))
  assert metrics['skipped_update'] == 0.0 and learner.step == 1
  assert _all_finite(learner.params)


def test_an_actor_drops_episodes_with_non_finite_rewards_or_logprobs_before_replay_and_rlds():
  from chorus.actors import actor as actor_lib  # pylint: disable=g-import-not-at-top
  from chorus.actors import rollouts  # pylint: disable=g-import-not-at-top
  from chorus.inference_server.client import Completion  # pylint: disable=g-import-not-at-top

  task = experiment.ExperimentConfig().make_task()
  tokens = np.array([3, 4], np.int32)

  def rollout(prompts):
    good = np.zeros(2, np.float32)
    settings = [({'exact': 1.0}, good), ({'exact': float('nan')}, good),
                ({'exact': 1.0, 'format': float('inf')}, good),
                ({'exact': 0.0}, np.array([0.0, np.nan], np.float32))]
    return [rollouts.Sample(prompt, Completion(tokens, logprobs, True), 0, components)
            for prompt, (components, logprobs) in zip(prompts, settings)]

  replayed, logged = [], []
  one_actor = actor_lib.Actor(
      0, actor_lib.ActorConfig(prompts_per_request=4), task, rollout=rollout,
      write_replay=lambda trajectories, should_stop: replayed.extend(trajectories),
      log_episode=logged.append, metrics=None, seed=0)
  one_actor.run_once()
  assert len(replayed) == len(logged) == 1
  assert replayed[0].reward == 1.0
  assert one_actor.skipped_episodes == 3


def test_a_run_that_never_updated_or_ended_with_a_nan_reward_is_not_a_success():
  from chorus.launch import run  # pylint: disable=g-import-not-at-top
  good = dict(learner_steps=10, initial_eval_reward=0.1, final_eval_reward=0.5)
  assert not run.summary_problems(good)
  assert 'never updated' in run.summary_problems(dict(good, learner_steps=0))[0]
  assert 'final_eval_reward' in run.summary_problems(dict(good, final_eval_reward=float('nan')))[0]
