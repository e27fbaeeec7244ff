"""A task's demonstrations as trajectories: for the warm start and for recorded datasets."""
from collections.abc import Iterator

import numpy as np

from chorus import core
from chorus import schema


# A task with so few demonstrations is taken to have none.
_MAX_PROMPTS_WITHOUT_DEMONSTRATION = 10_000


def demonstrations(task: core.Task, seed: int, *, seed_offset: int = 7,
                   min_reward: float = -np.inf) -> Iterator[core.Trajectory]:
  """Endless Trajectory of the task's demonstrations (behaviour log-probs unknown: 0).

  Deterministic given (seed, seed_offset). Prompts without a demonstration
  (`task.demonstration` returns None) are skipped, and so are demonstrations whose task
  reward is below `min_reward` (rejection sampling of the demonstrator).
  """
  rng = np.random.default_rng([seed, seed_offset])
  episode_id, misses = 0, 0
  while True:
    prompt = task.train_prompt(rng)
    completion = task.demonstration(prompt, rng)
    components = None if completion is None else task.reward_components(prompt, completion)
    if components is None or sum(components.values()) < min_reward:
      misses += 1
      if misses >= _MAX_PROMPTS_WITHOUT_DEMONSTRATION:
        raise ValueError(
            f'Task {task.name!r} gave no demonstration with reward >= {min_reward} for '
            f'{misses} prompts in a row; lower that threshold, or give the task '
            '`has_demonstrations = False` (the warm start is then skipped) or set '
            'warm_start.steps=0.')
      continue
    misses = 0
    yield core.Trajectory(
        prompt_tokens=np.asarray(task.demonstration_prompt_tokens(prompt, rng), np.int32),
        completion_tokens=np.asarray(completion, np.int32),
        behaviour_logprobs=np.zeros(len(completion), np.float32),
        reward=float(sum(components.values())), terminated=True, param_version=0,
        temperature=0.0, model_name='demonstrator', prompt_id=prompt.prompt_id,
        episode_id=episode_id, task=task.name, seed=seed, reward_components=components)
    episode_id += 1


def demonstration_batches(task: core.Task, seed: int, batch_size: int,
                          spec: core.SequenceSpec, *, min_reward: float = -np.inf
                          ) -> Iterator[core.TrajectoryBatch]:
  """Endless TrajectoryBatch of the task's demonstrations with reward >= `min_reward`
  (core fields only)."""
  source = demonstrations(task, seed, min_reward=min_reward)
  while True:
    yield schema.CORE_SCHEMA.batch_trajectories([next(source) for _ in range(batch_size)], spec)


def off_policy_batch(task: core.Task, rng: np.random.Generator, batch_size: int,
                     spec: core.SequenceSpec) -> core.TrajectoryBatch:
  """A batch of demonstrations posing as off-policy samples: random behaviour log-probs
  and random rewards in [0, 1), so every term of a policy-gradient loss has a gradient.
  For tests and benchmarks of learner updates (sharding, several processes, step time)."""
  trajectories = []
  for _ in range(batch_size):
    prompt = task.train_prompt(rng)
    completion = task.demonstration(prompt, rng)
    trajectories.append(core.Trajectory(
        prompt_tokens=np.asarray(task.encode_prompt(prompt), np.int32),
        completion_tokens=np.asarray(completion, np.int32),
        behaviour_logprobs=-rng.exponential(size=len(completion)).astype(np.float32),
        reward=float(rng.random()), terminated=True, param_version=0))
  return schema.CORE_SCHEMA.batch_trajectories(trajectories, spec)
