"""Online AI feedback for direct alignment (arXiv 2402.04792), and offline DPO.

Models: the policy, the frozen reference and, with `preference_model.kind=learned`, a
pairwise preference model trained by a setup step (agents/learned_rewards.py). Actors:
two completions per prompt from the current policy; a judge labels the pair, either the
task's noisy annotator (`annotator_prefers_first`: the task reward seen through label
noise) or the served preference model; each trajectory is the preferred completion y+
with the other one, y-, as an extra. Learner: DPO or IPO (learners/dpo.py) against the
frozen reference, whose log-probs of both completions are computed once per update.
Batches: the actors' pairs through a replay queue (online), or, given `replay_dataset`,
a recorded RLDS dataset of labelled pairs read directly and reshuffled every pass, with
no actors (offline DPO). A dataset of pairs sampled once from the reference is what an
online run with `learner.learning_rate=0` records in its rlds/ folder (see
docs/algorithms.md).
"""
from collections.abc import Sequence
import dataclasses
import hashlib

import jax.numpy as jnp
import numpy as np

from chorus import core
from chorus import schema
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.agents import learned_rewards
from chorus.learners import dpo
from chorus.learners import learner as learner_lib
from chorus.learners import policy
from chorus.learners.preference import RewardModelConfig

LOSSES = ('dpo', 'ipo')
EXTRAS = (
    schema.Field('rejected_tokens', schema.TOKENS, 'int32',
                 'y-: the completion of the pair that the judge did not prefer'),
    schema.Field('rejected_reward', schema.SCALAR, 'float32',
                 "task reward of y- (for the record: the judge's labels are noisy)"),
)


@dataclasses.dataclass(frozen=True)
class OAIFConfig(builder_lib.AgentConfig, tag='oaif'):
  """Direct alignment from judged pairs: online AI feedback, or offline DPO on a dataset.

  Attributes:
    loss: 'dpo' (-log sigmoid(beta * h)) or 'ipo' ((h - 1 / (2 tau))^2).
    beta: DPO's beta.
    tau: IPO's tau: the target margin is 1 / (2 tau) nats of sequence log-ratio.
    preference_model: the judge: the task's noisy annotator ('programmatic') or a
      pairwise preference model trained on the task's noisy pairs before RL ('learned'),
      whose more likely choice labels the pair.
  """
  loss: str = 'dpo'
  beta: float = 0.1
  tau: float = 0.5
  preference_model: RewardModelConfig = RewardModelConfig()

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f'loss must be one of {LOSSES}; got {self.loss!r}.')
    for name in ('beta', 'tau'):
      if not getattr(self, name) > 0:
        raise ValueError(f'{name} must be > 0; got {getattr(self, name)}.')


def _pair_rng(prompt: core.Prompt, first, second) -> np.random.Generator:
  """The annotator's coin for one pair: a function of the pair, so runs repeat exactly."""
  text = repr((prompt.prompt_id, [int(t) for t in first], [int(t) for t in second]))
  return np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8],
                                              'little'))


class JudgedPairRollout:
  """Two completions per prompt from the acting model, labelled by the judge.

  The judge is the served preference model when `preference_model` is named (its more
  likely choice wins), else the task's noisy annotator.
  """

  def __init__(self, client, task: core.Task, settings, *, preference_model: str | None):
    self._client, self._task, self._settings = client, task, settings
    self._preference_model = preference_model

  def _first_preferred(self, prompts, prompt_tokens, firsts, seconds) -> np.ndarray:
    if self._preference_model:
      return np.asarray(self._client.score_preferences(
          prompt_tokens, [c.tokens for c in firsts], [c.tokens for c in seconds],
          model=self._preference_model).probabilities) >= 0.5
    decode = self._task.tokenizer.decode
    return np.asarray([
        self._task.annotator_prefers_first(p, decode(f.tokens), decode(s.tokens),
                                           _pair_rng(p, f.tokens, s.tokens))
        for p, f, s in zip(prompts, firsts, seconds)])

  def __call__(self, prompts: Sequence[core.Prompt]) -> list[rollouts.Sample]:
    prompt_tokens = [self._task.encode_prompt(p) for p in prompts]
    result = rollouts.sample_policy(self._client, prompt_tokens, self._settings, num_samples=2)
    firsts, seconds = result.completions[0::2], result.completions[1::2]
    first_preferred = self._first_preferred(prompts, prompt_tokens, firsts, seconds)
    samples = []
    for prompt, first, second, first_wins in zip(prompts, firsts, seconds, first_preferred):
      chosen, rejected = (first, second) if first_wins else (second, first)
      samples.append(rollouts.Sample(
          prompt, chosen, result.param_version,
          self._task.reward_components(prompt, chosen.tokens),
          extras=dict(rejected_tokens=rejected.tokens,
                      rejected_reward=core.task_reward(self._task, prompt, rejected.tokens))))
    return samples


