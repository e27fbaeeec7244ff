"""Continuous batching: rows join and leave fixed decoding slots between decode steps.

A dynamic batch (lanes.DynamicLane) decodes until its longest row is done: rows that
finish early idle in it and rows that arrive wait for all of it. Here `max_batch_size`
slots decode at once; between decode calls finished rows leave and waiting rows are
prefilled into the free slots, in arrival order (a request's rows may start in different
calls when slots are short). One thread per lane runs the slots; the compiled parts are
`slots.SlotDecoder`, whose fixed shapes make every compilation happen in warm-up.

Parameter swaps. Each insert and decode call reads the models' current parameters, so
a swap takes effect at the next call and no row is dropped or restarted. A row whose
decode steps span a swap keeps its KV cache: its tokens after the swap are drawn by the
new parameters attending to the keys and values the old ones computed. Each token's
log-prob is that of the distribution that really drew it, so V-trace's importance
weights pi / mu stay exact per token. The row reports the oldest and the newest version
that drew its tokens (`RowResult`); the server sends the oldest as the completion's
`param_version`, which the learner uses for policy lag, so lag is never under-stated
and max-staleness limits stay safe.
"""
import collections
import concurrent.futures
import dataclasses
import queue
import threading

import jax
import numpy as np

from chorus.inference_server import sampler as sampler_lib
from chorus.inference_server import slots as slots_lib
from chorus.inference_server.lanes import LaneModel
from chorus.inference_server.lanes import lane_name
from chorus.inference_server.lanes import PADDING_ROW
from chorus.inference_server.lanes import read_params
from chorus.inference_server.lanes import Row
from chorus.inference_server.lanes import row_batch
from chorus.inference_server.lanes import RowResult

_POLL_SECONDS = 0.1


@dataclasses.dataclass(eq=False)
class _Request:
  rows: list[Row]
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)
  results: list[RowResult | None] = dataclasses.field(default_factory=list)
  started: int = 0  # Rows given a slot so far, in order.
  unfinished: int = 0


@dataclasses.dataclass(eq=False)
class _SlotRow:
  """The row a slot holds, and the oldest and newest versions (one per model) that drew
  its tokens so far."""
  request: _Request
  index: int
  length: int = 0  # Tokens drawn, as of the last call.
  oldest: tuple[int, ...] | None = None
  newest: tuple[int, ...] | None = None


