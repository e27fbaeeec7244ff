"""The registry of built-in tasks: each task config's tag -> the task class it configures."""
from chorus import core
from chorus.actors import music
from chorus.actors import reverse_digits

TASK_CLASSES = {reverse_digits.ReverseDigitsConfig.tag: reverse_digits.ReverseDigitsTask,
                music.MusicTaskConfig.tag: music.MusicTask}


def make_task(config: core.TaskConfig) -> core.Task:
  """The task that `config` configures (any registered TaskConfig)."""
  if config.tag not in TASK_CLASSES:
    raise ValueError(f'No task class for task config {type(config).__name__} (tag '
                     f'{config.tag!r}); known tags: {sorted(TASK_CLASSES)}.')
  return TASK_CLASSES[config.tag](config)
