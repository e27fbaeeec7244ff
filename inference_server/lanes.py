"""Request rows and the lanes that batch them: a dynamic batcher and a compiled function each.

A generation lane samples completions (one decoder, or a decoder paired with a second
pass for a geometric mixture or classifier-free guidance); a scoring lane scores given
completions. Each lane reads its model's current parameters once per batch.
"""
import concurrent.futures
import dataclasses
from typing import Any, Protocol
import zlib

import jax
import numpy as np

from chorus import core
from chorus import models
from chorus.inference_server import sampler as sampler_lib
from chorus.inference_server import scoring as scoring_lib
from chorus.inference_server.batcher import DynamicBatcher
from chorus.inference_server.config import InferenceServerConfig



class LaneModel(Protocol):
  """What a lane reads of the model it serves (served_model.ServedModel is one)."""
  name: str
  kind: str
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
  """
  prompt: list[int]
  max_new_tokens: int
  temperature: float
  coef: float = 0.0
  second_prompt: list[int] | None = None


@dataclasses.dataclass(frozen=True)
class RowResult:
  """One sampled completion: tokens [T] and log-probs [T], T its own length."""
  tokens: np.ndarray
  logprobs: np.ndarray
  terminated: bool
  param_version: int
  second_param_version: int | None = None


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


_PADDING_ROW = Row([models.BOS_ID], 1, 1.0)
_PADDING_SCORE_ROW = ScoreRow([models.BOS_ID], [models.EOS_ID], [models.EOS_ID])


class GenerationLane:
  """A batcher and a compiled sampler: one decoder alone, or paired with a second pass.

  A paired lane samples `sampler_lib.paired_logits`: its rows say the coefficient and
  the second pass's prompt. With another model as `second` (a geometric mixture) it
  reads both models' current parameters when each batch starts, so their versions move
  independently; with `second` the model itself (guidance) both passes run one batch
  of 2B rows on one read of the parameters.
  """

  def __init__(self, model: LaneModel, second: 'LaneModel | None' = None):
    self._model, self._second = model, second
    config, sequence = model.config, model.sequence
    if second is None:
      self._sample = sampler_lib.make_sampler(model.decoder_config, sequence.prompt_len,
                                              sequence.completion_len)
      self._rng = jax.random.PRNGKey(config.seed)
      name = f'batcher-{model.name}'
    else:
      self._sample = sampler_lib.make_paired_sampler(
          model.decoder_config, None if second is model else second.decoder_config,
          sequence.prompt_len, sequence.completion_len)
      # Its own random stream, so paired traffic does not shift the plain one.
      self._rng = jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                     zlib.crc32(second.name.encode()))
      name = f'batcher-{model.name}+{second.name}'
    self._num_batches = 0
    self._batcher = DynamicBatcher(self._process_batch, max_batch_size=config.max_batch_size,
                                   max_wait_ms=config.max_wait_ms, name=name)

  def submit(self, rows: list[Row]) -> concurrent.futures.Future:
    return self._batcher.submit(rows)

  def warm_up(self):
    """Compiles the sampler for every batch bucket."""
    for size in self._model.config.batch_buckets():
      self._process_batch([_PADDING_ROW] * size, count=False)

  def close(self):
    self._batcher.close()

  def _process_batch(self, rows: list[Row], count: bool = True) -> list[RowResult]:
    # One consistent version per model for the whole batch.
    params, version = self._model.params_and_version()
    config, prompt_len = self._model.config, self._model.sequence.prompt_len
    padded = rows + [_PADDING_ROW] * (config.bucket_for(len(rows)) - len(rows))
    prompt_tokens, prompt_mask = models.left_pad_prompts([row.prompt for row in padded],
                                                         prompt_len)
    temperature = np.array([row.temperature for row in padded], np.float32)
    max_new_tokens = np.array([row.max_new_tokens for row in padded], np.int32)
    rng = jax.random.fold_in(self._rng, self._num_batches)
    self._num_batches += 1
    if self._second is None:
      second_version = None
      output = self._sample(params, prompt_tokens, prompt_mask, temperature, max_new_tokens,
                            rng)
    else:
      if self._second is self._model:
        second_params, second_version = None, version  # One read: one version.
      else:
        second_params, second_version = self._second.params_and_version()
      coef = np.array([row.coef for row in padded], np.float32)
      second_tokens, second_mask = models.left_pad_prompts(
          [row.second_prompt or row.prompt for row in padded], prompt_len)
      output = self._sample(params, second_params, coef, prompt_tokens, prompt_mask,
                            second_tokens, second_mask, temperature, max_new_tokens, rng)
    output = jax.device_get(output)
    results = []
    for index in range(len(rows)):
      length = int(output.lengths[index])
      results.append(RowResult(np.asarray(output.tokens[index, :length]),
                               np.asarray(output.logprobs[index, :length]),
                               bool(output.terminated[index]), version, second_version))
    if count:
      self._model.count(batches=1, sequences=len(rows),
                        generated_tokens=int(output.lengths[:len(rows)].sum()))
    return results


class ScoringLane:
  """A batcher and a compiled scorer for one model; completions padded to completion_len."""

  def __init__(self, model: LaneModel):
    self._model = model
    config, sequence = model.config, model.sequence
    self._score = scoring_lib.make_scorer(model.kind, model.decoder_config,
                                          sequence.prompt_len, sequence.completion_len)
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
