"""Trajectories as RLDS episodes: the tfds features, derived from a chorus.schema.

Steps are tokens (tfds stacks an episode's steps, so every step field has one fixed
shape). A completion of T tokens is exactly T steps; there is no extra observation-only
step after the last action. Step t:
  observation   int32, the token before the action: the last prompt token for t = 0,
                completion token t - 1 after that.
  action        int32, completion token t.
  reward        float32, 0 except the trajectory's reward on the last step.
  discount      float32, 1 except 0 on the last step of a terminated (EOS) episode.
  is_first      t == 0.
  is_last       t == T - 1; its action is real (EOS when terminated).
  is_terminal   is_last and terminated. Unlike RLDS' default convention, where the
                terminal step carries only an observation, here it also carries the
                last action, so tools that drop the action of is_last steps lose a token.
  metadata      every `per_token` field, e.g. behaviour_logprob (log mu(action | prefix))
                and an algorithm's per-token extras (BOND's anchor_logprobs).
Episode metadata, one entry per other field of the schema: token fields (prompt_tokens,
an algorithm's second completion) as int32 [n] tensors; scalars as int64, bool, or, for
floats, float64 stored as raw bytes (tf.train.Example would round them to float32), so
`reward` and `temperature` round-trip exactly; text as text; reward components as two
parallel tensors, reward_component_names (string [N]) and reward_component_values
(float64 [N], raw bytes): plain tensors, which any tf.data/TFDS tool reads and filters
without parsing. Every field of core.Trajectory round-trips exactly, extras included.

A writer directory also keeps the chorus.schema it was written with (chorus_schema.json,
written once, atomically, when the directory is created), so that a repair can rebuild
its metadata even when a kill left features.json half written.
"""
import functools
import json
import os

import numpy as np
from rlds import rlds_types
from rlds.tfds import episode_writer
import tensorflow_datasets as tfds

from chorus import core
from chorus import schema as schema_lib
from chorus.datasets import rlds_files

DEFAULT_DATASET_NAME = 'chorus_episodes'
SCHEMA_FILE = 'chorus_schema.json'
# The RLDS names of core fields whose key differs from their field name (kept from the
# first on-disk format).
_STEP_KEYS = {'behaviour_logprobs': 'behaviour_logprob'}
_EXACT_FLOAT = tfds.features.Tensor(shape=(), dtype=np.float64,
                                    encoding=tfds.features.Encoding.BYTES)
_COMPLETION = 'completion_tokens'


def step_key(field: schema_lib.Field) -> str:
  return _STEP_KEYS.get(field.name, field.name)


def component_keys(field: schema_lib.Field) -> tuple[str, str]:
  """The names and values tensors of a components field: reward_components ->
  reward_component_names, reward_component_values."""
  stem = field.name[:-1] if field.name.endswith('s') else field.name
  return f'{stem}_names', f'{stem}_values'


def _episode_features(field: schema_lib.Field) -> dict:
  if field.kind in (schema_lib.PROMPT, schema_lib.TOKENS):
    return {field.name: tfds.features.Tensor(shape=(None,), dtype=np.int32)}
  if field.kind == schema_lib.TEXT:
    return {field.name: tfds.features.Text()}
  if field.kind == schema_lib.COMPONENTS:
    names, values = component_keys(field)
    return {names: tfds.features.Tensor(shape=(None,), dtype=np.str_),
            values: tfds.features.Tensor(shape=(None,), dtype=np.float64,
                                         encoding=tfds.features.Encoding.BYTES)}
  if field.dtype.startswith('float'):
    return {field.name: _EXACT_FLOAT}
  return {field.name: np.bool_ if field.dtype == 'bool' else np.int64}


def dataset_config(schema: schema_lib.TrajectorySchema,
                   dataset_name: str = DEFAULT_DATASET_NAME) -> episode_writer.DatasetConfig:
  """The rlds DatasetConfig of `schema` (see the module docstring)."""
  step_metadata, episode_metadata = {}, {}
  for field in schema.fields:
    if field.kind == schema_lib.COMPLETION:
      continue  # The steps' actions and observations.
    if field.kind == schema_lib.PER_TOKEN:
      step_metadata[step_key(field)] = np.dtype(field.dtype).type
    else:
      episode_metadata.update(_episode_features(field))
  return episode_writer.DatasetConfig(
      name=dataset_name, observation_info=np.int32, action_info=np.int32,
      reward_info=np.float32, discount_info=np.float32, step_metadata_info=step_metadata,
      episode_metadata_info=episode_metadata)


@functools.lru_cache(maxsize=32)
def _features(schema_json: str, dataset_name: str) -> tfds.features.FeaturesDict:
  identity = tfds.core.DatasetIdentity(
      name=dataset_name, version=tfds.core.Version(rlds_files.VERSION), data_dir='/unused',
      module_name='')
  schema = schema_lib.TrajectorySchema.from_json(json.loads(schema_json))
  return tfds.rlds.rlds_base.build_info(dataset_config(schema, dataset_name), identity).features


def features(schema: schema_lib.TrajectorySchema,
             dataset_name: str = DEFAULT_DATASET_NAME) -> tfds.features.FeaturesDict:
  """The tfds features of episodes of `schema` (to encode episodes as records)."""
  return _features(json.dumps(schema.to_json()), dataset_name)


