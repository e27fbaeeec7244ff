"""Node entry points and offline tools on recorded data, in-process: warm start from a
dataset, and the weight interpolation of two runs' checkpoints."""
import dataclasses
import json
import os

import jax
import pytest

from chorus import configs
from chorus import models
from chorus.actors import demonstrations
from chorus.datasets import EpisodeLogger
from chorus.launch import evaluate
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.launch import run_dir as layout
from chorus.metrics import read_metrics
from chorus.models.checkpoints import Checkpointer


def _small_config(**changes) -> experiment.ExperimentConfig:
  config = experiment.apply_overrides(configs.get_config('text_vtrace'), [
      'task.num_eval_prompts=16', 'inference.max_batch_size=8'])
  return dataclasses.replace(config, **changes)


def test_warm_start_learns_the_episodes_of_a_dataset_instead_of_the_tasks(tmp_path):
  # A dataset that answers every prompt with "7": the task's own demonstrations never do.
  config = _small_config()
  task = config.make_task()
  source = demonstrations.demonstrations(task, config.seed)
  with EpisodeLogger(tmp_path / 'sevens' / 'writer_000') as logger:
    for _ in range(64):
      demonstration = next(source)
      logger.write(dataclasses.replace(demonstration,
                                       completion_tokens=task.encode_completion('7'),
                                       behaviour_logprobs=[0.0, 0.0]))
  config = experiment.apply_overrides(config, [
      f'warm_start.dataset={tmp_path / "sevens"}', 'warm_start.steps=60',
      'warm_start.batch_size=16'])
  run_dir = str(tmp_path / 'run')
  os.makedirs(run_dir)
  nodes.warm_start(config, run_dir, should_stop=lambda: False)
  history = read_metrics(layout.metrics_path(run_dir), node='warm_start')
  assert history[-1]['nll'] < 0.2 < history[0]['nll']
  params = Checkpointer(layout.warm_start_dir(run_dir)).restore(
      models.init_params(config.model.decoder, jax.random.PRNGKey(0)))
  prompt = task.eval_prompts()[0]
  logits, _ = models.forward_completions(
      config.model.decoder, params, *models.left_pad_prompts([task.encode_prompt(prompt)], 16),
      jax.numpy.asarray([task.encode_completion('7')]), jax.numpy.ones((1, 2), bool))
  assert int(logits[0, 0].argmax()) == task.encode_completion('7')[0]


def _fake_run(run_dir: str, config: experiment.ExperimentConfig, seed: int, step: int = 5):
  """A run directory with config.json and one learner checkpoint of random weights."""
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w') as file:
    json.dump(experiment.to_dict(config), file)
  learner = nodes.make_learner(config, models.init_params(config.model.decoder,
                                                        jax.random.PRNGKey(seed)), run_dir)
  checkpointer = Checkpointer(layout.learner_checkpoint_dir(run_dir))
  checkpointer.save(step, learner.state)
  checkpointer.close()


def test_interpolation_endpoints_are_the_two_runs_and_models_must_match(tmp_path):
  # Random policies score near 0: 64 prompts make two of them score apart.
  config = _small_config(task=dataclasses.replace(_small_config().task, num_eval_prompts=64))
  run_a, run_b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _fake_run(run_a, config, seed=1)
  _fake_run(run_b, config, seed=2)
  both = evaluate.interpolate_runs(run_a, run_b, [0.0, 1.0])
  assert [r['weight'] for r in both] == [0.0, 1.0]
  # Same weights, same server seed: identical samples, so identical rewards.
  assert both[0]['reward'] == evaluate.interpolate_runs(run_a, run_a, [0.0])[0]['reward']
  assert both[1]['reward'] == evaluate.interpolate_runs(run_b, run_b, [0.0])[0]['reward']
  assert both[0]['reward'] != both[1]['reward']
  other = str(tmp_path / 'other')
  _fake_run(other, dataclasses.replace(config, model=models.ModelConfig(
      decoder=models.DecoderConfig.small(config.model.decoder.vocab_size))), seed=3)
  with pytest.raises(ValueError, match='different models'):
    evaluate.interpolate_runs(run_a, other, [0.5])
