"""Nash-MD (arXiv 2312.00886): policy gradient against the geometric mixture of the policy
and the reference, judged by a preference.

Models: the policy, the reference (the mixture's second model, also scoring log
pi_ref(y)) and, with `preference_model.kind=learned`, a pairwise preference model
trained by a setup step. Actors: y from the policy and y' from the token-level geometric
mixture pi^(1-beta) pi_ref^beta (two KV caches on the inference server), P(y > y') from
the preference model or from the task reward. Learner: Nash-MD-PG (learners/nash_md.py).
Batches: the actors' trajectories through a replay queue.
"""
from collections.abc import Sequence
import dataclasses

import numpy as np

from chorus import core
from chorus import schema
from chorus.actors import rollouts
from chorus.agents import builder as builder_lib
from chorus.agents import learned_rewards
from chorus.learners import learner as learner_lib
from chorus.learners import nash_md
from chorus.learners import policy
from chorus.learners.preference import RewardModelConfig

EXTRAS = (
    schema.Field('reference_logprobs', schema.PER_TOKEN, 'float32',
                 'log pi_ref(y_t | prefix) of each completion token, scored when sampled'),
    schema.Field('opponent_tokens', schema.TOKENS, 'int32',
                 "y', sampled from the policy/reference geometric mixture"),
    schema.Field('preference', schema.SCALAR, 'float32', "P(y > y'), the completion's win "
                 'probability against the opponent'),
)


@dataclasses.dataclass(frozen=True)
class NashMDConfig(builder_lib.AgentConfig, tag='nash_md'):
  """Nash-MD-PG.

  Attributes:
    kl_coef: tau, the KL-to-reference regulariser (the paper: about 0.008).
    mixture_coef: beta of the opponent pi^beta ∝ pi^(1-beta) pi_ref^beta (paper's best:
      0.125-0.375); the actors sample the opponent from the inference server.
    preference_temperature: with no learned preference model, P(y > y') =
      sigmoid((r(y) - r(y')) / preference_temperature) from the task reward.
    preference_model: who judges the pairs: the task reward ('programmatic') or a
      pairwise preference model trained on the task's noisy pairs before RL ('learned').
  """
  kl_coef: float = 0.008
  mixture_coef: float = 0.125
  preference_temperature: float = 0.1
  preference_model: RewardModelConfig = RewardModelConfig()

  def __post_init__(self):
    if not 0 <= self.mixture_coef <= 1:
      raise ValueError(f'mixture_coef must be in [0, 1], got {self.mixture_coef}.')
    if not self.preference_temperature > 0:
      raise ValueError(f'preference_temperature must be > 0, got {self.preference_temperature}.')


class MixtureOpponentRollout:
  """y from the policy, y' from the geometric mixture of policy and reference, per prompt.

  P(y > y') comes from the served preference model when `preference_model` is named,
  else from the task reward as sigmoid((r(y) - r(y')) / preference_temperature). The
  sample records log pi_ref(y), scored by the server.
  """

  def __init__(self, client, task: core.Task, settings, *, mixture_coef: float,
               preference_model: str | None, preference_temperature: float):
    self._client, self._task, self._settings = client, task, settings
    self._mixture_coef = mixture_coef
    self._preference_model = preference_model
    self._preference_temperature = preference_temperature

  def _preferences(self, prompts, prompt_tokens, completions, opponents) -> np.ndarray:
    if self._preference_model:
      return np.asarray(self._client.score_preferences(
          prompt_tokens, [c.tokens for c in completions], [c.tokens for c in opponents],
          model=self._preference_model).probabilities)
    margins = np.asarray([core.task_reward(self._task, p, c.tokens)
                          - core.task_reward(self._task, p, o.tokens)
                          for p, c, o in zip(prompts, completions, opponents)])
    return 1 / (1 + np.exp(-margins / self._preference_temperature))

  def __call__(self, prompts: Sequence[core.Prompt]) -> list[rollouts.Sample]:
    prompt_tokens = [self._task.encode_prompt(p) for p in prompts]
    sampled = rollouts.sample_policy(self._client, prompt_tokens, self._settings)
    opponent = rollouts.sample_policy(self._client, prompt_tokens, self._settings,
                                      mixture_model=builder_lib.REFERENCE_MODEL,
                                      mixture_coef=self._mixture_coef)
    preferences = self._preferences(prompts, prompt_tokens, sampled.completions,
                                    opponent.completions)
    reference_logprobs = self._client.score_logprobs(
        prompt_tokens, [c.tokens for c in sampled.completions],
        model=builder_lib.REFERENCE_MODEL).logprobs
    return [rollouts.Sample(
        prompt, completion, sampled.param_version,
        self._task.reward_components(prompt, completion.tokens),
        extras=dict(reference_logprobs=np.asarray(reference_logprobs[index], np.float32),
                    opponent_tokens=opponent.completions[index].tokens,
                    preference=float(preferences[index])))
            for index, (prompt, completion) in enumerate(zip(prompts, sampled.completions))]


def make_nash_md_learner(context: builder_lib.LearnerContext,
                         config: NashMDConfig) -> learner_lib.Learner:
  """Batches carry log pi_ref(y) and P(y > y') as the actors scored them."""
  model = context.model

  def loss_fn(params, aux, batch: core.TrajectoryBatch):
    del aux
    sampled = policy.evaluate_actions(model, params, batch)
    loss, metrics = nash_md.nash_md_loss(sampled.logprobs, batch.extras['reference_logprobs'],
                                         batch.extras['preference'], batch.completion_mask,
                                         kl_coef=config.kl_coef)
    return loss, {**metrics, **policy.batch_metrics(batch)}

  return learner_lib.Learner(loss_fn, params=context.params, optimizer=context.optimizer,
                             mesh=context.mesh)


@builder_lib.register
class NashMDBuilder(builder_lib.AgentBuilder):
  """Nash-MD-PG against the policy/reference mixture sampled by the inference server."""
  config_class = NashMDConfig
  progress_metrics = (('kl_to_reference', 'kl'), ('preference', "P(y>y')"))

  @property
  def _judge(self) -> learned_rewards.LearnedModel:
    return learned_rewards.LearnedModel(self.config.preference_model, learned_rewards.PREFERENCE)

  def trajectory_extras(self):
    return EXTRAS

  def served_models(self, model):
    return self._judge.served_models(model)

  def scored_models(self):
    return (builder_lib.REFERENCE_MODEL,)

  def mixtures(self):
    return ((builder_lib.POLICY_MODEL, builder_lib.REFERENCE_MODEL),)

  def setup_steps(self, replay_dataset):
    return self._judge.setup_steps()

  def check(self, task):
    self._judge.check(task)

  def make_rollout(self, client, task, actor_config):
    return MixtureOpponentRollout(client, task, actor_config,
                                  mixture_coef=self.config.mixture_coef,
                                  preference_model=self._judge.served_name,
                                  preference_temperature=self.config.preference_temperature)

  def make_learner(self, context):
    return make_nash_md_learner(context, self.config)
