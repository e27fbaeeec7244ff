"""Tests of DynamicBatcher with a plain Python process function (no JAX)."""
import random
import threading
import time

import pytest

from chorus.inference_server.batcher import DynamicBatcher

# Generous: a future that needs longer than this has hung, not merely run slowly.
_RESULT_TIMEOUT_S = 10.0
# Long enough that a batch that leaves early cannot have left by its deadline.
_LONG_WAIT_MS = 60_000.0


class _Recorder:
  """A process function that records each batch and answers `row -> ('done', row)`.

  With `block_first_batch`, the first batch waits for `release` to be set, so a test
  can queue requests behind a batch that is still running.
  """

  def __init__(self, block_first_batch: bool = False):
    self.batches = []
    self.release = threading.Event()
    self.first_batch_started = threading.Event()
    self._block_first_batch = block_first_batch
    self._lock = threading.Lock()

  def __call__(self, rows):
    with self._lock:
      self.batches.append(list(rows))
      is_first = len(self.batches) == 1
    if is_first and self._block_first_batch:
      self.first_batch_started.set()
      assert self.release.wait(_RESULT_TIMEOUT_S)
    if any(row == 'boom' for row in rows):
      raise KeyError('boom in this batch')
    return [('done', row) for row in rows]


@pytest.fixture
def make_batcher():
  """Builds batchers and closes every one of them after the test."""
  batchers = []

  def make(process_batch, **kwargs):
    batcher = DynamicBatcher(process_batch, **kwargs)
    batchers.append(batcher)
    return batcher

  yield make
  for batcher in batchers:
    batcher.close()


def test_full_batch_leaves_without_waiting_for_the_deadline(make_batcher):
  recorder = _Recorder()
  batcher = make_batcher(recorder, max_batch_size=4, max_wait_ms=_LONG_WAIT_MS)
  start = time.monotonic()
  first, second = batcher.submit(['a', 'b']), batcher.submit(['c', 'd'])

  assert first.result(_RESULT_TIMEOUT_S) == [('done', 'a'), ('done', 'b')]
  assert second.result(_RESULT_TIMEOUT_S) == [('done', 'c'), ('done', 'd')]
  assert time.monotonic() - start < _RESULT_TIMEOUT_S
  assert recorder.batches == [['a', 'b', 'c', 'd']]


def test_lone_request_leaves_after_max_wait_without_a_full_batch(make_batcher):
  recorder = _Recorder()
  batcher = make_batcher(recorder, max_batch_size=64, max_wait_ms=200.0)
  start = time.monotonic()

  assert batcher.submit(['alone']).result(_RESULT_TIMEOUT_S) == [('done', 'alone')]
  elapsed_s = time.monotonic() - start
  # It waited for company (about 0.2 s) but not for a batch of 64 that never comes.
  assert 0.1 <= elapsed_s < 5.0
  assert recorder.batches == [['alone']]


def test_requests_within_max_wait_share_one_batch(make_batcher):
  recorder = _Recorder()
  batcher = make_batcher(recorder, max_batch_size=64, max_wait_ms=1000.0)
  futures = [batcher.submit([index]) for index in range(3)]

  for index, future in enumerate(futures):
    assert future.result(_RESULT_TIMEOUT_S) == [('done', index)]
  assert recorder.batches == [[0, 1, 2]]


def test_request_that_does_not_fit_opens_the_next_batch_unsplit(make_batcher):
  recorder = _Recorder()
  batcher = make_batcher(recorder, max_batch_size=4, max_wait_ms=_LONG_WAIT_MS)
  futures = [batcher.submit(['a', 'b', 'c']), batcher.submit(['d', 'e']),
             batcher.submit(['f', 'g'])]

  for future in futures:
    future.result(_RESULT_TIMEOUT_S)
  # ['d', 'e'] would overflow the first batch, so the first leaves with 3 rows and
  # ['d', 'e'] opens the second, which ['f', 'g'] fills.
  assert recorder.batches == [['a', 'b', 'c'], ['d', 'e', 'f', 'g']]


