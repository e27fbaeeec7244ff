"""GRPO (DeepSeekMath, arXiv 2402.03300): group-relative advantages instead of a value head.

Models: the policy and the frozen reference (the KL penalty's pi_ref). Actors: G
completions per prompt from the policy (one Generate call with `num_samples=G`), scored
by the task; the rollout standardises the rewards within each prompt's group and every
trajectory carries its advantage. Learner: the clipped surrogate against the behaviour
policy plus a k3 KL penalty to the reference (learners/grpo.py); the reference's
log-probs are computed once per batch. Batches: the actors' trajectories through a
replay queue; a group's members may land in different batches, which is harmless since
each already knows its advantage.
"""
from collections.abc import Sequence
import dataclasses

import numpy as np

from chorus import core
from chorus import schema
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.learners import grpo
from chorus.learners import learner as learner_lib
from chorus.learners import policy

EXTRAS = (
    schema.Field('advantage', schema.SCALAR, 'float32',
                 "the completion's reward standardised within its prompt's group"),
)


@dataclasses.dataclass(frozen=True)
class GRPOConfig(builder_lib.AgentConfig, tag='grpo'):
  """GRPO (ALGORITHMS.md defaults).

  Attributes:
    group_size: G, completions sampled per prompt.
    advantage_epsilon: added to the group's reward standard deviation.
    clip_epsilon: eps of the ratio clip.
    kl_coef: beta of the k3 KL penalty to the reference (0 turns it off).
    normalisation: 'sequence' (mean over each completion's tokens, then over
      completions: the paper's) or 'token' (mean over the batch's tokens).
    num_epochs: passes over each batch per learner step (the paper's mu).
    num_minibatches: minibatches per pass.
  """
  group_size: int = 8
  advantage_epsilon: float = 1e-4
  clip_epsilon: float = 0.2
  kl_coef: float = 0.04
  normalisation: str = 'sequence'
  num_epochs: int = 1
  num_minibatches: int = 1

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError(f'group_size must be >= 2 (advantages compare a group\'s samples); '
                       f'got {self.group_size}.')
    if self.normalisation not in grpo.NORMALISATIONS:
      raise ValueError(f'normalisation must be one of {grpo.NORMALISATIONS}; got '
                       f'{self.normalisation!r}.')


class GroupRollout:
  """`group_size` completions per prompt, each with its group-relative advantage."""

  def __init__(self, client, task: core.Task, settings, *, group_size: int,
               advantage_epsilon: float):
    self._client, self._task, self._settings = client, task, settings
    self._group_size = group_size
    self._advantage_epsilon = advantage_epsilon

  def __call__(self, prompts: Sequence[core.Prompt]) -> list[rollouts.Sample]:
    size = self._group_size
    result = rollouts.sample_policy(self._client, [self._task.encode_prompt(p) for p in prompts],
                                    self._settings, num_samples=size)
    group_prompts = [p for p in prompts for _ in range(size)]  # Completions are prompt-major.
    components = [self._task.reward_components(p, c.tokens)
                  for p, c in zip(group_prompts, result.completions)]
    rewards = np.asarray([sum(terms.values()) for terms in components]).reshape(-1, size)
    advantages = grpo.group_advantages(rewards, epsilon=self._advantage_epsilon).reshape(-1)
    return [rollouts.Sample(prompt, completion, result.param_version, terms,
                            extras=dict(advantage=float(advantage)))
            for prompt, completion, terms, advantage in zip(
                group_prompts, result.completions, components, advantages)]


def make_grpo_learner(context: builder_lib.LearnerContext,
                      config: GRPOConfig) -> learner_lib.Learner:
  """GRPO against the frozen reference of `context`."""
  model = context.model

  def prepare_batch(params, aux, batch: core.TrajectoryBatch) -> core.TrajectoryBatch:
    del params  # Only the frozen reference, once per update.
    reference = policy.evaluate_actions(model, aux['reference'], batch)
    return batch._replace(extras={**batch.extras, 'reference_logprobs': reference.logprobs})

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux
    target = policy.evaluate_actions(model, params, batch)
    loss, metrics = grpo.grpo_loss(
        target.logprobs, batch.behaviour_logprobs, batch.extras['reference_logprobs'],
        batch.extras['advantage'], batch.completion_mask, clip_epsilon=config.clip_epsilon,
        kl_coef=config.kl_coef, normalisation=config.normalisation)
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer,
                             constants={'reference': context.reference_params},
                             mesh=context.mesh, prepare_batch=prepare_batch,
                             num_epochs=config.num_epochs,
                             num_minibatches=config.num_minibatches)


@builder_lib.register
class GRPOBuilder(builder_lib.AgentBuilder):
  """Group-relative policy optimisation from a replay queue."""
  config_class = GRPOConfig
  progress_metrics = (('kl_to_reference', 'kl'), ('zero_advantage_fraction', 'flat groups'))

  def trajectory_extras(self):
    return EXTRAS

  def make_rollout(self, client, task, actor_config):
    return GroupRollout(client, task, actor_config, group_size=self.config.group_size,
                        advantage_epsilon=self.config.advantage_epsilon)

  def make_learner(self, context):
    return make_grpo_learner(context, self.config)
