"""The actor loop: prompts -> inference server -> rewards -> replay and RLDS."""
from collections.abc import Callable
import dataclasses
import logging
import math
import time

import numpy as np

from chorus import core
from chorus.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class ActorConfig:
  """How actors act.

  Attributes:
    prompts_per_request: prompts sent in one Generate call (amortises the round trip).
    temperature: sampling temperature of the behaviour policy.
    max_new_tokens: completion cap per request; 0 uses the inference server's limit.
    model: served model name to sample from.
    log_every_s: seconds between an actor's metrics lines.
  """
  prompts_per_request: int = 4
  temperature: float = 1.0
  max_new_tokens: int = 0
  model: str = 'policy'
  log_every_s: float = 5.0

  def __post_init__(self):
    core.check_ranges(self, 'actor', prompts_per_request=(1, None), max_new_tokens=(0, None),
                      log_every_s=(0, None))
    error = core.temperature_error(self.temperature)
    if error:
      raise ValueError(f'actor.{error}')


class Actor:
  """Generates episodes of one task and hands each to replay and the episode log.

  Collaborators are passed in (Acme style), so the loop knows no addresses:
    rollout: prompts -> list of rollouts.Sample (the agent's, see agents/).
    write_replay: TrajectoryWriter.write(trajectories, should_stop) -> stored or not.
    log_episode: EpisodeLogger.write(trajectory).
  """

  def __init__(self, actor_id: int, config: ActorConfig, task, *, rollout: Callable,
               write_replay: Callable, log_episode: Callable, metrics: MetricsWriter | None,
               seed: int):
    self.actor_id = actor_id
    self.config = config
    self.task = task
    self._rollout = rollout
    self._write_replay = write_replay
    self._log_episode = log_episode
    self._metrics = metrics
    self._seed = seed
    self._rng = np.random.default_rng([seed, actor_id])
    self.episodes = 0
    self.generated_tokens = 0
    self.skipped_episodes = 0  # Non-finite rewards or log-probs: neither replayed nor recorded.
    self.digest = core.TrajectoryDigest()

  def run_once(self, should_stop: Callable[[], bool] = lambda: False) -> list[core.Trajectory]:
    """One request's worth of episodes: all logged, then offered to replay together."""
    prompts = [self.task.train_prompt(self._rng) for _ in range(self.config.prompts_per_request)]
    trajectories = []
    for sample in self._rollout(prompts):
      prompt, completion = sample.prompt, sample.completion
      reason = _non_finite(sample)
      if reason:
        # Never trained on nor recorded; a failed user reward was logged by GuardedTask.
        self.skipped_episodes += 1
        logging.warning('Actor %d dropped an episode of prompt %r (param version %d): %s; it '
                        'goes neither to replay nor to RLDS (%d dropped so far).',
                        self.actor_id, prompt.prompt_id, sample.param_version, reason,
                        self.skipped_episodes)
        continue
      trajectory = core.Trajectory(
          prompt_tokens=np.asarray(self.task.encode_prompt(prompt), np.int32),
          completion_tokens=completion.tokens, behaviour_logprobs=completion.logprobs,
          # What task.reward returns, without scoring the completion a second time.
          reward=sum(sample.reward_components.values()),
          terminated=completion.terminated or self.task.ends_at_length_cap,
          param_version=sample.param_version, temperature=self.config.temperature,
          model_name=self.config.model, prompt_id=prompt.prompt_id, actor_id=self.actor_id,
          episode_id=self.episodes, task=self.task.name, seed=self._seed,
          reward_components=sample.reward_components, extras=sample.extras)
      # The episode log comes first: an episode generated is an episode recorded, even
      # when the actor is stopped (or killed) while replay makes it wait.
      self._log_episode(trajectory)
      self.digest.update(trajectory)
      self.episodes += 1
      self.generated_tokens += len(completion.tokens)
      trajectories.append(trajectory)
    if trajectories:
      self._write_replay(trajectories, should_stop)
    return trajectories

  def run(self, should_stop: Callable[[], bool], max_episodes: int | None = None):
    """Acts until `should_stop()` (or `max_episodes`), writing metrics every few seconds."""
    last_log, rewards = time.monotonic(), []
    episodes_at_log, tokens_at_log = 0, 0
    while not should_stop() and (max_episodes is None or self.episodes < max_episodes):
      rewards.extend(t.reward for t in self.run_once(should_stop))
      now = time.monotonic()
      if self._metrics and now - last_log >= self.config.log_every_s:
        elapsed = now - last_log
        self._metrics.write(
            kind='actor', episodes=self.episodes, generated_tokens=self.generated_tokens,
            episodes_per_second=(self.episodes - episodes_at_log) / elapsed,
            tokens_per_second=(self.generated_tokens - tokens_at_log) / elapsed,
            mean_reward=float(np.mean(rewards)) if rewards else None,
            skipped_episodes=self.skipped_episodes)
        last_log, rewards = now, []
        episodes_at_log, tokens_at_log = self.episodes, self.generated_tokens
    if self._metrics:
      self._metrics.write(kind='actor_final', episodes=self.episodes,
                          generated_tokens=self.generated_tokens,
                          skipped_episodes=self.skipped_episodes,
                          episode_digest=self.digest.hexdigest())


def _non_finite(sample) -> str | None:
  """Why a rollout sample cannot train (a NaN or infinite reward, behaviour log-prob or
  float extra); None if it can."""
  for name, value in sample.reward_components.items():
    if not math.isfinite(float(value)):
      return f'reward component {name!r} is {value}'
  logprobs = np.asarray(sample.completion.logprobs, np.float64)
  if not np.isfinite(logprobs).all():
    return f'{int((~np.isfinite(logprobs)).sum())} behaviour log-probs are not finite'
  for name, value in sample.extras.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
      return f'{name} is not finite (a reward it was computed from failed)'
  return None
