"""What an actor asks the inference server for each batch of prompts, per algorithm.

A rollout turns prompts into `Sample`s: the completion the policy sampled, its task
reward terms and whatever the algorithm compares it with. Everything model-based
(anchor and reference samples, log-probs under another model, learned rewards and
preferences) comes from the inference server through `InferenceClient`; only the
programmatic reward runs in the actor.
"""
from collections.abc import Sequence
import dataclasses
from typing import Any

import numpy as np

from chorus.actors.actor import ActorConfig
from chorus.inference_server.client import Completion
from chorus.inference_server.client import InferenceClient


@dataclasses.dataclass(frozen=True)
class Sample:
  """One episode: a prompt and what was sampled for it (see core.Trajectory for the fields)."""
  prompt: Any
  completion: Completion
  param_version: int
  reward_components: dict[str, float]
  reference_logprobs: np.ndarray | None = None
  paired_completion_tokens: np.ndarray | None = None
  win_probability: float | None = None


def _sample_policy(client: InferenceClient, prompt_tokens: Sequence[Sequence[int]],
                   settings: ActorConfig, **mixture):
  return client.generate(prompt_tokens, model=settings.model, temperature=settings.temperature,
                         max_new_tokens=settings.max_new_tokens, **mixture)


class PolicyRollout:
  """One completion per prompt from the policy, scored by the task (V-trace, soft-Q)."""

  def __init__(self, client: InferenceClient, task, settings: ActorConfig):
    self._client, self._task, self._settings = client, task, settings

  def __call__(self, prompts) -> list[Sample]:
    result = _sample_policy(self._client, [self._task.encode_prompt(p) for p in prompts],
                            self._settings)
    return [Sample(prompt, completion, result.param_version,
                   self._task.reward_components(prompt, completion.tokens))
            for prompt, completion in zip(prompts, result.completions)]


class BestOfAnchorRollout:
  """J-BOND: y from the policy and `num_anchor_samples` from the moving anchor.

  Each completion is judged by the task reward, or by the served reward model when
  `reward_model` is named. The sample records log pi_anchor(y) (scored by the server), the
  better anchor sample (the forward, Best-of-N term learns from it) and the share of
  anchor samples whose reward is <= r(y): the p-hat<= whose zero gives r_J = -log 16.
  """

  def __init__(self, client: InferenceClient, task, settings: ActorConfig, *,
               anchor_model: str = 'anchor', num_anchor_samples: int = 2,
               reward_model: str | None = None):
    if num_anchor_samples < 1:
      raise ValueError(f'num_anchor_samples must be >= 1, got {num_anchor_samples}.')
    self._client, self._task, self._settings = client, task, settings
    self._anchor_model = anchor_model
    self._num_anchor_samples = num_anchor_samples
    self._reward_model = reward_model

  def _rewards(self, prompts, prompt_tokens, completions: Sequence[Completion]) -> np.ndarray:
    if self._reward_model:
      return np.asarray(self._client.score_rewards(
          prompt_tokens, [c.tokens for c in completions], model=self._reward_model).rewards)
    return np.asarray([self._task.reward(p, c.tokens) for p, c in zip(prompts, completions)])

  def __call__(self, prompts) -> list[Sample]:
    prompt_tokens = [self._task.encode_prompt(p) for p in prompts]
    policy = _sample_policy(self._client, prompt_tokens, self._settings)
    num = self._num_anchor_samples
    anchor = self._client.generate(prompt_tokens, model=self._anchor_model,
                                   temperature=self._settings.temperature,
                                   max_new_tokens=self._settings.max_new_tokens,
                                   num_samples=num)
    repeated_prompts = [p for p in prompts for _ in range(num)]
    repeated_tokens = [t for t in prompt_tokens for _ in range(num)]
    policy_rewards = self._rewards(prompts, prompt_tokens, policy.completions)
    anchor_rewards = self._rewards(repeated_prompts, repeated_tokens,
                                   anchor.completions).reshape(len(prompts), num)
    anchor_logprobs = self._client.score_logprobs(
        prompt_tokens, [c.tokens for c in policy.completions], model=self._anchor_model).logprobs
    samples = []
    for index, (prompt, completion) in enumerate(zip(prompts, policy.completions)):
      best = anchor.completions[index * num + int(np.argmax(anchor_rewards[index]))]
      samples.append(Sample(
          prompt, completion, policy.param_version,
          self._task.reward_components(prompt, completion.tokens),
          reference_logprobs=np.asarray(anchor_logprobs[index], np.float32),
          paired_completion_tokens=best.tokens,
          win_probability=float(np.mean(anchor_rewards[index] <= policy_rewards[index]))))
    return samples


