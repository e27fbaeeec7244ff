"""Tests for the task registry: every built-in task implements the `core.Task` protocol."""

import numpy as np
import pytest

from chorus import core
from chorus.actors import tasks


@pytest.mark.parametrize('tag', sorted(tasks.BUILT_IN_TASKS))
def test_built_in_task_implements_the_task_protocol_and_its_reward(tag):
  task = tasks.make_task(core.TaskConfig.by_tag(tag)())
  assert isinstance(task, core.Task)
  assert isinstance(task.tokenizer, core.Tokenizer)
  assert task.name == tag
  rng = np.random.default_rng(0)
  for prompt in [task.train_prompt(rng), *task.eval_prompts()[:2]]:
    assert task.prompt_from_id(prompt.prompt_id) == prompt
    demonstration = task.demonstration(prompt, rng)
    # Random tokens too, so the rewards compared are not all those of good answers.
    noise = rng.integers(0, task.tokenizer.vocab_size, len(demonstration)).tolist()
    for completion in (demonstration, noise):
      assert core.task_reward(task, prompt, completion) == task.reward(prompt, completion)
