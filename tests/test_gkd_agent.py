"""The GKD agent (agents/gkd.py): its rollout's on-policy share, its teacher constant, its loss."""
import itertools
import os

import jax
import numpy as np
import pytest

from chorus import agents
from chorus import core
from chorus import models
from chorus.actors import demonstrations
from chorus.actors import reverse_digits
from chorus.actors.actor import ActorConfig
from chorus.agents import gkd as gkd_agent
from chorus.inference_server.client import Completion
from chorus.inference_server.client import GenerateResult
from chorus.learners import gkd
from chorus.learners import learner as learner_lib
from chorus.models.checkpoints import Checkpointer

_SPEC = core.SequenceSpec(16, 12)


class _FakeClient:
  """Answers `generate` with one fixed completion; records which model sampled."""

  def __init__(self):
    self.models = []

  def generate(self, prompts, *, model='policy', **unused_options):
    self.models.append(model)
    completion = Completion(np.array([5, 6, models.EOS_ID]), np.array([-0.1, -0.2, -0.3]), True)
    return GenerateResult([completion for _ in prompts],
                          param_version=7 if model == 'policy' else -1)

  def status(self):
    return {'policy': {'param_version': 7}}


@pytest.mark.parametrize('fraction, expected', [(1.0, 12), (0.0, 0), (0.25, 3), (0.5, 6)])
def test_rollout_asks_the_student_for_exactly_the_on_policy_share(fraction, expected):
  task, client = reverse_digits.ReverseDigitsTask(), _FakeClient()
  rollout = gkd_agent.OnOrOffPolicyRollout(client, task, ActorConfig(),
                                           on_policy_fraction=fraction)
  rng = np.random.default_rng(0)
  samples = [rollout([task.train_prompt(rng)])[0] for _ in range(12)]
  assert client.models.count('policy') == expected
  assert client.models.count(gkd_agent.TEACHER) == 12 - expected
  for model, sample in zip(client.models, samples):
    assert sample.extras['on_policy'] == float(model == 'policy')
    assert sample.param_version == 7  # Teacher samples carry the served policy's version.


def _batch(task, seed: int):
  rng = np.random.default_rng(seed)
  trajectories = []
  for index in range(8):
    prompt = task.train_prompt(rng)
    completion = task.demonstration(prompt, rng)
    trajectories.append(core.Trajectory(
        prompt_tokens=np.asarray(task.encode_prompt(prompt), np.int32),
        completion_tokens=np.asarray(completion, np.int32),
        behaviour_logprobs=-rng.exponential(size=len(completion)).astype(np.float32),
        reward=float(rng.random()), terminated=True, param_version=0,
        extras={'on_policy': float(index % 2)}))
  builder = agents.make_builder(agents.GKDConfig())
  return builder.schema().batch_trajectories(trajectories, _SPEC)


def _logits(model, params, batch):
  return models.forward_completions(model, params, batch.prompt_tokens, batch.prompt_mask,
                                    batch.completion_tokens, batch.completion_mask)[0]


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_learner_holds_the_saved_teacher_as_a_constant_and_distils_it(tmp_path, beta):
  task = reverse_digits.ReverseDigitsTask()
  student = models.DecoderConfig.tiny(task.tokenizer.vocab_size)
  config = agents.GKDConfig(beta=beta)
  teacher = models.init_params(config.teacher_model, jax.random.PRNGKey(3))
  Checkpointer(os.path.join(tmp_path, gkd_agent.TEACHER_CHECKPOINT)).save(0, teacher)
  params = models.init_params(student, jax.random.PRNGKey(0))
  learner = agents.make_builder(config).make_learner(agents.LearnerContext(
      model=student, sequence=_SPEC, task=task, params=params, reference_params=params,
      optimizer=learner_lib.make_optimizer(3e-3, 1.0), run_dir=str(tmp_path)))
  # Frozen: not in the train state (so not checkpointed, never moved), never published.
  assert gkd_agent.TEACHER not in learner.state.aux
  assert learner.published_params().keys() == {'policy'}

  batch = _batch(task, 0)
  expected, _ = gkd.gkd_loss(_logits(student, params, batch),
                             _logits(config.teacher_model, teacher, batch),
                             batch.completion_mask, beta=beta)
  losses = [learner.update(batch) for _ in range(15)]
  assert losses[0]['loss'] == pytest.approx(float(expected), rel=1e-4)
  assert losses[0]['on_policy_fraction'] == pytest.approx(0.5)
  assert losses[-1]['loss'] < 0.8 * losses[0]['loss']


def test_config_refuses_what_cannot_make_a_teacher():
  with pytest.raises(ValueError, match='beta must be in'):
    agents.GKDConfig(beta=-0.1)
  with pytest.raises(ValueError, match='on_policy_fraction must be in'):
    agents.GKDConfig(on_policy_fraction=1.5)
  with pytest.raises(ValueError, match='needs teacher.init'):
    agents.GKDConfig(teacher=gkd_agent.supervised.WarmStartConfig(steps=0))
  builder = agents.make_builder(agents.GKDConfig())
  student = models.DecoderConfig.tiny(22)  # A pretrained checkpoint's vocabulary, say.
  (teacher,) = builder.served_models(student)
  assert teacher.name == gkd_agent.TEACHER
  # The teacher keeps its own size but reads and writes the student's token ids.
  assert teacher.model.vocab_size == 22
  assert teacher.model.num_layers == agents.GKDConfig().teacher_model.num_layers
  assert [step.name for step in builder.setup_steps(None)] == [gkd_agent.TEACHER]


def test_a_teacher_with_a_reward_floor_sees_only_the_demonstrations_that_reach_it():
  task = reverse_digits.ReverseDigitsTask()  # Half its demonstrations swap two digits.
  rewards = [t.reward for t in itertools.islice(demonstrations.demonstrations(task, 0), 200)]
  assert 0.3 < np.mean(np.array(rewards) < 1.0) < 0.7
  kept = itertools.islice(demonstrations.demonstrations(task, 0, min_reward=1.0), 200)
  assert all(t.reward == 1.0 for t in kept)
  batch = next(demonstrations.demonstration_batches(task, 0, 16, _SPEC, min_reward=1.0))
  for prompt, completion, mask in zip(batch.prompt_tokens, batch.completion_tokens,
                                      batch.completion_mask):
    digits = task.tokenizer.decode(prompt).split(' ')[1].rstrip('>')
    assert task.tokenizer.decode(completion[mask]) == digits[::-1]