class MixtureOpponentRollout:
  """Nash-MD: y from the policy, y' from the geometric mixture of policy and reference.

  P(y > y') comes from the served preference model when `preference_model` is named,
  else from the task reward as sigmoid((r(y) - r(y')) / preference_temperature). The
  sample records log pi_ref(y), scored by the server.
  """

  def __init__(self, client: InferenceClient, task, settings: ActorConfig, *,
               reference_model: str = 'reference', mixture_coef: float = 0.125,
               preference_model: str | None = None, preference_temperature: float = 0.1):
    if not 0 <= mixture_coef <= 1:
      raise ValueError(f'mixture_coef must be in [0, 1], got {mixture_coef}.')
    if preference_temperature <= 0:
      raise ValueError(f'preference_temperature must be > 0, got {preference_temperature}.')
    self._client, self._task, self._settings = client, task, settings
    self._reference_model = reference_model
    self._mixture_coef = mixture_coef
    self._preference_model = preference_model
    self._preference_temperature = preference_temperature

  def _preferences(self, prompts, prompt_tokens, completions, opponents) -> np.ndarray:
    if self._preference_model:
      return np.asarray(self._client.score_preferences(
          prompt_tokens, [c.tokens for c in completions], [c.tokens for c in opponents],
          model=self._preference_model).probabilities)
    margins = np.asarray([self._task.reward(p, c.tokens) - self._task.reward(p, o.tokens)
                          for p, c, o in zip(prompts, completions, opponents)])
    return 1 / (1 + np.exp(-margins / self._preference_temperature))

  def __call__(self, prompts) -> list[Sample]:
    prompt_tokens = [self._task.encode_prompt(p) for p in prompts]
    policy = _sample_policy(self._client, prompt_tokens, self._settings)
    opponent = _sample_policy(self._client, prompt_tokens, self._settings,
                              mixture_model=self._reference_model,
                              mixture_coef=self._mixture_coef)
    preferences = self._preferences(prompts, prompt_tokens, policy.completions,
                                    opponent.completions)
    reference_logprobs = self._client.score_logprobs(
        prompt_tokens, [c.tokens for c in policy.completions],
        model=self._reference_model).logprobs
    return [Sample(prompt, completion, policy.param_version,
                   self._task.reward_components(prompt, completion.tokens),
                   reference_logprobs=np.asarray(reference_logprobs[index], np.float32),
                   paired_completion_tokens=opponent.completions[index].tokens,
                   win_probability=float(preferences[index]))
            for index, (prompt, completion) in enumerate(zip(prompts, policy.completions))]


class DiversityPairRollout:
  """Two completions per prompt, both rewarded by their diversity 1 - cos(E(y1), E(y2)).

  For diversity-rewarded CFG distillation: the reward of each sample is the task's
  `diversity_reward` of the pair (audio embeddings for music), the whole learning signal
  of the REINFORCE term; quality comes from distilling the CFG teacher.
  """

  def __init__(self, client: InferenceClient, task, settings: ActorConfig):
    self._client, self._task, self._settings = client, task, settings

  def __call__(self, prompts) -> list[Sample]:
    result = _sample_policy(self._client, [self._task.encode_prompt(p) for p in prompts],
                            self._settings, num_samples=2)
    samples = []
    for index, prompt in enumerate(prompts):
      pair = result.completions[2 * index:2 * index + 2]
      diversity = self._task.diversity_reward(pair[0].tokens, pair[1].tokens)
      samples += [Sample(prompt, completion, result.param_version, {'diversity': diversity})
                  for completion in pair]
    return samples
