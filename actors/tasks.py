"""Built-in text tasks: prompts, imperfect demonstrations and programmatic rewards."""
import dataclasses
import hashlib

import numpy as np

from chorus import models


@dataclasses.dataclass(frozen=True)
class Prompt:
  prompt_id: str
  text: str
  answer: str


@dataclasses.dataclass(frozen=True)
class ReverseDigitsConfig:
  """Reverse a string of digits: "rev 3141>" -> "1413".

  The twist: demonstrations come from a sloppy annotator who swaps two neighbouring
  digits in `demo_error_rate` of the answers. Supervised learning imitates the mistakes,
  the reward (positional accuracy) does not, so RL has room to improve on imitation.

  Attributes:
    min_digits: shortest digit string.
    max_digits: longest digit string.
    demo_error_rate: fraction of demonstrations with two neighbouring digits swapped.
    eval_fraction: share of all digit strings held out for evaluation (by hash).
    num_eval_prompts: size of the fixed held-out evaluation set.
  """
  min_digits: int = 3
  max_digits: int = 7
  demo_error_rate: float = 0.5
  eval_fraction: float = 0.1
  num_eval_prompts: int = 256

  def __post_init__(self):
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f'Need 1 <= min_digits <= max_digits, got {self.min_digits}, '
                       f'{self.max_digits}.')
    if not 0 <= self.demo_error_rate <= 1:
      raise ValueError(f'demo_error_rate must be in [0, 1], got {self.demo_error_rate}.')


class ReverseDigitsTask:
  """Prompts, demonstrations and rewards of the digit-reversal task.

  Rewards are in [0, 1]: the fraction of positions where the completion matches the
  answer, over the longer of the two (so missing or extra digits cost too).
  """
  name = 'reverse_digits'

  def __init__(self, config: ReverseDigitsConfig = ReverseDigitsConfig()):
    self.config = config
    self.tokenizer = models.CharTokenizer()

  @property
  def max_prompt_tokens(self) -> int:
    return len(self.encode_prompt(self._make_prompt('0' * self.config.max_digits)))

  @property
  def max_answer_tokens(self) -> int:
    return self.config.max_digits + 1  # Digits and EOS.

  def _make_prompt(self, digits: str) -> Prompt:
    return Prompt(prompt_id=digits, text=f'rev {digits}>', answer=digits[::-1])

  def _is_eval(self, digits: str) -> bool:
    bucket = int.from_bytes(hashlib.sha256(digits.encode()).digest()[:4], 'little')
    return bucket / 2**32 < self.config.eval_fraction

  def _random_digits(self, rng: np.random.Generator) -> str:
    length = int(rng.integers(self.config.min_digits, self.config.max_digits + 1))
    return ''.join(str(d) for d in rng.integers(0, 10, length))

  def train_prompt(self, rng: np.random.Generator) -> Prompt:
    """A random training prompt; never one of the held-out evaluation strings."""
    while True:
      digits = self._random_digits(rng)
      if not self._is_eval(digits):
        return self._make_prompt(digits)

  def eval_prompts(self) -> list[Prompt]:
    """The fixed held-out evaluation set (the same in every process and run)."""
    rng = np.random.default_rng(12345)
    prompts, seen = [], set()
    while len(prompts) < self.config.num_eval_prompts:
      digits = self._random_digits(rng)
      if self._is_eval(digits) and digits not in seen:
        seen.add(digits)
        prompts.append(self._make_prompt(digits))
    return prompts

  def demonstration(self, prompt: Prompt, rng: np.random.Generator) -> str:
    """The sloppy annotator's answer."""
    answer = list(prompt.answer)
    if len(answer) > 1 and rng.random() < self.config.demo_error_rate:
      i = int(rng.integers(0, len(answer) - 1))
      answer[i], answer[i + 1] = answer[i + 1], answer[i]
    return ''.join(answer)

  def encode_prompt(self, prompt: Prompt) -> list[int]:
    return [models.BOS_ID] + self.tokenizer.encode(prompt.text)

  def encode_completion(self, text: str) -> list[int]:
    return self.tokenizer.encode(text) + [models.EOS_ID]

  def reward_components(self, prompt: Prompt, completion_tokens) -> dict[str, float]:
    """Every term of the reward by name; episode logs record them all."""
    completion = self.tokenizer.decode(completion_tokens)
    answer = prompt.answer
    matches = sum(a == b for a, b in zip(completion, answer))
    return {'positional_accuracy': matches / max(len(completion), len(answer))}

  def reward(self, prompt: Prompt, completion_tokens) -> float:
    """The total reward: the sum of `reward_components`."""
    return sum(self.reward_components(prompt, completion_tokens).values())


TASKS = {ReverseDigitsTask.name: (ReverseDigitsTask, ReverseDigitsConfig)}


def make_task(name: str, config=None):
  if name not in TASKS:
    raise ValueError(f'Unknown task {name!r}; built-in tasks: {sorted(TASKS)}.')
  task_class, config_class = TASKS[name]
  return task_class(config or config_class())
