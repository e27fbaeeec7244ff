"""Users' own data: prompts from a file, scored by a reward function of their own.

    chorus run --config text_vtrace --prompts prompts.jsonl --reward my_rewards.py:score

Each row of the file has a `prompt`, optionally a `completion` (a demonstration for the
warm start; rows without one are for RL only) and any other fields, which the reward
function receives as `row`. The reward function is

    def score(prompt: str, completion: str, row: dict) -> float | dict[str, float]

(a dict gives the reward's named components; the reward is their sum).
"""
import csv
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from chorus import core
from chorus import models
from chorus import plugins
from chorus.core import Prompt

FORMATS = ('.jsonl', '.json', '.csv', '.parquet')


def _absolute_reference(reference: str) -> str:
  """'MODULE:NAME' with a .py path made absolute (nodes may start elsewhere)."""
  module, separator, name = reference.rpartition(':')
  if separator and (module.endswith('.py') or os.sep in module):
    return f'{os.path.abspath(module)}:{name}'
  return reference


@dataclasses.dataclass(frozen=True)
class PromptFileConfig(core.TaskConfig, tag='prompt_file'):
  """Prompts from a JSON-lines, CSV or Parquet file, scored by a user's reward function.

  Attributes:
    path: the prompt file (.jsonl, .csv; .parquet needs pyarrow), one row per prompt with
      a `prompt` field, an optional `completion` (a demonstration) and any other fields.
      Stored as an absolute path.
    reward: 'MODULE:FUNCTION' (MODULE importable or a path to a .py file), called as
      FUNCTION(prompt, completion, row) -> float or dict of named float components.
    eval_fraction: share of the rows held out for evaluation (at least one row when > 0 and
      the file has two or more); the split is by a hash of each row's id, the same in
      every process and run.
    name: the task name recorded in every episode ('' uses the file's name).
  """
  path: str = ''
  reward: str = ''
  eval_fraction: float = 0.1
  name: str = ''

  def __post_init__(self):
    if not 0 <= self.eval_fraction < 1:
      raise ValueError(f'task.eval_fraction must be in [0, 1); got {self.eval_fraction}.')
    if self.path:
      object.__setattr__(self, 'path', os.path.abspath(self.path))
    if self.reward:
      object.__setattr__(self, 'reward', _absolute_reference(self.reward))


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a prompt file as dicts; ValueError naming the first bad row."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Prompt file {path} does not exist.')
  extension = os.path.splitext(path)[1].lower()
  if extension in ('.jsonl', '.json'):
    rows = []
    with open(path, encoding='utf-8') as file:
      for number, line in enumerate(file, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as error:
            raise ValueError(f'{path}:{number}: not a JSON object ({error}).') from None
  elif extension == '.csv':
    with open(path, encoding='utf-8', newline='') as file:
      rows = list(csv.DictReader(file))
  elif extension == '.parquet':
    try:
      import pyarrow.parquet  # pylint: disable=g-import-not-at-top  (optional dependency)
    except ImportError:
      raise ValueError(f'{path}: reading Parquet needs pyarrow (pip install pyarrow); '
                       'or give the prompts as .jsonl or .csv.') from None
    rows = pyarrow.parquet.read_table(path).to_pylist()
  else:
    raise ValueError(f'{path}: unknown prompt file type {extension!r}; use one of {FORMATS}.')
  for number, row in enumerate(rows, 1):
    if not isinstance(row, dict) or not isinstance(row.get('prompt'), str) or not row['prompt']:
      raise ValueError(f'{path}: row {number} has no "prompt" text; every row needs one.')
  if not rows:
    raise ValueError(f'{path} has no rows.')
  return rows


def reward_components_of(value, reference: str) -> dict[str, float]:
  """A reward function's result as named components (a float is {'reward': value})."""
  if isinstance(value, dict):
    return {str(name): float(term) for name, term in value.items()}
  if isinstance(value, (int, float, np.number)):
    return {'reward': float(value)}
  raise TypeError(f'{reference} returned {type(value).__name__}; return a float or a dict of '
                  'named floats.')


def _bucket(prompt_id: str) -> float:
  return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], 'little') / 2**64


