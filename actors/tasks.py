"""The registry of built-in tasks: each task config's tag -> the task class it configures."""
import inspect

from chorus import core
from chorus.actors import music
from chorus.actors import reverse_digits

TASK_CLASSES = {reverse_digits.ReverseDigitsConfig.tag: reverse_digits.ReverseDigitsTask,
                music.MusicTaskConfig.tag: music.MusicTask}


def make_task(config: core.TaskConfig, tokenizer: core.Tokenizer | None = None) -> core.Task:
  """The task that `config` configures (any registered TaskConfig).

  Args:
    config: the task's config.
    tokenizer: the policy's tokenizer (a pretrained model's), passed to the task class as
      `tokenizer=`; None: the task's own.
  """
  if config.tag not in TASK_CLASSES:
    raise ValueError(f'No task class for task config {type(config).__name__} (tag '
                     f'{config.tag!r}); known tags: {sorted(TASK_CLASSES)}.')
  task_class = TASK_CLASSES[config.tag]
  if tokenizer is None:
    return task_class(config)
  if 'tokenizer' not in inspect.signature(task_class).parameters:
    raise ValueError(
        f'Task {config.tag!r} ({task_class.__name__}) encodes with its own vocabulary and '
        'takes no tokenizer, so it cannot train a pretrained text checkpoint '
        '(model.pretrained); leave model.pretrained empty for it.')
  return task_class(config, tokenizer=tokenizer)
