"""RLDS episodes: exact round trips, RLDS step fields, and what a SIGKILL of a writer loses.

Run as a script, this file is the writer process that the crash tests kill.
"""
import dataclasses
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from chorus import core
from chorus import schema
from chorus.datasets import CorruptEpisodeFileError
from chorus.datasets import EpisodeLogger
from chorus.datasets import episode_dataset
from chorus.datasets import read_episodes
from chorus.datasets import read_trajectories
from chorus.datasets import rlds_records
from chorus.datasets import rlds_schema

_FIELDS = ('reward', 'terminated', 'param_version', 'temperature', 'model_name', 'prompt_id',
           'actor_id', 'episode_id', 'task', 'seed', 'reward_components')
_COMPONENT_NAMES = ('positional_accuracy', 'length_penalty', 'kl/ref', 'ünïcode')
# An agent's extras of every kind, written and read back beside the core fields.
SCHEMA = schema.CORE_SCHEMA.with_extras([
    schema.Field('other_logprobs', schema.PER_TOKEN, 'float32'),
    schema.Field('second_tokens', schema.TOKENS, 'int32'),
    schema.Field('score', schema.SCALAR, 'float32'),
    schema.Field('exact_score', schema.SCALAR, 'float64'),
    schema.Field('count', schema.SCALAR, 'int64'),
    schema.Field('flag', schema.SCALAR, 'bool'),
    schema.Field('label', schema.TEXT, in_rows=False),
])


def random_trajectories(seed: int, count: int, actor_id: int = 0) -> list[core.Trajectory]:
  rng = np.random.default_rng(seed)
  trajectories = []
  for episode_id in range(count):
    completion_len = int(rng.integers(1, 40))
    terminated = bool(rng.integers(2))
    completion = rng.integers(3, 32000, completion_len).astype(np.int32)
    if terminated:
      completion[-1] = 1  # EOS
    trajectories.append(core.Trajectory(
        prompt_tokens=rng.integers(2, 32000, int(rng.integers(1, 30))).astype(np.int32),
        completion_tokens=completion,
        behaviour_logprobs=-rng.exponential(size=completion_len).astype(np.float32),
        reward=float(rng.normal()), terminated=terminated,
        param_version=int(rng.integers(0, 2**40)), temperature=float(rng.uniform(0.1, 2)),
        model_name=f'policy-{actor_id}', prompt_id=f'task/é{rng.integers(1000)}',
        actor_id=actor_id, episode_id=episode_id, task=f'task-{rng.integers(3)}',
        seed=int(rng.integers(-2**62, 2**62)),
        # Zero to all terms, in a random order that must survive too.
        reward_components={name: float(rng.normal()) for name in rng.permutation(
            _COMPONENT_NAMES)[:rng.integers(len(_COMPONENT_NAMES) + 1)]},
        extras=dict(
            other_logprobs=-rng.exponential(size=completion_len).astype(np.float32),
            second_tokens=rng.integers(3, 32000, int(rng.integers(1, 20))).astype(np.int32),
            score=float(np.float32(rng.uniform())), exact_score=float(rng.normal()),
            count=int(rng.integers(-2**62, 2**62)), flag=bool(rng.integers(2)),
            label=f'é{rng.integers(100)}')))
  return trajectories


def assert_same_trajectories(got, expected):
  assert len(got) == len(expected)
  for got_one, expected_one in zip(got, expected):
    for name in _FIELDS:
      assert getattr(got_one, name) == getattr(expected_one, name), name
    assert list(got_one.reward_components) == list(expected_one.reward_components)
    for name, dtype in (('prompt_tokens', np.int32), ('completion_tokens', np.int32),
                        ('behaviour_logprobs', np.float32)):
      got_array, expected_array = getattr(got_one, name), getattr(expected_one, name)
      assert got_array.dtype == dtype, name
      np.testing.assert_array_equal(got_array, expected_array, err_msg=name)
    assert sorted(got_one.extras) == sorted(expected_one.extras)
    for name, value in expected_one.extras.items():
      if isinstance(value, np.ndarray):
        assert got_one.extras[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got_one.extras[name], value, err_msg=name)
      else:
        assert got_one.extras[name] == value and type(got_one.extras[name]) is type(value), name
  assert digest(got) == digest(expected)


