"""Diversity-rewarded CFG distillation (arXiv 2410.06084), for music tasks.

Models: the policy (the student, sampled without guidance) and the frozen reference (the
teacher, whose classifier-free-guided distribution is the target). Actors: two
completions per caption, each rewarded by their diversity 1 - cos(E(y1), E(y2)) (the
task's `diversity_reward`, on audio embeddings). Learner: on-policy reverse KL to the CFG
teacher, token by token, plus a REINFORCE term on the diversity reward
(learners/cfg_distill.py): one model then does what CFG did with two passes. Batches:
the actors' pairs through a replay queue.
"""
from collections.abc import Sequence
import dataclasses

import jax
import jax.numpy as jnp

from chorus import core
from chorus import models
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.learners import cfg_distill
from chorus.learners import learner as learner_lib


@dataclasses.dataclass(frozen=True)
class CFGDistillConfig(builder_lib.AgentConfig, tag='cfg_distill'):
  """Distillation of a CFG teacher into the policy.

  Attributes:
    guidance_scale: g of the teacher's logits g * l(.|c) + (1 - g) * l(.|null).
    diversity_coef: weight of the diversity REINFORCE term; 0 is plain distillation
      (the quality-only run).
  """
  guidance_scale: float = 3.0
  diversity_coef: float = 0.5


class DiversityPairRollout:
  """Two completions per prompt, both rewarded by their diversity 1 - cos(E(y1), E(y2)).

  The reward of each sample is the task's `diversity_reward` of the pair (audio
  embeddings for music), the whole learning signal of the REINFORCE term; quality comes
  from distilling the CFG teacher.
  """

  def __init__(self, client, task: core.Task, settings):
    self._client, self._task, self._settings = client, task, settings

  def __call__(self, prompts: Sequence[core.Prompt]) -> list[rollouts.Sample]:
    result = rollouts.sample_policy(self._client, [self._task.encode_prompt(p) for p in prompts],
                                    self._settings, num_samples=2)
    samples = []
    for index, prompt in enumerate(prompts):
      pair = result.completions[2 * index:2 * index + 2]
      diversity = self._task.diversity_reward(pair[0].tokens, pair[1].tokens)
      samples += [rollouts.Sample(prompt, completion, result.param_version,
                                  {'diversity': diversity})
                  for completion in pair]
    return samples


def make_cfg_distill_learner(context: builder_lib.LearnerContext,
                             config: CFGDistillConfig) -> learner_lib.Learner:
  """Batches hold caption prompts, the student's samples and their diversity rewards."""
  model = context.model
  unconditional_prompt = context.task.unconditional_prompt_tokens()

  def logits(params, prompt_tokens, prompt_mask, batch: core.TrajectoryBatch):
    return models.forward_completions(model, params, prompt_tokens, prompt_mask,
                                      batch.completion_tokens, batch.completion_mask)[0]

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    teacher_params = aux['teacher']
    batch_size, prompt_len = batch.prompt_tokens.shape
    null_tokens, null_mask = models.left_pad_prompts([unconditional_prompt] * batch_size,
                                                     prompt_len)
    student = logits(params, batch.prompt_tokens, batch.prompt_mask, batch)
    teacher_cond = logits(teacher_params, batch.prompt_tokens, batch.prompt_mask, batch)
    teacher_uncond = logits(teacher_params, jnp.asarray(null_tokens), jnp.asarray(null_mask),
                            batch)
    distill_loss, metrics = cfg_distill.cfg_distillation_loss(
        student, teacher_cond, teacher_uncond, batch.completion_mask,
        guidance_scale=config.guidance_scale)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(student, axis=-1),
                                   batch.completion_tokens[..., None], axis=-1)[..., 0]
    diversity_loss, _ = cfg_distill.diversity_reinforce_loss(logprobs, batch.completion_mask,
                                                             batch.reward)
    loss = distill_loss + config.diversity_coef * diversity_loss
    metrics.update(loss=loss, distill_loss=distill_loss, diversity_loss=diversity_loss,
                   diversity=batch.reward.mean(),
                   completion_length=batch.completion_mask.sum(axis=1).mean())
    return loss, metrics

  return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer,
                             constants={'teacher': context.reference_params},
                             mesh=context.mesh)


@builder_lib.register
class CFGDistillBuilder(builder_lib.AgentBuilder):
  """Distils the guided warm start into itself, rewarding diverse pairs."""
  config_class = CFGDistillConfig
  progress_metrics = (('reverse_kl', 'kl to CFG teacher'), ('diversity', 'diversity'))

  def check(self, task):
    if not (hasattr(task, 'unconditional_prompt_tokens') and hasattr(task, 'diversity_reward')):
      raise ValueError(f'cfg_distill distils classifier-free guidance and rewards diversity; '
                       f'task {task.name!r} has no unconditional prompt or diversity reward. '
                       'Use a music task.')

  def make_rollout(self, client, task, actor_config):
    return DiversityPairRollout(client, task, actor_config)

  def make_learner(self, context):
    return make_cfg_distill_learner(context, self.config)