def make_oaif_learner(context: builder_lib.LearnerContext,
                      config: OAIFConfig) -> learner_lib.Learner:
  """DPO or IPO on judged pairs, against the frozen reference of `context`."""
  model = context.model

  def logprobs(params, batch: core.TrajectoryBatch) -> tuple:
    return (policy.evaluate_actions(model, params, batch).logprobs,
            policy.evaluate_extra_tokens(model, params, batch, 'rejected_tokens').logprobs)

  def prepare_batch(params, aux, batch: core.TrajectoryBatch) -> core.TrajectoryBatch:
    del params  # Only the frozen reference, once per update.
    chosen, rejected = logprobs(aux['reference'], batch)
    return batch._replace(extras={**batch.extras, 'reference_chosen_logprobs': chosen,
                                  'reference_rejected_logprobs': rejected})

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux
    extras = batch.extras
    chosen, rejected = logprobs(params, batch)
    chosen_log_ratios = dpo.sequence_log_ratios(chosen, extras['reference_chosen_logprobs'],
                                                batch.completion_mask)
    rejected_log_ratios = dpo.sequence_log_ratios(
        rejected, extras['reference_rejected_logprobs'], extras['rejected_mask'])
    if config.loss == 'dpo':
      loss, metrics = dpo.dpo_loss(chosen_log_ratios, rejected_log_ratios, beta=config.beta)
    else:
      loss, metrics = dpo.ipo_loss(chosen_log_ratios, rejected_log_ratios, tau=config.tau)
    identical = (jnp.all(batch.completion_tokens == extras['rejected_tokens'], axis=1)
                 & jnp.all(batch.completion_mask == extras['rejected_mask'], axis=1))
    rewards, rejected_rewards = batch.reward, extras['rejected_reward']
    distinct = rewards != rejected_rewards
    metrics.update(
        identical_pair_fraction=identical.mean(),
        # How often the judge picked the completion of higher task reward, among pairs
        # whose rewards differ.
        label_accuracy=jnp.sum(distinct & (rewards > rejected_rewards))
        / jnp.maximum(jnp.sum(distinct), 1))
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer,
                             constants={'reference': context.reference_params},
                             mesh=context.mesh, prepare_batch=prepare_batch)


@builder_lib.register
class OAIFBuilder(builder_lib.AgentBuilder):
  """DPO/IPO on the current policy's judged pairs, or on a recorded dataset of pairs."""
  config_class = OAIFConfig
  progress_metrics = (('margin', 'margin'), ('label_accuracy', 'label acc'))

  @property
  def _judge(self) -> learned_rewards.LearnedModel:
    return learned_rewards.LearnedModel(self.config.preference_model, learned_rewards.PREFERENCE)

  def trajectory_extras(self):
    return EXTRAS

  def served_models(self, model):
    return self._judge.served_models(model)

  def setup_steps(self, replay_dataset):
    return self._judge.setup_steps()

  def data(self, replay_dataset):
    if not replay_dataset:
      return builder_lib.Data(builder_lib.DataSource.ACTORS)
    if self._judge.learned:
      raise ValueError('With replay_dataset the pairs come labelled from the dataset, so no '
                       'preference model is needed; drop preference_model.kind=learned.')
    return builder_lib.Data(builder_lib.DataSource.DATASET, replay_dataset)

  def check(self, task):
    self._judge.check(task)
    if not self._judge.learned and not hasattr(task, 'annotator_prefers_first'):
      raise ValueError(f'The programmatic judge is the task\'s noisy annotator, and task '
                       f'{task.name!r} has no `annotator_prefers_first`; use '
                       'preference_model.kind=learned.')

  def make_rollout(self, client, task, actor_config):
    return JudgedPairRollout(client, task, actor_config,
                             preference_model=self._judge.served_name)

  def make_learner(self, context):
    return make_oaif_learner(context, self.config)
