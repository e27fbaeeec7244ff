"""A learned reward or pairwise preference model, for agents that judge with one.

Trained by a setup step on the task's noisy preference pairs (`task.preference_pair`,
see learners/preference.py), saved as an orbax checkpoint in the run directory, then
served read-only by the inference servers under its name, where actors score
completions with it. BOND judges with a reward model, Nash-MD with a preference model.
"""
import dataclasses
import logging
import time

import numpy as np

from chorus import core
from chorus.agents import builder as builder_lib
from chorus.learners import preference
from chorus.learners.preference import RewardModelConfig
from chorus.models.checkpoints import Checkpointer

REWARD = 'reward'
PREFERENCE = 'preference'
CHECKPOINT_DIR = 'checkpoints/reward_model'


@dataclasses.dataclass(frozen=True)
class LearnedModel:
  """A learned model of one kind.

  Attributes:
    config: its training settings; `kind='programmatic'` means none is learned.
    kind: REWARD (one score per completion) or PREFERENCE (P(y > y') per pair); also the
      name it is served under.
  """
  config: RewardModelConfig
  kind: str

  @property
  def learned(self) -> bool:
    return self.config.kind == 'learned'

  @property
  def served_name(self) -> str | None:
    """The served model's name, or None when the task's programmatic reward judges."""
    return self.kind if self.learned else None

  def check(self, task: core.Task) -> None:
    if self.learned and not hasattr(task, 'preference_pair'):
      raise ValueError(f'A learned {self.kind} model trains on the task\'s preference pairs, '
                       f'and task {task.name!r} has no `preference_pair`; use '
                       'reward_model.kind=programmatic.')

  def served_models(self) -> tuple[builder_lib.ServedModelSpec, ...]:
    if not self.learned:
      return ()
    return (builder_lib.ServedModelSpec(self.kind, kind=self.kind, checkpoint=CHECKPOINT_DIR),)

  def setup_steps(self) -> tuple[builder_lib.SetupStep, ...]:
    if not self.learned:
      return ()
    return (builder_lib.SetupStep('reward_model', self.train, accelerator=True),)

  def train(self, context: builder_lib.SetupContext) -> None:
    """Trains the model on noisy task pairs, logs held-out accuracy, saves its checkpoint."""
    config, task, spec = self.config, context.task, context.sequence
    train, accuracy = ((preference.train_preference_model, preference.preference_model_accuracy)
                       if self.kind == PREFERENCE else
                       (preference.train_reward_model, preference.reward_model_accuracy))
    start = time.monotonic()
    rng = np.random.default_rng([context.seed, config.seed, 11])
    pairs = preference.preference_batches(task, rng, config.batch_size, spec.prompt_len,
                                          spec.completion_len, num_pairs=config.num_pairs)
    params, history = train(context.model, config, pairs)
    for record in history[::max(1, len(history) // 20)] + history[-1:]:
      context.metrics.write(kind='reward_model', model=self.kind, **record)
    held_out = accuracy(context.model, params, task, np.random.default_rng([context.seed, 12]),
                        spec.prompt_len, spec.completion_len)
    context.metrics.write(kind='reward_model_eval', model=self.kind, **held_out)
    Checkpointer(context.path(CHECKPOINT_DIR)).save(0, params)
    logging.info('%s model: %d steps in %.1f s, held-out %s', self.kind, config.steps,
                 time.monotonic() - start, held_out)
