"""Small types shared by every role: sequence lengths, tasks, and what an actor sends to
replay and RLDS.

Roles import this module and `models/`, never each other's internals.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
import json
import math
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import numpy as np


# Sampling settings every door accepts (configs, the inference server's Generate and Score):
# far outside them the softmax under- or overflows (1e-40 gave padding and NaN log-probs).
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2
MAX_GUIDANCE_SCALE = 1e2


def temperature_error(temperature: float) -> str | None:
  """Why `temperature` is not a sampling temperature a server accepts; None if it is."""
  # The slack lets the bounds themselves through after a float32 trip over gRPC.
  if not (math.isfinite(temperature)
          and MIN_TEMPERATURE * (1 - 1e-6) <= temperature <= MAX_TEMPERATURE * (1 + 1e-6)):
    return (f'temperature must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], '
            f'got {temperature}.')
  return None


def check_ranges(config, section: str, **ranges: tuple[float | None, float | None]) -> None:
  """Raises ValueError unless each named field of `config` lies in its [low, high].

  Every float field of the dataclass must also be finite (NaN compares False everywhere,
  so a range alone would let it through). `section` prefixes the message the way `--set`
  names the field, e.g. 'learner'.
  """
  prefix = f'{section}.' if section else ''
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{prefix}{field.name} must be a finite number, got {value}.')
  for name, (low, high) in ranges.items():
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f'{prefix}{name} must be a number, got {value!r}.')
    if (low is not None and value < low) or (high is not None and value > high):
      bounds = (f'>= {low:g}' if high is None else f'<= {high:g}' if low is None
                else f'in [{low:g}, {high:g}]')
      raise ValueError(f'{prefix}{name} must be {bounds}, got {value:g}.')


class TaggedConfig:
  """Base of config dataclasses that an experiment chooses among by a tag.

  An experiment holds one agent config and one task config, each one of several
  dataclasses (prime-rl's discriminated unions): a direct subclass of TaggedConfig is
  such a family (agents.AgentConfig, TaskConfig), and each of its dataclasses names its
  tag when it is defined, which registers it:

      @dataclasses.dataclass(frozen=True)
      class VTraceConfig(AgentConfig, tag='vtrace'): ...

  Serialised configs carry the tag, and `by_tag` finds the class again.
  """
  tag: ClassVar[str] = ''
  _by_tag: ClassVar[dict[str, type]]

  def __init_subclass__(cls, tag: str | None = None, **kwargs):
    super().__init_subclass__(**kwargs)
    if TaggedConfig in cls.__bases__:  # A family.
      cls._by_tag = {}
      return
    if tag is None:
      return
    known = cls._by_tag.get(tag)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__,
                                                                         cls.__qualname__):
      raise ValueError(f'Tag {tag!r} is taken by {known.__module__}.{known.__qualname__}; '
                       f'give {cls.__qualname__} another tag.')
    cls.tag = tag
    cls._by_tag[tag] = cls

  @classmethod
  def by_tag(cls, tag: str) -> type:
    """The registered class of `tag` in this family; ValueError naming the known tags."""
    if tag not in cls._by_tag:
      raise ValueError(f'Unknown {cls.__name__} tag {tag!r}; known: {sorted(cls._by_tag)}. '
                       'A tag from a plugin needs the plugin imported first (`plugins`).')
    return cls._by_tag[tag]

  @classmethod
  def tags(cls) -> list[str]:
    return sorted(cls._by_tag)


class TaskConfig(TaggedConfig):
  """Base of task configs; each task's config dataclass subclasses it with its tag."""


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
  """The fixed token lengths of one experiment, read by server, replay, RLDS and learner.

  Attributes:
    prompt_len: P, prompts are left-padded to it (BOS included); longer ones are rejected.
    completion_len: T, the completion length cap: generation stops there, replay and the
      learner pad completions (and any second completion) to it.
  """
  prompt_len: int = 16
  completion_len: int = 16

  def __post_init__(self):
    for name in ('prompt_len', 'completion_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'SequenceSpec.{name} must be an int >= 1; got {value!r}.')

  @property
  def total_len(self) -> int:
    """P + T: the longest sequence a model sees."""
    return self.prompt_len + self.completion_len


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt of a task.

  Attributes:
    prompt_id: the task's stable id of the prompt (recorded in every episode, so
      `Task.prompt_from_id` can rebuild it).
    text: the prompt as text (a caption for music tasks).
    answer: the reference answer where the task has one ('' otherwise).
  """
  prompt_id: str
  text: str
  answer: str = ''


@runtime_checkable
class Tokenizer(Protocol):
  """Text <-> token ids. Ids `pad_id`, `bos_id` and `eos_id` are special."""
  pad_id: int
  bos_id: int
  eos_id: int

  @property
  def vocab_size(self) -> int:
    ...

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS or EOS."""

  def decode(self, ids) -> str:
    """Text of `ids`, stopping at the first EOS and skipping PAD and BOS."""


@runtime_checkable
class Task(Protocol):
  """What actors, evaluators and the warm start need of a task; tasks implement it.

  Attributes:
    name: recorded in every episode.
    tokenizer: encodes prompts and completions (the policy's tokenizer).
    ends_at_length_cap: True when reaching the completion length cap ends the episode: the
      reward scores a completion cut there as it is (every built-in task: the text
      rewards read the cut text, a music clip has a fixed number of frames). False only
      for a task whose episode goes on past the cap and whose reward does not score
      the cut completion; the value learners then bootstrap from V(s_T), which no real
      step trains (docs/algorithms.md, "How a row ends").
  """
  name: str
  tokenizer: Tokenizer
  ends_at_length_cap: bool

  def train_prompt(self, rng: np.random.Generator) -> Prompt:
    """A random training prompt; never one of `eval_prompts()`."""

  def eval_prompts(self) -> Sequence[Prompt]:
    """The fixed held-out evaluation set, the same in every process and run."""

  def prompt_from_id(self, prompt_id: str) -> Prompt:
    """The prompt whose `prompt_id` is given (as episode logs record it)."""

  def encode_prompt(self, prompt: Prompt) -> list[int]:
    """The prompt's token ids as fed to the model, BOS first."""

  def demonstration(self, prompt: Prompt, rng: np.random.Generator) -> list[int] | None:
    """A demonstrated completion of `prompt` as token ids (EOS last), or None if none."""

  def demonstration_prompt_tokens(self, prompt: Prompt, rng: np.random.Generator) -> list[int]:
    """The prompt tokens a demonstration of `prompt` is trained with (usually
    `encode_prompt(prompt)`; music drops the caption at random for guidance)."""

  def reward_components(self, prompt: Prompt, completion_tokens) -> dict[str, float]:
    """Every term of the reward of a completion, by name; the reward is their sum."""


def task_reward(task: Task, prompt: Prompt, completion_tokens) -> float:
  """The total reward of a completion: the sum of the task's `reward_components`."""
  return float(sum(task.reward_components(prompt, completion_tokens).values()))


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """One episode: a prompt, one sampled completion and what learners need about it.

  Tokens are actions: `completion_tokens[t]` was sampled from the behaviour policy mu
  given the prompt and `completion_tokens[:t]`; `behaviour_logprobs[t]` is
  log mu(completion_tokens[t] | prefix) of the distribution really sampled from
  (temperature included). chorus.schema declares every field (CORE_FIELDS and the
  algorithms' extras) and derives replay rows, RLDS features and journal records.

  Attributes:
    prompt_tokens: [P] int32, the prompt as fed to the model (BOS first).
    completion_tokens: [T] int32, T >= 1; ends with EOS when `terminated`.
    behaviour_logprobs: [T] float32.
    reward: task reward R(x, y) of the whole completion, credited on its last token; the
      total of `reward_components` when the task has several terms.
    terminated: True if EOS was sampled (or the task ends every episode at the length
      cap, as music clips of a fixed number of frames do); False if the cap truncated it.
    param_version: version of the policy parameters that sampled it.
    temperature: sampling temperature used.
    model_name: name of the served model that sampled it.
    prompt_id: the task's id of the prompt (stable across runs).
    actor_id: which actor produced it.
    episode_id: per-actor episode counter.
    task: name of the task that made the prompt and scored the completion.
    seed: the run's seed given to the actor; with `actor_id` it fixes the actor's prompt
      stream, so an episode's prompt can be regenerated.
    reward_components: every term of the reward by name, e.g. {'positional_accuracy': 0.75};
      for the built-in tasks `reward` is their sum.
    extras: the fields the algorithm adds, by name (each declared by its builder as a
      chorus.schema.Field), e.g. BOND's {'anchor_logprobs': [T] float32, ...}.
  """
  prompt_tokens: np.ndarray
  completion_tokens: np.ndarray
  behaviour_logprobs: np.ndarray
  reward: float
  terminated: bool
  param_version: int
  temperature: float = 1.0
  model_name: str = 'policy'
  prompt_id: str = ''
  actor_id: int = 0
  episode_id: int = 0
  task: str = ''
  seed: int = 0
  reward_components: Mapping[str, float] = dataclasses.field(default_factory=dict)
  extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    num_tokens = len(self.completion_tokens)
    if num_tokens < 1:
      raise ValueError('A trajectory needs at least one completion token; got 0.')
    if len(self.behaviour_logprobs) != num_tokens:
      raise ValueError(
          f'behaviour_logprobs has {len(self.behaviour_logprobs)} entries but there are '
          f'{num_tokens} completion tokens; give one log-prob per sampled token.')
    clashes = sorted(set(self.extras) & {field.name for field in dataclasses.fields(self)})
    if clashes:
      raise ValueError(f'extras {clashes} have the names of core fields; rename them.')

  def value(self, name: str):
    """The core field or extra called `name`."""
    if name in self.extras:
      return self.extras[name]
    if name == 'extras' or name not in self.__dataclass_fields__:
      raise KeyError(f'The trajectory has no field {name!r}; its extras are '
                     f'{sorted(self.extras)}.')
    return getattr(self, name)


class TrajectoryBatch(NamedTuple):
  """A fixed-shape batch of trajectories for learners (one XLA shape per (B, P, T)).

  Prompts are left-padded to P (so every prompt ends at the same position and
  completions start together), completions right-padded to T. A NamedTuple, so a JAX
  pytree as it is.

  Attributes:
    prompt_tokens: [B, P] int32.
    prompt_mask: [B, P] bool, True on real prompt tokens.
    completion_tokens: [B, T] int32.
    completion_mask: [B, T] bool, True on real completion tokens (a prefix).
    behaviour_logprobs: [B, T] float32, 0 on padding.
    reward: [B] float32 sequence rewards.
    terminated: [B] bool.
    param_version: [B] int64.
    extras: the algorithm's fields by row name, [B] or [B, T] each (see chorus.schema:
      a token field X_tokens comes with its mask X_mask).
  """
  prompt_tokens: Any
  prompt_mask: Any
  completion_tokens: Any
  completion_mask: Any
  behaviour_logprobs: Any
  reward: Any
  terminated: Any
  param_version: Any
  extras: dict[str, Any] = {}


class TrajectoryDigest:
  """A running hash of what matters in a sequence of trajectories, to check that logs are exact."""

  def __init__(self):
    self._hash = hashlib.sha256()
    self.count = 0

  def update(self, t: Trajectory):
    for array, dtype in ((t.prompt_tokens, np.int32), (t.completion_tokens, np.int32),
                         (t.behaviour_logprobs, np.float32)):
      self._hash.update(np.asarray(array, dtype).tobytes())
      self._hash.update(b'|')
    self._hash.update(np.float32(t.reward).tobytes())
    self._hash.update(f'|{bool(t.terminated)}|{int(t.param_version)}|'
                      f'{t.actor_id}|{t.episode_id}|{t.prompt_id}|'.encode())
    # JSON quotes the strings, so no task or component name can imitate a separator.
    self._hash.update(json.dumps([t.task, int(t.seed), list(t.reward_components),
                                  sorted(t.extras)]).encode())
    self._hash.update(np.asarray(list(t.reward_components.values()), np.float64).tobytes())
    for name in sorted(t.extras):
      value = np.asarray(t.extras[name])
      self._hash.update(f'|{value.dtype.str}{value.shape}|'.encode() + value.tobytes())
    self._hash.update(b'\n')
    self.count += 1

  def hexdigest(self) -> str:
    return self._hash.hexdigest()
