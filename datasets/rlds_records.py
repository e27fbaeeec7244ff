"""An RLDS episode's record (tf.train.Example bytes), built from a trajectory's whole arrays.

tfds encodes an episode step by step in Python (`FeaturesDict.serialize_example` of
`rlds_schema.episode(...)`): about 0.5 ms for a 12-token episode on this machine, more
than the rest of an actor's work per episode. Every feature of a Chorus episode is a
scalar or a 1-D tensor (rlds_schema.py), so its record can be built from whole arrays
instead: the same tf.train.Example, feature for feature (tests/test_rlds_episodes.py
compares the two on random trajectories of every field kind), for a small part of the CPU.
"""
import numpy as np
from rlds import rlds_types
from tensorflow.core.example import example_pb2
from tensorflow.core.example import feature_pb2

from chorus import core
from chorus import schema as schema_lib
from chorus.datasets import rlds_schema


def _ints(values) -> feature_pb2.Feature:
  return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=values))


def _floats(values) -> feature_pb2.Feature:
  return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=values))


def _bytes(values) -> feature_pb2.Feature:
  return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=values))


def _array_feature(values: np.ndarray) -> feature_pb2.Feature:
  """A 1-D array as tfds stores a Tensor feature of its dtype (floats as float32)."""
  if values.dtype.kind == 'f':
    return _floats(values.tolist())
  return _ints(values.astype(np.int64).tolist())


def _episode_features(field: schema_lib.Field, value) -> dict[str, feature_pb2.Feature]:
  """Episode metadata, encoded as rlds_schema._episode_features declares it."""
  if field.kind in (schema_lib.PROMPT, schema_lib.TOKENS):
    return {field.name: _ints(np.asarray(value, np.int32).reshape(-1).tolist())}
  if field.kind == schema_lib.TEXT:
    return {field.name: _bytes([str(value).encode('utf-8')])}
  if field.kind == schema_lib.COMPONENTS:
    names, values = rlds_schema.component_keys(field)
    return {names: _bytes([name.encode('utf-8') for name in value]),
            values: _bytes([np.asarray(list(value.values()), np.float64).tobytes()])}
  if field.dtype.startswith('float'):  # Exact: float64 as raw bytes.
    return {field.name: _bytes([np.float64(value).tobytes()])}
  return {field.name: _ints([int(bool(value)) if field.dtype == 'bool' else int(value)])}


def serialize_episode(trajectory: core.Trajectory, schema: schema_lib.TrajectorySchema) -> bytes:
  """The record of `trajectory` as an RLDS episode of `schema` (see rlds_schema.episode).

  Raises:
    ValueError: the trajectory lacks a field of `schema`, has one of the wrong size, or
      has no prompt.
  """
  schema.check(trajectory)
  prompt_tokens = np.asarray(trajectory.prompt_tokens, np.int32)
  if prompt_tokens.ndim != 1 or prompt_tokens.size == 0:
    raise ValueError(
        f'prompt_tokens has shape {prompt_tokens.shape}; an episode needs a non-empty 1-D '
        'prompt (at least BOS), whose last token is the first step\'s observation.')
  actions = np.asarray(trajectory.completion_tokens, np.int32).reshape(-1)
  length = len(actions)
  last_step = np.arange(length) == length - 1
  terminal = last_step & bool(trajectory.terminated)
  steps = {
      rlds_types.OBSERVATION: np.concatenate([prompt_tokens[-1:], actions[:-1]])[:length],
      rlds_types.ACTION: actions,
      rlds_types.REWARD: np.where(last_step, np.float32(trajectory.reward), np.float32(0)),
      rlds_types.DISCOUNT: np.where(terminal, np.float32(0), np.float32(1)),
      rlds_types.IS_FIRST: np.arange(length) == 0,
      rlds_types.IS_LAST: last_step,
      rlds_types.IS_TERMINAL: terminal,
  }
  features = {}
  for field in schema.fields:
    if field.kind == schema_lib.PER_TOKEN:
      steps[rlds_schema.step_key(field)] = np.asarray(trajectory.value(field.name), field.dtype)
    elif field.kind != schema_lib.COMPLETION:
      features.update(_episode_features(field, trajectory.value(field.name)))
  for key, values in steps.items():
    features[f'{rlds_types.STEPS}/{key}'] = _array_feature(values.reshape(-1))
  return example_pb2.Example(features=feature_pb2.Features(feature=features)).SerializeToString()
