"""GKD (arXiv 2306.13649): on-policy distillation of a teacher into a smaller student.

Models: the policy (the student, warm-started on the task's demonstrations like every
policy) and the teacher, a decoder of its own architecture that a setup step trains on
the task's demonstrations, or loads from a checkpoint (an RL-tuned policy, say) with
`teacher.init` and `teacher.steps=0`; the inference servers serve it under 'teacher' and
the learner holds the same weights as a constant. Actors: for a share lambda of their
requests the student samples the completions (on-policy), otherwise the teacher does.
Learner: the token-level generalized JSD(beta) between teacher and student over the whole
vocabulary on those sequences (learners/gkd.py). lambda = 0 and beta = 0 is supervised
KD: forward KL on teacher samples.
"""
from collections.abc import Sequence
import dataclasses
import itertools
import logging
import math
import time

import jax
import jax.numpy as jnp

from chorus import core
from chorus import models
from chorus import schema
from chorus.actors import demonstrations
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.learners import gkd
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.learners import supervised
from chorus.models.checkpoints import Checkpointer
from chorus.models import tokenizer

TEACHER = 'teacher'
TEACHER_CHECKPOINT = 'checkpoints/teacher'
EXTRAS = (schema.Field('on_policy', schema.SCALAR, 'float32',
                       '1 if the student sampled the completion, 0 if the teacher did'),)
# A bigger model than the tiny default policy: 4 blocks of width 64.
DEFAULT_TEACHER = models.DecoderConfig(
    vocab_size=tokenizer.CharTokenizer().vocab_size, num_layers=4, embed_dim=64, num_heads=4,
    num_kv_heads=2, head_dim=16, mlp_dim=256, max_seq_len=64)


@dataclasses.dataclass(frozen=True)
class GKDConfig(builder_lib.AgentConfig, tag='gkd'):
  """Generalized knowledge distillation.

  Attributes:
    beta: of the generalized JSD: 0 is the forward KL(teacher || student), 1 the reverse
      KL(student || teacher), in between the mixture divergence.
    on_policy_fraction: lambda, the share of actor requests answered by the student's
      own samples; the others by teacher samples. Requests alternate deterministically
      so that the share is exact.
    teacher_model: the teacher's architecture; its vocab_size is replaced by the
      student's (the same token ids).
    teacher: how the teacher is made: supervised training on the task's
      demonstrations (`steps`, `batch_size`, `learning_rate`), starting from `init` (an
      orbax directory of `teacher_model` parameters, e.g. an RL-tuned policy) when set;
      `steps=0` with `init` serves that checkpoint as it is. `dataset` is not supported.
    teacher_min_reward: the teacher trains only on demonstrations whose task reward is
      at least this (rejection sampling, so that it can be better than the student,
      which imitates them all); None uses every demonstration.
  """
  beta: float = 0.5
  on_policy_fraction: float = 1.0
  teacher_model: models.DecoderConfig = DEFAULT_TEACHER
  teacher: supervised.WarmStartConfig = supervised.WarmStartConfig(steps=600)
  teacher_min_reward: float | None = None

  def __post_init__(self):
    if not 0 <= self.beta <= 1:
      raise ValueError(f'beta must be in [0, 1]; got {self.beta}.')
    if not 0 <= self.on_policy_fraction <= 1:
      raise ValueError(f'on_policy_fraction must be in [0, 1]; got {self.on_policy_fraction}.')
    if self.teacher.dataset:
      raise ValueError('The GKD teacher trains on the task\'s demonstrations or starts from '
                       '`teacher.init`; `teacher.dataset` is not supported. Warm-start a run '
                       'on the dataset and pass its checkpoints/warm_start as teacher.init.')
    if not (self.teacher.steps or self.teacher.init):
      raise ValueError('teacher.steps=0 needs teacher.init, a checkpoint of the teacher; '
                       'otherwise the teacher would be random weights.')


