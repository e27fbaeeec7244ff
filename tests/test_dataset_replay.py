"""Recorded datasets as training data: batches, a filled Reverb table, prompts, foreign data."""
import numpy as np
import pytest
import reverb
from rlds import rlds_types
from rlds.tfds import episode_writer
import tensorflow_datasets as tfds

from chorus import core
from chorus import models
from chorus.datasets import dataset_prompts
from chorus.datasets import EpisodeLogger
from chorus.datasets import fill_replay
from chorus.datasets import ForeignDatasetMapping
from chorus.datasets import read_trajectories
from chorus.datasets import trajectory_batches
from chorus.replay import batch_iterator
from chorus.replay import make_tables
from chorus.replay import ReplayConfig
from chorus import schema
from test_rlds_episodes import assert_same_trajectories
from test_rlds_episodes import random_trajectories
from test_rlds_episodes import SCHEMA

# random_trajectories: prompts < 30 tokens, completions and second completions < 40.
_SPEC = core.SequenceSpec(prompt_len=32, completion_len=40)
_TOKENIZER = models.CharTokenizer()


@pytest.fixture(name='recorded', scope='module')
def fixture_recorded(tmp_path_factory):
  """A run's rlds/ folder of two actors, the second still writing (its open file journalled)."""
  rlds = tmp_path_factory.mktemp('run') / 'rlds'
  written = random_trajectories(20, 7, actor_id=0) + random_trajectories(21, 6, actor_id=1)
  with EpisodeLogger(rlds / 'actor_000', schema=SCHEMA, max_episodes_per_file=3) as logger:
    for trajectory in written[:7]:
      logger.write(trajectory)
  running = EpisodeLogger(rlds / 'actor_001', schema=SCHEMA, max_episodes_per_file=4)
  for trajectory in written[7:]:
    running.write(trajectory)
  yield rlds, written
  running.close()


def _rows(batch: core.TrajectoryBatch) -> list[bytes]:
  """Each row of a batch as bytes, to compare batches as multisets of rows."""
  fields = {**batch._asdict(), **batch.extras}
  del fields['extras']
  return [b''.join(np.asarray(fields[name][i]).tobytes() for name in sorted(fields))
          for i in range(len(batch.reward))]


def _expected_rows(trajectories, row_schema=SCHEMA) -> list[bytes]:
  return _rows(row_schema.batch_trajectories(trajectories, _SPEC))


def test_one_pass_of_batches_is_every_episode_padded_as_replay_pads_it(recorded):
  rlds, written = recorded
  batches = list(trajectory_batches(rlds, 4, _SPEC, schema=SCHEMA, shuffle=False,
                                    repeat=False))
  assert len(batches) == len(written) // 4  # The remainder is dropped.
  for batch in batches:
    assert batch.prompt_tokens.shape == (4, 32) and batch.extras['second_tokens'].shape == (4, 40)
  got = [row for batch in batches for row in _rows(batch)]
  assert got == _expected_rows(written)[:len(got)]


def test_shuffled_batches_are_reproducible_and_repeat_over_every_episode(recorded):
  rlds, written = recorded
  first = trajectory_batches(rlds, 13, _SPEC, schema=SCHEMA, seed=5)
  second = trajectory_batches(rlds, 13, _SPEC, schema=SCHEMA, seed=5)
  epochs = [next(first) for _ in range(2)]
  for batch in epochs:
    assert sorted(_rows(batch)) == sorted(_expected_rows(written))  # One whole pass each.
    assert _rows(next(second)) == _rows(batch)
  assert _rows(epochs[0]) != _rows(epochs[1])
  assert _rows(epochs[0]) != _expected_rows(written)


def test_an_episode_over_the_shapes_is_named_or_skipped(recorded):
  rlds, written = recorded
  longest = max(len(t.completion_tokens) for t in written)
  short = core.SequenceSpec(prompt_len=32, completion_len=longest - 1)
  with pytest.raises(ValueError, match=f'completion_tokens of {longest} tokens, over '
                     f'completion_len={longest - 1}.*skip_too_long=True'):
    list(trajectory_batches(rlds, 1, short, schema=SCHEMA, shuffle=False, repeat=False))
  fits = [t for t in written if len(t.completion_tokens) < longest and
          len(t.extras['second_tokens']) < longest]
  batches = trajectory_batches(rlds, 1, short, schema=SCHEMA, shuffle=False, repeat=False,
                               skip_too_long=True)
  assert len(list(batches)) == len(fits)


