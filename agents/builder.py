"""What an algorithm is: a builder that answers every question the launcher asks.

Acme's split (google-deepmind/acme, agents/jax/impala/builder.py): an experiment config
says what to train, an agent's builder makes its pieces, and the launcher decides where
each runs without ever asking which algorithm it is. A Chorus agent is one module of
agents/ holding its config (a dataclass with a tag), the fields its trajectories add,
its actors' rollout, its learner (loss, auxiliary trees, published models) and a builder
tying them together:

  served_models   models the inference servers hold beside the policy and the reference
  scored_models   served decoders the actors score completions with (compiled at start-up)
  mixtures        (model, mixture model) pairs the actors sample geometric mixtures of
  setup_steps     what runs, in order, after the warm start and before RL
  trajectory_extras  the chorus.schema fields its rollout adds to every trajectory
  data            where the learner's batches come from: actors through replay, a
                  recorded dataset through replay, or a dataset read directly
  make_rollout    what an actor asks the inference server for each batch of prompts
  make_learner    the learner: a pure loss, the optimiser, auxiliary trees

Every experiment serves 'policy' (trained, pushed by the learner) and 'reference' (the
frozen warm start: KL reference, evaluation opponent, CFG teacher of music tasks).
"""
from collections.abc import Callable, Sequence
import dataclasses
import enum
import os
from typing import Any, ClassVar

import jax

from chorus import core
from chorus import models
from chorus import schema as schema_lib
from chorus.metrics import MetricsWriter
from chorus.models.checkpoints import Checkpointer

POLICY_MODEL = 'policy'
REFERENCE_MODEL = 'reference'
MODEL_KINDS = ('decoder', 'reward', 'preference')


class AgentConfig(core.TaggedConfig):
  """Base of every agent's config dataclass; each passes its tag:
  `class C(AgentConfig, tag='x')`."""


@dataclasses.dataclass(frozen=True)
class ServedModelSpec:
  """A model the inference servers hold beside the policy and the reference.

  Attributes:
    name: the name requests use.
    kind: 'decoder' (samples and scores log-probs), 'reward' or 'preference'.
    checkpoint: run-directory-relative directory of the orbax checkpoint a setup step
      wrote (its step 0); None: the warm start's parameters.
    model: its architecture; None: the policy's.
    published: the learner pushes new versions of it (an EMA anchor, say); otherwise it
      never changes after set-up.
    pooling: how a 'reward' or 'preference' model reads its value head ('last' or
      'mean', `models.reward_models.POOLINGS`); decoders ignore it.
  """
  name: str
  kind: str = 'decoder'
  checkpoint: str | None = None
  model: models.DecoderConfig | None = None
  published: bool = False
  pooling: str = 'last'

  def __post_init__(self):
    if self.kind not in MODEL_KINDS:
      raise ValueError(f'Served model {self.name!r} has kind {self.kind!r}; use one of '
                       f'{MODEL_KINDS}.')
    if self.name in (POLICY_MODEL, REFERENCE_MODEL):
      raise ValueError(f'{self.name!r} is served for every agent; name the extra model '
                       'otherwise.')


@dataclasses.dataclass(frozen=True)
class SetupContext:
  """What a setup step gets: the experiment's task, sizes and run directory.

  Attributes:
    run_dir: the run directory; steps write under it (see `path`).
    task: the experiment's task.
    model: the policy's architecture.
    sequence: prompt and completion lengths.
    seed: the run's seed.
    metrics: the step's metrics writer (JSON lines of metrics.jsonl).
    should_stop: polled by long steps; True once the run is being stopped.
    rlds_episodes_per_file: RLDS shard size for steps that record datasets.
  """
  run_dir: str
  task: core.Task
  model: models.DecoderConfig
  sequence: core.SequenceSpec
  seed: int
  metrics: MetricsWriter
  should_stop: Callable[[], bool]
  rlds_episodes_per_file: int

  def path(self, relative: str) -> str:
    return os.path.join(self.run_dir, relative)


@dataclasses.dataclass(frozen=True)
class SetupStep:
  """One setup node: runs to completion before RL starts.

  Attributes:
    name: the node's name (and its log file's).
    run: does the work, given a SetupContext.
    accelerator: the step trains a model, so cluster launchers place it on an
      accelerator machine.
  """
  name: str
  run: Callable[[SetupContext], None]
  accelerator: bool = False


@dataclasses.dataclass(frozen=True)
class LearnerContext:
  """What `make_learner` gets.

  Attributes:
    model: the policy's architecture.
    sequence: prompt and completion lengths.
    task: the experiment's task.
    params: the parameters to start from (the warm start's).
    reference_params: the frozen reference (the warm start's); learners take it as a
      constant (`Learner(constants=...)`), so that it is sharded like the policy.
    optimizer: the optax optimiser the experiment configures.
    mesh: the learner's device mesh (models/sharding.py), or None for one device.
    run_dir: the run directory, where setup steps wrote what the learner may hold as
      a constant too (a teacher the servers also serve, say; see `restore`).
  """
  model: models.DecoderConfig
  sequence: core.SequenceSpec
  task: core.Task
  params: Any
  reference_params: Any
  optimizer: Any
  mesh: Any = None
  run_dir: str = ''

  def restore(self, checkpoint: str, model: models.DecoderConfig):
    """Parameters of `model` that a setup step saved under the run-directory-relative
    `checkpoint` (as a ServedModelSpec names it)."""
    return restore_params(os.path.join(self.run_dir, checkpoint), model)


