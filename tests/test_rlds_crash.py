"""A killed RLDS writer loses at most the episode in progress: the journal and its repair.

Run as a script, this file is the writer process that the tests kill.
"""
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from chorus import core
from chorus import schema
from chorus.datasets import EpisodeLogger
from chorus.datasets import episode_dataset
from chorus.datasets import journal as journal_lib
from chorus.datasets import read_episodes
from chorus.datasets import read_trajectories
from chorus.datasets import repair_episode_directory
from chorus.launch import cli
from test_rlds_episodes import assert_same_trajectories
from test_rlds_episodes import digest
from test_rlds_episodes import random_trajectories
from test_rlds_episodes import SCHEMA

_BIG_FILES = 1000  # No file closes during the tests: every episode is in the open one.


def _start_writer(directory, count: int) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, __file__, str(directory), str(count)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))


def _kill_after(writer: subprocess.Popen, acknowledged: int) -> list[str]:
  """SIGKILLs the writer while it writes, after `acknowledged` writes; returns every ack."""
  lines = [writer.stdout.readline() for _ in range(acknowledged)]
  assert lines[-1], f'the writer ended (status {writer.wait()}) before {acknowledged} writes'
  writer.send_signal(signal.SIGKILL)
  writer.wait()
  return lines + writer.stdout.readlines()  # Those it printed before the signal landed.


def test_a_sigkilled_writer_loses_at_most_the_episode_in_progress(tmp_path):
  writer = _start_writer(tmp_path, 2000)
  acks = _kill_after(writer, 30)
  expected = random_trajectories(11, 2000)
  # Each line is the digest of every episode up to it, printed after write() returned.
  assert all(line == f'{i} {digest(expected[:i + 1])}\n' for i, line in enumerate(acks))
  got = read_trajectories(tmp_path)
  assert len(acks) <= len(got) <= len(acks) + 1
  assert_same_trajectories(got, expected[:len(got)])


def test_the_repair_command_makes_journalled_episodes_visible_to_plain_tfds(tmp_path, capsys):
  writer = _start_writer(tmp_path / 'actor_000', 2000)
  acks = _kill_after(writer, 12)
  directory = tmp_path / 'actor_000'
  with pytest.raises(FileNotFoundError):  # No closed file: plain tfds sees nothing.
    list(episode_dataset(directory))
  assert cli.main(['datasets', 'repair', str(tmp_path)]) == 0
  out = capsys.readouterr().out
  got = read_trajectories(directory)
  assert len(acks) <= len(got) <= len(acks) + 1
  assert f'{directory}: {len(got)} episodes in closed files, of which {len(got)} recovered ' \
         'from its journal into chorus_episodes-train.tfrecord-00000' in out
  builder = tfds.builder_from_directories([str(directory)])
  assert builder.info.splits['train'].num_examples == len(got)
  assert os.path.getsize(journal_lib.journal_path(directory)) == 0
  assert read_episodes(directory).from_journal == {}
  assert_same_trajectories(got, random_trajectories(11, len(got)))
  # Twice changes nothing.
  assert repair_episode_directory(directory).num_episodes == len(got)
  assert_same_trajectories(read_trajectories(directory), got)


def _open_logger_with(directory, trajectories, max_episodes_per_file=_BIG_FILES):
  """A logger left open, as if its process had died.

  The caller keeps it referenced until the checks are done: collecting it would flush
  the open file, which a killed process never does.
  """
  logger = EpisodeLogger(directory, schema=SCHEMA, max_episodes_per_file=max_episodes_per_file)
  for trajectory in trajectories:
    logger.write(trajectory)
  return logger


@pytest.mark.parametrize('cut', [3, 40, -5])
def test_a_torn_last_journal_record_is_dropped_with_a_log_line(tmp_path, caplog, cut):
  expected = random_trajectories(4, 5)
  logger = _open_logger_with(tmp_path, expected[:4])
  record = journal_lib.encode_record(4, expected[4], SCHEMA)
  with open(journal_lib.journal_path(tmp_path), 'ab') as file:
    file.write(record[:cut])  # Killed in the middle of appending episode 4.
  with caplog.at_level(logging.INFO):
    got = read_episodes(tmp_path)
  assert_same_trajectories(got.trajectories, expected[:4])
  assert got.from_journal == {str(tmp_path): 4}
  assert 'the episode whose write was in progress' in caplog.text
  assert 'read 4 episodes from episodes.journal' in caplog.text
  report = repair_episode_directory(tmp_path)
  assert (report.num_episodes, report.recovered) == (4, 4)
  assert report.dropped_bytes == len(record[:cut])
  assert 'dropped the episode in progress' in str(report)
  assert_same_trajectories(read_trajectories(tmp_path), expected[:4])
  del logger


