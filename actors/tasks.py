"""The registry of tasks: each task config's tag -> the task class (or factory) it configures.

Built in: reverse_digits and music; users' data through prompt_file (a prompt file and a
reward function) and users' own classes through user_task (`--task MODULE:CLASS`).
"""
import inspect

from chorus import core
from chorus.actors import music
from chorus.actors import prompt_file
from chorus.actors import reverse_digits
from chorus.actors import user_task
from chorus.actors.reward_guard import GuardedTask

TASK_CLASSES = {reverse_digits.ReverseDigitsConfig.tag: reverse_digits.ReverseDigitsTask,
                music.MusicTaskConfig.tag: music.MusicTask,
                prompt_file.PromptFileConfig.tag: prompt_file.PromptFileTask,
                user_task.UserTaskConfig.tag: user_task.make_user_task}
# Tasks that work with their default config (the others need a user's file or class).
BUILT_IN_TASKS = (reverse_digits.ReverseDigitsConfig.tag, music.MusicTaskConfig.tag)


def make_task(config: core.TaskConfig, tokenizer: core.Tokenizer | None = None, *,
              guarded: bool = True) -> core.Task:
  """The task that `config` configures (any registered TaskConfig).

  Args:
    config: the task's config.
    tokenizer: the policy's tokenizer (a pretrained model's), passed to the task class as
      `tokenizer=`; None: the task's own.
    guarded: wrap it in a GuardedTask, whose rewards never raise (failures are logged
      and come back as NaN, for actors to drop).
  """
  if config.tag not in TASK_CLASSES:
    raise ValueError(f'No task class for task config {type(config).__name__} (tag '
                     f'{config.tag!r}); known tags: {sorted(TASK_CLASSES)}.')
  task_class = TASK_CLASSES[config.tag]
  if tokenizer is None:
    task = task_class(config)
  elif 'tokenizer' not in inspect.signature(task_class).parameters:
    raise ValueError(
        f'Task {config.tag!r} ({task_class.__name__}) encodes with its own vocabulary and '
        'takes no tokenizer, so it cannot train a pretrained text checkpoint '
        '(model.pretrained); leave model.pretrained empty for it.')
  else:
    task = task_class(config, tokenizer=tokenizer)
  return GuardedTask(task) if guarded else task
