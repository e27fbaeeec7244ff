"""Rewards that fail are reported and skipped, never trained on or recorded.

A user's reward function may raise, or return NaN or infinity. `GuardedTask` wraps any
task: such a reward is logged with its prompt's id and comes back as NaN, and the actor
drops every episode whose reward (or any float field) is not finite.
"""
import collections
import logging
import math

from chorus import core

# The component a reward that raised is reported as.
REWARD_ERROR = 'reward_error'
# Reports per prompt id logged in full; after these, one in every _LOG_EVERY.
_LOGGED_PER_PROMPT = 3
_LOG_EVERY = 100


class GuardedTask:
  """`task` with rewards that never raise: failures are logged and come back as NaN."""

  def __init__(self, task: core.Task):
    self._task = task
    self.failed_rewards = 0
    self._failures = collections.Counter()

  @property
  def unwrapped(self) -> core.Task:
    return self._task

  def __getattr__(self, name):
    if name == '_task':  # Not set yet (copy, unpickling): no recursion.
      raise AttributeError(name)
    return getattr(self._task, name)

  def _report(self, prompt: core.Prompt, reason: str):
    self.failed_rewards += 1
    self._failures[prompt.prompt_id] += 1
    count = self._failures[prompt.prompt_id]
    if count <= _LOGGED_PER_PROMPT or count % _LOG_EVERY == 0:
      logging.warning('Reward of prompt %r skipped (%d time(s)): %s', prompt.prompt_id, count,
                      reason)

  def reward_components(self, prompt: core.Prompt, completion_tokens) -> dict[str, float]:
    try:
      components = {str(name): float(value) for name, value in
                    self._task.reward_components(prompt, completion_tokens).items()}
    except Exception as error:  # pylint: disable=broad-except  (users' code)
      self._report(prompt, f'the reward raised {type(error).__name__}: {error}')
      return {REWARD_ERROR: math.nan}
    if not all(math.isfinite(value) for value in components.values()):
      self._report(prompt, f'the reward is not finite: {components}')
    return components
