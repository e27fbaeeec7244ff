"""Off the learner's critical path: the prefetching iterator and the background publisher."""
import threading
import time

import numpy as np
import pytest

from chorus.learners import background


def _batches(count: int):
  rng = np.random.default_rng(0)
  for step in range(count):
    yield {'step': step, 'tokens': rng.integers(0, 50, (4, 6))}


def test_prefetcher_yields_the_same_batches_in_the_same_order():
  plain = list(_batches(50))
  prefetched = list(background.Prefetcher(_batches(50), buffer_size=3))
  assert [b['step'] for b in prefetched] == list(range(50))
  for expected, got in zip(plain, prefetched, strict=True):
    np.testing.assert_array_equal(got['tokens'], expected['tokens'])


def test_prefetcher_reads_the_next_batch_while_the_caller_works():
  read = []

  def slow_batches():
    for step in range(3):
      read.append(step)
      yield step

  batches = background.Prefetcher(slow_batches())
  assert next(batches) == 0
  deadline = time.monotonic() + 10
  while len(read) < 2 and time.monotonic() < deadline:  # The caller "updates" meanwhile.
    time.sleep(0.01)
  time.sleep(0.2)  # Time to read a third batch, which a buffer of one must not do.
  assert read == [0, 1]


def test_prefetcher_raises_the_error_of_the_item_it_failed_on():
  def failing():
    yield 1
    raise RuntimeError('replay went away')

  batches = background.Prefetcher(failing())
  assert next(batches) == 1
  with pytest.raises(RuntimeError, match='replay went away'):
    next(batches)
  with pytest.raises(StopIteration):
    next(batches)


class _GatedServer:
  """A fake server whose pushes wait for `gate`; records the versions it received."""

  def __init__(self, gate: threading.Event):
    self.gate = gate
    self.versions = []
    self.push_started = threading.Event()

  def push(self, models, version):
    self.push_started.set()
    self.gate.wait()
    self.versions.append((version, models['policy']))


def test_a_burst_reaches_a_slow_server_as_its_first_and_newest_versions_only():
  slow, fast = _GatedServer(threading.Event()), _GatedServer(threading.Event())
  fast.gate.set()
  publisher = background.BackgroundPublisher({'slow': slow.push, 'fast': fast.push})
  publisher.submit({'policy': 'params-1'}, 1)
  assert slow.push_started.wait(10)
  for version in range(2, 11):  # Nine updates while version 1 is stuck in flight: had
    publisher.submit({'policy': f'params-{version}'}, version)  # one blocked, this hangs.
  slow.gate.set()
  publisher.flush(timeout_s=10)
  assert slow.versions == [(1, 'params-1'), (10, 'params-10')]  # Never queued.
  assert fast.versions[-1] == (10, 'params-10')
  assert publisher.pushed_versions() == {'slow': 10, 'fast': 10}
  publisher.close()


def test_a_failed_push_is_raised_by_the_next_submit():
  def broken(models, version):
    raise ConnectionError(f'server down at version {version}')

  publisher = background.BackgroundPublisher({'broken': broken})
  publisher.submit({'policy': 1}, 1)
  with pytest.raises(background.PublishError, match='server down at version 1'):
    publisher.flush(timeout_s=10)
  with pytest.raises(background.PublishError, match='broken'):
    publisher.submit({'policy': 2}, 2)
  publisher.close()