def test_a_journal_record_with_a_bad_checksum_ends_the_journal(tmp_path):
  expected = random_trajectories(5, 3)
  logger = _open_logger_with(tmp_path, expected)
  path = journal_lib.journal_path(tmp_path)
  data = bytearray(open(path, 'rb').read())
  data[-3] ^= 0xFF  # Flips bits in the last record's arrays.
  open(path, 'wb').write(bytes(data))
  journal = journal_lib.read_journal(tmp_path)
  assert len(journal.records) == 2 and 'checksum' in journal.problem
  assert_same_trajectories(read_trajectories(tmp_path), expected[:2])
  del logger


def test_episodes_already_in_a_closed_file_are_not_recovered_twice(tmp_path):
  # Killed after tfds listed a full file but before the journal was emptied.
  expected = random_trajectories(6, 5)
  logger = _open_logger_with(tmp_path, expected[:3], max_episodes_per_file=3)
  stale = b''.join(journal_lib.encode_record(i, t, SCHEMA) for i, t in enumerate(expected[:3]))
  with open(journal_lib.journal_path(tmp_path), 'ab') as file:
    file.write(stale)
  for trajectory in expected[3:]:
    logger.write(trajectory)  # In the open second file, and in the journal after `stale`.
  assert_same_trajectories(read_trajectories(tmp_path), expected)
  assert repair_episode_directory(tmp_path).recovered == 2
  assert_same_trajectories(read_trajectories(tmp_path), expected)
  del logger


def test_a_restarted_writer_continues_after_the_recovered_episodes(tmp_path):
  expected = random_trajectories(7, 9)
  dead = _open_logger_with(tmp_path, expected[:4], max_episodes_per_file=3)  # 3 closed, 1 open.
  with EpisodeLogger(tmp_path, schema=SCHEMA, max_episodes_per_file=3) as logger:
    for trajectory in expected[4:]:
      logger.write(trajectory)
  assert_same_trajectories(read_trajectories(tmp_path), expected)
  assert tfds.builder_from_directory(tmp_path).info.splits['train'].shard_lengths == [3, 1, 3, 2]
  del dead


# The done-when test of the issue: real processes, one actor SIGKILLed mid-run.
_P, _T, _PROMPTS_PER_REQUEST = 16, 8, 4


def _padded_rows(batch) -> list[bytes]:
  fields = batch._asdict()
  del fields['extras']  # The core schema has none.
  return [b''.join(np.asarray(fields[name][i]).tobytes() for name in sorted(fields))
          for i in range(len(batch.reward))]


@pytest.fixture(name='servers')
def fixture_servers():
  """Reverb (a queue table that holds every episode) and an inference server, on 127.0.0.1."""
  # pylint: disable=g-import-not-at-top  (slow imports only this test needs)
  import jax
  import reverb
  from chorus import models
  from chorus import core
  from chorus.inference_server.config import InferenceServerConfig
  from chorus.inference_server.served_model import ServedModel
  from chorus.inference_server.service import start_server
  from chorus.replay import make_tables
  from chorus.replay import ReplayConfig
  # A queue never evicts and nothing samples it during the run, so it ends holding every
  # trajectory that reached replay, each exactly once.
  replay = reverb.Server(make_tables(ReplayConfig(kind='queue', max_size=100_000),
                                     schema.CORE_SCHEMA, core.SequenceSpec(_P, _T)), port=None)
  decoder = models.DecoderConfig.tiny(models.CharTokenizer().vocab_size)
  served = ServedModel(
      'policy', decoder, models.init_params(decoder, jax.random.PRNGKey(0)), version=0,
      config=InferenceServerConfig(max_batch_size=4),
      sequence=core.SequenceSpec(prompt_len=_P, completion_len=_T))
  served.warm_up()
  grpc_server, port = start_server({'policy': served}, '127.0.0.1:0')
  yield f'localhost:{replay.port}', f'127.0.0.1:{port}'
  grpc_server.stop(grace=1).wait()
  served.close()
  replay.stop()


