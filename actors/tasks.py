"""The registry of built-in tasks: task name -> task class and its config class."""
from chorus.actors import music
from chorus.actors import reverse_digits

TASKS = {reverse_digits.ReverseDigitsTask.name: (reverse_digits.ReverseDigitsTask,
                                                 reverse_digits.ReverseDigitsConfig),
         music.MusicTask.name: (music.MusicTask, music.MusicTaskConfig)}
TaskConfig = reverse_digits.ReverseDigitsConfig | music.MusicTaskConfig


def config_class(name: str) -> type:
  """The options dataclass of the built-in task `name`."""
  if name not in TASKS:
    raise ValueError(f'Unknown task {name!r}; built-in tasks: {sorted(TASKS)}.')
  return TASKS[name][1]


def make_task(name: str, config=None):
  options = config or config_class(name)()
  return TASKS[name][0](options)
