"""An experiment config: what to train (Acme's split: launch/ decides where it runs).

An experiment names its agent and its task by their config classes (each chosen by a
tag, see core.TaggedConfig) and holds the sizes, schedules and scale knobs that every
agent shares. `to_dict` / `from_dict` are its JSON form (config.json of a run) and
`apply_overrides` its `--set a.b=value` form.
"""
import dataclasses
import json
import math
import types
import typing
from typing import Any

from chorus import agents
from chorus import core
from chorus import datasets
from chorus import models
from chorus import plugins as plugins_lib
from chorus.actors import reverse_digits
from chorus.actors import tasks
from chorus.actors.actor import ActorConfig
from chorus.inference_server.config import InferenceServerConfig
from chorus.launch.launcher_config import LauncherConfig
from chorus.models import sharding
from chorus.learners.loop import LearnerConfig
from chorus.learners.supervised import WarmStartConfig
from chorus.replay.config import ReplayConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation on the task's held-out prompts, before and after RL.

  Attributes:
    temperature: sampling temperature (1.0 evaluates the policy as it acts).
    greedy_temperature: a second evaluation near argmax decoding.
    every_s: an evaluator node also evaluates the served policy this often during RL,
      giving a held-out learning curve (0: no evaluator node).
    cfg_teacher_guidance_scale: for tasks with an unconditional prompt (music), the frozen
      reference is also evaluated with classifier-free guidance at this scale (the CFG
      teacher, and what guidance buys); 0 skips it.
  """
  temperature: float = 1.0
  greedy_temperature: float = 0.01
  every_s: float = 0.0
  cfg_teacher_guidance_scale: float = 3.0

  def __post_init__(self):
    core.check_ranges(self, 'evaluation', every_s=(0, None),
                      cfg_teacher_guidance_scale=(0, core.MAX_GUIDANCE_SCALE))
    for name in ('temperature', 'greedy_temperature'):
      error = core.temperature_error(getattr(self, name))
      if error:
        raise ValueError(f'evaluation.{name}: {error}')


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one experiment trains with; every field can be set with `--set a.b=value`.

  Attributes:
    name: the config's name.
    seed: seeds parameters, warm start, actors and sampling.
    agent: what learns and how: one agent config (agents/), chosen by its tag; `--set
      agent=bond` switches to another agent's defaults, `--set agent.kl_coef=0.05` sets
      one of its fields.
    task: the task: one task config, chosen by its tag like `agent`.
    model: the policy network: a decoder from scratch, or a pretrained checkpoint
      (`--set model.pretrained=DIR`) whose tokenizer the task then encodes with.
    mesh: the device mesh of each accelerator node (the learner now; see
      models/sharding.py): devices along data, fsdp and tensor.
    sequence: prompt and completion lengths, shared by server, replay, RLDS and learner.
    warm_start: supervised warm start on the task's demonstrations (becomes the reference).
    inference: the inference server.
    replay: Reverb tables.
    actor: actor behaviour.
    learner: the learner loop.
    evaluation: held-out evaluation.
    num_actors: actor loops in all.
    actors_per_process: actor loops sharing one process (threads; they mostly wait on I/O).
    num_inference_servers: inference servers; actor processes are spread over them.
    num_replay_servers: Reverb servers, each with the tables of `replay`; actor processes
      are spread over them and the learner reads from all.
    rlds_episodes_per_file: RLDS shard size per actor (smaller loses less on a crash).
    replay_dataset: RLDS dataset directory (a run's rlds/ folder, or any directory of
      writer directories) to train from instead of actors, for agents that can (soft_q
      replays it through a Reverb table, inverse_soft_q reads it as demonstrations).
    skip_corrupt: read recorded datasets (replay_dataset, warm_start.dataset) around damaged
      files and records, logging what was left out, instead of stopping at the first.
    launcher: restarts and stop timeout of every launcher, and the Ray launcher's
      resource requests (where this experiment runs, not what it trains).
    plugins: modules or .py files imported in every process before this config is read,
      defining agents or tasks of one's own.
  """
  name: str = 'text_vtrace'
  seed: int = 0
  agent: agents.AgentConfig = agents.VTraceConfig()
  task: core.TaskConfig = reverse_digits.ReverseDigitsConfig()
  model: models.ModelConfig = models.ModelConfig()
  mesh: sharding.MeshConfig = sharding.MeshConfig()
  sequence: core.SequenceSpec = core.SequenceSpec()
  warm_start: WarmStartConfig = WarmStartConfig()
  inference: InferenceServerConfig = InferenceServerConfig()
  replay: ReplayConfig = ReplayConfig()
  actor: ActorConfig = ActorConfig()
  learner: LearnerConfig = LearnerConfig()
  evaluation: EvalConfig = EvalConfig()
  num_actors: int = 4
  actors_per_process: int = 1
  num_inference_servers: int = 1
  num_replay_servers: int = 1
  rlds_episodes_per_file: int = 100
  replay_dataset: str = ''
  skip_corrupt: bool = False
  launcher: LauncherConfig = LauncherConfig()
  plugins: tuple[str, ...] = ()

  def __post_init__(self):
    core.check_ranges(self, '', num_actors=(1, None), actors_per_process=(1, None),
                      num_inference_servers=(1, None), num_replay_servers=(1, None),
                      rlds_episodes_per_file=(1, None))
    if not isinstance(self.agent, agents.AgentConfig):
      raise ValueError(f'agent must be an agent config ({agents.tags()}), not '
                       f'{type(self.agent).__name__}.')
    if not isinstance(self.task, core.TaskConfig):
      raise ValueError(f'task must be a task config ({core.TaskConfig.tags()}), not '
                       f'{type(self.task).__name__}.')
    _check_finite(self, '')

  def make_task(self) -> core.Task:
    """The task, encoding with the policy's tokenizer when the model is pretrained."""
    return tasks.make_task(self.task, tokenizer=self.model.tokenizer())

  def builder(self) -> agents.AgentBuilder:
    return agents.make_builder(self.agent)

  def check(self) -> None:
    """Raises ValueError if the agent cannot train on this task or data.

    Recorded datasets are checked too (every file, without decoding): a damaged one raises
    datasets.CorruptEpisodeFileError naming the file unless `skip_corrupt`, and a missing
    one FileNotFoundError, before any process starts.
    """
    builder = self.builder()
    task = self.make_task()
    builder.check(task)
    longest = getattr(task, 'max_prompt_tokens', 0)
    if longest > self.sequence.prompt_len:
      raise ValueError(f'The longest prompt of task {task.name!r} is {longest} tokens (BOS '
                       f'included), longer than sequence.prompt_len={self.sequence.prompt_len}; '
                       f'--set sequence.prompt_len={longest}.')
    if self.learner.batch_size % self.learner.processes:
      raise ValueError(f'learner.batch_size={self.learner.batch_size} must be a multiple of '
                       f'learner.processes={self.learner.processes}: each process samples an '
                       'equal share of every batch.')
    builder.data(self.replay_dataset)
    for dataset in filter(None, (self.replay_dataset, self.warm_start.dataset)):
      datasets.episode_sources(dataset, skip_corrupt=self.skip_corrupt)

  @property
  def guided_task(self) -> bool:
    """The task has an unconditional prompt, so its model can sample with CFG (music)."""
    return hasattr(self.make_task(), 'unconditional_prompt_tokens')