def restore_params(directory: str, model: models.DecoderConfig):
  """The decoder parameters of `model` saved in the orbax `directory` (its newest step)."""
  shapes = jax.eval_shape(lambda rng: models.init_params(model, rng), jax.random.PRNGKey(0))
  return Checkpointer(directory).restore(shapes)


class DataSource(enum.Enum):
  """Where a learner's batches come from."""
  ACTORS = 'actors'  # Actors sample the served policy and write to replay.
  DATASET_IN_REPLAY = 'dataset_in_replay'  # A recorded dataset is written to replay once.
  DATASET = 'dataset'  # The learner reads a recorded dataset itself; no replay, no actors.


@dataclasses.dataclass(frozen=True)
class Data:
  """A learner's data: its source and, for datasets, the path (run-dir relative or absolute)."""
  source: DataSource
  dataset: str = ''

  def dataset_path(self, run_dir: str) -> str:
    return os.path.join(run_dir, self.dataset)  # An absolute dataset path wins.


Rollout = Callable[[Sequence[core.Prompt]], list]


class AgentBuilder:
  """Base builder: subclasses set `config_class` and implement the make_* methods.

  Attributes:
    config: this agent's config.
  """
  config_class: ClassVar[type]
  # Learner metrics the launcher shows on the terminal when reported: (name, label).
  progress_metrics: ClassVar[tuple[tuple[str, str], ...]] = ()

  def __init__(self, config: AgentConfig):
    if not isinstance(config, self.config_class):
      raise TypeError(f'{type(self).__name__} builds from a {self.config_class.__name__}, '
                      f'not a {type(config).__name__}.')
    self.config = config

  def trajectory_extras(self) -> tuple[schema_lib.Field, ...]:
    """Fields this agent's rollout adds to every trajectory."""
    return ()

  def schema(self) -> schema_lib.TrajectorySchema:
    """The trajectory schema of this agent's experiments."""
    return schema_lib.CORE_SCHEMA.with_extras(self.trajectory_extras())

  def served_models(self, model: models.DecoderConfig) -> tuple[ServedModelSpec, ...]:
    """Models served beside 'policy' and 'reference', given the policy's architecture."""
    del model
    return ()

  def scored_models(self) -> tuple[str, ...]:
    """Served decoders whose Score the actors call (their scorers compile at start-up)."""
    return ()

  def mixtures(self) -> tuple[tuple[str, str], ...]:
    """(model, mixture model) pairs whose geometric mixture the actors sample."""
    return ()

  def setup_steps(self, replay_dataset: str) -> tuple[SetupStep, ...]:
    """Setup nodes after the warm start, in order (e.g. training a reward model)."""
    del replay_dataset
    return ()

  def data(self, replay_dataset: str) -> Data:
    """Where batches come from; `replay_dataset` is the experiment's recorded dataset, if any.

    The default learns from its own current samples and refuses a dataset.
    """
    if replay_dataset:
      raise ValueError(f'replay_dataset needs an off-policy agent (soft_q, inverse_soft_q); '
                       f'{self.config_class.tag!r} learns from its own current samples.')
    return Data(DataSource.ACTORS)

  def check(self, task: core.Task) -> None:
    """Raises ValueError if this agent cannot train on `task`."""
    del task

  def make_rollout(self, client, task: core.Task, actor_config) -> Rollout:
    """The callable an actor hands each batch of prompts to (see actors.rollouts)."""
    raise NotImplementedError

  def make_learner(self, context: LearnerContext):
    """The chorus.learners.Learner of this agent."""
    raise NotImplementedError


_BUILDERS: dict[type, type[AgentBuilder]] = {}


def register(builder_class: type[AgentBuilder]) -> type[AgentBuilder]:
  """Class decorator: makes `builder_class` the builder of its `config_class`'s tag."""
  config_class = getattr(builder_class, 'config_class', None)
  if not (isinstance(config_class, type) and issubclass(config_class, AgentConfig)
          and config_class.tag):
    raise TypeError(f'{builder_class.__name__}.config_class must be an AgentConfig dataclass '
                    'defined with a tag.')
  _BUILDERS[config_class] = builder_class
  return builder_class


def make_builder(config: AgentConfig) -> AgentBuilder:
  """The builder of an agent config."""
  if type(config) not in _BUILDERS:
    raise ValueError(f'No builder is registered for {type(config).__name__} '
                     f'(tag {getattr(config, "tag", None)!r}); registered tags: '
                     f'{sorted(c.tag for c in _BUILDERS)}.')
  return _BUILDERS[type(config)](config)


def tags() -> list[str]:
  return sorted(config_class.tag for config_class in _BUILDERS)