def digest(trajectories) -> str:
  result = core.TrajectoryDigest()
  for trajectory in trajectories:
    result.update(trajectory)
  return result.hexdigest()


@pytest.fixture(name='two_actor_dirs', scope='module')
def fixture_two_actor_dirs(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('run')
  written = {}
  for actor_id, count in ((0, 11), (1, 9)):
    directory = run_dir / 'rlds' / f'actor_{actor_id:03d}'  # Missing: the logger creates it.
    written[directory] = random_trajectories(actor_id, count, actor_id)
    with EpisodeLogger(directory, schema=SCHEMA, max_episodes_per_file=4) as logger:
      for trajectory in written[directory]:
        logger.write(trajectory)
  return written


def test_two_writers_read_back_as_one_dataset_with_every_field_exact(two_actor_dirs):
  directories = list(two_actor_dirs)
  got = read_trajectories([str(directory) for directory in directories])
  expected = [t for directory in directories for t in two_actor_dirs[directory]]
  assert_same_trajectories(got, expected)
  assert {t.terminated for t in expected} == {True, False}
  assert {len(t.reward_components) for t in expected} >= {0, 1, len(_COMPONENT_NAMES)}


def test_records_are_the_examples_tfds_encodes_for_every_field_kind():
  features = rlds_schema.features(SCHEMA)
  for trajectory in random_trajectories(5, 60):
    ours = tf.train.Example.FromString(rlds_records.serialize_episode(trajectory, SCHEMA))
    tfds_made = tf.train.Example.FromString(
        features.serialize_example(rlds_schema.episode(trajectory, SCHEMA)))
    assert ours == tfds_made


def test_extras_are_plain_rlds_step_and_episode_fields(two_actor_dirs):
  directory, expected = next(iter(two_actor_dirs.items()))
  for trajectory, episode in zip(expected, episode_dataset(directory), strict=True):
    extras = trajectory.extras
    np.testing.assert_array_equal(episode['second_tokens'].numpy(), extras['second_tokens'])
    assert episode['exact_score'].dtype == tf.float64  # Kept exactly, as raw bytes.
    assert episode['exact_score'].numpy() == extras['exact_score']
    assert episode['count'].numpy() == extras['count']
    assert episode['label'].numpy().decode() == extras['label']
    steps = next(iter(episode['steps'].batch(1000)))
    np.testing.assert_array_equal(steps['other_logprobs'].numpy(), extras['other_logprobs'])


def test_a_run_rlds_folder_reads_as_its_actor_directories_in_order(two_actor_dirs):
  rlds_folder = next(iter(two_actor_dirs)).parent
  result = read_episodes(rlds_folder)
  assert result.episodes_per_directory == {str(d): len(t) for d, t in two_actor_dirs.items()}
  assert_same_trajectories(result.trajectories,
                           [t for trajectories in two_actor_dirs.values() for t in trajectories])
  assert not result.skipped
  assert len(read_episodes(rlds_folder, max_episodes=3).trajectories) == 3


def test_raw_episode_metadata_has_reward_components_as_parallel_tensors(two_actor_dirs):
  directory, expected = next(iter(two_actor_dirs.items()))
  for trajectory, episode in zip(expected, episode_dataset(directory), strict=True):
    names, values = episode['reward_component_names'], episode['reward_component_values']
    assert [name.decode() for name in names.numpy()] == list(trajectory.reward_components)
    assert values.dtype == tf.float64
    assert list(values.numpy()) == list(trajectory.reward_components.values())
    assert episode['task'].numpy().decode() == trajectory.task
    assert episode['seed'].numpy() == trajectory.seed


def test_digest_covers_the_recorded_task_seed_and_reward_components():
  trajectory = random_trajectories(0, 1)[0]
  changed = [dataclasses.replace(trajectory, task='other'),
             dataclasses.replace(trajectory, seed=trajectory.seed + 1),
             dataclasses.replace(trajectory, reward_components={'a': 0.5}),
             dataclasses.replace(trajectory, reward_components={'a': 0.25})]
  digests = set()
  for t in [trajectory, *changed]:
    digest = core.TrajectoryDigest()
    digest.update(t)
    digests.add(digest.hexdigest())
  assert len(digests) == 5


def _three_files(directory):
  """Writes 10 episodes in files of 4, 4 and 2; returns them and the middle file."""
  expected = random_trajectories(5, 10)
  with EpisodeLogger(directory, schema=SCHEMA, max_episodes_per_file=4) as logger:
    for trajectory in expected:
      logger.write(trajectory)
  return expected, directory / 'chorus_episodes-train.tfrecord-00001'


def _append_garbage(path):
  with open(path, 'ab') as f:
    f.write(b'not a tfrecord' * 5)


def _cut_mid_record(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) * 5 // 8])


@pytest.mark.parametrize('damage, episodes_read', [(_append_garbage, 4), (_cut_mid_record, 2)])
def test_a_damaged_file_is_named_or_skipped_keeping_its_intact_episodes(
    tmp_path, damage, episodes_read):
  expected, middle = _three_files(tmp_path / 'actor_000')
  damage(middle)
  with pytest.raises(CorruptEpisodeFileError, match=f'{middle}.*skip_corrupt=True') as error:
    read_trajectories(tmp_path)
  assert error.value.path == str(middle)
  result = read_episodes(tmp_path, skip_corrupt=True)
  assert [s.path for s in result.skipped] == [str(middle)]
  assert result.skipped[0].episodes_read == episodes_read
  assert_same_trajectories(result.trajectories, expected[:4 + episodes_read] + expected[8:])
  assert result.episodes_per_directory == {str(tmp_path / 'actor_000'): 6 + episodes_read}


def test_a_file_cut_at_a_record_boundary_is_reported_short(tmp_path):
  expected, middle = _three_files(tmp_path)
  with open(middle, 'r+b') as f:  # Drops the last record (lengths from the tfrecord framing).
    sizes = [len(r) for r in tf.data.TFRecordDataset(str(middle)).as_numpy_iterator()]
    f.truncate(sum(size + 16 for size in sizes[:3]))
  with pytest.raises(CorruptEpisodeFileError, match='holds 3 whole episodes.*lists 4'):
    read_trajectories(tmp_path)
  assert_same_trajectories(read_trajectories(tmp_path, skip_corrupt=True),
                           expected[:7] + expected[8:])


def test_broken_metadata_skips_its_directory_and_names_the_file(tmp_path):
  good, _ = _three_files(tmp_path / 'actor_000')
  _three_files(tmp_path / 'actor_001')
  (tmp_path / 'actor_001' / 'features.json').write_text('{"truncated": ')
  with pytest.raises(CorruptEpisodeFileError, match='actor_001/features.json'):
    read_trajectories(tmp_path)
  result = read_episodes(tmp_path, skip_corrupt=True)
  assert [s.path for s in result.skipped] == [str(tmp_path / 'actor_001' / 'features.json')]
  assert_same_trajectories(result.trajectories, good)


def test_a_record_that_passes_the_checksum_but_is_no_episode_is_named_or_skipped(tmp_path):
  expected, middle = _three_files(tmp_path)
  records = list(tf.data.TFRecordDataset(str(middle)).as_numpy_iterator())
  records[2] = b'\x0a\x03abc' + b'garbage' * 10  # A valid TFRecord, but no episode.
  with tf.io.TFRecordWriter(str(middle)) as writer:
    for record in records:
      writer.write(record)
  with pytest.raises(CorruptEpisodeFileError, match=f'{middle} has a record .episode 2 of '
                     'the file. that does not decode'):
    read_trajectories(tmp_path)
  result = read_episodes(tmp_path, skip_corrupt=True)
  assert_same_trajectories(result.trajectories, expected[:6] + expected[7:])
  assert [(s.path, s.episodes_read) for s in result.skipped] == [(str(middle), 3)]
  assert result.episodes_per_directory == {str(tmp_path): 9}


def test_a_missing_metadata_file_is_named_not_blamed_on_an_old_tfds(tmp_path):
  good, _ = _three_files(tmp_path / 'actor_000')
  _three_files(tmp_path / 'actor_001')
  (tmp_path / 'actor_001' / 'features.json').unlink()
  with pytest.raises(CorruptEpisodeFileError, match='actor_001/features.json is missing'):
    read_trajectories(tmp_path)
  result = read_episodes(tmp_path, skip_corrupt=True)
  assert [s.path for s in result.skipped] == [str(tmp_path / 'actor_001' / 'features.json')]
  assert_same_trajectories(result.trajectories, good)


def test_a_garbage_journal_is_named_while_a_torn_last_record_is_not_damage(tmp_path):
  expected, _ = _three_files(tmp_path)
  journal = tmp_path / 'episodes.journal'
  journal.write_bytes(b'not a journal at all' * 5)
  with pytest.raises(CorruptEpisodeFileError, match='episodes.journal holds 100 bytes of '
                     'damage after its 0 whole records .bytes that are not a journal record'):
    read_trajectories(tmp_path)
  result = read_episodes(tmp_path, skip_corrupt=True)
  assert [s.path for s in result.skipped] == [str(journal)]
  assert_same_trajectories(result.trajectories, expected)
  journal.write_bytes(b'CHJ')  # A kill inside the first bytes of an append: not damage.
  assert_same_trajectories(read_trajectories(tmp_path), expected)


def test_raw_rlds_steps_put_reward_discount_and_flags_on_the_last_token(two_actor_dirs):
  builder = tfds.builder_from_directories(list(two_actor_dirs))
  assert builder.info.splits['train'].num_examples == 20
  expected = [t for trajectories in two_actor_dirs.values() for t in trajectories]
  episodes = builder.as_dataset(split='train', shuffle_files=False)
  for trajectory, episode in zip(expected, episodes, strict=True):
    steps = list(episode['steps'].as_numpy_iterator())
    num_steps = len(trajectory.completion_tokens)
    assert len(steps) == num_steps
    last = num_steps - 1
    for t, step in enumerate(steps):
      previous = trajectory.prompt_tokens[-1] if t == 0 else trajectory.completion_tokens[t - 1]
      assert step['observation'] == previous
      assert step['action'] == trajectory.completion_tokens[t]
      assert step['behaviour_logprob'] == trajectory.behaviour_logprobs[t]
      assert step['is_first'] == (t == 0)
      assert step['is_last'] == (t == last)
      assert step['is_terminal'] == (t == last and trajectory.terminated)
      assert step['reward'] == (np.float32(trajectory.reward) if t == last else 0.0)
      assert step['discount'] == (0.0 if t == last and trajectory.terminated else 1.0)


def test_episode_dataset_skips_directories_with_nothing_readable_yet(two_actor_dirs, tmp_path):
  open_logger = EpisodeLogger(tmp_path / 'open', schema=SCHEMA, max_episodes_per_file=4)
  open_logger.write(random_trajectories(7, 1)[0])  # In an open file: not readable yet.
  directories = [tmp_path / 'never_written', tmp_path / 'open', *two_actor_dirs]
  assert len(list(episode_dataset(directories))) == 20
  open_logger.close()
  assert len(read_trajectories(tmp_path / 'open')) == 1


def test_reading_nothing_readable_names_the_paths(tmp_path):
  EpisodeLogger(tmp_path / 'empty').close()
  with pytest.raises(FileNotFoundError,
                     match='empty.*never_written.*neither a closed file nor a journalled'):
    read_trajectories([tmp_path / 'empty', tmp_path / 'never_written'])


def test_every_written_episode_is_readable_before_the_logger_is_closed(tmp_path):
  trajectories = random_trajectories(3, 5)
  logger = EpisodeLogger(tmp_path, schema=SCHEMA, max_episodes_per_file=2)
  for trajectory in trajectories:
    logger.write(trajectory)
  # Chorus readers take the open file's episode from the journal; plain tfds sees the
  # two closed files only.
  result = read_episodes(tmp_path)
  assert_same_trajectories(result.trajectories, trajectories)
  assert result.from_journal == {str(tmp_path): 1}
  assert len(list(episode_dataset(tmp_path))) == 4
  logger.close()
  assert_same_trajectories(read_trajectories(tmp_path), trajectories)
  assert read_episodes(tmp_path).from_journal == {}
  assert (tmp_path / 'episodes.journal').stat().st_size == 0


def test_logger_rejects_bad_arguments_with_the_fix(tmp_path):
  with pytest.raises(ValueError, match='max_episodes_per_file must be >= 1'):
    EpisodeLogger(tmp_path, max_episodes_per_file=0)
  trajectory = random_trajectories(0, 1)[0]
  with EpisodeLogger(tmp_path, schema=SCHEMA) as logger:
    with pytest.raises(ValueError, match='non-empty 1-D prompt'):
      logger.write(dataclasses.replace(trajectory, prompt_tokens=np.zeros(0, np.int32)))
    with pytest.raises(ValueError, match=r"lacks the fields \['count'\]"):
      logger.write(dataclasses.replace(trajectory, extras={
          name: value for name, value in trajectory.extras.items() if name != 'count'}))
  with pytest.raises(RuntimeError, match='open a new one'):
    logger.write(trajectory)
  with pytest.raises(ValueError, match='another schema'):
    EpisodeLogger(tmp_path)  # The core schema: this directory holds SCHEMA's episodes.


def _start_writer(directory, count, max_episodes_per_file, *, hang):
  """A child process that writes random_trajectories(0, count), printing after each."""
  return subprocess.Popen(
      [sys.executable, __file__, str(directory), str(count), str(max_episodes_per_file),
       'hang' if hang else 'loop'],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_sigkill_loses_no_episode_whose_write_returned(tmp_path):
  writer = _start_writer(tmp_path, 7, 3, hang=True)
  lines = [writer.stdout.readline() for _ in range(7)]
  writer.send_signal(signal.SIGKILL)
  writer.wait()
  assert lines[-1] == 'wrote 6\n'
  expected = random_trajectories(0, 8)
  # Two closed files of 3; episode 6, of the open file, comes from the journal.
  assert_same_trajectories(read_trajectories(tmp_path), expected[:7])
  assert len(list(episode_dataset(tmp_path))) == 6
  # A restarted writer first moves it into a closed file, then appends.
  with EpisodeLogger(tmp_path, schema=SCHEMA, max_episodes_per_file=3) as logger:
    assert len(list(episode_dataset(tmp_path))) == 7
    logger.write(expected[7])
  assert_same_trajectories(read_trajectories(tmp_path), expected)
  assert len(list(episode_dataset(tmp_path))) == 8


@pytest.mark.parametrize('emptied', ['dataset_info.json', 'features.json'])
def test_metadata_emptied_by_a_kill_mid_rewrite_is_repaired_on_reopen(tmp_path, emptied):
  expected = random_trajectories(1, 5)
  with EpisodeLogger(tmp_path, schema=SCHEMA, max_episodes_per_file=2) as logger:
    for trajectory in expected:
      logger.write(trajectory)
  # What a SIGKILL inside tfds' in-place rewrite leaves behind (seen in most random kills).
  (tmp_path / emptied).write_text('')
  with pytest.raises(ValueError, match='repair_episode_directory'):
    read_trajectories(tmp_path)
  EpisodeLogger(tmp_path, schema=SCHEMA).close()
  assert_same_trajectories(read_trajectories(tmp_path), expected)


def test_sigkills_at_spread_moments_keep_every_acknowledged_episode(tmp_path):
  # Writer 0 dies right after a write returned; writer 1, which kept writing meanwhile,
  # at an arbitrary point of a write (about 1 time in 5 inside tfds' metadata rewrite,
  # which leaves the directory unreadable until it is repaired).
  max_episodes_per_file, acknowledged = 2, 25
  writers = [_start_writer(tmp_path / str(i), 1000, max_episodes_per_file, hang=False)
             for i in range(2)]
  for writer in writers:
    for _ in range(acknowledged):
      assert writer.stdout.readline().startswith('wrote')
    writer.send_signal(signal.SIGKILL)
    writer.wait()
  for i in range(len(writers)):
    # Repairs the metadata if the kill broke it.
    EpisodeLogger(tmp_path / str(i), schema=SCHEMA).close()
    got = read_trajectories(tmp_path / str(i))
    # Every acknowledged episode, and at most the one in progress at the kill beyond.
    assert len(got) >= acknowledged
    assert_same_trajectories(got, random_trajectories(0, len(got)))


def _write_then_wait(directory, count, max_episodes_per_file, hang):
  logger = EpisodeLogger(directory, schema=SCHEMA, max_episodes_per_file=max_episodes_per_file)
  for trajectory in random_trajectories(0, count):
    logger.write(trajectory)
    print(f'wrote {trajectory.episode_id}', flush=True)
  if hang:
    signal.pause()  # Until the test kills this process.


if __name__ == '__main__':
  _write_then_wait(pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                   sys.argv[4] == 'hang')