class PromptFileTask:
  """The prompts of a file; rewards from the user's function (see PromptFileConfig)."""
  # The user's reward scores a completion cut by the cap as it is: the cap ends the episode.
  ends_at_length_cap = True

  def __init__(self, config: PromptFileConfig, tokenizer: core.Tokenizer | None = None):
    if not config.path or not config.reward:
      raise ValueError('A prompt-file task needs both a file and a reward function: '
                       '--prompts FILE --reward MODULE:FUNCTION.')
    self.config = config
    self.name = config.name or os.path.splitext(os.path.basename(config.path))[0]
    self.tokenizer = models.CharTokenizer() if tokenizer is None else tokenizer
    self._reward_fn: Callable = plugins.import_object(config.reward)
    if not callable(self._reward_fn):
      raise ValueError(f'{config.reward} is not a function.')
    self._rows: dict[str, dict] = {}
    self._prompts: dict[str, Prompt] = {}
    for index, row in enumerate(read_rows(config.path)):
      prompt_id = str(row.get('id', index))
      if prompt_id in self._prompts:
        raise ValueError(f'{config.path}: id {prompt_id!r} appears twice; ids must be unique.')
      self._rows[prompt_id] = row
      self._prompts[prompt_id] = Prompt(prompt_id, row['prompt'],
                                        str(row.get('completion') or ''))
      try:
        self.encode_prompt(self._prompts[prompt_id])
        self.tokenizer.encode(self._prompts[prompt_id].answer)
      except ValueError as error:
        raise ValueError(f'{config.path}: row {index + 1} cannot be encoded: {error} Give a '
                         'pretrained model (--set model.pretrained=DIR) for its tokenizer, '
                         'or keep to these characters.') from None
    ranked = sorted(self._prompts, key=_bucket)
    num_eval = math.ceil(config.eval_fraction * len(ranked)) if config.eval_fraction else 0
    num_eval = min(num_eval, len(ranked) - 1)
    self._eval_ids = ranked[:num_eval]
    held_out = set(self._eval_ids)
    self._train_ids = [i for i in self._prompts if i not in held_out]
    self.has_demonstrations = any(self._prompts[i].answer for i in self._train_ids)

  @property
  def max_prompt_tokens(self) -> int:
    return max(len(self.encode_prompt(p)) for p in self._prompts.values())

  def train_prompt(self, rng: np.random.Generator) -> Prompt:
    return self._prompts[self._train_ids[int(rng.integers(len(self._train_ids)))]]

  def eval_prompts(self) -> Sequence[Prompt]:
    return [self._prompts[i] for i in self._eval_ids]

  def prompt_from_id(self, prompt_id: str) -> Prompt:
    if prompt_id not in self._prompts:
      raise KeyError(f'{self.config.path} has no row with id {prompt_id!r}.')
    return self._prompts[prompt_id]

  def encode_prompt(self, prompt: Prompt) -> list[int]:
    return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt.text)

  def demonstration(self, prompt: Prompt, rng: np.random.Generator) -> list[int] | None:
    del rng
    if not prompt.answer:
      return None
    return self.tokenizer.encode(prompt.answer) + [self.tokenizer.eos_id]

  def demonstration_prompt_tokens(self, prompt: Prompt, rng: np.random.Generator) -> list[int]:
    del rng
    return self.encode_prompt(prompt)

  def reward_components(self, prompt: Prompt, completion_tokens) -> dict[str, float]:
    """The user's reward of the completion (decoded to text) with the prompt's row."""
    completion = self.tokenizer.decode(completion_tokens)
    row = dict(self._rows[prompt.prompt_id])
    return reward_components_of(self._reward_fn(prompt.text, completion, row),
                                self.config.reward)
