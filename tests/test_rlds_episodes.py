"""RLDS episodes: exact round trips, RLDS step fields, and what a SIGKILL of a writer loses.

Run as a script, this file is the writer process that the crash tests kill.
"""
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from chorus import core
from chorus.datasets import EpisodeLogger, episode_dataset, read_trajectories

_FIELDS = ('reward', 'terminated', 'param_version', 'temperature', 'model_name', 'prompt_id',
           'actor_id', 'episode_id')


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
        actor_id=actor_id, episode_id=episode_id))
  return trajectories


def assert_same_trajectories(got, expected):
  assert len(got) == len(expected)
  for got_one, expected_one in zip(got, expected):
    for name in _FIELDS:
      assert getattr(got_one, name) == getattr(expected_one, name), name
    for name, dtype in (('prompt_tokens', np.int32), ('completion_tokens', np.int32),
                        ('behaviour_logprobs', np.float32)):
      got_array = getattr(got_one, name)
      assert got_array.dtype == dtype, name
      np.testing.assert_array_equal(got_array, getattr(expected_one, name), err_msg=name)


@pytest.fixture(name='two_actor_dirs', scope='module')
def fixture_two_actor_dirs(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('run')
  written = {}
  for actor_id, count in ((0, 11), (1, 9)):
    directory = run_dir / 'rlds' / f'actor_{actor_id:03d}'  # Missing: the logger creates it.
    written[directory] = random_trajectories(actor_id, count, actor_id)
    with EpisodeLogger(directory, max_episodes_per_file=4) as logger:
      for trajectory in written[directory]:
        logger.write(trajectory)
  return written


def test_two_writers_read_back_as_one_dataset_with_every_field_exact(two_actor_dirs):
  directories = list(two_actor_dirs)
  got = read_trajectories([str(directory) for directory in directories])
  expected = [t for directory in directories for t in two_actor_dirs[directory]]
  assert_same_trajectories(got, expected)
  assert {t.terminated for t in expected} == {True, False}


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
  open_logger = EpisodeLogger(tmp_path / 'open', max_episodes_per_file=4)
  open_logger.write(random_trajectories(7, 1)[0])  # In an open file: not readable yet.
  directories = [tmp_path / 'never_written', tmp_path / 'open', *two_actor_dirs]
  assert len(list(episode_dataset(directories))) == 20
  open_logger.close()
  assert len(read_trajectories(tmp_path / 'open')) == 1


def test_reading_nothing_readable_names_the_paths(tmp_path):
  EpisodeLogger(tmp_path / 'empty').close()
  with pytest.raises(FileNotFoundError, match='empty.*never_written.*no closed file yet'):
    read_trajectories([tmp_path / 'empty', tmp_path / 'never_written'])


def test_a_full_file_is_readable_before_the_logger_is_closed(tmp_path):
  trajectories = random_trajectories(3, 5)
  logger = EpisodeLogger(tmp_path, max_episodes_per_file=2)
  for trajectory in trajectories:
    logger.write(trajectory)
  assert_same_trajectories(read_trajectories(tmp_path), trajectories[:4])
  logger.close()
  assert_same_trajectories(read_trajectories(tmp_path), trajectories)


def test_logger_rejects_bad_arguments_with_the_fix(tmp_path):
  with pytest.raises(ValueError, match='max_episodes_per_file must be >= 1'):
    EpisodeLogger(tmp_path, max_episodes_per_file=0)
  trajectory = random_trajectories(0, 1)[0]
  with EpisodeLogger(tmp_path) as logger:
    with pytest.raises(ValueError, match='non-empty 1-D prompt'):
      logger.write(core.Trajectory(
          prompt_tokens=np.zeros(0, np.int32), completion_tokens=trajectory.completion_tokens,
          behaviour_logprobs=trajectory.behaviour_logprobs, reward=0.0, terminated=True,
          param_version=0))
  with pytest.raises(RuntimeError, match='open a new one'):
    logger.write(trajectory)


def _start_writer(directory, count, max_episodes_per_file, *, hang):
  """A child process that writes random_trajectories(0, count), printing after each."""
  return subprocess.Popen(
      [sys.executable, __file__, str(directory), str(count), str(max_episodes_per_file),
       'hang' if hang else 'loop'],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_sigkill_loses_only_the_open_file(tmp_path):
  writer = _start_writer(tmp_path, 7, 3, hang=True)
  lines = [writer.stdout.readline() for _ in range(7)]
  writer.send_signal(signal.SIGKILL)
  writer.wait()
  assert lines[-1] == 'wrote 6\n'
  expected = random_trajectories(0, 7)
  # Two closed files of 3; episode 6 was in the open file.
  assert_same_trajectories(read_trajectories(tmp_path), expected[:6])
  # A restarted writer appends after the closed files.
  with EpisodeLogger(tmp_path, max_episodes_per_file=3) as logger:
    logger.write(expected[6])
  assert_same_trajectories(read_trajectories(tmp_path), expected)


@pytest.mark.parametrize('emptied', ['dataset_info.json', 'features.json'])
def test_metadata_emptied_by_a_kill_mid_rewrite_is_repaired_on_reopen(tmp_path, emptied):
  expected = random_trajectories(1, 5)
  with EpisodeLogger(tmp_path, max_episodes_per_file=2) as logger:
    for trajectory in expected:
      logger.write(trajectory)
  # What a SIGKILL inside tfds' in-place rewrite leaves behind (seen in most random kills).
  (tmp_path / emptied).write_text('')
  with pytest.raises(ValueError, match='repair_episode_directory'):
    read_trajectories(tmp_path)
  EpisodeLogger(tmp_path).close()
  assert_same_trajectories(read_trajectories(tmp_path), expected)


def test_sigkills_at_spread_moments_keep_every_acknowledged_closed_file(tmp_path):
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
    EpisodeLogger(tmp_path / str(i)).close()  # Repairs the metadata if the kill broke it.
    got = read_trajectories(tmp_path / str(i))
    assert len(got) >= acknowledged // max_episodes_per_file * max_episodes_per_file
    assert_same_trajectories(got, random_trajectories(0, len(got)))


def _write_then_wait(directory, count, max_episodes_per_file, hang):
  logger = EpisodeLogger(directory, max_episodes_per_file=max_episodes_per_file)
  for trajectory in random_trajectories(0, count):
    logger.write(trajectory)
    print(f'wrote {trajectory.episode_id}', flush=True)
  if hang:
    signal.pause()  # Until the test kills this process.


if __name__ == '__main__':
  _write_then_wait(pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                   sys.argv[4] == 'hang')