def test_batches_need_the_fields_of_their_schema(recorded):
  rlds, _ = recorded
  bond_like = schema.CORE_SCHEMA.with_extras([
      schema.Field('anchor_logprobs', schema.PER_TOKEN, 'float32')])
  with pytest.raises(ValueError, match=r"lacks the fields \['anchor_logprobs'\].*recorded "
                     'with its fields'):
    next(trajectory_batches(rlds, 2, _SPEC, schema=bond_like))
  # The core schema takes what any agent recorded and leaves its extras out.
  batch = next(trajectory_batches(rlds, 2, _SPEC, shuffle=False))
  assert batch.extras == {}


def _server(num_episodes: int, kind: str) -> reverb.Server:
  # A uniform table never limits inserts below min_size_to_sample.
  config = ReplayConfig(kind=kind, max_size=1000, min_size_to_sample=num_episodes)
  return reverb.Server(make_tables(config, SCHEMA, _SPEC), port=None)


@pytest.mark.parametrize('kind', ['queue', 'uniform'])
def test_fill_replay_stores_every_episode_and_a_learner_samples_them(recorded, kind):
  rlds, written = recorded
  server = _server(len(written), kind)
  address = f'localhost:{server.port}'
  try:
    assert fill_replay(rlds, address, 'trajectories', SCHEMA, _SPEC) == len(written)
    info = reverb.Client(address).server_info()['trajectories']
    assert info.current_size == len(written)
    batch = next(batch_iterator(address, 'trajectories', len(written), SCHEMA, _SPEC))
    if kind == 'queue':  # FIFO: each exactly once, in order.
      assert _rows(batch) == _expected_rows(written)
    else:
      assert set(_rows(batch)) <= set(_expected_rows(written))
  finally:
    server.stop()


def test_dataset_prompts_are_the_distinct_prompts_in_first_seen_order(tmp_path):
  written = random_trajectories(30, 6)
  repeated = [written[0], written[1], written[0], written[2], written[1], written[0]]
  with EpisodeLogger(tmp_path, schema=SCHEMA) as logger:
    for trajectory in repeated:
      logger.write(trajectory)
  prompts = dataset_prompts(tmp_path)
  assert [p.num_episodes for p in prompts] == [3, 2, 1]
  for prompt, trajectory in zip(prompts, written[:3]):
    np.testing.assert_array_equal(prompt.prompt_tokens, trajectory.prompt_tokens)
    assert (prompt.prompt_id, prompt.task) == (trajectory.prompt_id, trajectory.task)


# Datasets that Chorus did not write: the plain RLDS EpisodeWriter with its own config.
_QUESTIONS = [('12+3=', '15'), ('7*6=', '42'), ('(1+1)*3=', '6'), ('9-10=', '-1')]


def _write_token_dataset(directory):
  """Token ids per step, prompt tokens in episode metadata; every step has an action."""
  config = episode_writer.DatasetConfig(
      name='their_tokens', observation_info=np.int32, action_info=np.int32,
      reward_info=np.float32, discount_info=np.float32,
      step_metadata_info={'logprob': np.float32},
      episode_metadata_info={'question': tfds.features.Tensor(shape=(None,), dtype=np.int32),
                             'question_id': tfds.features.Text()})
  directory.mkdir()
  writer = episode_writer.EpisodeWriter(str(directory), config, max_episodes_per_file=3)
  expected = []
  for index, (question, answer) in enumerate(_QUESTIONS):
    prompt = [_TOKENIZER.bos_id, *_TOKENIZER.encode(question)]
    actions = [*_TOKENIZER.encode(answer), _TOKENIZER.eos_id]
    logprobs = -np.arange(1, len(actions) + 1, dtype=np.float32) / 8
    last = len(actions) - 1
    steps = [rlds_types.build_step(
        observation=np.int32(([prompt[-1]] + actions)[t]), action=np.int32(actions[t]),
        reward=np.float32(0.5 if t >= last - 1 else 0.0), discount=np.float32(t != last),
        is_first=t == 0, is_last=t == last, is_terminal=t == last,
        metadata={'logprob': logprobs[t]}) for t in range(len(actions))]
    writer.add_episode(rlds_types.build_episode(
        steps, {'question': np.asarray(prompt, np.int32), 'question_id': f'q{index}'}))
    expected.append(core.Trajectory(
        prompt_tokens=np.asarray(prompt, np.int32), completion_tokens=np.asarray(actions, np.int32),
        behaviour_logprobs=logprobs, reward=1.0, terminated=True, param_version=0,
        model_name='unknown', prompt_id=f'q{index}', task='foreign'))
  writer.close()
  return expected


