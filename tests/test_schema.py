"""The trajectory schema: one declaration per field, from which replay, batches and RLDS follow."""
import dataclasses

import numpy as np
import pytest

from chorus import core
from chorus import schema
from chorus.datasets import rlds_schema
from chorus.replay import tables

_SPEC = core.SequenceSpec(prompt_len=5, completion_len=4)


def _trajectory(**extras) -> core.Trajectory:
  return core.Trajectory(
      prompt_tokens=np.array([1, 7, 8], np.int32), completion_tokens=np.array([9, 2], np.int32),
      behaviour_logprobs=np.array([-0.5, -0.25], np.float32), reward=0.75, terminated=True,
      param_version=3, extras=extras)


def test_a_field_added_to_a_schema_copy_appears_in_replay_rlds_and_batches():
  # The one edit: a Field in a copy of the core schema (as an agent declares its extras).
  extended = schema.CORE_SCHEMA.with_extras([
      schema.Field('judge_score', schema.SCALAR, 'float32', 'a judge model\'s score')])
  signature = tables.trajectory_signature(extended, _SPEC)
  assert signature['judge_score'].shape == () and signature['judge_score'].dtype.name == 'float32'
  assert 'judge_score' not in tables.trajectory_signature(schema.CORE_SCHEMA, _SPEC)
  features = rlds_schema.features(extended)
  assert 'judge_score' in features and 'judge_score' not in rlds_schema.features(
      schema.CORE_SCHEMA)
  batch = extended.batch_trajectories([_trajectory(judge_score=0.5)] * 2, _SPEC)
  np.testing.assert_array_equal(batch.extras['judge_score'], [0.5, 0.5])
  assert batch.extras['judge_score'].dtype == np.float32


def test_row_specs_cover_every_core_row_field_with_fixed_shapes():
  specs = schema.CORE_SCHEMA.row_specs(_SPEC)
  assert tuple(specs) == schema.CORE_ROW_NAMES
  assert specs['prompt_tokens'] == ((5,), 'int32') and specs['prompt_mask'] == ((5,), 'bool')
  assert specs['completion_tokens'] == ((4,), 'int32')
  assert specs['reward'] == ((), 'float32') and specs['param_version'] == ((), 'int64')


def test_padding_is_left_for_prompts_and_right_for_completions_and_token_extras():
  extended = schema.CORE_SCHEMA.with_extras([
      schema.Field('opponent_tokens', schema.TOKENS, 'int32'),
      schema.Field('other_logprobs', schema.PER_TOKEN, 'float32')])
  row = extended.padded_row(_trajectory(opponent_tokens=np.array([4, 5, 2]),
                                        other_logprobs=np.array([-1.0, -2.0])), _SPEC)
  np.testing.assert_array_equal(row['prompt_tokens'], [0, 0, 1, 7, 8])
  np.testing.assert_array_equal(row['prompt_mask'], [False, False, True, True, True])
  np.testing.assert_array_equal(row['completion_tokens'], [9, 2, 0, 0])
  np.testing.assert_array_equal(row['opponent_tokens'], [4, 5, 2, 0])
  np.testing.assert_array_equal(row['opponent_mask'], [True, True, True, False])
  np.testing.assert_array_equal(row['other_logprobs'], [-1.0, -2.0, 0.0, 0.0])


def test_missing_or_mis_sized_fields_are_named():
  extended = schema.CORE_SCHEMA.with_extras([
      schema.Field('other_logprobs', schema.PER_TOKEN, 'float32'),
      schema.Field('opponent_tokens', schema.TOKENS, 'int32')])
  with pytest.raises(ValueError, match=r"lacks the fields \['opponent_tokens', 'other_logprobs'\]"):
    extended.padded_row(_trajectory(), _SPEC)
  with pytest.raises(ValueError, match='other_logprobs has 3 entries for 2 completion tokens'):
    extended.padded_row(_trajectory(other_logprobs=np.zeros(3), opponent_tokens=[4]), _SPEC)
  with pytest.raises(ValueError, match='opponent_tokens has 5 tokens, more than completion_len=4'):
    extended.padded_row(_trajectory(other_logprobs=np.zeros(2), opponent_tokens=[4] * 5), _SPEC)
  with pytest.raises(ValueError, match='prompt_tokens has 3 tokens, more than prompt_len=2'):
    schema.CORE_SCHEMA.padded_row(_trajectory(), core.SequenceSpec(2, 4))


def test_fields_are_declared_once_and_checked():
  with pytest.raises(ValueError, match=r"\['reward'\] are declared twice"):
    schema.CORE_SCHEMA.with_extras([schema.Field('reward', schema.SCALAR, 'float32')])
  with pytest.raises(ValueError, match='must be int32'):
    schema.Field('x_tokens', schema.TOKENS, 'float32')
  with pytest.raises(ValueError, match="kind 'matrix'"):
    schema.Field('x', 'matrix', 'float32')
  with pytest.raises(ValueError, match='names of core fields'):
    _trajectory(reward=1.0)


def test_the_trajectory_dataclass_and_the_core_schema_list_the_same_fields():
  attributes = {field.name for field in dataclasses.fields(core.Trajectory)} - {'extras'}
  assert attributes == {field.name for field in schema.CORE_FIELDS}


def test_schemas_round_trip_through_json():
  extended = schema.CORE_SCHEMA.with_extras([
      schema.Field('opponent_tokens', schema.TOKENS, 'int32', 'y prime')])
  assert schema.TrajectorySchema.from_json(extended.to_json()) == extended
