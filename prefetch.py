"""Reading an iterator ahead of its consumer, in a thread: the learner's next batch is
sampled during its update, and an inference server receives a push's next chunks while it
checks and places this one."""
from collections.abc import Iterator
import queue
import threading
from typing import Generic, TypeVar

T = TypeVar('T')
_END = object()


class Prefetcher(Generic[T]):
  """Iterates `items` up to `buffer_size` items ahead, in a daemon thread; same items, same order.

  It reads an item only when a slot is free, so no more than `buffer_size` items are ever
  taken from `items` before the caller asks for them (from a queue table, every row read
  early waits, and its policy lag grows). An error raised by `items` is raised by the
  `next` call that would have returned the item it failed on. A caller that stops early
  calls `close`, which lets the thread end once its read in progress returns.

  Args:
    items: the iterator to read ahead of the caller (replay batches, a stream's messages).
    buffer_size: items read ahead; 1 reads the next batch during the current update.
  """

  def __init__(self, items: Iterator[T], buffer_size: int = 1):
    if buffer_size < 1:
      raise ValueError(f'buffer_size must be >= 1, got {buffer_size}.')
    self._items = items
    self._free_slots = threading.Semaphore(buffer_size)
    self._buffer: queue.Queue = queue.Queue()
    self._done = self._closed = False
    self._thread = threading.Thread(target=self._fill, name='prefetcher', daemon=True)
    self._thread.start()

  def _fill(self):
    try:
      while True:
        self._free_slots.acquire()
        if self._closed:
          return
        self._buffer.put((next(self._items), None))
    except StopIteration:
      self._buffer.put((_END, None))
    except Exception as error:  # pylint: disable=broad-except
      self._buffer.put((_END, error))

  def __iter__(self) -> 'Prefetcher[T]':
    return self

  def __next__(self) -> T:
    if self._done:
      raise StopIteration
    item, error = self._buffer.get()
    if item is _END:
      self._done = True
      if error is not None:
        raise error
      raise StopIteration
    self._free_slots.release()
    return item

  def close(self) -> None:
    """Stops reading ahead and drops what was read; iterating afterwards ends at once."""
    self._closed = self._done = True
    self._free_slots.release()  # Wakes a thread waiting for a slot, to see `_closed`.
    while not self._buffer.empty():
      self._buffer.get_nowait()