def _check_finite(config, path: str) -> None:
  """Raises ValueError naming the first float field of the nested configs that is NaN or inf.

  Configs without range checks of their own (agents', tasks', models') get this one: a NaN
  hyperparameter trains NaN.
  """
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    name = f'{path}{field.name}'
    if dataclasses.is_dataclass(value):
      _check_finite(value, f'{name}.')
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{name} must be a finite number, got {value}.')


def to_dict(config) -> dict:
  """The JSON-able form of a (nested) config dataclass; tagged configs carry their 'tag'."""
  data = {'tag': config.tag} if isinstance(config, core.TaggedConfig) else {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    data[field.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
  return data


def _config_class(hint, data: dict, path: str) -> type:
  """The dataclass `data` describes: `hint`, or for a tagged family the class of its tag."""
  if isinstance(hint, type) and issubclass(hint, core.TaggedConfig):
    if 'tag' not in data:
      raise ValueError(f'{path}: a {hint.__name__} needs its "tag" (one of {hint.tags()}).')
    return hint.by_tag(data['tag'])
  return hint


def from_dict(cls, data: dict, path: str = 'config'):
  """Rebuilds a (nested) config dataclass from `to_dict` output; unknown keys are errors.

  Classes of tagged fields (agent, task) are found by tag, so plugins that define them
  must be imported first (`load_experiment` does).
  """
  cls = _config_class(cls, data, path)
  hints = typing.get_type_hints(cls)
  fields = {field.name for field in dataclasses.fields(cls)}
  unknown = sorted(set(data) - fields - {'tag'})
  if unknown:
    raise ValueError(f'Unknown fields {unknown} for {cls.__name__}; known: {sorted(fields)}.')
  values = {}
  for name, value in data.items():
    if name == 'tag':
      continue
    hint = hints[name]
    if dataclasses.is_dataclass(hint) or (isinstance(hint, type)
                                          and issubclass(hint, core.TaggedConfig)):
      values[name] = from_dict(hint, value, f'{path}.{name}')
    elif isinstance(value, list):
      values[name] = tuple(value)
    else:
      values[name] = value
  return cls(**values)


def load_experiment(data: dict) -> ExperimentConfig:
  """The ExperimentConfig of a run's config.json, its plugins imported first."""
  plugins_lib.import_plugins(data.get('plugins', ()))
  if 'vocab_size' in data.get('model', {}):  # Written before `model` held a ModelConfig.
    data = dict(data, model={'decoder': data['model']})
  return from_dict(ExperimentConfig, data)


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
    value = json.loads(text)
    return tuple(value) if typing.get_origin(hint) is tuple and isinstance(value, list) else value
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
  if len(names) == 1 and isinstance(current, core.TaggedConfig):
    # A tag picks another member of the family, with its defaults.
    family = typing.get_type_hints(type(config))[names[0]]
    return dataclasses.replace(config, **{names[0]: family.by_tag(text)()})
  if len(names) > 1:
    if not dataclasses.is_dataclass(current):
      raise ValueError(f'--set {path}: {names[0]!r} has no sub-fields.')
    new_value = _replace_path(current, names[1:], text, path)
  else:
    if dataclasses.is_dataclass(current):
      raise ValueError(f'--set {path}: {names[0]!r} is a group; set one of its fields.')
    new_value = _parse_value(text, typing.get_type_hints(type(config))[names[0]], path)
  return dataclasses.replace(config, **{names[0]: new_value})
