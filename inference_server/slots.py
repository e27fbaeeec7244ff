"""Fixed decoding slots, each with its own KV-cache rows: the compiled half of the scheduler.

`scheduler.ContinuousScheduler` keeps up to `num_slots` rows decoding at once. Between
decode calls it inserts waiting rows into free slots (`SlotDecoder.insert`: prefill their
prompts, draw their first tokens) and collects the rows that finished; `decode` advances
the first K slots by up to `steps_per_call` tokens, K the smallest bucket (a power of two,
or the slot count) that holds every busy slot, so a half-empty server does not compute
for idle slots. An insert prefills only the last W positions of the left-padded prompts,
W the smallest prompt window (prompt_len / 2 or prompt_len) that holds them, since a
prefill costs as much per position as a decode step per row. Every shape is fixed by the
buckets, the windows, prompt_len and max_new_tokens, so once each has run nothing
compiles again; `SlotDecoder.compilations` counts the traces (each one an XLA
compilation, or a load from the persistent compilation cache).

Each slot decodes at its own offset (its prompt window plus its tokens so far) while the
decoder takes one cache index per call, so the per-row functions are vmapped over slots
with a batch of one row inside; XLA turns that back into the batched matmuls of a plain
batch. A row draws token k with
`fold_in(row_key, k)` (`sampler.draw`), so what it samples depends neither on the slot
it sits in nor on what the other slots hold.
"""
from collections.abc import Callable
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from chorus.inference_server import sampler as sampler_lib
from chorus.models import tokenizer


class RowBatch(NamedTuple):
  """R rows to start, as arrays (built by `lanes.row_batch`).

  Attributes:
    prompt_tokens: [R, W] int32, left padded: W is the prompt window, P or a window
      (see `SlotDecoder.cut`).
    prompt_mask: [R, W] bool.
    row_inputs: per-row inputs of the next-token logits beside the prompt, leaves [R, ...]:
      () for one decoder, a `PairedRow` for a paired lane.
    request_keys: [R, 2] uint32, the PRNG key of each row's request.
    row_index: [R] int32, the row's index in its request: its key is
      `fold_in(request_key, row_index)`.
    temperature: [R] float32, each > 0.
    max_new_tokens: [R] int32, each in 1 .. the decoder's max_new_tokens.
  """
  prompt_tokens: Any
  prompt_mask: Any
  row_inputs: Any
  request_keys: Any
  row_index: Any
  temperature: Any
  max_new_tokens: Any


class PairedRow(NamedTuple):
  """A paired row's own inputs (see `sampler.PairedInputs`): coef [R] float32, the second
  pass's prompt [R, W] int32 and its mask [R, W] bool."""
  coef: Any
  second_prompt_tokens: Any
  second_prompt_mask: Any


class SlotState(NamedTuple):
  """Every slot's row; each leaf has the slots as its leading axis S.

  Attributes:
    decoding: the `NextTokenLogits` state of each slot's row (its KV caches).
    row_inputs: as in `RowBatch`, less what only the prefill reads (a paired row keeps
      its coef).
    keys: [S, 2] uint32, each row's own PRNG key.
    temperature: [S] float32.
    max_new_tokens: [S] int32.
    prompt_slots: [S] int32, the row's prompt window W: its prompt fills cache slots
      0 .. W - 1 and its token k sits at slot W + k.
    tokens: [S, T] int32, PAD after the row's length.
    logprobs: [S, T] float32, log-prob of each token under the distribution that drew it;
      0 after the row's length.
    lengths: [S] int32, tokens drawn so far.
    terminated: [S] bool, True where EOS was drawn.
    done: [S] bool, True where the row finished (and on slots never used).
  """
  decoding: Any
  row_inputs: Any
  keys: jax.Array
  temperature: jax.Array
  max_new_tokens: jax.Array
  prompt_slots: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  terminated: jax.Array
  done: jax.Array


def _step_inputs(row_inputs):
  """What decode steps read of a row's inputs: a paired row's second prompt only feeds
  its prefill (and has the insert's window as its width), so the slots keep coef alone."""
  if isinstance(row_inputs, PairedRow):
    return row_inputs._replace(second_prompt_tokens=None, second_prompt_mask=None)
  return row_inputs


def plain_bind(params, unused_row_inputs):
  """One decoder: its logits read the shared parameters only."""
  return params