def _write_text_dataset(directory):
  """Text per step in RLDS' own convention: the is_last step carries only an observation."""
  config = episode_writer.DatasetConfig(
      name='their_text', observation_info=tfds.features.Text(),
      action_info=tfds.features.Text(), reward_info=np.float32, discount_info=np.float32)
  directory.mkdir()
  writer = episode_writer.EpisodeWriter(str(directory), config, max_episodes_per_file=10)
  expected = []
  for index, (question, answer) in enumerate(_QUESTIONS):
    truncated = index == 3  # Cut short: no EOS, not terminal.
    pieces = [answer[:1], answer[1:]] if len(answer) > 1 else [answer]
    text = question
    steps = []
    for t, piece in enumerate(pieces):
      steps.append(rlds_types.build_step(
          observation=text, action=piece, reward=np.float32(t + 1), discount=np.float32(1),
          is_first=t == 0, is_last=False, is_terminal=False))
      text += piece
    steps.append(rlds_types.build_step(  # The final observation; action and reward unused.
        observation=text, action='', reward=np.float32(100), discount=np.float32(0),
        is_first=False, is_last=True, is_terminal=not truncated))
    writer.add_episode(rlds_types.build_episode(steps, {}))
    completion = _TOKENIZER.encode(answer) + ([] if truncated else [_TOKENIZER.eos_id])
    expected.append(core.Trajectory(
        prompt_tokens=np.asarray([_TOKENIZER.bos_id, *_TOKENIZER.encode(question)], np.int32),
        completion_tokens=np.asarray(completion, np.int32),
        behaviour_logprobs=np.zeros(len(completion), np.float32),
        reward=float(sum(range(1, len(pieces) + 1))), terminated=not truncated,
        param_version=0, model_name='unknown', task='foreign'))
  writer.close()
  return expected


_TOKEN_MAPPING = ForeignDatasetMapping(prompt='question', completion='steps/action',
                                       behaviour_logprob='steps/logprob',
                                       prompt_id='question_id')
_TEXT_MAPPING = ForeignDatasetMapping(prompt='steps/observation', completion='steps/action',
                                      last_step_is_observation_only=True)


@pytest.mark.parametrize('write, mapping', [(_write_token_dataset, _TOKEN_MAPPING),
                                            (_write_text_dataset, _TEXT_MAPPING)])
def test_a_plain_rlds_dataset_replays_through_a_declared_mapping(tmp_path, write, mapping):
  expected = write(tmp_path / 'theirs')
  assert_same_trajectories(read_trajectories(tmp_path / 'theirs', mapping=mapping), expected)
  spec, core_schema = core.SequenceSpec(12, 8), schema.CORE_SCHEMA
  batches = list(trajectory_batches(tmp_path / 'theirs', 2, spec, shuffle=False,
                                    repeat=False, mapping=mapping))
  assert [row for batch in batches for row in _rows(batch)] == _rows(
      core_schema.batch_trajectories(expected, spec))
  server = reverb.Server(make_tables(ReplayConfig(kind='queue', max_size=100), core_schema,
                                     spec), port=None)
  try:
    address = f'localhost:{server.port}'
    assert fill_replay(tmp_path / 'theirs', address, 'trajectories', core_schema, spec,
                       mapping=mapping) == len(expected)
    batch = next(batch_iterator(address, 'trajectories', len(expected), core_schema, spec))
    assert _rows(batch) == _rows(core_schema.batch_trajectories(expected, spec))
  finally:
    server.stop()


@pytest.mark.parametrize('mapping, message', [
    (ForeignDatasetMapping(prompt='prompt'),
     r"ForeignDatasetMapping.prompt names episode field 'prompt', which .*theirs does not "
     r"have; its episode fields are \['question', 'question_id'\]"),
    (ForeignDatasetMapping(prompt='question', behaviour_logprob='steps/log_mu'),
     r"behaviour_logprob names step field 'steps/log_mu'.*its step fields are \['action', "
     r"'discount', 'is_first', 'is_last', 'is_terminal', 'logprob', 'observation', 'reward'\]"),
])
def test_a_mapping_naming_a_missing_field_names_the_fields_that_exist(tmp_path, mapping,
                                                                      message):
  _write_token_dataset(tmp_path / 'theirs')
  with pytest.raises(ValueError, match=message):
    read_trajectories(tmp_path / 'theirs', mapping=mapping)
