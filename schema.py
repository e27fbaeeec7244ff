"""The trajectory schema: every field an episode carries, declared once.

A `Field` says a field's name, kind (its shape rule) and dtype. From a `TrajectorySchema`
come the fixed-shape row a learner trains on (`row_specs`, `padded_row`, `batch`: the
Reverb signature and the padding), and the RLDS features and the crash journal's
records (chorus.datasets derive theirs from the same fields). The core fields below are
what every trajectory has; an algorithm adds its own ("extras", e.g. BOND's anchor
log-probs) by declaring them in its builder, and `CORE_SCHEMA.with_extras(...)` is then
the schema of that experiment. Adding a field is one `Field(...)`.

Kinds, and what each becomes:

  kind        Trajectory value       row / batch                      RLDS
  prompt      [P'] int32 tokens      NAME [P] left padded + NAME_mask  episode tensor
  completion  [T'] int32 tokens      NAME [T] right padded + mask      the steps' actions
  per_token   [T'] one per token     NAME [T] right padded with 0      step metadata
  tokens      [n] int32, n >= 1      NAME [T] right padded + mask      episode tensor
  scalar      a number               NAME [] (if `in_rows`)            episode metadata
  text        a str                  -                                 episode text
  components  {name: float}          -                                 names and values

The mask of a token field `X_tokens` is `X_mask` (`prompt_mask`, `completion_mask`);
other token fields get `NAME_mask`. Floats that are not in rows keep float64 exactly
on disk; `reward` is in rows (float32) and kept exactly too.
"""
from collections.abc import Iterable, Mapping, Sequence
import dataclasses
from typing import Any

import numpy as np

from chorus import core

