"""WARM: the reward-model setup step averages M models' weights, and the servers serve it."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from chorus import agents
from chorus import configs
from chorus import models
from chorus.agents import learned_rewards
from chorus.inference_server.client import InferenceClient
from chorus.inference_server.service import start_server
from chorus.launch import experiment
from chorus.launch import nodes
from chorus.learners import preference
from chorus.metrics import read_metrics
from chorus.models import reward_models
from chorus.models.checkpoints import Checkpointer

_TINY = models.DecoderConfig.tiny(models.CharTokenizer().vocab_size)


def _config(num_models: int):
  config = experiment.apply_overrides(configs.get_config('text_bond'), [
      'warm_start.steps=1', 'inference.max_batch_size=8', 'task.num_eval_prompts=16'])
  reward_model = dataclasses.replace(config.agent.reward_model, model=_TINY,
                                     warm_start_steps=3, steps=6, batch_size=8,
                                     num_models=num_models)
  return dataclasses.replace(config, agent=dataclasses.replace(config.agent,
                                                               reward_model=reward_model))


def test_setup_step_serves_the_weight_average_of_its_members(tmp_path):
  config, run_dir = _config(num_models=3), str(tmp_path)
  nodes.warm_start(config, run_dir, lambda: False)
  nodes.setup(config, run_dir, lambda: False, step='reward_model')

  shapes = jax.eval_shape(lambda: models.init_params(_TINY, jax.random.PRNGKey(0)))
  members = [Checkpointer(os.path.join(run_dir, learned_rewards.MEMBERS_DIR, str(m))).restore(
      shapes) for m in range(3)]
  # Fine-tuned from one init on different pairs: the members differ.
  assert not np.allclose(*[jax.tree_util.tree_leaves(m)[0] for m in members[:2]])
  numpy_mean = jax.tree_util.tree_map(lambda *leaves: np.mean(np.stack(leaves), axis=0),
                                      *members)

  served = nodes._served_models(config, run_dir)  # pylint: disable=protected-access
  assert served['reward'].kind == 'reward' and served['reward'].decoder_config == _TINY
  pooling = config.agent.reward_model.pooling
  assert served['reward'].pooling == pooling == 'mean'
  jax.tree_util.tree_map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6,
                                                                      atol=1e-7),
                         served['reward'].params_and_version()[0], numpy_mean)
  server, port = start_server(served, '127.0.0.1:0')
  try:
    prompts = [[models.BOS_ID, 5, 6, 7], [models.BOS_ID, 8]]
    completions = [[9, 10, models.EOS_ID], [11, models.EOS_ID]]
    with InferenceClient(f'127.0.0.1:{port}') as client:
      rewards = client.score_rewards(prompts, completions, model='reward').rewards
  finally:
    server.stop(grace=None)
    for model in served.values():
      model.close()
  expected = reward_models.reward_scores(
      _TINY, numpy_mean, *models.left_pad_prompts(prompts, config.sequence.prompt_len),
      *models.right_pad_completions(completions, config.sequence.completion_len), pooling)
  np.testing.assert_allclose(rewards, expected, atol=1e-5)

  evals = [r for r in read_metrics(os.path.join(run_dir, 'metrics.jsonl'), node='reward_model')
           if r['kind'] == 'reward_model_eval']
  assert [r.get('member') for r in evals] == [0, 1, 2, 'ensemble', None]
  assert all(0 <= r['accuracy'] <= 1 for r in evals)
  # One warm start on demonstrations, shared by the members.
  warm_start = [r for r in read_metrics(os.path.join(run_dir, 'metrics.jsonl'),
                                        node='reward_model')
                if r['kind'] == 'reward_model_warm_start']
  assert [r['step'] for r in warm_start] == [0, 1, 2, 2]
  assert all(np.isfinite(r['nll']) for r in warm_start)


def test_an_ensembles_margin_is_the_mean_of_its_members():
  task = configs.get_config('text_bond').make_task()
  batch = next(preference.preference_batches(task, np.random.default_rng(0), 4, 16, 12))
  members = [models.init_params(_TINY, jax.random.PRNGKey(seed)) for seed in (0, 1)]
  single = [preference.reward_margins(_TINY, [m], batch, 'mean') for m in members]
  np.testing.assert_allclose(preference.reward_margins(_TINY, members, batch, 'mean'),
                             np.mean(single, axis=0), rtol=1e-5, atol=1e-6)


def test_the_reward_model_reads_the_policys_token_ids():
  judge = learned_rewards.LearnedModel(_config(num_models=1).agent.reward_model,
                                       learned_rewards.REWARD)
  policy = dataclasses.replace(_TINY, vocab_size=22)  # A pretrained checkpoint's, say.
  (spec,) = judge.served_models(policy)
  assert spec.model.vocab_size == 22
  assert spec.model.num_layers == judge.config.model.num_layers




def test_a_warm_started_judge_needs_the_tasks_demonstrations():
  task = configs.get_config('text_bond').make_task()
  task.has_demonstrations = False  # An instance attribute: a task whose demonstrations are off.
  judge = learned_rewards.LearnedModel(_config(num_models=1).agent.reward_model,
                                       learned_rewards.REWARD)
  with pytest.raises(ValueError, match='warm_start_steps=0'):
    judge.check(task)
  dataclasses.replace(judge, config=dataclasses.replace(judge.config,
                                                        warm_start_steps=0)).check(task)
