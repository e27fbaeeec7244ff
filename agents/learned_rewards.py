"""A learned reward or pairwise preference model, for agents that judge with one.

Trained by a setup step, after a warm start on the task's demonstrations, on the task's
noisy preference pairs (`task.preference_pair`, see learners/preference.py), saved as an
orbax checkpoint in the run directory, then served read-only by the inference servers
under its name, where actors score completions with it. BOND judges with a reward model,
Nash-MD with a preference model.

With `num_models` M > 1 the step does WARM (arXiv 2401.12187): M models fine-tuned from
one initialisation (the warm start), each on its own stream of pairs, whose weight
average is served. It logs the held-out accuracy of each model, of their prediction
ensemble (the mean of their scores, M forward passes) and of the weight average (one),
and keeps the M models in checkpoints/reward_model_members/<m> for later comparisons.
"""
import dataclasses
import logging
import os
import time

import jax
import numpy as np

from chorus import core
from chorus import models
from chorus.actors import demonstrations
from chorus.agents import builder as builder_lib
from chorus.learners import preference
from chorus.learners import supervised
from chorus.learners import weight_averaging
from chorus.learners.preference import RewardModelConfig
from chorus.models.checkpoints import Checkpointer

REWARD = 'reward'
PREFERENCE = 'preference'
CHECKPOINT_DIR = 'checkpoints/reward_model'
MEMBERS_DIR = 'checkpoints/reward_model_members'


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
    if not self.learned:
      return
    if not hasattr(task, 'preference_pair'):
      raise ValueError(f'A learned {self.kind} model trains on the task\'s preference pairs, '
                       f'and task {task.name!r} has no `preference_pair`; use '
                       'reward_model.kind=programmatic.')
    if self.config.warm_start_steps and not getattr(task, 'has_demonstrations', True):
      raise ValueError(f'The learned {self.kind} model warm-starts on demonstrations, and task '
                       f'{task.name!r} has none; set its warm_start_steps=0.')

  def architecture(self, policy_model: models.DecoderConfig) -> models.DecoderConfig:
    """`config.model` with the policy's vocabulary (the task tokenizer's, or a pretrained
    checkpoint's): the model reads the same token ids."""
    return dataclasses.replace(self.config.model, vocab_size=policy_model.vocab_size)

  def served_models(self, policy_model: models.DecoderConfig
                    ) -> tuple[builder_lib.ServedModelSpec, ...]:
    if not self.learned:
      return ()
    return (builder_lib.ServedModelSpec(self.kind, kind=self.kind, checkpoint=CHECKPOINT_DIR,
                                        model=self.architecture(policy_model),
                                        pooling=self.config.pooling),)

  def setup_steps(self) -> tuple[builder_lib.SetupStep, ...]:
    if not self.learned:
      return ()
    return (builder_lib.SetupStep('reward_model', self.train, accelerator=True),)

  def train(self, context: builder_lib.SetupContext) -> None:
    """Warm-starts, trains the model(s) on noisy task pairs, logs held-out accuracy, saves
    the checkpoint."""
    config = dataclasses.replace(self.config, model=self.architecture(context.model))
    task, spec = context.task, context.sequence
    train, margins = ((preference.train_preference_model, preference.preference_margins)
                      if self.kind == PREFERENCE else
                      (preference.train_reward_model, preference.reward_margins))
    start = time.monotonic()
    init = models.init_params(config.model, jax.random.PRNGKey(config.seed))
    if config.warm_start_steps:
      warm_start = supervised.WarmStartConfig(steps=config.warm_start_steps)
      init, history = supervised.warm_start(
          config.model, warm_start, demonstrations.demonstration_batches(
              task, config.seed, warm_start.batch_size, spec), init)
      context.metrics.write_history(history, count=10, kind='reward_model_warm_start',
                                    model=self.kind)
    members = []
    for member in range(config.num_models):
      # Fresh pairs (num_pairs=0) differ from member to member; a fixed labelled set
      # (num_pairs > 0) is the same for all, each member seeing it in its own order.
      member_rng = np.random.default_rng([context.seed, config.seed, 11, member])
      pairs = preference.preference_batches(
          task, np.random.default_rng([context.seed, config.seed, 11]) if config.num_pairs
          else member_rng, config.batch_size, spec.prompt_len, spec.completion_len,
          num_pairs=config.num_pairs, order_rng=member_rng)
      params, history = train(config.model, config, pairs, params=init)
      context.metrics.write_history(history, kind='reward_model', model=self.kind,
                                    member=member)
      members.append(params)

    def held_out(params_list):
      return preference.held_out_accuracy(
          lambda batch: margins(config.model, params_list, batch, config.pooling), task,
          np.random.default_rng([context.seed, 12]), spec.prompt_len, spec.completion_len)

    served = weight_averaging.average(members)
    if config.num_models > 1:
      for member, params in enumerate(members):
        context.metrics.write(kind='reward_model_eval', model=self.kind, member=member,
                              **held_out([params]))
        Checkpointer(context.path(os.path.join(MEMBERS_DIR, str(member)))).save(0, params)
      context.metrics.write(kind='reward_model_eval', model=self.kind, member='ensemble',
                            **held_out(members))
    result = held_out([served])
    context.metrics.write(kind='reward_model_eval', model=self.kind, **result)
    Checkpointer(context.path(CHECKPOINT_DIR)).save(0, served)
    logging.info('%s model: %d x %d steps in %.1f s, held-out %s', self.kind,
                 config.num_models, config.steps, time.monotonic() - start, result)
