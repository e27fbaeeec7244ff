"""Reading RLDS datasets that Chorus did not write, through a small declared mapping.

A dataset written with the plain `rlds.tfds.episode_writer.EpisodeWriter` and a
DatasetConfig of the usual shape (observation, action, reward, discount, is_first,
is_last, is_terminal per step; anything else as step or episode metadata) becomes
core.Trajectory once a ForeignDatasetMapping says where the prompt and the completion
are. Every reader accepts it: `read_trajectories(paths, mapping=...)`,
`trajectory_batches(..., mapping=...)`, `fill_replay(..., mapping=...)`,
`dataset_prompts(..., mapping=...)`.

    mapping = ForeignDatasetMapping(prompt='steps/observation', completion='steps/action',
                                    last_step_is_observation_only=True)
    batches = trajectory_batches('/data/their_rlds', 32, 16, 64, mapping=mapping)

Field names: 'steps/NAME' is a step field (or step metadata) NAME, anything else an
episode metadata key. Text is detected from the values: a string field is tokenized with
`tokenizer` (chorus.models.CharTokenizer by default), an integer field is taken as token
ids.

Behaviour log-probs: datasets that do not record log mu(a | s) (demonstrations, human
data) get 0 for every token. Such data suits only losses that do not need the behaviour
policy: maximum likelihood (supervised warm start), inverse soft-Q and path consistency;
importance-weighted losses (V-trace) would read the zeros as probabilities of 1.
"""
import dataclasses
from typing import Any

import numpy as np
from rlds import rlds_types

from chorus import core
from chorus import models

_STEP_PREFIX = 'steps/'


def _is_text(value) -> bool:
  array = np.asarray(value)
  return array.dtype.kind in 'OSU'


