"""Request rows and the lanes that batch them.

A generation lane samples completions (one decoder, or a decoder paired with a second
pass for a geometric mixture or classifier-free guidance): `DynamicLane` here (a dynamic
batcher and a whole-batch sampler) or `scheduler.ContinuousLane` (decode-step slots),
chosen by `InferenceServerConfig.scheduler`. A scoring lane scores given completions.
Each lane reads its model's current parameters once per batch or decode call.
"""
import concurrent.futures
import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from chorus import core
from chorus import models
from chorus.inference_server import sampler as sampler_lib
from chorus.inference_server import scoring as scoring_lib
from chorus.inference_server import slots as slots_lib
from chorus.inference_server.batcher import DynamicBatcher
from chorus.inference_server.config import InferenceServerConfig



class LaneModel(Protocol):
  """What a lane reads of the model it serves (served_model.ServedModel is one)."""
  name: str
  kind: str
  pooling: str
  decoder_config: models.DecoderConfig
  config: InferenceServerConfig
  sequence: core.SequenceSpec

  def params_and_version(self) -> tuple[Any, int]:
    """The current parameters and their version, read together."""

  def count(self, **increments: int) -> None:
    """Adds to the model's traffic counters."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One completion to sample.

  On a paired lane the logits are (1 - coef) * first pass + coef * second pass, the
  second pass reading `second_prompt` (None: `prompt`). A mixture row has coef = b and no
  second prompt; a guided row has coef = 1 - g and the unconditional prompt.

  The row draws with its own PRNG key, `fold_in(key, index)` (`key` as two uint32 words,
  what `jax.random.PRNGKey` holds): the rows of one request share `key` and count
  `index` from 0, so a request's completions do not depend on what else is batched.
  """
  prompt: list[int]
  max_new_tokens: int
  temperature: float
  coef: float = 0.0
  second_prompt: list[int] | None = None
  key: tuple[int, int] = (0, 0)
  index: int = 0