class ContinuousLane:
  """Decode-step slots for one decoder, or a pair (see lanes.DynamicLane for pairs)."""

  def __init__(self, model: LaneModel, second: LaneModel | None = None):
    self._model, self._second = model, second
    sequence = model.sequence
    if second is None:
      next_logits, bind = sampler_lib.decoder_logits(model.decoder_config), slots_lib.plain_bind
    else:
      next_logits = sampler_lib.paired_logits(
          model.decoder_config, None if second is model else second.decoder_config)
      bind = slots_lib.paired_bind
    self._decoder = slots_lib.SlotDecoder(
        next_logits, bind, sequence.prompt_len, sequence.completion_len,
        model.config.max_batch_size, model.config.decode_steps_per_call,
        model.decoder_config.eos_token_id)
    self._arrivals: queue.Queue[_Request] = queue.Queue()
    self._closed = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name=f'scheduler-{lane_name(model, second)}')
    self._thread.start()

  @property
  def compilations(self) -> int:
    return self._decoder.compilations

  def submit(self, rows: list[Row]) -> concurrent.futures.Future:
    """Queues `rows`; the future resolves to their results, in order."""
    if not rows:
      raise ValueError('Cannot submit an empty request: send at least one row.')
    if self._closed.is_set():
      raise RuntimeError('The scheduler is closed.')
    request = _Request(list(rows), results=[None] * len(rows), unfinished=len(rows))
    self._arrivals.put(request)
    return request.future

  def warm_up(self):
    """Compiles insert (every bucket and window) and decode (every bucket), on a scratch
    copy of the slots."""
    shared, _ = read_params(self._model, self._second)
    state = self._empty(shared)
    for size in self._decoder.buckets():
      for window in self._decoder.windows():
        state = self._decoder.insert(
            shared, state, np.arange(size, dtype=np.int32),
            self._decoder.cut(self._batch([PADDING_ROW] * size), window))
      state = self._decoder.decode(shared, state, size)
    jax.block_until_ready(state)

  def close(self):
    self._closed.set()
    self._thread.join()

  def _batch(self, rows: list[Row]) -> slots_lib.RowBatch:
    return row_batch(rows, self._model.sequence.prompt_len, paired=self._second is not None)

  def _empty(self, shared) -> slots_lib.SlotState:
    return self._decoder.empty(shared, self._batch([PADDING_ROW]))

  def _inserts(self, started: list[tuple[int, Row]]):
    """The insert calls for the started (slot, row) pairs: (slot_index [R], RowBatch),
    R a bucket (padding rows go to slot num_slots, which drops them). Rows are grouped
    by prompt window, so a row is prefilled alike whatever starts beside it."""
    by_window = {}
    for slot, row in started:
      length = max(len(row.prompt), len(row.second_prompt or row.prompt))
      window = next(w for w in self._decoder.windows() if w >= length)
      by_window.setdefault(window, []).append((slot, row))
    num_slots = self._decoder.num_slots
    for window, group in by_window.items():
      bucket = next(size for size in self._decoder.buckets() if size >= len(group))
      padding = bucket - len(group)
      slot_index = np.array([slot for slot, _ in group] + [num_slots] * padding, np.int32)
      batch = self._batch([row for _, row in group] + [PADDING_ROW] * padding)
      yield slot_index, self._decoder.cut(batch, window)

  def _run(self):
    waiting: collections.deque[_Request] = collections.deque()
    slots: list[_SlotRow | None] = [None] * self._decoder.num_slots
    state = None
    try:
      while True:
        if not self._receive(waiting, idle=not any(slots)):
          return
        started = self._start_rows(waiting, slots)
        shared, versions = read_params(self._model, self._second)
        try:
          if state is None:
            state = self._empty(shared)
          state, insert_rows, decode_rows = self._step(shared, state, started, slots)
          lengths, done = jax.device_get((state.lengths, state.done))
        except Exception as error:  # pylint: disable=broad-except
          # The slots' buffers were donated to the failed call: start again from empty
          # slots, failing the rows they held. The lane keeps serving.
          state = None
          for request in {slot.request for slot in slots if slot is not None}:
            _fail(request, error)
          slots = [None] * len(slots)
          continue
        self._finish(state, slots, versions, lengths, done, insert_rows, decode_rows)
    finally:
      for request in list(waiting) + list(_drain(self._arrivals)) + [
          slot.request for slot in slots if slot is not None]:
        _fail(request, RuntimeError('The scheduler was closed.'))

  def _receive(self, waiting: collections.deque, idle: bool) -> bool:
    """Moves arrived requests to `waiting`; blocks while the lane has nothing to do.
    Returns False once the lane is closed."""
    while True:
      if self._closed.is_set():
        return False
      try:
        block = idle and not waiting
        waiting.append(self._arrivals.get(timeout=_POLL_SECONDS) if block
                       else self._arrivals.get_nowait())
      except queue.Empty:
        if not (idle and not waiting):
          return True

  def _start_rows(self, waiting: collections.deque,
                  slots: list[_SlotRow | None]) -> list[tuple[int, Row]]:
    """Gives free slots to waiting rows, first come first served: (slot, row) pairs."""
    started = []
    free = [index for index, slot in enumerate(slots) if slot is None]
    while free and waiting:
      request = waiting[0]
      # Drops requests their callers cancelled before any row started; the rest can no
      # longer be cancelled, so setting their results cannot raise.
      if request.future.done() or (request.started == 0
                                   and not request.future.set_running_or_notify_cancel()):
        waiting.popleft()
        continue
      slot = free.pop(0)
      slots[slot] = _SlotRow(request, request.started)
      started.append((slot, request.rows[request.started]))
      request.started += 1
      if request.started == len(request.rows):
        waiting.popleft()
    return started

  def _step(self, shared, state: slots_lib.SlotState, started: list[tuple[int, Row]],
            slots: list[_SlotRow | None]) -> tuple[slots_lib.SlotState, int, int]:
    """Inserts the started rows, then decodes the bucket of slots that holds every busy
    one; returns the new state and the decoder rows of the calls (the inserts' buckets,
    the decode's), for the fill counters."""
    buckets = self._decoder.buckets()
    insert_rows = 0
    for slot_index, batch in self._inserts(started):
      state = self._decoder.insert(shared, state, slot_index, batch)
      insert_rows += len(slot_index)
    busy = [index for index, slot in enumerate(slots) if slot is not None]
    decode_rows = next(size for size in buckets if size > max(busy)) if busy else 0
    if busy:
      state = self._decoder.decode(shared, state, decode_rows)
    return state, insert_rows, decode_rows

  def _finish(self, state: slots_lib.SlotState, slots: list[_SlotRow | None],
              versions: tuple[int, ...], lengths: np.ndarray, done: np.ndarray,
              insert_rows: int, decode_rows: int):
    """Records the call's versions for the rows that drew tokens, hands finished rows
    their results, frees their slots and counts."""
    drawn, decode_steps = 0, 0
    for index, slot in enumerate(slots):
      if slot is None or lengths[index] == slot.length:
        continue
      drawn += int(lengths[index]) - slot.length
      # A row started in this call drew its first token in the insert, the rest in decode.
      decode_steps = max(decode_steps, int(lengths[index]) - max(slot.length, 1))
      slot.length = int(lengths[index])
      slot.oldest = versions if slot.oldest is None else tuple(map(min, slot.oldest, versions))
      slot.newest = versions if slot.newest is None else tuple(map(max, slot.newest, versions))
    finished = [index for index, slot in enumerate(slots) if slot is not None and done[index]]
    if finished:
      tokens, logprobs, terminated = jax.device_get(
          (state.tokens, state.logprobs, state.terminated))
    second = len(versions) > 1
    for index in finished:
      slot, length = slots[index], int(lengths[index])
      slots[index] = None
      slot.request.results[slot.index] = RowResult(
          tokens[index, :length], logprobs[index, :length], bool(terminated[index]),
          slot.oldest[0], slot.newest[0], slot.oldest[1] if second else None,
          slot.newest[1] if second else None)
      slot.request.unfinished -= 1
      if not slot.request.unfinished and not slot.request.future.done():
        slot.request.future.set_result(slot.request.results)
    # Every slot of the bucket computes in every decode step, busy or not: the fill
    # counters see that.
    self._model.count(batches=1, sequences=len(finished), generated_tokens=drawn,
                      decoded_row_steps=insert_rows + decode_rows * decode_steps)


def _fail(request: _Request, error: Exception):
  if not request.future.done():
    request.future.set_exception(error)


def _drain(arrivals: queue.Queue):
  while True:
    try:
      yield arrivals.get_nowait()
    except queue.Empty:
      return