class OnOrOffPolicyRollout:
  """Completions from the student for a share lambda of the calls, from the teacher otherwise.

  Call k is on-policy when floor((k + 1) lambda) > floor(k lambda): the share is exact
  and needs no random numbers. Teacher samples carry the policy version the server
  serves, since the policy lag means nothing for them.
  """

  def __init__(self, client, task: core.Task, settings, *, on_policy_fraction: float):
    self._client, self._task, self._settings = client, task, settings
    self._fraction = on_policy_fraction
    self._calls = itertools.count()  # next() on a count is atomic: threads may share it.

  def __call__(self, prompts: Sequence[core.Prompt]) -> list[rollouts.Sample]:
    call = next(self._calls)
    on_policy = math.floor((call + 1) * self._fraction) > math.floor(call * self._fraction)
    prompt_tokens = [self._task.encode_prompt(p) for p in prompts]
    if on_policy:
      result = rollouts.sample_policy(self._client, prompt_tokens, self._settings)
      version = result.param_version
    else:
      result = self._client.generate(prompt_tokens, model=TEACHER,
                                     temperature=self._settings.temperature,
                                     max_new_tokens=self._settings.max_new_tokens)
      version = self._client.status()[builder_lib.POLICY_MODEL]['param_version']
    return [rollouts.Sample(prompt, completion, version,
                            self._task.reward_components(prompt, completion.tokens),
                            extras={'on_policy': float(on_policy)})
            for prompt, completion in zip(prompts, result.completions)]


def teacher_architecture(config: GKDConfig,
                         student_model: models.DecoderConfig) -> models.DecoderConfig:
  """`teacher_model` with the student's vocabulary: distillation compares the two token by
  token, so both read and write the same ids (the task tokenizer's or a checkpoint's)."""
  return dataclasses.replace(config.teacher_model, vocab_size=student_model.vocab_size)


def train_teacher(config: GKDConfig, context: builder_lib.SetupContext) -> None:
  """Trains (or loads) the teacher and saves it where the servers and learner read it."""
  start = time.monotonic()
  teacher, model = config.teacher, teacher_architecture(config, context.model)
  if teacher.init:
    params = builder_lib.restore_params(teacher.init, model)
  else:
    params = models.init_params(model, jax.random.PRNGKey(context.seed + 1))
  batches = demonstrations.demonstration_batches(
      context.task, context.seed + 1, teacher.batch_size, context.sequence,
      min_reward=-math.inf if config.teacher_min_reward is None else config.teacher_min_reward)
  params, history = supervised.warm_start(model, teacher, batches, params)
  context.metrics.write_history(history, kind='teacher')
  Checkpointer(context.path(TEACHER_CHECKPOINT)).save(0, params)
  logging.info('Teacher: %d steps in %.1f s', teacher.steps, time.monotonic() - start)


def make_gkd_learner(context: builder_lib.LearnerContext, config: GKDConfig):
  """The student learns the teacher's per-token distributions on the batch's sequences."""
  student_model = context.model
  teacher_model = teacher_architecture(config, student_model)

  def logits(model, params, batch: core.TrajectoryBatch):
    return models.forward_completions(model, params, batch.prompt_tokens, batch.prompt_mask,
                                      batch.completion_tokens, batch.completion_mask)[0]

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    loss, metrics = gkd.gkd_loss(logits(student_model, params, batch),
                                 logits(teacher_model, aux[TEACHER], batch),
                                 batch.completion_mask, beta=config.beta)
    metrics['on_policy_fraction'] = jnp.mean(batch.extras['on_policy'])
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return learner_lib.Learner(
      loss_fn, params=context.params, optimizer=context.optimizer,
      constants={TEACHER: context.restore(TEACHER_CHECKPOINT, teacher_model)},
      mesh=context.mesh)


@builder_lib.register
class GKDBuilder(builder_lib.AgentBuilder):
  """On-policy distillation from a served teacher."""
  config_class = GKDConfig
  progress_metrics = (('loss', 'jsd'), ('argmax_agreement', 'agreement'))

  def trajectory_extras(self):
    return EXTRAS

  def served_models(self, model):
    return (builder_lib.ServedModelSpec(TEACHER, checkpoint=TEACHER_CHECKPOINT,
                                        model=teacher_architecture(self.config, model)),)

  def setup_steps(self, replay_dataset):
    return (builder_lib.SetupStep(TEACHER, lambda context: train_teacher(self.config, context),
                                  accelerator=True),)

  def make_rollout(self, client, task, actor_config):
    return OnOrOffPolicyRollout(client, task, actor_config,
                                on_policy_fraction=self.config.on_policy_fraction)

  def make_learner(self, context):
    return make_gkd_learner(context, self.config)