PROMPT = 'prompt'
COMPLETION = 'completion'
PER_TOKEN = 'per_token'
TOKENS = 'tokens'
SCALAR = 'scalar'
TEXT = 'text'
COMPONENTS = 'components'
KINDS = (PROMPT, COMPLETION, PER_TOKEN, TOKENS, SCALAR, TEXT, COMPONENTS)
_DTYPES = ('int32', 'int64', 'float32', 'float64', 'bool')
_ARRAY_KINDS = (PROMPT, COMPLETION, PER_TOKEN, TOKENS)
_MASKED_KINDS = (PROMPT, COMPLETION, TOKENS)


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of a trajectory.

  Attributes:
    name: the Trajectory attribute (core fields) or `extras` key (others); also its name
      in rows, batches, RLDS and the journal.
    kind: one of KINDS (see the module docstring).
    dtype: numpy dtype name of its values (for text and components: '').
    doc: what it holds, for people and generated docs.
    in_rows: whether learners see it (rows, batches, the Reverb signature); scalars of
      bookkeeping (ids, seeds) are logged but not trained on.
  """
  name: str
  kind: str
  dtype: str = ''
  doc: str = ''
  in_rows: bool = True

  def __post_init__(self):
    if not self.name.isidentifier():
      raise ValueError(f'Field name {self.name!r} must be a Python identifier.')
    if self.kind not in KINDS:
      raise ValueError(f'Field {self.name!r} has kind {self.kind!r}; use one of {KINDS}.')
    if self.kind in (TEXT, COMPONENTS):
      if self.dtype or self.in_rows:
        raise ValueError(f'Field {self.name!r} of kind {self.kind!r} has no dtype and is '
                         'not in rows; leave dtype empty and set in_rows=False.')
    elif self.dtype not in _DTYPES:
      raise ValueError(f'Field {self.name!r} has dtype {self.dtype!r}; use one of {_DTYPES}.')
    if self.kind in (PROMPT, COMPLETION, TOKENS) and self.dtype != 'int32':
      raise ValueError(f'Token field {self.name!r} must be int32, not {self.dtype}.')

  @property
  def mask_name(self) -> str | None:
    """The row name of its mask (token kinds only)."""
    return token_mask_name(self.name) if self.kind in _MASKED_KINDS else None


def token_mask_name(name: str) -> str:
  """The row name of the mask of token field `name`: X_tokens -> X_mask, else NAME_mask."""
  return f'{name[:-len("_tokens")]}_mask' if name.endswith('_tokens') else f'{name}_mask'


CORE_FIELDS = (
    Field('prompt_tokens', PROMPT, 'int32', 'the prompt as fed to the model, BOS first'),
    Field('completion_tokens', COMPLETION, 'int32',
          'the sampled completion; ends with EOS when terminated'),
    Field('behaviour_logprobs', PER_TOKEN, 'float32',
          'log mu(token | prefix) of the distribution really sampled from'),
    Field('reward', SCALAR, 'float32',
          'task reward R(x, y), credited on the last token; the sum of reward_components'),
    Field('terminated', SCALAR, 'bool',
          'EOS sampled (or the task ends episodes at the length cap); False: truncated'),
    Field('param_version', SCALAR, 'int64', 'version of the policy parameters that sampled it'),
    Field('temperature', SCALAR, 'float64', 'sampling temperature', in_rows=False),
    Field('model_name', TEXT, doc='served model that sampled it', in_rows=False),
    Field('prompt_id', TEXT, doc="the task's stable id of the prompt", in_rows=False),
    Field('task', TEXT, doc='the task that made the prompt and scored the completion',
          in_rows=False),
    Field('actor_id', SCALAR, 'int64', 'the actor that produced it', in_rows=False),
    Field('episode_id', SCALAR, 'int64', 'per-actor episode counter', in_rows=False),
    Field('seed', SCALAR, 'int64', "the run's seed given to the actor", in_rows=False),
    Field('reward_components', COMPONENTS, doc='every term of the reward, by name',
          in_rows=False),
)
CORE_FIELD_NAMES = frozenset(field.name for field in CORE_FIELDS)
# The core row fields are TrajectoryBatch's attributes; every other row field is an extra.
CORE_ROW_NAMES = ('prompt_tokens', 'prompt_mask', 'completion_tokens', 'completion_mask',
                  'behaviour_logprobs', 'reward', 'terminated', 'param_version')


def _padded(values, length: int, dtype: str, *, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
  values = np.asarray(values, dtype).reshape(-1)
  padded = np.zeros(length, dtype)
  mask = np.zeros(length, bool)
  where = slice(length - len(values), length) if left else slice(0, len(values))
  padded[where] = values
  mask[where] = True
  return padded, mask


@dataclasses.dataclass(frozen=True)
class TrajectorySchema:
  """The fields of one experiment's trajectories: the core ones and its algorithm's extras.

  Attributes:
    fields: every field, core first.
  """
  fields: tuple[Field, ...] = CORE_FIELDS

  def __post_init__(self):
    names = [field.name for field in self.fields]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
      raise ValueError(f'Fields {repeated} are declared twice; each field is declared once.')
    missing = sorted(CORE_FIELD_NAMES - set(names))
    if missing:
      raise ValueError(f'A trajectory schema needs the core fields; {missing} are missing.')

  def with_extras(self, extras: Iterable[Field]) -> 'TrajectorySchema':
    """This schema plus `extras` (fields an algorithm adds)."""
    return TrajectorySchema(self.fields + tuple(extras))

  @property
  def extras(self) -> tuple[Field, ...]:
    return tuple(field for field in self.fields if field.name not in CORE_FIELD_NAMES)

  def field(self, name: str) -> Field:
    for field in self.fields:
      if field.name == name:
        return field
    raise KeyError(f'No field {name!r} in the schema; fields: '
                   f'{[field.name for field in self.fields]}.')

  def to_json(self) -> list[dict]:
    return [dataclasses.asdict(field) for field in self.fields]

  @classmethod
  def from_json(cls, fields: Sequence[Mapping[str, Any]]) -> 'TrajectorySchema':
    return cls(tuple(Field(**field) for field in fields))

  # Rows: what replay stores and learners train on.

  def row_specs(self, spec: core.SequenceSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """{row name: (shape, dtype)} of one padded row (no batch axis): the Reverb signature."""
    specs = {}
    for field in self.fields:
      if not field.in_rows:
        continue
      if field.kind == SCALAR:
        specs[field.name] = ((), field.dtype)
        continue
      length = spec.prompt_len if field.kind == PROMPT else spec.completion_len
      specs[field.name] = ((length,), field.dtype)
      if field.mask_name:
        specs[field.mask_name] = ((length,), 'bool')
    return specs

  def check(self, trajectory: core.Trajectory) -> None:
    """Raises ValueError unless `trajectory` has every extra field, each of the right size."""
    missing = sorted(field.name for field in self.extras if field.name not in trajectory.extras)
    if missing:
      raise ValueError(f'The trajectory lacks the fields {missing} that this experiment\'s '
                       f'algorithm declares; it has extras {sorted(trajectory.extras)}.')
    num_tokens = len(trajectory.completion_tokens)
    for field in self.extras:
      value = trajectory.extras[field.name]
      if field.kind == PER_TOKEN and np.size(value) != num_tokens:
        raise ValueError(f'{field.name} has {np.size(value)} entries for {num_tokens} '
                         'completion tokens; give one per token.')
      if field.kind == TOKENS and np.size(value) < 1:
        raise ValueError(f'{field.name} is empty; a token field holds at least one token.')

  def padded_row(self, trajectory: core.Trajectory,
                 spec: core.SequenceSpec) -> dict[str, np.ndarray]:
    """The fixed-shape row of `trajectory` (see `row_specs`): what replay stores.

    Raises:
      ValueError: a field is missing, of the wrong size, or longer than `spec` allows.
    """
    self.check(trajectory)
    row = {}
    for field in self.fields:
      if not field.in_rows:
        continue
      value = trajectory.value(field.name)
      if field.kind == SCALAR:
        row[field.name] = np.asarray(value, field.dtype)
        continue
      length = spec.prompt_len if field.kind == PROMPT else spec.completion_len
      limit = 'prompt_len' if field.kind == PROMPT else 'completion_len'
      if np.size(value) > length:
        raise ValueError(f'{field.name} has {np.size(value)} tokens, more than {limit}='
                         f'{length}; raise sequence.{limit} in the config or shorten the task.')
      padded, mask = _padded(value, length, field.dtype, left=field.kind == PROMPT)
      row[field.name] = padded
      if field.mask_name:
        row[field.mask_name] = mask
    return row

  def batch(self, rows: Sequence[Mapping[str, np.ndarray]]) -> core.TrajectoryBatch:
    """Stacks rows (from `padded_row`, or replay) into a TrajectoryBatch."""
    if not rows:
      raise ValueError('Cannot batch zero rows.')
    stacked = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
    return batch_from_arrays(stacked)

  def batch_trajectories(self, trajectories: Sequence[core.Trajectory],
                         spec: core.SequenceSpec) -> core.TrajectoryBatch:
    return self.batch([self.padded_row(t, spec) for t in trajectories])


def batch_from_arrays(arrays: Mapping[str, Any]) -> core.TrajectoryBatch:
  """A TrajectoryBatch of named [B, ...] arrays: core row names as attributes, the rest extras."""
  missing = [name for name in CORE_ROW_NAMES if name not in arrays]
  if missing:
    raise ValueError(f'Batch arrays lack the core fields {missing}.')
  return core.TrajectoryBatch(
      **{name: arrays[name] for name in CORE_ROW_NAMES},
      extras={name: value for name, value in arrays.items() if name not in CORE_ROW_NAMES})


CORE_SCHEMA = TrajectorySchema()
