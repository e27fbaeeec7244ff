"""Reading ahead of the consumer: the learner's batches, a push's chunks."""
import threading
import time

import numpy as np
import pytest

from chorus import prefetch


def _batches(count: int):
  rng = np.random.default_rng(0)
  for step in range(count):
    yield {'step': step, 'tokens': rng.integers(0, 50, (4, 6))}


def test_prefetcher_yields_the_same_batches_in_the_same_order():
  plain = list(_batches(50))
  prefetched = list(prefetch.Prefetcher(_batches(50), buffer_size=3))
  assert [b['step'] for b in prefetched] == list(range(50))
  for expected, got in zip(plain, prefetched, strict=True):
    np.testing.assert_array_equal(got['tokens'], expected['tokens'])


def test_prefetcher_reads_the_next_batch_while_the_caller_works():
  read = []

  def slow_batches():
    for step in range(3):
      read.append(step)
      yield step

  batches = prefetch.Prefetcher(slow_batches())
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

  batches = prefetch.Prefetcher(failing())
  assert next(batches) == 1
  with pytest.raises(RuntimeError, match='replay went away'):
    next(batches)
  with pytest.raises(StopIteration):
    next(batches)


def test_a_closed_prefetcher_ends_and_its_thread_stops():
  read, readers = [], set()

  def endless():
    while True:
      readers.add(threading.current_thread())
      read.append(len(read))
      yield read[-1]

  items = prefetch.Prefetcher(endless(), buffer_size=2)
  assert next(items) == 0
  items.close()
  with pytest.raises(StopIteration):
    next(items)
  (reader,) = readers
  reader.join(timeout=10)
  assert not reader.is_alive(), 'the reading thread outlived close()'
  assert len(read) <= 3  # Never more than the one taken and the two slots.
