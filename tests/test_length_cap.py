"""A completion cut by the length cap ends its episode in every built-in task, so the value
learners do not bootstrap past it from V(s_T), a value no real step trains (docs/algorithms.md,
"How a row ends"; bootstrapping there let text_vtrace learn to run into the cap)."""
import json

import numpy as np
import pytest

from chorus import core
from chorus import schema
from chorus.actors import prompt_file
from chorus.actors import reverse_digits
from chorus.actors import tasks
from chorus.actors import user_task
from chorus.actors.actor import Actor
from chorus.actors.actor import ActorConfig
from chorus.actors.rollouts import Sample
from chorus.inference_server.client import Completion
from chorus.learners import policy
from chorus.learners import token_mdp
from chorus.learners import vtrace

_CAP = 4
_REWARD = 0.25
_UNTRAINED_VALUE = 1e3  # What V(s_T) may hold: nothing trains it.


def _reverse_digits(unused_tmp_path):
  return reverse_digits.ReverseDigitsTask()


def _prompt_file(tmp_path):
  (tmp_path / 'prompts.jsonl').write_text(
      ''.join(json.dumps({'prompt': f'rev {i:03d}>'}) + '\n' for i in range(20)))
  (tmp_path / 'rewards.py').write_text(
      'def score(prompt, completion, row):\n  return len(completion) / 16\n')
  return tasks.make_task(prompt_file.PromptFileConfig(
      path=str(tmp_path / 'prompts.jsonl'), reward=f'{tmp_path}/rewards.py:score'))


def _example_task(unused_tmp_path):
  return user_task.make_user_task(
      user_task.UserTaskConfig(cls='examples/repeat_task.py:RepeatTask'))


@pytest.mark.parametrize('make_task', [_reverse_digits, _prompt_file, _example_task],
                         ids=['reverse_digits', 'prompt_file', 'example_task'])
def test_a_completion_cut_at_the_cap_ends_its_episode_and_is_not_bootstrapped(
    tmp_path, make_task):
  task = make_task(tmp_path)
  prompt = task.train_prompt(np.random.default_rng(0))
  # What the sampler returns at the cap: no EOS, not terminated.
  cut = Completion(tokens=np.asarray(task.tokenizer.encode('1111')[:_CAP], np.int32),
                   logprobs=np.full(_CAP, -0.5, np.float32), terminated=False)
  stored = []
  actor = Actor(0, ActorConfig(), task,
                rollout=lambda unused: [Sample(prompt, cut, 0, {'reward': _REWARD})],
                write_replay=lambda trajectories, _: stored.extend(trajectories),
                log_episode=lambda unused: None, metrics=None, seed=0)
  actor.run_once()
  (trajectory,) = stored
  assert trajectory.terminated, 'a cut completion must be recorded as the end of its episode'

  spec = core.SequenceSpec(prompt_len=len(trajectory.prompt_tokens), completion_len=_CAP)
  batch = schema.CORE_SCHEMA.batch_trajectories([trajectory], spec)
  mask = batch.completion_mask
  rewards = token_mdp.token_rewards(batch.reward, mask, batch.behaviour_logprobs,
                                    batch.behaviour_logprobs, kl_coef=0.0)
  discounts = token_mdp.token_discounts(mask, batch.terminated)
  values = np.zeros((1, _CAP + 1), np.float32)
  values[0, _CAP] = _UNTRAINED_VALUE
  targets = vtrace.vtrace_targets(values, rewards, discounts, np.zeros((1, _CAP), np.float32),
                                  mask)
  # The return of every step is the task's reward of the cut completion, nothing of V(s_T).
  np.testing.assert_allclose(targets.vs[0], _REWARD, rtol=1e-6)


def test_learners_report_the_share_of_completions_at_the_cap():
  trajectories = [
      core.Trajectory(prompt_tokens=np.asarray([1, 5], np.int32),
                      completion_tokens=np.full(length, 7, np.int32),
                      behaviour_logprobs=np.zeros(length, np.float32), reward=0.0,
                      terminated=True, param_version=0)
      for length in (_CAP, 2, _CAP, 1)]
  batch = schema.CORE_SCHEMA.batch_trajectories(
      trajectories, core.SequenceSpec(prompt_len=2, completion_len=_CAP))
  metrics = policy.batch_metrics(batch)
  assert float(metrics['at_length_cap']) == 0.5
  assert float(metrics['completion_length']) == (2 * _CAP + 3) / 4
