"""An experiment config: what to train (Acme's split: launch/ decides where it runs)."""
import dataclasses
import json
import types
import typing
from typing import Any

from chorus import core
from chorus import models
from chorus.actors.actor import ActorConfig
from chorus.actors import reverse_digits
from chorus.actors import tasks
from chorus.inference_server.config import InferenceServerConfig
from chorus.learners.bond_learner import BondConfig
from chorus.learners.cfg_distill_learner import CFGDistillConfig
from chorus.learners.loop import LearnerConfig
from chorus.learners.nash_md_learner import NashMDConfig
from chorus.learners.preference import RewardModelConfig
from chorus.learners.soft_q_learner import InverseSoftQConfig
from chorus.learners.soft_q_learner import SoftQConfig
from chorus.learners.supervised import WarmStartConfig
from chorus.learners.vtrace_learner import VTraceConfig
from chorus.launch.launcher_config import LauncherConfig

# Each learner's loss, and what its data needs:
ALGORITHMS = ('vtrace', 'soft_q', 'inverse_soft_q', 'bond', 'nash_md', 'cfg_distill')
# Off-policy learners, which may train from a recorded dataset with no actors.
OFFLINE_ALGORITHMS = ('soft_q', 'inverse_soft_q')
from chorus.replay.tables import ReplayConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation on the task's held-out prompts, before and after RL.

  Attributes:
    temperature: sampling temperature (1.0 evaluates the policy as it acts).
    greedy_temperature: a second evaluation near argmax decoding.
    every_s: an evaluator node also evaluates the served policy this often during RL,
      giving a held-out learning curve (0: no evaluator node).
  """
  temperature: float = 1.0
  greedy_temperature: float = 0.01
  every_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one experiment trains with; every field can be set with `--set a.b=value`.

  Attributes:
    name: the config's name.
    seed: seeds parameters, warm start, actors and sampling.
    num_actors: actor loops in all.
    actors_per_process: actor loops sharing one process (threads; they mostly wait on I/O).
    num_inference_servers: inference servers; actor processes are spread over them.
    num_replay_servers: Reverb servers, each with the tables of `replay`; actor processes
      are spread over them and the learner reads from all.
    task: built-in task name (actors/tasks.py).
    task_config: that task's options (the config class registered with the task).
    model: the policy network.
    warm_start: supervised warm start on the task's demonstrations (becomes the reference).
    sequence: prompt and completion lengths, shared by the inference server, replay,
      RLDS, warm start and learner.
    inference: the inference server.
    replay: Reverb tables.
    actor: actor behaviour.
    learner: the learner loop.
    vtrace: the V-trace loss.
    evaluation: held-out evaluation.
    rlds_episodes_per_file: RLDS shard size per actor (smaller loses less on a crash).
    algorithm: the learner, one of ALGORITHMS.
    soft_q: the soft-Q loss ('soft_q').
    inverse_soft_q: the inverse soft-Q loss ('inverse_soft_q').
    bond: the J-BOND loss and anchor ('bond').
    nash_md: the Nash-MD loss and opponent ('nash_md').
    cfg_distill: diversity-rewarded distillation of the classifier-free-guided warm start
      ('cfg_distill', music); `guidance_scale` also sets the teacher's guidance when it
      is evaluated.
    reward_model: programmatic rewards, or a learned reward model (BOND) or pairwise
      preference model (Nash-MD) trained before RL and served by the inference servers.
    replay_dataset: RLDS dataset directory (a run's rlds/ folder, or any directory of
      writer directories) to train from instead of actors: 'soft_q' replays it through
      a Reverb table (offline RL), 'inverse_soft_q' reads it as demonstrations. Empty:
      actors generate the data ('inverse_soft_q' records the task's demonstrations).
    num_demonstrations: demonstrations recorded for 'inverse_soft_q' without a dataset.
    launcher: restarts and stop timeout of every launcher, and the Ray launcher's
      resource requests (where this experiment runs, not what it trains).
  """
  name: str = 'text_vtrace'
  seed: int = 0
  num_actors: int = 4
  actors_per_process: int = 1
  num_inference_servers: int = 1
  num_replay_servers: int = 1
  task: str = 'reverse_digits'
  task_config: tasks.TaskConfig = reverse_digits.ReverseDigitsConfig()
  model: models.DecoderConfig = models.DecoderConfig.tiny(models.CharTokenizer().vocab_size)
  warm_start: WarmStartConfig = WarmStartConfig()
  sequence: core.SequenceSpec = core.SequenceSpec()
  inference: InferenceServerConfig = InferenceServerConfig()
  replay: ReplayConfig = ReplayConfig()
  actor: ActorConfig = ActorConfig()
  learner: LearnerConfig = LearnerConfig()
  vtrace: VTraceConfig = VTraceConfig()
  evaluation: EvalConfig = EvalConfig()
  rlds_episodes_per_file: int = 100
  algorithm: str = 'vtrace'
  soft_q: SoftQConfig = SoftQConfig()
  inverse_soft_q: InverseSoftQConfig = InverseSoftQConfig()
  bond: BondConfig = BondConfig()
  nash_md: NashMDConfig = NashMDConfig()
  cfg_distill: CFGDistillConfig = CFGDistillConfig()
  reward_model: RewardModelConfig = RewardModelConfig()
  replay_dataset: str = ''
  num_demonstrations: int = 4096
  launcher: LauncherConfig = LauncherConfig()

  def __post_init__(self):
    for name in ('num_actors', 'actors_per_process', 'num_inference_servers',
                 'num_replay_servers'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}.')
    if not isinstance(self.task_config, tasks.config_class(self.task)):
      raise ValueError(f'Task {self.task!r} takes a {tasks.config_class(self.task).__name__} as '
                       f'task_config, not a {type(self.task_config).__name__}.')
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f'Unknown algorithm {self.algorithm!r}; use one of {ALGORITHMS}.')
    if self.algorithm == 'cfg_distill' and not self.guided_task:
      raise ValueError(f'cfg_distill distils classifier-free guidance, which task {self.task!r} '
                       'has no unconditional prompt for; use a music task.')
    if self.replay_dataset and self.algorithm not in OFFLINE_ALGORITHMS:
      raise ValueError(f'replay_dataset needs an off-policy learner ({OFFLINE_ALGORITHMS}); '
                       f'{self.algorithm!r} learns from its own current samples.')
    if self.reward_model.kind == 'learned' and self.algorithm not in ('bond', 'nash_md'):
      raise ValueError(f'A learned reward model serves BOND (reward) and Nash-MD (preference); '
                       f'{self.algorithm!r} uses the task reward: set reward_model.kind='
                       'programmatic.')

  @property
  def guided_task(self) -> bool:
    """The task has an unconditional prompt, so its model can sample with CFG (music)."""
    return hasattr(tasks.TASKS[self.task][0], 'unconditional_prompt_tokens')

  @property
  def offline(self) -> bool:
    """No actors: the learner trains on a dataset (recorded, or demonstrations)."""
    return bool(self.replay_dataset) or self.algorithm == 'inverse_soft_q'

  def make_task(self):
    return tasks.make_task(self.task, self.task_config)