def _start_actor(actor_id, rlds, replay_address, inference_address, max_episodes):
  return subprocess.Popen(
      [sys.executable, __file__, 'actor', str(actor_id), str(rlds), replay_address,
       inference_address, str(max_episodes)],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu'))


@pytest.mark.slow
def test_a_run_with_a_sigkilled_actor_reads_back_every_episode_it_sent(
    servers, tmp_path, capsys):
  # pylint: disable=g-import-not-at-top
  import reverb
  from chorus.replay import batch_iterator
  from chorus import core
  replay_address, inference_address = servers
  rlds = tmp_path / 'rlds'
  finishing = _start_actor(0, rlds, replay_address, inference_address, 12)
  killed = _start_actor(1, rlds, replay_address, inference_address, 0)
  client = reverb.Client(replay_address)
  deadline = time.monotonic() + 240
  while client.server_info()['trajectories'].current_size < 60:
    assert killed.poll() is None, killed.stderr.read()[-3000:]
    assert time.monotonic() < deadline, 'the actors wrote too little to replay in 240 s'
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)  # Mid-run: it writes episodes in a loop.
  killed.wait()
  assert finishing.wait(timeout=240) == 0, finishing.stderr.read()[-3000:]

  # What the actors sent: every trajectory that reached replay (each is logged first).
  stored = client.server_info()['trajectories'].current_size
  spec = core.SequenceSpec(_P, _T)
  sent = _padded_rows(next(batch_iterator(replay_address, 'trajectories', stored,
                                          schema.CORE_SCHEMA, spec)))
  episodes = read_trajectories(rlds)
  recorded = _padded_rows(schema.CORE_SCHEMA.batch_trajectories(episodes, spec))
  missing = collections.Counter(sent) - collections.Counter(recorded)
  assert not missing, f'{sum(missing.values())} episodes that reached replay are not in RLDS'
  # RLDS also holds what the killed actor logged but had not yet put into replay: at most
  # its last request (logged first, then sent to replay in one flush).
  assert len(recorded) - len(sent) <= _PROMPTS_PER_REQUEST
  by_actor = collections.Counter(t.actor_id for t in episodes)
  assert by_actor[0] == 12 and by_actor[1] >= 60 - 12
  for actor_id in (0, 1):
    ids = [t.episode_id for t in episodes if t.actor_id == actor_id]
    assert ids == list(range(len(ids)))

  def datasets(*args):
    capsys.readouterr()
    assert cli.main(['datasets', *map(str, args)]) == 0
    return capsys.readouterr().out

  out = datasets('inspect', rlds, '-n', 1)
  assert f'({by_actor[1]} from its journal, in no closed file yet' in out
  assert f'total {len(episodes)}'.split() == next(
      line.split() for line in out.splitlines() if line.strip().startswith('total'))
  out = datasets('repair', rlds)
  assert f'{rlds / "actor_001"}: {by_actor[1]} episodes in closed files, of which ' \
         f'{by_actor[1]} recovered' in out
  builder = tfds.builder_from_directories([str(rlds / 'actor_000'), str(rlds / 'actor_001')])
  assert builder.info.splits['train'].num_examples == len(episodes)
  assert_same_trajectories(read_trajectories(rlds), episodes)
  out = datasets('stats', rlds)
  assert f'{len(episodes)} episodes from 2 directories.' in out
  datasets('export', rlds, '--output', tmp_path / 'all.jsonl')
  records = [json.loads(line) for line in (tmp_path / 'all.jsonl').read_text().splitlines()]
  assert [r['completion_tokens'] for r in records] == [
      t.completion_tokens.tolist() for t in episodes]
  out = datasets('filter', rlds, '--output', tmp_path / 'good', '--min-reward', '0.5')
  good = [t for t in episodes if t.reward >= 0.5]
  assert f'Kept {len(good)} of {len(episodes)} episodes' in out
  if good:
    assert_same_trajectories(read_trajectories(tmp_path / 'good'), good)


def _run_actor(actor_id: int, rlds: str, replay_address: str, inference_address: str,
               max_episodes: int):
  """An actor wired as launch/nodes.py's `actor` entry point wires one."""
  # pylint: disable=g-import-not-at-top
  from chorus.actors import reverse_digits
  from chorus.actors import rollouts
  from chorus.actors.actor import Actor
  from chorus.actors.actor import ActorConfig
  from chorus.inference_server.client import InferenceClient
  from chorus.replay import TrajectoryWriter
  client = InferenceClient(inference_address)
  client.wait_until_ready()
  writer = TrajectoryWriter(replay_address, 'trajectories', schema.CORE_SCHEMA,
                            core.SequenceSpec(_P, _T))
  task = reverse_digits.ReverseDigitsTask()
  config = ActorConfig(prompts_per_request=_PROMPTS_PER_REQUEST, max_new_tokens=_T)
  with EpisodeLogger(os.path.join(rlds, f'actor_{actor_id:03d}'),
                     max_episodes_per_file=_BIG_FILES) as logger:
    Actor(actor_id, config, task, rollout=rollouts.PolicyRollout(client, task, config),
          write_replay=writer.write,
          log_episode=logger.write, metrics=None, seed=3).run(
              lambda: False, max_episodes=max_episodes or None)
  writer.close()
  client.close()


def _write_and_acknowledge(directory: str, count: int):
  # Exported so that a parent can compare with its own random_trajectories(11, ...).
  logger = EpisodeLogger(directory, schema=SCHEMA, max_episodes_per_file=_BIG_FILES)
  written = []
  for trajectory in random_trajectories(11, count):
    logger.write(trajectory)
    written.append(trajectory)
    # One write per line: print() writes the text and its newline separately when Python
    # runs unbuffered (PYTHONUNBUFFERED, as CI sets it), and a kill between them would
    # leave the last acknowledgement without its newline.
    sys.stdout.write(f'{len(written) - 1} {digest(written)}\n')
    sys.stdout.flush()


if __name__ == '__main__':
  if sys.argv[1] == 'actor':
    _run_actor(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
  else:
    _write_and_acknowledge(sys.argv[1], int(sys.argv[2]))
