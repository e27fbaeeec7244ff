"""What an actor asks the inference server for: a rollout turns prompts into Samples.

A rollout is any callable `prompts -> list[Sample]`. `PolicyRollout` (one completion
per prompt from the policy, scored by the task) serves the agents that need nothing
else; agents that compare a completion with other samples or score it with other
models build their own in their module (agents/*.py), from `sample_policy` and the
client's scoring calls. Everything model-based comes from the inference server through
`InferenceClient`; only the programmatic reward runs in the actor.
"""
from collections.abc import Sequence
import dataclasses
from typing import Any

from chorus import core
from chorus.actors.actor import ActorConfig
from chorus.inference_server.client import Completion
from chorus.inference_server.client import GenerateResult
from chorus.inference_server.client import InferenceClient


@dataclasses.dataclass(frozen=True)
class Sample:
  """One episode: a prompt and what was sampled for it (see core.Trajectory for the fields).

  Attributes:
    prompt: the task's prompt.
    completion: the sampled completion, with its behaviour log-probs.
    param_version: version of the policy parameters that sampled it.
    reward_components: the reward's terms; the trajectory's reward is their sum.
    extras: the fields the agent declares (its `trajectory_extras`), by name.
  """
  prompt: core.Prompt
  completion: Completion
  param_version: int
  reward_components: dict[str, float]
  extras: dict[str, Any] = dataclasses.field(default_factory=dict)


def sample_policy(client: InferenceClient, prompt_tokens: Sequence[Sequence[int]],
                  settings: ActorConfig, **options) -> GenerateResult:
  """Completions of the acting model with the actor's temperature and length cap."""
  return client.generate(prompt_tokens, model=settings.model, temperature=settings.temperature,
                         max_new_tokens=settings.max_new_tokens, **options)


class PolicyRollout:
  """One completion per prompt from the policy, scored by the task (V-trace, soft-Q)."""

  def __init__(self, client: InferenceClient, task: core.Task, settings: ActorConfig):
    self._client, self._task, self._settings = client, task, settings

  def __call__(self, prompts: Sequence[core.Prompt]) -> list[Sample]:
    result = sample_policy(self._client, [self._task.encode_prompt(p) for p in prompts],
                           self._settings)
    return [Sample(prompt, completion, result.param_version,
                   self._task.reward_components(prompt, completion.tokens))
            for prompt, completion in zip(prompts, result.completions)]