def to_dict(config) -> dict:
  return dataclasses.asdict(config)


def from_dict(cls, data: dict):
  """Rebuilds a (nested) config dataclass from `to_dict` output; unknown keys are errors."""
  hints = typing.get_type_hints(cls)
  fields = {field.name for field in dataclasses.fields(cls)}
  unknown = sorted(set(data) - fields)
  if unknown:
    raise ValueError(f'Unknown fields {unknown} for {cls.__name__}; known: {sorted(fields)}.')
  values = {}
  for name, value in data.items():
    hint = hints[name]
    if name == 'task_config' and 'task' in data:  # Its class depends on the task.
      hint = tasks.config_class(data['task'])
    if dataclasses.is_dataclass(hint):
      values[name] = from_dict(hint, value)
    elif isinstance(value, list):
      values[name] = tuple(value)
    else:
      values[name] = value
  return cls(**values)


def _parse_value(text: str, hint, path: str) -> Any:
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if text.lower() in ('none', 'null'):
      return None
    hint = options[0]
  try:
    if hint is bool:
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(text)
      return text.lower() in ('true', '1')
    if hint in (int, float, str):
      return hint(text)
    return json.loads(text)
  except ValueError:
    raise ValueError(f'--set {path}={text}: expected a value of type '
                     f'{getattr(hint, "__name__", hint)}.') from None


def apply_overrides(config, overrides: list[str]):
  """Applies `a.b=value` overrides to a frozen config dataclass; returns the new config."""
  for override in overrides:
    if '=' not in override:
      raise ValueError(f'--set {override!r}: write it as field.subfield=value.')
    path, text = override.split('=', 1)
    config = _replace_path(config, path.strip().split('.'), text.strip(), path)
  return config


def _replace_path(config, names: list[str], text: str, path: str):
  fields = {field.name for field in dataclasses.fields(config)}
  if names[0] not in fields:
    raise ValueError(f'--set {path}: {type(config).__name__} has no field {names[0]!r}; '
                     f'fields: {sorted(fields)}.')
  current = getattr(config, names[0])
  if len(names) > 1:
    if not dataclasses.is_dataclass(current):
      raise ValueError(f'--set {path}: {names[0]!r} has no sub-fields.')
    new_value = _replace_path(current, names[1:], text, path)
  else:
    if dataclasses.is_dataclass(current):
      raise ValueError(f'--set {path}: {names[0]!r} is a group; set one of its fields.')
    new_value = _parse_value(text, typing.get_type_hints(type(config))[names[0]], path)
  return dataclasses.replace(config, **{names[0]: new_value})
