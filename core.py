"""Small types shared by every role: sequence lengths, tasks, and what an actor sends to
replay and RLDS.

Roles import this module and `models/`, never each other's internals.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import functools
import hashlib
import json
from typing import Protocol, runtime_checkable

import jax
import numpy as np


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
    ends_at_length_cap: True when reaching the completion length cap ends the episode (a
      music clip has a fixed number of frames) rather than cutting it short.
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
  (temperature included).

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
    reference_logprobs: [T] float32 or None, log-probs of the completion tokens under the
      served reference model (Nash-MD) or moving anchor (BOND), scored by the inference
      server when the completion was made; None when the algorithm needs none.
    paired_completion_tokens: [T'] int32 or None, a second completion of the same prompt
      that the algorithm compares against: BOND's better anchor sample, Nash-MD's sample
      from the geometric-mixture opponent.
    win_probability: None, or the estimated probability that this completion is at least
      as good as its comparison samples: Nash-MD's P(y > y') from the preference model,
      BOND's share of anchor samples whose reward is <= this one's (p-hat<=).
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
  reference_logprobs: np.ndarray | None = None
  paired_completion_tokens: np.ndarray | None = None
  win_probability: float | None = None

  def __post_init__(self):
    num_tokens = len(self.completion_tokens)
    if num_tokens < 1:
      raise ValueError('A trajectory needs at least one completion token; got 0.')
    for name in ('behaviour_logprobs', 'reference_logprobs'):
      values = getattr(self, name)
      if values is not None and len(values) != num_tokens:
        raise ValueError(
            f'{name} has {len(values)} entries but there are {num_tokens} completion '
            'tokens; give one log-prob per sampled token.')
    if self.paired_completion_tokens is not None and len(self.paired_completion_tokens) < 1:
      raise ValueError('paired_completion_tokens is empty; give None when there is no pair.')


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[],
                   data_fields=['prompt_tokens', 'prompt_mask', 'completion_tokens',
                                'completion_mask', 'behaviour_logprobs', 'rewards',
                                'terminated', 'param_version', 'reference_logprobs',
                                'paired_tokens', 'paired_mask', 'win_probability'])
@dataclasses.dataclass(frozen=True)
class TrajectoryBatch:
  """A fixed-shape batch of trajectories for learners (one XLA shape per (B, P, T)).

  Prompts are left-padded to P (so every prompt ends at the same position and
  completions start together), completions right-padded to T.

  Attributes:
    prompt_tokens: [B, P] int32.
    prompt_mask: [B, P] bool, True on real prompt tokens.
    completion_tokens: [B, T] int32.
    completion_mask: [B, T] bool, True on real completion tokens (a prefix).
    behaviour_logprobs: [B, T] float32, 0 on padding.
    rewards: [B] float32 sequence rewards.
    terminated: [B] bool.
    param_version: [B] int64.
    reference_logprobs: [B, T] float32, Trajectory.reference_logprobs (0 where absent).
    paired_tokens: [B, T] int32, Trajectory.paired_completion_tokens right-padded.
    paired_mask: [B, T] bool, all False for rows without a paired completion.
    win_probability: [B] float32, Trajectory.win_probability (0.5 where absent).
  """
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  completion_tokens: np.ndarray
  completion_mask: np.ndarray
  behaviour_logprobs: np.ndarray
  rewards: np.ndarray
  terminated: np.ndarray
  param_version: np.ndarray
  reference_logprobs: np.ndarray
  paired_tokens: np.ndarray
  paired_mask: np.ndarray
  win_probability: np.ndarray


def padded_row(trajectory: Trajectory, prompt_len: int, completion_len: int) -> dict[str, np.ndarray]:
  """One trajectory as the fixed-shape fields of a TrajectoryBatch row (no batch axis)."""
  prompt, completion = trajectory.prompt_tokens, trajectory.completion_tokens
  paired = trajectory.paired_completion_tokens
  if len(prompt) > prompt_len:
    raise ValueError(f'Prompt of {len(prompt)} tokens exceeds prompt_len={prompt_len}; raise '
                     'the limit in the config or shorten the task prompts.')
  for name, tokens in (('Completion', completion), ('Paired completion', paired)):
    if tokens is not None and len(tokens) > completion_len:
      raise ValueError(f'{name} of {len(tokens)} tokens exceeds completion_len='
                       f'{completion_len}; raise the limit in the config.')
  row = dict(
      prompt_tokens=np.zeros(prompt_len, np.int32),
      prompt_mask=np.zeros(prompt_len, bool),
      completion_tokens=np.zeros(completion_len, np.int32),
      completion_mask=np.zeros(completion_len, bool),
      behaviour_logprobs=np.zeros(completion_len, np.float32),
      rewards=np.float32(trajectory.reward),
      terminated=np.bool_(trajectory.terminated),
      param_version=np.int64(trajectory.param_version),
      reference_logprobs=np.zeros(completion_len, np.float32),
      paired_tokens=np.zeros(completion_len, np.int32),
      paired_mask=np.zeros(completion_len, bool),
      win_probability=np.float32(0.5 if trajectory.win_probability is None
                                 else trajectory.win_probability),
  )
  row['prompt_tokens'][prompt_len - len(prompt):] = prompt
  row['prompt_mask'][prompt_len - len(prompt):] = True
  row['completion_tokens'][:len(completion)] = completion
  row['completion_mask'][:len(completion)] = True
  row['behaviour_logprobs'][:len(completion)] = trajectory.behaviour_logprobs
  if trajectory.reference_logprobs is not None:
    row['reference_logprobs'][:len(completion)] = trajectory.reference_logprobs
  if paired is not None:
    row['paired_tokens'][:len(paired)] = paired
    row['paired_mask'][:len(paired)] = True
  return row


def batch_trajectories(trajectories: list[Trajectory], prompt_len: int,
                       completion_len: int) -> TrajectoryBatch:
  rows = [padded_row(t, prompt_len, completion_len) for t in trajectories]
  return TrajectoryBatch(**{name: np.stack([row[name] for row in rows]) for name in rows[0]})


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
    self._hash.update(json.dumps([t.task, int(t.seed), list(t.reward_components)]).encode())
    self._hash.update(np.asarray(list(t.reward_components.values()), np.float64).tobytes())
    for array, dtype in ((t.reference_logprobs, np.float32),
                         (t.paired_completion_tokens, np.int32)):
      self._hash.update(b'-' if array is None else np.asarray(array, dtype).tobytes() + b'|')
    self._hash.update(b'-' if t.win_probability is None
                      else np.float64(t.win_probability).tobytes())
    self._hash.update(b'\n')
    self.count += 1

  def hexdigest(self) -> str:
    return self._hash.hexdigest()
