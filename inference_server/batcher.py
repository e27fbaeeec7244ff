"""Dynamic batching: gather many callers' requests into one accelerator batch.

SEED RL sends a batch only when it is full; with few actors that stalls, so a batch
here leaves when it is full *or* when its oldest request has waited `max_wait_ms`.
"""
from collections.abc import Callable, Sequence
import concurrent.futures
import queue
import threading
import time
from typing import Any

_POLL_SECONDS = 0.1


class _Request:

  def __init__(self, rows: Sequence[Any]):
    self.rows = list(rows)
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.submitted_at = time.monotonic()


class DynamicBatcher:
  """Runs `process_batch(rows) -> per-row results` on batches of up to `max_batch_size` rows.

  A request's rows always travel in one batch, so a request may hold at most
  `max_batch_size` rows. One thread runs the batches, in arrival order.
  """

  def __init__(self, process_batch: Callable[[list[Any]], Sequence[Any]], *,
               max_batch_size: int, max_wait_ms: float, name: str = 'batcher'):
    if max_batch_size < 1:
      raise ValueError(f'max_batch_size must be >= 1, got {max_batch_size}.')
    if max_wait_ms < 0:
      raise ValueError(f'max_wait_ms must be >= 0, got {max_wait_ms}.')
    self._process_batch = process_batch
    self.max_batch_size = max_batch_size
    self._max_wait_s = max_wait_ms / 1000.0
    self._queue: queue.Queue[_Request] = queue.Queue()
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._run, name=name, daemon=True)
    self._thread.start()

  def submit(self, rows: Sequence[Any]) -> concurrent.futures.Future:
    """Queues `rows`; the future resolves to their results, in order."""
    if not rows:
      raise ValueError('Cannot submit an empty request: send at least one row.')
    if len(rows) > self.max_batch_size:
      raise ValueError(f'A request has {len(rows)} rows but a batch holds at most '
                       f'{self.max_batch_size}; split the request.')
    if self._closed.is_set():
      raise RuntimeError('The batcher is closed.')
    request = _Request(rows)
    self._queue.put(request)
    return request.future

  def close(self):
    self._closed.set()
    self._thread.join()
    while not self._queue.empty():
      future = self._queue.get().future
      if future.set_running_or_notify_cancel():
        future.set_exception(RuntimeError('The batcher was closed.'))

  def _next_batch(self, carried: _Request | None) -> tuple[list[_Request], _Request | None]:
    first = carried
    while first is None:
      if self._closed.is_set():
        return [], None
      try:
        first = self._queue.get(timeout=_POLL_SECONDS)
      except queue.Empty:
        continue
    batch, num_rows = [first], len(first.rows)
    # From submission: a request that waited behind a running batch does not wait again.
    deadline = first.submitted_at + self._max_wait_s
    while num_rows < self.max_batch_size:
      remaining = deadline - time.monotonic()
      try:
        request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if num_rows + len(request.rows) > self.max_batch_size:
        return batch, request  # Opens the next batch instead of splitting it.
      batch.append(request)
      num_rows += len(request.rows)
    return batch, None

  def _run(self):
    carried = None
    while True:
      batch, carried = self._next_batch(carried)
      if not batch:
        return
      # Drops requests their callers cancelled; the rest can no longer be cancelled, so
      # setting their results below cannot raise InvalidStateError and kill this thread.
      batch = [request for request in batch if request.future.set_running_or_notify_cancel()]
      if not batch:
        continue
      rows = [row for request in batch for row in request.rows]
      try:
        results = self._process_batch(rows)
        if len(results) != len(rows):
          raise RuntimeError(f'process_batch returned {len(results)} results for {len(rows)} rows.')
      except Exception as error:  # pylint: disable=broad-except
        # One bad batch fails its own callers only; the server keeps serving.
        for request in batch:
          request.future.set_exception(error)
        continue
      start = 0
      for request in batch:
        request.future.set_result(list(results[start:start + len(request.rows)]))
        start += len(request.rows)
