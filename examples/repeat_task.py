"""A complete task of one's own: repeat a letter n times ("repeat k 3>" -> "kkk").

    chorus run --config text_vtrace --task examples/repeat_task.py:RepeatTask

A task is any class with the members of chorus.core.Task: its name and tokenizer, training
prompts, a fixed held-out set, prompts rebuilt from their ids, token encodings,
demonstrations for the warm start (or None) and the reward's components. Chorus imports it
by path in every process, so it needs nothing but this file.
"""
import hashlib
import string

import numpy as np

from chorus import core
from chorus import models


class RepeatTask:
  """Prompts 'repeat L N>' for a letter L and 1 <= N <= 8; the answer is L written N times."""
  name = 'repeat_letter'
  # The reward scores a completion cut by the cap as it is: the cap ends the episode.
  ends_at_length_cap = True
  max_count = 8

  def __init__(self, tokenizer: core.Tokenizer | None = None):
    # The built-in character tokenizer, unless a pretrained model brings its own.
    self.tokenizer = models.CharTokenizer() if tokenizer is None else tokenizer
    ids = [f'{letter}{count}' for letter in string.ascii_lowercase
           for count in range(1, self.max_count + 1)]
    # One prompt in ten held out, chosen by a hash: the same in every process and run.
    held_out = lambda i: hashlib.sha256(i.encode()).digest()[0] < 26
    self._eval_ids = [i for i in ids if held_out(i)]
    self._train_ids = [i for i in ids if not held_out(i)]

  def prompt_from_id(self, prompt_id: str) -> core.Prompt:
    letter, count = prompt_id[0], int(prompt_id[1:])
    return core.Prompt(prompt_id, f'repeat {letter} {count}>', letter * count)

  def train_prompt(self, rng: np.random.Generator) -> core.Prompt:
    return self.prompt_from_id(self._train_ids[int(rng.integers(len(self._train_ids)))])

  def eval_prompts(self) -> list[core.Prompt]:
    return [self.prompt_from_id(i) for i in self._eval_ids]

  def encode_prompt(self, prompt: core.Prompt) -> list[int]:
    return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt.text)

  def demonstration(self, prompt: core.Prompt, rng: np.random.Generator) -> list[int] | None:
    del rng  # Demonstrations are exact here; return None for prompts that have none.
    return self.tokenizer.encode(prompt.answer) + [self.tokenizer.eos_id]

  def demonstration_prompt_tokens(self, prompt: core.Prompt,
                                  rng: np.random.Generator) -> list[int]:
    del rng
    return self.encode_prompt(prompt)

  def reward_components(self, prompt: core.Prompt, completion_tokens) -> dict[str, float]:
    """Right letters, and the right length: each in [0, 0.5]; the reward is their sum."""
    completion = self.tokenizer.decode(completion_tokens)
    letter, count = prompt.answer[0], len(prompt.answer)
    right_letters = sum(char == letter for char in completion[:count]) / count
    length_error = abs(len(completion) - count) / max(len(completion), count)
    return {'letters': 0.5 * right_letters, 'length': 0.5 * (1 - length_error)}