@dataclasses.dataclass(frozen=True)
class RowResult:
  """One sampled completion: tokens [T] and log-probs [T], T its own length.

  Versions: the oldest and newest parameter version of the model (and of the second
  model of a mixture) that drew any of its tokens. They differ only where a parameter
  swap fell between the row's decode steps (continuous scheduler); each log-prob is then
  still that of the distribution that drew its token.
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  terminated: bool
  param_version: int
  newest_param_version: int
  second_param_version: int | None = None
  newest_second_param_version: int | None = None


@dataclasses.dataclass(frozen=True)
class ScoreRow:
  """One completion to score (and, for a preference model, the comparison it is ranked against)."""
  prompt: list[int]
  completion: list[int]
  comparison: list[int] | None = None
  temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class ScoreResult:
  """Decoders: per-token `logprobs` [T] and their sum as `score`; others: `score` only."""
  score: float
  param_version: int
  logprobs: np.ndarray | None = None


PADDING_ROW = Row([models.BOS_ID], 1, 1.0)
_PADDING_SCORE_ROW = ScoreRow([models.BOS_ID], [models.EOS_ID], [models.EOS_ID])


def row_batch(rows: list[Row], prompt_len: int, paired: bool) -> slots_lib.RowBatch:
  """The arrays of `rows` ([R] each): paired lanes get a `PairedRow` of row inputs."""
  prompt_tokens, prompt_mask = models.left_pad_prompts([row.prompt for row in rows],
                                                       prompt_len)
  row_inputs = ()
  if paired:
    row_inputs = slots_lib.PairedRow(
        np.array([row.coef for row in rows], np.float32),
        *models.left_pad_prompts([row.second_prompt or row.prompt for row in rows],
                                 prompt_len))
  return slots_lib.RowBatch(prompt_tokens, prompt_mask, row_inputs,
                            np.array([row.key for row in rows], np.uint32),
                            np.array([row.index for row in rows], np.int32),
                            np.array([row.temperature for row in rows], np.float32),
                            np.array([row.max_new_tokens for row in rows], np.int32))


def read_params(model: LaneModel, second: 'LaneModel | None') -> tuple[Any, tuple[int, ...]]:
  """What one batch or decode call reads: (params, (version,)) for one decoder;
  ((params, second_params), (version, second_version)) for a pair, second_params None
  when both passes run `model` (guidance: one read, one version)."""
  params, version = model.params_and_version()
  if second is None:
    return params, (version,)
  if second is model:
    return (params, None), (version, version)
  second_params, second_version = second.params_and_version()
  return (params, second_params), (version, second_version)


def lane_name(model: LaneModel, second: 'LaneModel | None') -> str:
  return model.name if second is None else f'{model.name}+{second.name}'


class DynamicLane:
  """A dynamic batcher and a compiled whole-batch sampler: one decoder, or a pair.

  A paired lane samples `sampler_lib.paired_logits`: its rows say the coefficient and
  the second pass's prompt. With another model as `second` (a geometric mixture) it
  reads both models' current parameters when each batch starts, so their versions move
  independently; with `second` the model itself (guidance) both passes run one batch
  of 2B rows on one read of the parameters. A batch decodes until its longest row is
  done, and every row of it has one version per model.
  """

  def __init__(self, model: LaneModel, second: 'LaneModel | None' = None):
    self._model, self._second = model, second
    config, sequence = model.config, model.sequence
    if second is None:
      self._sample = sampler_lib.make_sampler(model.decoder_config, sequence.prompt_len,
                                              sequence.completion_len)
    else:
      self._sample = sampler_lib.make_paired_sampler(
          model.decoder_config, None if second is model else second.decoder_config,
          sequence.prompt_len, sequence.completion_len)
    self._batcher = DynamicBatcher(self._process_batch, max_batch_size=config.max_batch_size,
                                   max_wait_ms=config.max_wait_ms,
                                   name=f'batcher-{lane_name(model, second)}')

  def submit(self, rows: list[Row]) -> concurrent.futures.Future:
    return self._batcher.submit(rows)

  def warm_up(self):
    """Compiles the sampler for every batch bucket."""
    for size in self._model.config.batch_buckets():
      self._process_batch([PADDING_ROW] * size, count=False)

  def close(self):
    self._batcher.close()

  def _process_batch(self, rows: list[Row], count: bool = True) -> list[RowResult]:
    # One consistent version per model for the whole batch.
    shared, versions = read_params(self._model, self._second)
    bucket = self._model.config.bucket_for(len(rows))
    batch = row_batch(rows + [PADDING_ROW] * (bucket - len(rows)),
                      self._model.sequence.prompt_len, paired=self._second is not None)
    keys = _row_keys(batch.request_keys, batch.row_index)
    if self._second is None:
      output = self._sample(shared, batch.prompt_tokens, batch.prompt_mask,
                            batch.temperature, batch.max_new_tokens, keys)
    else:
      output = self._sample(*shared, batch.row_inputs.coef, batch.prompt_tokens,
                            batch.prompt_mask, batch.row_inputs.second_prompt_tokens,
                            batch.row_inputs.second_prompt_mask, batch.temperature,
                            batch.max_new_tokens, keys)
    output = jax.device_get(output)
    second_version = versions[1] if len(versions) > 1 else None
    results = []
    for index in range(len(rows)):
      length = int(output.lengths[index])
      results.append(RowResult(np.asarray(output.tokens[index, :length]),
                               np.asarray(output.logprobs[index, :length]),
                               bool(output.terminated[index]), versions[0], versions[0],
                               second_version, second_version))
    if count:
      # The batch ran until its longest row was done, every row of the bucket each step.
      self._model.count(batches=1, sequences=len(rows),
                        generated_tokens=int(output.lengths[:len(rows)].sum()),
                        decoded_row_steps=bucket * int(output.lengths.max()))
    return results


@jax.jit
def _row_keys(request_keys: jax.Array, row_index: jax.Array) -> jax.Array:
  """[B, 2] row keys `fold_in(request_key, row_index)`, as `slots` derives them."""
  return jax.vmap(jax.random.fold_in)(request_keys, row_index.astype(jnp.uint32))


class ScoringLane:
  """A batcher and a compiled scorer for one model; completions padded to completion_len."""

  def __init__(self, model: LaneModel):
    self._model = model
    config, sequence = model.config, model.sequence
    self._score = scoring_lib.make_scorer(model.kind, model.decoder_config,
                                          sequence.prompt_len, sequence.completion_len,
                                          model.pooling)
    self._batcher = DynamicBatcher(self._process_batch, max_batch_size=config.max_batch_size,
                                   max_wait_ms=config.max_wait_ms,
                                   name=f'score-batcher-{model.name}')

  def submit(self, rows: list[ScoreRow]) -> concurrent.futures.Future:
    return self._batcher.submit(rows)

  def warm_up(self):
    for size in self._model.config.batch_buckets():
      self._process_batch([_PADDING_SCORE_ROW] * size, count=False)

  def close(self):
    self._batcher.close()

  def _process_batch(self, rows: list[ScoreRow], count: bool = True) -> list[ScoreResult]:
    params, version = self._model.params_and_version()
    config, sequence = self._model.config, self._model.sequence
    padded = rows + [_PADDING_SCORE_ROW] * (config.bucket_for(len(rows)) - len(rows))
    prompt_tokens, prompt_mask = models.left_pad_prompts([row.prompt for row in padded],
                                                         sequence.prompt_len)
    completion_tokens, completion_mask = models.right_pad_completions(
        [row.completion for row in padded], sequence.completion_len)
    comparison_tokens, comparison_mask = models.right_pad_completions(
        [row.comparison or [models.EOS_ID] for row in padded], sequence.completion_len)
    temperature = np.array([row.temperature for row in padded], np.float32)
    scores = np.asarray(jax.device_get(self._score(
        params, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
        comparison_tokens, comparison_mask, temperature)))
    results = []
    for index, row in enumerate(rows):
      if self._model.kind == 'decoder':
        logprobs = scores[index, :len(row.completion)]
        results.append(ScoreResult(float(logprobs.sum()), version, logprobs))
      else:
        results.append(ScoreResult(float(scores[index]), version))
    if count:
      self._model.count(score_batches=1, scored_sequences=len(rows))
    return results