def paired_bind(shared, row: PairedRow) -> sampler_lib.PairedInputs:
  """A paired lane: shared = (params, second_params), the rest is the row's own."""
  params, second_params = shared
  return sampler_lib.PairedInputs(params, second_params, row.coef, row.second_prompt_tokens,
                                  row.second_prompt_mask)


def _cached_cpu_executables() -> bool:
  """Whether JAX loads CPU executables from its persistent compilation cache."""
  return bool(jax.config.jax_compilation_cache_dir) and jax.default_backend() == 'cpu'


class SlotDecoder:
  """The jitted insert and decode functions over `num_slots` slots.

  Args:
    next_logits: where logits come from (`sampler.decoder_logits` or `paired_logits`).
    bind: `(shared, row_inputs with a leading axis of 1) -> next_logits's params`:
      `plain_bind` or `paired_bind`. `shared` is what all rows read (the parameters).
    prompt_len: P, the prompts' padded length.
    max_new_tokens: T, the longest completion.
    num_slots: S, rows decoding at once.
    steps_per_call: most decode steps one `decode` call runs: more saves host round
      trips, fewer lets finished rows leave and new ones join sooner.
    eos_id: the token that ends a completion (the model's tokenizer's).
  """

  def __init__(self, next_logits: sampler_lib.NextTokenLogits,
               bind: Callable[[Any, Any], Any], prompt_len: int, max_new_tokens: int,
               num_slots: int, steps_per_call: int, eos_id: int = tokenizer.EOS_ID):
    if num_slots < 1 or steps_per_call < 1:
      raise ValueError(f'num_slots ({num_slots}) and steps_per_call ({steps_per_call}) must '
                       'be at least 1.')
    self._next_logits, self._bind = next_logits, bind
    self.prompt_len, self.max_new_tokens = prompt_len, max_new_tokens
    self.num_slots, self.steps_per_call = num_slots, steps_per_call
    self.eos_id = eos_id
    self._traces = 0
    self._lock = threading.Lock()
    # The slots' state is updated in place (donated), except where JAX's persistent
    # compilation cache is on with the CPU backend: executables loaded from it there gave
    # wrong log-probs with donated state (jax 0.4.34; tests/test_scheduler.py).
    donate = () if _cached_cpu_executables() else (1,)
    self.insert = self._counted_jit(self._insert, donate_argnums=donate)
    self.decode = self._counted_jit(self._decode, donate_argnums=donate, static_argnums=2)

  @property
  def compilations(self) -> int:
    """Traces of `insert` and `decode` so far: one per shape, so it stays put after
    warm-up unless something recompiles."""
    with self._lock:
      return self._traces

  def windows(self) -> tuple[int, ...]:
    """The prompt windows `insert` compiles for: prompt_len / 2 (if at least 1) and
    prompt_len."""
    return tuple(sorted({max(self.prompt_len // 2, 1), self.prompt_len}))

  def cut(self, batch: RowBatch, window: int) -> RowBatch:
    """`batch` (prompts left padded to P) cut to their last `window` positions, one of
    `windows()`; every prompt of it, second prompts included, must fit."""
    if window not in self.windows():
      raise ValueError(f'window {window} is not one of {self.windows()}.')
    cut = lambda x: x[:, self.prompt_len - window:]
    row_inputs = batch.row_inputs
    if isinstance(row_inputs, PairedRow):
      row_inputs = row_inputs._replace(second_prompt_tokens=cut(row_inputs.second_prompt_tokens),
                                       second_prompt_mask=cut(row_inputs.second_prompt_mask))
    return batch._replace(prompt_tokens=cut(batch.prompt_tokens),
                          prompt_mask=cut(batch.prompt_mask), row_inputs=row_inputs)

  def buckets(self) -> tuple[int, ...]:
    """Powers of two below the slot count, and it: the row counts `insert` compiles for,
    and the slot counts `decode` compiles for."""
    buckets, size = [], 1
    while size < self.num_slots:
      buckets.append(size)
      size *= 2
    return tuple(buckets) + (self.num_slots,)

  def empty(self, shared, row_batch: RowBatch) -> SlotState:
    """All slots free; `row_batch` (any R) gives the per-row arrays' shapes and dtypes."""
    shapes = jax.eval_shape(self._start_rows, shared, row_batch)
    state = jax.tree_util.tree_map(lambda leaf: jnp.zeros((self.num_slots,) + leaf.shape[1:],
                                                          leaf.dtype), shapes)
    return state._replace(done=jnp.ones(self.num_slots, bool))

  def _counted_jit(self, function, **jit_kwargs):

    def traced(*args):
      with self._lock:
        self._traces += 1
      return function(*args)

    return jax.jit(traced, **jit_kwargs)

  def _start_rows(self, shared, batch: RowBatch) -> SlotState:
    """Prefills R rows and draws their first tokens: a SlotState of R rows."""
    cache_len = self.prompt_len + self.max_new_tokens

    def prefill_row(row_inputs, prompt_tokens, prompt_mask):
      params = self._bind(shared, jax.tree_util.tree_map(lambda x: x[None], row_inputs))
      logits, decoding = self._next_logits.prefill(params, prompt_tokens[None],
                                                   prompt_mask[None].astype(bool), cache_len)
      return logits[0], decoding

    logits, decoding = jax.vmap(prefill_row)(batch.row_inputs, batch.prompt_tokens,
                                             batch.prompt_mask)
    keys = jax.vmap(jax.random.fold_in)(batch.request_keys,
                                        batch.row_index.astype(jnp.uint32))
    token, logprob = sampler_lib.draw(logits, batch.temperature, keys, 0)
    num_rows, window = batch.prompt_tokens.shape
    terminated = token == self.eos_id
    return SlotState(
        decoding, _step_inputs(batch.row_inputs), keys, batch.temperature, batch.max_new_tokens,
        jnp.full(num_rows, window, jnp.int32),
        jnp.full((num_rows, self.max_new_tokens), tokenizer.PAD_ID,
                 jnp.int32).at[:, 0].set(token),
        jnp.zeros((num_rows, self.max_new_tokens), jnp.float32).at[:, 0].set(logprob),
        jnp.ones(num_rows, jnp.int32), terminated, terminated | (batch.max_new_tokens <= 1))

  def _insert(self, shared, state: SlotState, slot_index, batch: RowBatch) -> SlotState:
    """Starts the rows of `batch` in the slots `slot_index` [R] int32; an index of
    `num_slots` or more marks a padding row, which is dropped."""
    rows = self._start_rows(shared, batch)
    return jax.tree_util.tree_map(
        lambda slots, new: slots.at[slot_index].set(new.astype(slots.dtype), mode='drop'),
        state, rows)

  def _decode(self, shared, state: SlotState, num_slots: int) -> SlotState:
    """Decodes the first `num_slots` slots (a bucket); the rest must be idle."""
    if num_slots == self.num_slots:
      return self._decode_slots(shared, state)
    head = self._decode_slots(shared, jax.tree_util.tree_map(lambda x: x[:num_slots], state))
    return jax.tree_util.tree_map(lambda x, y: x.at[:num_slots].set(y), state, head)

  def _decode_slots(self, shared, state: SlotState) -> SlotState:
    """Runs up to `steps_per_call` decode steps, stopping early once every slot is done."""
    positions = jnp.arange(self.max_new_tokens)[None]

    def step_row(row_inputs, decoding, token, active, cache_index):
      params = self._bind(shared, jax.tree_util.tree_map(lambda x: x[None], row_inputs))
      logits, decoding = self._next_logits.step(params, decoding, token[None, None],
                                                active[None, None], cache_index)
      return logits[0], decoding

    def step(carry):
      count, state = carry
      active = ~state.done
      # Token k of a row sits at cache slot W + k (its prompt window first); done and
      # free slots feed masked padding into their own caches, which no row reads.
      last = jnp.take_along_axis(state.tokens, jnp.maximum(state.lengths - 1, 0)[:, None],
                                 axis=1)[:, 0]
      logits, decoding = jax.vmap(step_row)(state.row_inputs, state.decoding, last, active,
                                            state.prompt_slots + state.lengths - 1)
      token, logprob = sampler_lib.draw(logits, state.temperature, state.keys, state.lengths)
      write = active[:, None] & (positions == state.lengths[:, None])
      is_eos = active & (token == self.eos_id)
      lengths = state.lengths + active
      return count + 1, state._replace(
          decoding=decoding,
          tokens=jnp.where(write, token[:, None], state.tokens),
          logprobs=jnp.where(write, logprob[:, None], state.logprobs),
          lengths=lengths, terminated=state.terminated | is_eos,
          done=state.done | is_eos | (lengths >= state.max_new_tokens))

    def keep_going(carry):
      count, state = carry
      return (count < self.steps_per_call) & ~jnp.all(state.done)

    return jax.lax.while_loop(keep_going, step, (jnp.int32(0), state))[1]
