"""Users' own Task classes by reference: `chorus run --task my_task.py:MyTask`."""
import dataclasses
import inspect
import os

from chorus import core
from chorus import plugins

_MEMBERS = ('name', 'tokenizer', 'ends_at_length_cap', 'train_prompt', 'eval_prompts',
            'prompt_from_id', 'encode_prompt', 'demonstration', 'demonstration_prompt_tokens',
            'reward_components')


@dataclasses.dataclass(frozen=True)
class UserTaskConfig(core.TaskConfig, tag='user_task'):
  """A task class of the user's, implementing chorus.core.Task.

  Attributes:
    cls: 'MODULE:CLASS' (MODULE importable or a path to a .py file, stored absolute),
      imported in every process. The class is called with no arguments, or with
      `tokenizer=` (the pretrained model's) when it takes one and model.pretrained is set.
  """
  cls: str = ''

  def __post_init__(self):
    module, separator, name = self.cls.rpartition(':')
    if separator and (module.endswith('.py') or os.sep in module):
      object.__setattr__(self, 'cls', f'{os.path.abspath(module)}:{name}')


def make_user_task(config: UserTaskConfig, tokenizer: core.Tokenizer | None = None) -> core.Task:
  """An instance of the user's class; ValueError naming what it lacks of the Task protocol."""
  if not config.cls:
    raise ValueError('A user task needs its class: --task MODULE:CLASS.')
  task_class = plugins.import_object(config.cls)
  if not inspect.isclass(task_class):
    raise ValueError(f'{config.cls} is a {type(task_class).__name__}, not a class; --task '
                     'names a class implementing chorus.core.Task.')
  takes_tokenizer = 'tokenizer' in inspect.signature(task_class).parameters
  if tokenizer is not None and not takes_tokenizer:
    raise ValueError(f'{config.cls} takes no tokenizer, so it cannot train a pretrained '
                     'checkpoint (model.pretrained); give its __init__ a `tokenizer` argument.')
  try:
    task = task_class(tokenizer=tokenizer) if tokenizer is not None else task_class()
  except TypeError as error:
    raise ValueError(f'{config.cls}() failed: {error}. The class is called with no arguments '
                     '(or with tokenizer= only).') from None
  missing = [name for name in _MEMBERS if not hasattr(task, name)]
  if missing:
    raise ValueError(f'{config.cls} does not implement the Task protocol (chorus.core.Task): '
                     f'it lacks {missing}.')
  return task
