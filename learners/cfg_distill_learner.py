"""Diversity-rewarded CFG distillation (arXiv 2410.06084) as a learner.

The student (the policy, sampled without guidance) learns the frozen teacher's
classifier-free-guided distribution by on-policy reverse KL, token by token, while a
REINFORCE term on each sample's diversity reward keeps pairs of generations for one
caption apart. One model then does what CFG did with two passes.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax

from chorus import core
from chorus import models
from chorus.learners import cfg_distill
from chorus.learners import learner as learner_lib


@dataclasses.dataclass(frozen=True)
class CFGDistillConfig:
  """Distillation of a CFG teacher into the policy.

  Attributes:
    guidance_scale: g of the teacher's logits g * l(.|c) + (1 - g) * l(.|null).
    diversity_coef: weight of the diversity REINFORCE term; 0 is plain distillation
      (the quality-only run).
  """
  guidance_scale: float = 3.0
  diversity_coef: float = 0.5


def make_cfg_distill_learner(decoder_config: models.DecoderConfig, config: CFGDistillConfig, *,
                             params, teacher_params, unconditional_prompt: list[int],
                             optimizer: optax.GradientTransformation) -> learner_lib.Learner:
  """Batches hold caption prompts, the student's samples and their diversity rewards."""

  def logits(params, prompt_tokens, prompt_mask, batch: core.TrajectoryBatch):
    return models.forward_completions(decoder_config, params, prompt_tokens, prompt_mask,
                                      batch.completion_tokens, batch.completion_mask)[0]

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux
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
                                                             batch.rewards)
    loss = distill_loss + config.diversity_coef * diversity_loss
    metrics.update(loss=loss, distill_loss=distill_loss, diversity_loss=diversity_loss,
                   diversity=batch.rewards.mean(),
                   completion_length=batch.completion_mask.sum(axis=1).mean())
    return loss, metrics

  return learner_lib.Learner(loss_fn, params=params, optimizer=optimizer)