def _episode_metadata(field: schema_lib.Field, value) -> dict:
  if field.kind in (schema_lib.PROMPT, schema_lib.TOKENS):
    return {field.name: np.asarray(value, np.int32).reshape(-1)}
  if field.kind == schema_lib.TEXT:
    return {field.name: value}
  if field.kind == schema_lib.COMPONENTS:
    names, values = component_keys(field)
    return {names: np.asarray(list(value), np.object_),
            values: np.asarray(list(value.values()), np.float64)}
  if field.dtype.startswith('float'):
    return {field.name: np.float64(value)}
  return {field.name: bool(value) if field.dtype == 'bool' else np.int64(value)}


def episode(trajectory: core.Trajectory,
            schema: schema_lib.TrajectorySchema) -> rlds_types.Episode:
  """The RLDS episode of a trajectory: one step per completion token."""
  schema.check(trajectory)
  prompt_tokens = np.asarray(trajectory.prompt_tokens, np.int32)
  if prompt_tokens.ndim != 1 or prompt_tokens.size == 0:
    raise ValueError(
        f'prompt_tokens has shape {prompt_tokens.shape}; an episode needs a non-empty 1-D '
        'prompt (at least BOS), whose last token is the first step\'s observation.')
  actions = np.asarray(trajectory.completion_tokens, np.int32)
  per_token = {step_key(field): np.asarray(trajectory.value(field.name), field.dtype)
               for field in schema.fields if field.kind == schema_lib.PER_TOKEN}
  observations = np.concatenate([prompt_tokens[-1:], actions[:-1]])
  last = len(actions) - 1
  steps = [
      rlds_types.build_step(
          observation=observations[t],
          action=actions[t],
          reward=np.float32(trajectory.reward if t == last else 0.0),
          discount=np.float32(0.0 if t == last and trajectory.terminated else 1.0),
          is_terminal=t == last and bool(trajectory.terminated),
          is_first=t == 0,
          is_last=t == last,
          metadata={key: values[t] for key, values in per_token.items()})
      for t in range(len(actions))
  ]
  metadata = {}
  for field in schema.fields:
    if field.kind not in (schema_lib.COMPLETION, schema_lib.PER_TOKEN):
      metadata.update(_episode_metadata(field, trajectory.value(field.name)))
  return rlds_types.build_episode(steps, metadata)


def _plain(value):
  """A decoded tfds value as a Trajectory field value: str, int, float, bool or an array."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray) and value.ndim:
    return value
  value = np.asarray(value).item()
  return value


_RLDS_STEP_KEYS = {rlds_types.OBSERVATION, rlds_types.ACTION, rlds_types.REWARD,
                   rlds_types.DISCOUNT, rlds_types.IS_FIRST, rlds_types.IS_LAST,
                   rlds_types.IS_TERMINAL}
_CORE_STEP_KEYS = {step_key(field) for field in schema_lib.CORE_FIELDS
                   if field.kind == schema_lib.PER_TOKEN}
_CORE_EPISODE_KEYS = set().union(*(
    _episode_features(field) for field in schema_lib.CORE_FIELDS
    if field.kind not in (schema_lib.COMPLETION, schema_lib.PER_TOKEN)))


def trajectory(decoded: dict) -> core.Trajectory:
  """The core.Trajectory of a decoded Chorus episode (numpy values, steps stacked).

  Fields beyond the core ones (an algorithm's extras) come back by name: step metadata
  as [T] arrays, episode metadata as arrays, numbers or text.
  """
  steps = decoded[rlds_types.STEPS]
  reward_names, reward_values = component_keys(
      next(f for f in schema_lib.CORE_FIELDS if f.kind == schema_lib.COMPONENTS))
  # rlds puts step metadata beside the standard step fields.
  extras = {key: np.asarray(value) for key, value in steps.items()
            if key not in _CORE_STEP_KEYS and key not in _RLDS_STEP_KEYS}
  extras.update({key: _plain(value) for key, value in decoded.items()
                 if key != rlds_types.STEPS and key not in _CORE_EPISODE_KEYS})
  return core.Trajectory(
      prompt_tokens=decoded['prompt_tokens'],
      completion_tokens=steps[rlds_types.ACTION],
      behaviour_logprobs=steps[_STEP_KEYS['behaviour_logprobs']],
      reward=float(decoded['reward']),
      terminated=bool(decoded['terminated']),
      param_version=int(decoded['param_version']),
      temperature=float(decoded['temperature']),
      model_name=decoded['model_name'].decode('utf-8'),
      prompt_id=decoded['prompt_id'].decode('utf-8'),
      actor_id=int(decoded['actor_id']),
      episode_id=int(decoded['episode_id']),
      task=decoded['task'].decode('utf-8'),
      seed=int(decoded['seed']),
      reward_components={
          name.decode('utf-8'): float(value)
          for name, value in zip(decoded[reward_names], decoded[reward_values], strict=True)},
      extras=extras)


def write_schema(directory: str, schema: schema_lib.TrajectorySchema) -> None:
  """Writes the directory's chorus_schema.json once, atomically (a rename)."""
  path = os.path.join(directory, SCHEMA_FILE)
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'w', encoding='utf-8') as file:
    json.dump(schema.to_json(), file, indent=1)
  os.replace(temporary, path)


def read_schema(directory: str) -> schema_lib.TrajectorySchema | None:
  """The schema a Chorus writer directory was written with; None if it has no schema file."""
  path = os.path.join(directory, SCHEMA_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as file:
    return schema_lib.TrajectorySchema.from_json(json.load(file))