def test_concurrent_requests_are_never_split_across_batches(make_batcher):
  recorder = _Recorder()
  max_batch_size = 5
  batcher = make_batcher(recorder, max_batch_size=max_batch_size, max_wait_ms=2.0)
  rng = random.Random(0)
  requests = [[(request_id, index) for index in range(rng.randint(1, max_batch_size))]
              for request_id in range(200)]
  futures = [None] * len(requests)

  def submit_some(worker):
    for request_id in range(worker, len(requests), 4):
      futures[request_id] = batcher.submit(requests[request_id])

  threads = [threading.Thread(target=submit_some, args=(worker,)) for worker in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  for future in futures:
    future.result(_RESULT_TIMEOUT_S)

  batch_of_request = {}
  for batch_index, batch in enumerate(recorder.batches):
    assert len(batch) <= max_batch_size
    for request_id, _ in batch:
      assert batch_of_request.setdefault(request_id, batch_index) == batch_index
  for request_id, rows in enumerate(requests):
    batch = recorder.batches[batch_of_request[request_id]]
    start = batch.index(rows[0])
    assert batch[start:start + len(rows)] == rows  # Whole and contiguous.


def test_results_go_back_to_their_own_callers_in_row_order(make_batcher):
  batcher = make_batcher(lambda rows: [row * 10 for row in rows], max_batch_size=8,
                         max_wait_ms=5.0)
  results, errors = {}, []

  def caller(caller_id):
    try:
      for step in range(20):
        rows = [1000 * caller_id + 10 * step + index for index in range(1 + step % 3)]
        results[(caller_id, step)] = (rows, batcher.submit(rows).result(_RESULT_TIMEOUT_S))
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)

  threads = [threading.Thread(target=caller, args=(caller_id,)) for caller_id in range(6)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()

  assert not errors
  assert len(results) == 6 * 20
  for rows, result in results.values():
    assert result == [row * 10 for row in rows]


def test_exception_fails_only_its_own_batch_and_later_batches_still_work(make_batcher):
  recorder = _Recorder()
  batcher = make_batcher(recorder, max_batch_size=2, max_wait_ms=_LONG_WAIT_MS)
  # Each request fills a batch, so the three travel in three batches.
  failing = batcher.submit(['ok', 'boom'])
  queued_behind = batcher.submit(['x', 'y'])

  with pytest.raises(KeyError, match='boom in this batch'):
    failing.result(_RESULT_TIMEOUT_S)
  assert queued_behind.result(_RESULT_TIMEOUT_S) == [('done', 'x'), ('done', 'y')]
  assert batcher.submit(['z', 'w']).result(_RESULT_TIMEOUT_S) == [('done', 'z'), ('done', 'w')]


def test_wrong_number_of_results_fails_the_batch_with_a_clear_error(make_batcher):
  batcher = make_batcher(lambda rows: rows[:-1], max_batch_size=2, max_wait_ms=_LONG_WAIT_MS)
  with pytest.raises(RuntimeError, match='returned 1 results for 2 rows'):
    batcher.submit([1, 2]).result(_RESULT_TIMEOUT_S)


def test_cancelled_request_is_skipped_and_the_batcher_keeps_serving(make_batcher):
  recorder = _Recorder(block_first_batch=True)
  batcher = make_batcher(recorder, max_batch_size=1, max_wait_ms=_LONG_WAIT_MS)
  running = batcher.submit(['running'])
  assert recorder.first_batch_started.wait(_RESULT_TIMEOUT_S)
  cancelled = batcher.submit(['cancelled'])
  assert cancelled.cancel()
  recorder.release.set()

  assert running.result(_RESULT_TIMEOUT_S) == [('done', 'running')]
  assert batcher.submit(['later']).result(_RESULT_TIMEOUT_S) == [('done', 'later')]
  assert ['cancelled'] not in recorder.batches


def test_request_queued_behind_a_slow_batch_does_not_wait_max_wait_again(make_batcher):
  recorder = _Recorder(block_first_batch=True)
  max_wait_ms = 2000.0
  batcher = make_batcher(recorder, max_batch_size=4, max_wait_ms=max_wait_ms)
  slow = batcher.submit(['slow'] * 4)
  assert recorder.first_batch_started.wait(_RESULT_TIMEOUT_S)
  waiting = batcher.submit(['waiting'])
  time.sleep(max_wait_ms / 1000.0 + 0.2)  # Its max_wait_ms passes while the batch runs.
  released_at = time.monotonic()
  recorder.release.set()

  slow.result(_RESULT_TIMEOUT_S)
  assert waiting.result(_RESULT_TIMEOUT_S) == [('done', 'waiting')]
  # Had the deadline restarted when the batcher took it up, this would be ~2 s.
  assert time.monotonic() - released_at < 1.0


def test_empty_request_raises_value_error(make_batcher):
  batcher = make_batcher(_Recorder(), max_batch_size=4, max_wait_ms=1.0)
  with pytest.raises(ValueError, match='empty request'):
    batcher.submit([])


def test_request_larger_than_a_batch_raises_value_error_naming_both_sizes(make_batcher):
  batcher = make_batcher(_Recorder(), max_batch_size=4, max_wait_ms=1.0)
  with pytest.raises(ValueError, match='5 rows but a batch holds at most 4'):
    batcher.submit([0] * 5)
  # A request of exactly max_batch_size rows is fine.
  assert len(batcher.submit([0] * 4).result(_RESULT_TIMEOUT_S)) == 4


def test_bad_limits_raise_value_error():
  with pytest.raises(ValueError, match='max_batch_size must be >= 1, got 0'):
    DynamicBatcher(_Recorder(), max_batch_size=0, max_wait_ms=1.0)
  with pytest.raises(ValueError, match='max_wait_ms must be >= 0, got -1'):
    DynamicBatcher(_Recorder(), max_batch_size=1, max_wait_ms=-1.0)


def test_submit_after_close_raises_runtime_error():
  batcher = DynamicBatcher(_Recorder(), max_batch_size=4, max_wait_ms=1.0)
  batcher.close()
  with pytest.raises(RuntimeError, match='closed'):
    batcher.submit([1])


def test_close_fails_queued_requests_even_after_a_cancelled_one():
  recorder = _Recorder(block_first_batch=True)
  batcher = DynamicBatcher(recorder, max_batch_size=1, max_wait_ms=_LONG_WAIT_MS)
  running = batcher.submit(['running'])
  assert recorder.first_batch_started.wait(_RESULT_TIMEOUT_S)
  cancelled, queued = batcher.submit(['cancelled']), batcher.submit(['queued'])
  assert cancelled.cancel()
  closer = threading.Thread(target=batcher.close)
  closer.start()
  # Lets the running batch finish only once close() has begun, so nothing queued runs.
  deadline = time.monotonic() + _RESULT_TIMEOUT_S
  # pylint: disable-next=protected-access
  while not batcher._closed.is_set() and time.monotonic() < deadline:
    time.sleep(0.01)
  recorder.release.set()
  closer.join(_RESULT_TIMEOUT_S)

  assert not closer.is_alive()
  assert running.result(_RESULT_TIMEOUT_S) == [('done', 'running')]
  with pytest.raises(RuntimeError, match='batcher was closed'):
    queued.result(_RESULT_TIMEOUT_S)
  assert recorder.batches == [['running']]
