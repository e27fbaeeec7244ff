"""Real Reverb server on loopback: trajectories in, fixed-shape batches out."""
import threading

import numpy as np
import pytest
import reverb

from chorus import core
from chorus import schema
from chorus.replay import dataset, tables, writer

_SPEC = core.SequenceSpec(prompt_len=6, completion_len=5)
# An agent's extras ride through replay like the core fields.
_SCHEMA = schema.CORE_SCHEMA.with_extras([
    schema.Field('opponent_tokens', schema.TOKENS, 'int32'),
    schema.Field('other_logprobs', schema.PER_TOKEN, 'float32'),
    schema.Field('preference', schema.SCALAR, 'float32')])


def _trajectory(rng, index):
  prompt_len = int(rng.integers(1, 6))
  completion_len = int(rng.integers(1, 5))
  return core.Trajectory(
      prompt_tokens=rng.integers(3, 20, prompt_len).astype(np.int32),
      completion_tokens=rng.integers(3, 20, completion_len).astype(np.int32),
      behaviour_logprobs=-rng.random(completion_len).astype(np.float32),
      reward=float(rng.random()), terminated=bool(index % 2), param_version=index,
      episode_id=index,
      extras=dict(opponent_tokens=rng.integers(3, 20, int(rng.integers(1, 6))).astype(np.int32),
                  other_logprobs=-rng.random(completion_len).astype(np.float32),
                  preference=float(rng.random())))


@pytest.fixture(name='server')
def fixture_server():
  config = tables.ReplayConfig(max_size=8)
  server = reverb.Server(tables.make_tables(config, _SCHEMA, _SPEC))
  yield server, config
  server.stop()


def test_queue_table_returns_each_trajectory_once_in_order_with_fixed_shapes(server):
  server, config = server
  address = f'127.0.0.1:{server.port}'
  rng = np.random.default_rng(0)
  sent = [_trajectory(rng, i) for i in range(8)]
  trajectory_writer = writer.TrajectoryWriter(address, config.table, _SCHEMA, _SPEC)
  assert trajectory_writer.write(sent[:3])  # A request's worth at once, then one by one.
  for trajectory in sent[3:]:
    assert trajectory_writer.write([trajectory])
  batches = dataset.batch_iterator(address, config.table, 4, _SCHEMA, _SPEC)
  received = [next(batches), next(batches)]
  expected = _SCHEMA.batch_trajectories(sent, _SPEC)
  for name in schema.CORE_ROW_NAMES:
    got = np.concatenate([getattr(batch, name) for batch in received])
    np.testing.assert_array_equal(got, getattr(expected, name), err_msg=name)
  assert sorted(received[0].extras) == sorted(expected.extras) == [
      'opponent_mask', 'opponent_tokens', 'other_logprobs', 'preference']
  for name in expected.extras:
    got = np.concatenate([batch.extras[name] for batch in received])
    np.testing.assert_array_equal(got, expected.extras[name], err_msg=name)
  assert received[0].prompt_tokens.shape == (4, 6)
  assert received[0].completion_tokens.shape == (4, 5)


def test_writer_blocks_on_full_queue_and_gives_up_when_asked_to_stop(server):
  server, config = server
  address = f'127.0.0.1:{server.port}'
  rng = np.random.default_rng(1)
  trajectory_writer = writer.TrajectoryWriter(address, config.table, _SCHEMA, _SPEC, poll_ms=50)
  for i in range(config.max_size):
    assert trajectory_writer.write([_trajectory(rng, i)])
  stop = threading.Event()
  threading.Timer(0.5, stop.set).start()
  assert not trajectory_writer.write([_trajectory(rng, 99)], should_stop=stop.is_set)
  assert trajectory_writer.blocked_seconds >= 0.4


def test_batches_mix_trajectories_from_several_servers():
  config = tables.ReplayConfig(max_size=8)
  servers = [reverb.Server(tables.make_tables(config, _SCHEMA, _SPEC)) for _ in range(2)]
  try:
    addresses = [f'127.0.0.1:{server.port}' for server in servers]
    rng = np.random.default_rng(2)
    for shard, address in enumerate(addresses):
      trajectory_writer = writer.TrajectoryWriter(address, config.table, _SCHEMA, _SPEC)
      for i in range(4):
        assert trajectory_writer.write([_trajectory(rng, 100 * shard + i)])
    batch = next(dataset.batch_iterator(addresses, config.table, 8, _SCHEMA, _SPEC))
    assert sorted(batch.param_version.tolist()) == [0, 1, 2, 3, 100, 101, 102, 103]
  finally:
    for server in servers:
      server.stop()
