"""Built-in text task: reverse digits, with sloppy demonstrations and noisy preferences."""
import dataclasses
import hashlib

import numpy as np

from chorus import models
from chorus import core
from chorus.core import Prompt


@dataclasses.dataclass(frozen=True)
class ReverseDigitsConfig(core.TaskConfig, tag='reverse_digits'):
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
    preference_noise_temperature: noise of the annotator who labels preference pairs
      (`preference_pair`): it prefers completion a over b with probability
      sigmoid((r_a - r_b) / temperature), r the task reward (positional accuracy, in
      [0, 1]). 0 is a perfect annotator (ties are a coin flip); at 0.1 a one-digit
      difference in a 5-digit answer (0.2 reward) is labelled right 88% of the time;
      large values make labels coin flips.
  """
  min_digits: int = 3
  max_digits: int = 7
  demo_error_rate: float = 0.5
  eval_fraction: float = 0.1
  num_eval_prompts: int = 256
  preference_noise_temperature: float = 0.1

  def __post_init__(self):
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f'Need 1 <= min_digits <= max_digits, got {self.min_digits}, '
                       f'{self.max_digits}.')
    if not 0 <= self.demo_error_rate <= 1:
      raise ValueError(f'demo_error_rate must be in [0, 1], got {self.demo_error_rate}.')
    if not self.preference_noise_temperature >= 0:
      raise ValueError(
          'preference_noise_temperature must be >= 0 (0 is a noiseless annotator); got '
          f'{self.preference_noise_temperature}.')


class ReverseDigitsTask:
  """Prompts, demonstrations and rewards of the digit-reversal task.

  Rewards are in [0, 1]: the fraction of positions where the completion matches the
  answer, over the longer of the two (so missing or extra digits cost too).
  """
  name = 'reverse_digits'
  # The reward scores a completion cut by the cap as it is: the cap ends the episode.
  ends_at_length_cap = True
  # Kinds of sloppy answers in preference pairs (see `corrupted_answer`).
  corruptions = ('swap', 'drop', 'extra', 'substitute', 'random')

  def __init__(self, config: ReverseDigitsConfig = ReverseDigitsConfig(),
               tokenizer: core.Tokenizer | None = None):
    """A task encoding with `tokenizer` (the policy's; default: a CharTokenizer)."""
    self.config = config
    self.tokenizer = models.CharTokenizer() if tokenizer is None else tokenizer

  @property
  def max_prompt_tokens(self) -> int:
    return len(self.encode_prompt(self.prompt_from_id('0' * self.config.max_digits)))

  @property
  def max_answer_tokens(self) -> int:
    """Tokens of a longest answer and EOS (exact for tokenizers that split digits, as the
    CharTokenizer and Gemma's do)."""
    return len(self.encode_completion('0' * self.config.max_digits))

  def prompt_from_id(self, digits: str) -> Prompt:
    """The prompt whose prompt_id is `digits` (as episode logs record it)."""
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
        return self.prompt_from_id(digits)

  def eval_prompts(self) -> list[Prompt]:
    """The fixed held-out evaluation set (the same in every process and run)."""
    rng = np.random.default_rng(12345)
    prompts, seen = [], set()
    while len(prompts) < self.config.num_eval_prompts:
      digits = self._random_digits(rng)
      if self._is_eval(digits) and digits not in seen:
        seen.add(digits)
        prompts.append(self.prompt_from_id(digits))
    return prompts

  def demonstration(self, prompt: Prompt, rng: np.random.Generator) -> list[int]:
    """The sloppy annotator's answer as completion tokens (EOS last)."""
    return self.encode_completion(self.demonstration_text(prompt, rng))

  def demonstration_text(self, prompt: Prompt, rng: np.random.Generator) -> str:
    """The sloppy annotator's answer."""
    answer = list(prompt.answer)
    if len(answer) > 1 and rng.random() < self.config.demo_error_rate:
      i = int(rng.integers(0, len(answer) - 1))
      answer[i], answer[i + 1] = answer[i + 1], answer[i]
    return ''.join(answer)

  def demonstration_prompt_tokens(self, prompt: Prompt, rng: np.random.Generator) -> list[int]:
    """The prompt tokens a demonstration of `prompt` is trained with (the prompt itself)."""
    del rng  # Music tasks drop the caption at random here; text prompts stay as they are.
    return self.encode_prompt(prompt)

  def encode_prompt(self, prompt: Prompt) -> list[int]:
    return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt.text)

  def encode_completion(self, text: str) -> list[int]:
    return self.tokenizer.encode(text) + [self.tokenizer.eos_id]

  def reward_components(self, prompt: Prompt, completion_tokens) -> dict[str, float]:
    """Every term of the reward by name; episode logs record them all."""
    completion = self.tokenizer.decode(completion_tokens)
    answer = prompt.answer
    matches = sum(a == b for a, b in zip(completion, answer))
    return {'positional_accuracy': matches / max(len(completion), len(answer))}

  def reward(self, prompt: Prompt, completion_tokens) -> float:
    """The total reward: the sum of `reward_components`."""
    return sum(self.reward_components(prompt, completion_tokens).values())

  @property
  def max_preference_completion_tokens(self) -> int:
    """Longest encoded candidate of `preference_pair` (an extra digit, then EOS)."""
    return len(self.encode_completion('0' * (self.config.max_digits + 1)))

  def corrupted_answer(self, prompt: Prompt, kind: str, rng: np.random.Generator) -> str:
    """A candidate answer of one kind from `CORRUPTIONS`.

    'correct' is the answer; 'swap' swaps two neighbouring digits; 'drop' deletes a
    digit; 'extra' inserts a random digit; 'substitute' changes one digit; 'random' is
    random digits of the answer's length. Each corruption really changes the answer
    (where the answer is long enough), so only 'correct' earns reward 1.
    """
    answer = list(prompt.answer)
    if kind == 'correct':
      pass
    elif kind == 'swap':
      neighbours = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
      if neighbours:
        i = neighbours[int(rng.integers(len(neighbours)))]
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
    elif kind == 'drop':
      del answer[int(rng.integers(len(answer)))]
    elif kind == 'extra':
      answer.insert(int(rng.integers(len(answer) + 1)), str(int(rng.integers(10))))
    elif kind == 'substitute':
      i = int(rng.integers(len(answer)))
      answer[i] = str((int(answer[i]) + int(rng.integers(1, 10))) % 10)
    elif kind == 'random':
      answer = [str(d) for d in rng.integers(0, 10, len(answer))]
    else:
      raise ValueError(f'Unknown corruption {kind!r}; choose one of {CORRUPTIONS}.')
    return ''.join(answer)

  def text_reward(self, prompt: Prompt, completion: str) -> float:
    """`reward` of a completion given as text (EOS appended)."""
    return self.reward(prompt, self.encode_completion(completion))

  def annotator_prefers_first(self, prompt: Prompt, first: str, second: str,
                              rng: np.random.Generator) -> bool:
    """The noisy annotator's label: True with probability sigmoid((r_1 - r_2) / temperature).

    r is `text_reward`, the temperature `config.preference_noise_temperature`; at
    temperature 0 the higher reward always wins and ties are a fair coin.
    """
    margin = self.text_reward(prompt, first) - self.text_reward(prompt, second)
    temperature = self.config.preference_noise_temperature
    if temperature == 0:
      probability = 0.5 if margin == 0 else float(margin > 0)
    else:
      probability = 1.0 / (1.0 + np.exp(-margin / temperature))
    return bool(rng.random() < probability)

  def preference_pair(self, rng: np.random.Generator,
                      prompt: Prompt | None = None) -> tuple[Prompt, str, str, bool]:
    """A labelled comparison, as a preference dataset would hold it.

    Two different candidates for one training prompt, each the answer or one of its
    sloppy corruptions (kinds drawn uniformly from `CORRUPTIONS`), labelled by the
    noisy annotator (`annotator_prefers_first`). Deterministic given `rng`.

    Args:
      rng: the only source of randomness.
      prompt: compare answers to this prompt instead of a random training prompt (e.g.
        held-out `eval_prompts()` to measure a model).

    Returns:
      (prompt, completion_a, completion_b, a_preferred), completions as text without EOS.
    """
    if prompt is None:
      prompt = self.train_prompt(rng)
    kinds = rng.choice(len(CORRUPTIONS), size=2, replace=False)
    first = self.corrupted_answer(prompt, CORRUPTIONS[kinds[0]], rng)
    second = self.corrupted_answer(prompt, CORRUPTIONS[kinds[1]], rng)
    for _ in range(8):  # Two kinds can still give the same text (e.g. a lucky 'random').
      if first != second:
        break
      second = self.corrupted_answer(prompt, 'random', rng)
    return prompt, first, second, self.annotator_prefers_first(prompt, first, second, rng)


# The candidates of preference pairs: the answer and its sloppy variants (`corrupted_answer`).
CORRUPTIONS = ('correct',) + ReverseDigitsTask.corruptions