def _text_of(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class ForeignDatasetMapping:
  """Where a foreign RLDS dataset keeps what a core.Trajectory needs.

  Attributes:
    prompt: the prompt: an episode metadata key, or 'steps/NAME' for the value of step
      field NAME at the first step (e.g. 'steps/observation' when the first observation
      is the prompt). Text, a token array or a single token id.
    completion: the completion: 'steps/NAME' for one token id or one piece of text per
      step (pieces are concatenated, then tokenized), or an episode metadata key holding
      a token array or a text.
    reward: None for the sum of the steps' 'reward'; else 'steps/NAME' (summed) or an
      episode metadata key.
    terminated: whether the episode ended on its own (EOS) rather than being cut short:
      'steps/NAME' takes the last step's value (default: is_terminal), or an episode key.
    behaviour_logprob: 'steps/NAME' holding log mu of each action, or None for 0 (see the
      module docstring for which losses that suits).
    prompt_id: an episode metadata key (text) naming the prompt, or None for ''.
    last_step_is_observation_only: RLDS' own convention, where the is_last step carries
      only the final observation: its action and reward are then left out. False when
      every step, the last included, carries an action (as Chorus' own datasets do).
    bos_for_text_prompts: put the tokenizer's BOS before a tokenized text prompt.
    eos_for_terminated_text: end a tokenized text completion of a terminated episode
      with the tokenizer's EOS, as the models' completions are.
    tokenizer: encodes text fields; needs encode(str) -> ids, bos_id and eos_id.
    task: recorded as Trajectory.task of every episode.
    model_name: recorded as Trajectory.model_name of every episode.
  """
  prompt: str = 'prompt'
  completion: str = 'steps/action'
  reward: str | None = None
  terminated: str = 'steps/is_terminal'
  behaviour_logprob: str | None = None
  prompt_id: str | None = None
  last_step_is_observation_only: bool = False
  bos_for_text_prompts: bool = True
  eos_for_terminated_text: bool = True
  tokenizer: Any = dataclasses.field(default_factory=models.CharTokenizer)
  task: str = 'foreign'
  model_name: str = 'unknown'

  def _fields(self) -> dict[str, str]:
    fields = {'prompt': self.prompt, 'completion': self.completion,
              'reward': self.reward or 'steps/reward', 'terminated': self.terminated}
    if self.behaviour_logprob is not None:
      fields['behaviour_logprob'] = self.behaviour_logprob
    if self.prompt_id is not None:
      fields['prompt_id'] = self.prompt_id
    return fields

  def check(self, features, directory: str) -> None:
    """Raises ValueError naming each declared field that `features` (tfds) lacks."""
    step_names = sorted(features[rlds_types.STEPS].feature.keys())
    episode_names = sorted(name for name in features.keys() if name != rlds_types.STEPS)
    for attribute, path in self._fields().items():
      if path.startswith(_STEP_PREFIX):
        if path[len(_STEP_PREFIX):] not in step_names:
          raise ValueError(
              f'ForeignDatasetMapping.{attribute} names step field {path!r}, which {directory} '
              f'does not have; its step fields are {step_names} (as steps/NAME) and its '
              f'episode fields {episode_names}. Fix the mapping.')
      elif path not in episode_names:
        raise ValueError(
            f'ForeignDatasetMapping.{attribute} names episode field {path!r}, which {directory} '
            f'does not have; its episode fields are {episode_names} and its step fields '
            f'{step_names} (as steps/NAME). Fix the mapping.')

  def _value(self, episode, path: str, num_steps: int):
    if path.startswith(_STEP_PREFIX):
      return episode[rlds_types.STEPS][path[len(_STEP_PREFIX):]][:num_steps]
    return episode[path]

  def _tokens(self, value, *, text_prefix=(), text_suffix=()) -> np.ndarray:
    if _is_text(value):
      pieces = [value] if np.ndim(value) == 0 else list(np.ravel(value))
      text = ''.join(_text_of(piece) for piece in pieces)
      return np.asarray([*text_prefix, *self.tokenizer.encode(text), *text_suffix], np.int32)
    return np.atleast_1d(np.asarray(value)).astype(np.int32).ravel()

  def trajectory(self, episode: dict) -> core.Trajectory:
    """The Trajectory of one decoded episode (numpy values, steps stacked into [T] arrays)."""
    steps = episode[rlds_types.STEPS]
    num_steps = len(steps[rlds_types.IS_LAST])
    if self.last_step_is_observation_only:
      num_steps -= 1
    if num_steps < 1:
      raise ValueError(f'An episode of {len(steps[rlds_types.IS_LAST])} steps has no action to '
                       'make a completion from (last_step_is_observation_only='
                       f'{self.last_step_is_observation_only}).')
    if self.terminated.startswith(_STEP_PREFIX):
      terminated = bool(steps[self.terminated[len(_STEP_PREFIX):]][-1])
    else:
      terminated = bool(episode[self.terminated])
    prompt = episode[self.prompt] if not self.prompt.startswith(_STEP_PREFIX) else (
        steps[self.prompt[len(_STEP_PREFIX):]][0])
    prompt_tokens = self._tokens(
        prompt, text_prefix=(self.tokenizer.bos_id,) if self.bos_for_text_prompts else ())
    completion_tokens = self._tokens(
        self._value(episode, self.completion, num_steps),
        text_suffix=(self.tokenizer.eos_id,) if terminated and self.eos_for_terminated_text
        else ())
    reward = np.sum(self._value(episode, self.reward or 'steps/reward', num_steps),
                    dtype=np.float64)
    if self.behaviour_logprob is None:
      behaviour_logprobs = np.zeros(len(completion_tokens), np.float32)
    else:
      behaviour_logprobs = np.asarray(
          self._value(episode, self.behaviour_logprob, num_steps), np.float32).ravel()
    prompt_id = '' if self.prompt_id is None else _text_of(episode[self.prompt_id])
    return core.Trajectory(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        behaviour_logprobs=behaviour_logprobs, reward=float(reward), terminated=terminated,
        param_version=0, model_name=self.model_name, prompt_id=prompt_id, task=self.task)
