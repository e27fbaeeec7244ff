"""The gRPC inference service: named models, dynamic batching, versioned parameter updates.

A server holds several named models at once (a policy; a frozen reference or moving
anchor; reward and preference models), each with its own parameters, version and
updates. Each request kind runs through its own batcher and compiled function:

* plain generation from one decoder (`ServedModel.submit`);
* generation from the geometric mixture of two decoders, one batcher per
  (model, mixture_model) pair (`ServedModel.submit_mixture`);
* generation with classifier-free guidance, one decoder run on the prompts and on
  unconditional prompts (`ServedModel.submit_guided`): the pair (model, model), whose
  two passes share one batch of 2B rows;
* scoring of given completions (`ServedModel.submit_score`).
"""
from collections.abc import Mapping, Sequence
import concurrent.futures
import dataclasses
import math
import threading
from typing import Any
import zlib

import grpc
import jax
import numpy as np

from chorus import models
from chorus.inference_server import inference_pb2
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server import sampler as sampler_lib
from chorus.inference_server import scoring as scoring_lib
from chorus.inference_server.batcher import DynamicBatcher

# Parameter pushes of real models exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 1 << 30
GRPC_OPTIONS = [('grpc.max_send_message_length', MAX_MESSAGE_BYTES),
                ('grpc.max_receive_message_length', MAX_MESSAGE_BYTES)]
# 'decoder': generates and scores log-probs; 'reward': a scalar reward per completion;
# 'preference': P(completion > comparison) per pair (see models.reward_models).
MODEL_KINDS = scoring_lib.MODEL_KINDS


@dataclasses.dataclass(frozen=True)
class InferenceServerConfig:
  """How one inference server batches and bounds requests.

  Attributes:
    max_batch_size: most rows in one accelerator batch (also the most in one request:
      prompts times samples per prompt). A guided batch runs twice as many decoder rows
      (conditional and unconditional).
    max_wait_ms: longest a request waits for others to fill its batch.
    max_prompt_len: prompts are left-padded to this many tokens; longer ones are rejected.
    max_new_tokens: completion length cap, for generation and for scored completions.
    request_timeout_s: a Generate or Score call that waits longer fails with
      DEADLINE_EXCEEDED.
    num_threads: gRPC worker threads; at least the number of concurrent callers.
    seed: seeds the sampling random stream.
  """
  max_batch_size: int = 32
  max_wait_ms: float = 5.0
  max_prompt_len: int = 16
  max_new_tokens: int = 16
  request_timeout_s: float = 120.0
  num_threads: int = 64
  seed: int = 0

  def batch_buckets(self) -> tuple[int, ...]:
    """Padded batch sizes (powers of two up to the cap), so XLA compiles a few shapes only."""
    buckets, size = [], 1
    while size < self.max_batch_size:
      buckets.append(size)
      size *= 2
    return tuple(buckets) + (self.max_batch_size,)

  def bucket_for(self, num_rows: int) -> int:
    return next(size for size in self.batch_buckets() if size >= num_rows)


class StaleVersionError(ValueError):
  """A parameter update whose version is not newer than the served one."""


class WrongModelKindError(ValueError):
  """A call that the model's kind cannot serve (e.g. generating from a reward model)."""


@dataclasses.dataclass(frozen=True)
class _Row:
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
class _RowResult:
  tokens: np.ndarray
  logprobs: np.ndarray
  terminated: bool
  param_version: int
  second_param_version: int | None = None


@dataclasses.dataclass(frozen=True)
class _ScoreRow:
  prompt: list[int]
  completion: list[int]
  comparison: list[int] | None = None
  temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class _ScoreResult:
  """Decoders: per-token `logprobs` [T] and their sum as `score`; others: `score` only."""
  score: float
  param_version: int
  logprobs: np.ndarray | None = None


_PADDING_ROW = _Row([models.BOS_ID], 1, 1.0)
_PADDING_SCORE_ROW = _ScoreRow([models.BOS_ID], [models.EOS_ID], [models.EOS_ID])


def _shape_and_dtype(array) -> tuple:
  return np.shape(array), np.asarray(array).dtype.name


class _GenerationLane:
  """A batcher and a compiled sampler: one decoder alone, or paired with a second pass.

  A paired lane samples `sampler_lib.paired_logits`: its rows say the coefficient and
  the second pass's prompt. With another model as `second` (a geometric mixture) it
  reads both models' current parameters when each batch starts, so their versions move
  independently; with `second` the model itself (guidance) both passes run one batch
  of 2B rows on one read of the parameters.
  """

  def __init__(self, model: 'ServedModel', second: 'ServedModel | None' = None):
    self._model, self._second = model, second
    config = model.config
    if second is None:
      self._sample = sampler_lib.make_sampler(model.decoder_config, config.max_prompt_len,
                                              config.max_new_tokens)
      self._rng = jax.random.PRNGKey(config.seed)
      name = f'batcher-{model.name}'
    else:
      self._sample = sampler_lib.make_paired_sampler(
          model.decoder_config, None if second is model else second.decoder_config,
          config.max_prompt_len, config.max_new_tokens)
      # Its own random stream, so paired traffic does not shift the plain one.
      self._rng = jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                     zlib.crc32(second.name.encode()))
      name = f'batcher-{model.name}+{second.name}'
    self._num_batches = 0
    self._batcher = DynamicBatcher(self._process_batch, max_batch_size=config.max_batch_size,
                                   max_wait_ms=config.max_wait_ms, name=name)

  def submit(self, rows: list[_Row]) -> concurrent.futures.Future:
    return self._batcher.submit(rows)

  def warm_up(self):
    """Compiles the sampler for every batch bucket."""
    for size in self._model.config.batch_buckets():
      self._process_batch([_PADDING_ROW] * size, count=False)

  def close(self):
    self._batcher.close()

  def _process_batch(self, rows: list[_Row], count: bool = True) -> list[_RowResult]:
    # One consistent version per model for the whole batch.
    params, version = self._model.params_and_version()
    config = self._model.config
    padded = rows + [_PADDING_ROW] * (config.bucket_for(len(rows)) - len(rows))
    prompt_tokens, prompt_mask = models.left_pad_prompts([row.prompt for row in padded],
                                                         config.max_prompt_len)
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
          [row.second_prompt or row.prompt for row in padded], config.max_prompt_len)
      output = self._sample(params, second_params, coef, prompt_tokens, prompt_mask,
                            second_tokens, second_mask, temperature, max_new_tokens, rng)
    output = jax.device_get(output)
    results = []
    for index in range(len(rows)):
      length = int(output.lengths[index])
      results.append(_RowResult(np.asarray(output.tokens[index, :length]),
                                np.asarray(output.logprobs[index, :length]),
                                bool(output.terminated[index]), version, second_version))
    if count:
      self._model.count(batches=1, sequences=len(rows),
                        generated_tokens=int(output.lengths[:len(rows)].sum()))
    return results


class _ScoringLane:
  """A batcher and a compiled scorer for one model; completions padded to max_new_tokens."""

  def __init__(self, model: 'ServedModel'):
    self._model = model
    config = model.config
    self._score = scoring_lib.make_scorer(model.kind, model.decoder_config,
                                          config.max_prompt_len, config.max_new_tokens)
    self._batcher = DynamicBatcher(self._process_batch, max_batch_size=config.max_batch_size,
                                   max_wait_ms=config.max_wait_ms,
                                   name=f'score-batcher-{model.name}')

  def submit(self, rows: list[_ScoreRow]) -> concurrent.futures.Future:
    return self._batcher.submit(rows)

  def warm_up(self):
    for size in self._model.config.batch_buckets():
      self._process_batch([_PADDING_SCORE_ROW] * size, count=False)

  def close(self):
    self._batcher.close()

  def _process_batch(self, rows: list[_ScoreRow], count: bool = True) -> list[_ScoreResult]:
    params, version = self._model.params_and_version()
    config = self._model.config
    padded = rows + [_PADDING_SCORE_ROW] * (config.bucket_for(len(rows)) - len(rows))
    prompt_tokens, prompt_mask = models.left_pad_prompts([row.prompt for row in padded],
                                                         config.max_prompt_len)
    completion_tokens, completion_mask = models.right_pad_completions([row.completion for row in padded],
                                                    config.max_new_tokens)
    comparison_tokens, comparison_mask = models.right_pad_completions(
        [row.comparison or [models.EOS_ID] for row in padded], config.max_new_tokens)
    temperature = np.array([row.temperature for row in padded], np.float32)
    scores = np.asarray(jax.device_get(self._score(
        params, prompt_tokens, prompt_mask, completion_tokens, completion_mask,
        comparison_tokens, comparison_mask, temperature)))
    results = []
    for index, row in enumerate(rows):
      if self._model.kind == 'decoder':
        logprobs = scores[index, :len(row.completion)]
        results.append(_ScoreResult(float(logprobs.sum()), version, logprobs))
      else:
        results.append(_ScoreResult(float(scores[index]), version))
    if count:
      self._model.count(score_batches=1, scored_sequences=len(rows))
    return results


class ServedModel:
  """One named model: its kind, parameters and version, and the batchers that serve it.

  Args:
    name: the name requests use.
    decoder_config: the model's architecture (reward and preference models are decoders
      whose value head is the score).
    params: its parameter tree; later updates must match its tree, shapes and dtypes.
    version: the version of `params`.
    config: batching and length limits.
    kind: 'decoder' (generates, with or without classifier-free guidance, scores
      per-token log-probs, may be either side of a geometric mixture), 'reward' (scores
      one reward per completion) or 'preference' (scores P(completion > comparison) per
      pair).
  """

  def __init__(self, name: str, decoder_config: models.DecoderConfig, params: Any,
               version: int, config: InferenceServerConfig, kind: str = 'decoder'):
    if kind not in MODEL_KINDS:
      raise ValueError(f'Model {name!r} has unknown kind {kind!r}; use one of {MODEL_KINDS}.')
    self.name = name
    self.kind = kind
    self.decoder_config = decoder_config
    self.config = config
    self._params_and_version = (params, version)
    self._template = jax.tree_util.tree_map(_shape_and_dtype, params)
    self._lock = threading.Lock()
    self.counters = dict(requests=0, sequences=0, generated_tokens=0, batches=0, param_updates=0,
                         score_requests=0, scored_sequences=0, score_batches=0)
    self._generation = _GenerationLane(self) if kind == 'decoder' else None
    self._scoring = _ScoringLane(self)
    # Keyed by the second model's name; this model's own name keys its guidance lane.
    self._paired_lanes: dict[str, _GenerationLane] = {}

  @property
  def param_version(self) -> int:
    return self._params_and_version[1]

  def params_and_version(self) -> tuple[Any, int]:
    """The current parameters and their version, read together."""
    return self._params_and_version

  def warm_up(self, scoring: bool | None = None):
    """Compiles every batch bucket of what this model serves before traffic arrives.

    That is generation (decoders), the mixtures and guidance already added with
    `add_mixture` and `add_guidance`, and scoring when `scoring` is True; None warms
    scoring up for reward and preference models only (a decoder's Score compiles on
    first use). Counters are not touched.
    """
    if self._generation is not None:
      self._generation.warm_up()
    with self._lock:
      lanes = list(self._paired_lanes.values())
    for lane in lanes:
      lane.warm_up()
    if scoring or (scoring is None and self.kind != 'decoder'):
      self._scoring.warm_up()

  def check_generates(self):
    """Raises WrongModelKindError unless this model can generate."""
    if self.kind != 'decoder':
      raise WrongModelKindError(
          f'Model {self.name!r} is a {self.kind} model (kind {self.kind!r}); it scores '
          'completions (Score) but cannot generate. Generate from a decoder model.')

  def add_mixture(self, mixture: 'ServedModel') -> _GenerationLane:
    """The lane sampling the geometric mixture of this model and `mixture`; made once.

    Raises:
      WrongModelKindError: either model is not a decoder.
      ValueError: the two models do not share a vocabulary or cannot hold the server's
        prompt and completion lengths.
    """
    self.check_generates()
    if mixture.kind != 'decoder':
      raise WrongModelKindError(
          f'Mixture model {mixture.name!r} is a {mixture.kind} model (kind '
          f'{mixture.kind!r}); a geometric mixture needs two decoder models.')
    if mixture.config != self.config:
      raise ValueError(f'Models {self.name!r} and {mixture.name!r} were served with different '
                       'InferenceServerConfigs; serve both with one config to mix them.')
    ours, theirs = self.decoder_config, mixture.decoder_config
    if (ours.vocab_size, ours.max_seq_len) != (theirs.vocab_size, theirs.max_seq_len):
      raise ValueError(
          f'Cannot mix {self.name!r} (vocab_size={ours.vocab_size}, max_seq_len='
          f'{ours.max_seq_len}) with {mixture.name!r} (vocab_size={theirs.vocab_size}, '
          f'max_seq_len={theirs.max_seq_len}): a geometric mixture needs models that share '
          'the vocabulary and max_seq_len.')
    return self._paired_lane(mixture)

  def add_guidance(self) -> _GenerationLane:
    """The lane sampling this model with classifier-free guidance; made once.

    Raises:
      WrongModelKindError: this model is not a decoder.
    """
    self.check_generates()
    return self._paired_lane(self)

  def _paired_lane(self, second: 'ServedModel') -> _GenerationLane:
    with self._lock:
      lane = self._paired_lanes.get(second.name)
      if lane is None:
        lane = self._paired_lanes[second.name] = _GenerationLane(self, second)
      return lane

  def submit(self, rows: list[_Row]) -> concurrent.futures.Future:
    """Queues rows for plain generation; resolves to one _RowResult per row."""
    self.check_generates()
    self.count(requests=1)
    return self._generation.submit(rows)

  def submit_mixture(self, mixture: 'ServedModel', rows: list[_Row]
                     ) -> concurrent.futures.Future:
    """Queues rows for the geometric mixture with `mixture` (see `add_mixture`)."""
    lane = self.add_mixture(mixture)
    self.count(requests=1)
    return lane.submit(rows)

  def submit_guided(self, rows: list[_Row]) -> concurrent.futures.Future:
    """Queues rows for classifier-free guidance (see `add_guidance`): each row's coef
    is 1 - guidance_scale and its second_prompt the unconditional prompt."""
    lane = self.add_guidance()
    self.count(requests=1)
    return lane.submit(rows)

  def submit_score(self, rows: list[_ScoreRow]) -> concurrent.futures.Future:
    """Queues rows for scoring; resolves to one _ScoreResult per row."""
    self.count(score_requests=1)
    return self._scoring.submit(rows)

  def update_params(self, params: Any, version: int, resume: bool = False):
    """Swaps in newer parameters; the batch running now finishes on the old ones.

    `resume` accepts an older version: a learner restarted from its checkpoint.
    """
    if jax.tree_util.tree_map(_shape_and_dtype, params) != self._template:
      raise ValueError(f'Parameters for model {self.name!r} do not match its architecture '
                       '(tree, shapes or dtypes); send the full float32 parameter tree of the '
                       'same DecoderConfig.')
    with self._lock:
      current = self.param_version
      if version <= current and not resume:
        raise StaleVersionError(f'Model {self.name!r} already serves version {current}; '
                         f'version {version} is not newer. Versions must increase.')
      self._params_and_version = (jax.device_put(params), version)
      self.counters['param_updates'] += 1

  def count(self, **increments: int):
    with self._lock:
      for key, increment in increments.items():
        self.counters[key] += increment

  def counters_snapshot(self) -> dict[str, int]:
    with self._lock:
      return dict(self.counters)

  def close(self):
    with self._lock:
      lanes = list(self._paired_lanes.values())
    for lane in lanes + [self._generation, self._scoring]:
      if lane is not None:
        lane.close()


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
  """Validates requests, hands them to the named model's batchers and answers."""

  def __init__(self, served_models: Mapping[str, ServedModel]):
    self._models = dict(served_models)

  def _model(self, name: str, context, role: str = 'model') -> ServedModel:
    if name not in self._models:
      context.abort(grpc.StatusCode.NOT_FOUND,
                    f'Unknown {role} {name!r}; this server serves {sorted(self._models)}.')
    return self._models[name]

  @staticmethod
  def _check_tokens(context, what: str, tokens: list[int], max_len: int,
                    model: ServedModel):
    """Aborts INVALID_ARGUMENT unless 1 <= len(tokens) <= max_len and ids are in vocab."""
    if not 1 <= len(tokens) <= max_len:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'{what} has {len(tokens)} tokens; it needs 1 to {max_len} tokens on '
                    'this server.')
    vocab_size = model.decoder_config.vocab_size
    bad = [token for token in tokens if not 0 <= token < vocab_size]
    if bad:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'{what} has token ids {bad[:5]} outside the vocabulary '
                    f'[0, {vocab_size}) of model {model.name!r}.')

  @staticmethod
  def _wait(context, future: concurrent.futures.Future, config: InferenceServerConfig,
            what: str):
    try:
      return future.result(timeout=config.request_timeout_s)
    except concurrent.futures.TimeoutError:
      future.cancel()
      context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                    f'{what} took over {config.request_timeout_s} s on the server.')
    except Exception as error:  # pylint: disable=broad-except
      context.abort(grpc.StatusCode.INTERNAL, f'{what} failed: {error!r}')

  def Generate(self, request, context):
    model = self._model(request.model, context)
    config = model.config
    try:
      model.check_generates()
    except WrongModelKindError as error:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    mixture = None
    if request.mixture_model:
      mixture = self._model(request.mixture_model, context, role='mixture_model')
      try:
        model.add_mixture(mixture)
      except WrongModelKindError as error:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
      except ValueError as error:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
      if not (math.isfinite(request.mixture_coef) and 0 <= request.mixture_coef <= 1):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f'mixture_coef must be in [0, 1], got {request.mixture_coef}.')
    elif request.mixture_coef != 0:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'mixture_coef={request.mixture_coef} without a mixture_model; name the '
                    'second decoder (e.g. "reference") or leave mixture_coef at 0.')
    unconditional_prompts = self._unconditional_prompts(request, context, model)
    if not request.prompts:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    'Empty batch: a GenerateRequest needs at least one prompt.')
    if request.num_samples < 0:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'num_samples must be >= 1 (0 means 1), got {request.num_samples}.')
    num_samples = request.num_samples or 1
    num_rows = len(request.prompts) * num_samples
    if num_rows > config.max_batch_size:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'{len(request.prompts)} prompts x {num_samples} samples = {num_rows} rows '
                    f'in one request; at most {config.max_batch_size} (the server\'s '
                    'max_batch_size). Split the request.')
    if not (math.isfinite(request.temperature) and request.temperature > 0):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'temperature must be a finite number > 0, got {request.temperature}.')
    if not 0 <= request.max_new_tokens <= config.max_new_tokens:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'max_new_tokens must be in [0, {config.max_new_tokens}] (0 means the '
                    f'server limit), got {request.max_new_tokens}.')
    rows = []
    for index, prompt in enumerate(request.prompts):
      tokens = list(prompt.tokens)
      self._check_tokens(context, f'Prompt {index}', tokens, config.max_prompt_len, model)
      coef, second_prompt = request.mixture_coef, None
      if unconditional_prompts:
        # Guidance: logits g * cond + (1 - g) * uncond, i.e. coef 1 - g on the second pass.
        coef = 1.0 - request.guidance_scale
        second_prompt = unconditional_prompts[index % len(unconditional_prompts)]
      row = _Row(tokens, request.max_new_tokens or config.max_new_tokens, request.temperature,
                 coef, second_prompt)
      rows.extend([row] * num_samples)  # Prompt-major: prompt 0's samples, then prompt 1's.
    if unconditional_prompts:
      future = model.submit_guided(rows)
    elif mixture is not None:
      future = model.submit_mixture(mixture, rows)
    else:
      future = model.submit(rows)
    results = self._wait(context, future, config, 'Generation')
    # Every row of one request rides in one batch, hence one version (per model).
    response = inference_pb2.GenerateResponse(model=model.name,
                                              param_version=results[0].param_version)
    if mixture is not None:
      response.mixture_param_version = results[0].second_param_version
    for result in results:
      response.completions.add(tokens=result.tokens.tolist(), logprobs=result.logprobs.tolist(),
                               terminated=result.terminated)
    return response

  def _unconditional_prompts(self, request, context, model: ServedModel) -> list[list[int]]:
    """A guided request's unconditional prompts, one or one per prompt; [] without guidance.

    Aborts INVALID_ARGUMENT on a bad guidance_scale, on guidance with a mixture_model,
    and on missing, surplus or malformed unconditional prompts.
    """
    scale = request.guidance_scale
    unconditional = [list(prompt.tokens) for prompt in request.unconditional_prompts]
    if not (math.isfinite(scale) and scale >= 0):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'guidance_scale must be a finite number >= 0 (0 means no guidance), got '
                    f'{scale}.')
    if scale == 0:
      if unconditional:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f'{len(unconditional)} unconditional_prompts without a guidance_scale; '
                      'set guidance_scale > 0 (e.g. 3) or leave the unconditional prompts '
                      'out.')
      return []
    if request.mixture_model:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'guidance_scale={scale} together with mixture_model='
                    f'{request.mixture_model!r}: a request samples either a geometric mixture '
                    'or classifier-free guidance. Drop one of them.')
    if len(unconditional) not in (1, len(request.prompts)):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'guidance_scale={scale} needs unconditional_prompts (e.g. [BOS, '
                    f'NULL_CAPTION]): one for all prompts or one per prompt; got '
                    f'{len(unconditional)} for {len(request.prompts)} prompts.')
    for index, tokens in enumerate(unconditional):
      self._check_tokens(context, f'Unconditional prompt {index}', tokens,
                         model.config.max_prompt_len, model)
    return unconditional

  def Score(self, request, context):
    model = self._model(request.model, context)
    config = model.config
    if request.expected_kind and request.expected_kind != model.kind:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f'Model {model.name!r} is a {model.kind} model (kind {model.kind!r}), not '
                    f'{request.expected_kind!r}; call the scoring method for its kind or name '
                    f'another model.')
    num_rows = len(request.prompts)
    if not num_rows:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    'Empty batch: a ScoreRequest needs at least one prompt.')
    if num_rows > config.max_batch_size:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'{num_rows} prompts in one request; at most {config.max_batch_size} (the '
                    'server\'s max_batch_size). Split the request.')
    if len(request.completions) != num_rows:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'{num_rows} prompts but {len(request.completions)} completions; send one '
                    'completion per prompt (repeat a prompt to score several completions).')
    if model.kind == 'preference':
      if len(request.comparisons) != num_rows:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f'Preference model {model.name!r} needs one comparison per completion: '
                      f'got {num_rows} completions and {len(request.comparisons)} '
                      'comparisons.')
    elif request.comparisons:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'Model {model.name!r} is a {model.kind} model; comparisons are for '
                    'preference models only. Leave them out.')
    temperature = 1.0
    if request.HasField('temperature'):
      if model.kind != 'decoder':
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f'temperature applies to decoder models only; {model.name!r} is a '
                      f'{model.kind} model. Leave it unset.')
      temperature = request.temperature
      if not (math.isfinite(temperature) and temperature > 0):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f'temperature must be a finite number > 0, got {temperature}.')
    rows = []
    for index in range(num_rows):
      prompt = list(request.prompts[index].tokens)
      completion = list(request.completions[index].tokens)
      self._check_tokens(context, f'Prompt {index}', prompt, config.max_prompt_len, model)
      self._check_tokens(context, f'Completion {index}', completion, config.max_new_tokens,
                         model)
      comparison = None
      if model.kind == 'preference':
        comparison = list(request.comparisons[index].tokens)
        self._check_tokens(context, f'Comparison {index}', comparison, config.max_new_tokens,
                           model)
      rows.append(_ScoreRow(prompt, completion, comparison, temperature))
    results = self._wait(context, model.submit_score(rows), config, 'Scoring')
    response = inference_pb2.ScoreResponse(model=model.name, kind=model.kind,
                                           param_version=results[0].param_version)
    for result in results:
      if model.kind == 'decoder':
        response.logprobs.add(logprobs=result.logprobs.tolist(), total=result.score)
      elif model.kind == 'reward':
        response.rewards.append(result.score)
      else:
        response.preferences.append(result.score)
    return response

  def UpdateParams(self, request, context):
    model = self._model(request.model, context)
    try:
      params = models.params_from_bytes(request.params)
    except Exception as error:  # pylint: disable=broad-except
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'Could not decode the parameters for {model.name!r}: {error!r}. Send '
                    'models.params_to_bytes(params).')
    try:
      model.update_params(params, request.version, request.resume)
    except StaleVersionError as error:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    except ValueError as error:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    return inference_pb2.UpdateParamsResponse(version=model.param_version)

  def GetStatus(self, request, context):
    response = inference_pb2.StatusResponse()
    for name, model in self._models.items():
      response.models.add(name=name, kind=model.kind, param_version=model.param_version,
                          **model.counters_snapshot())
    return response


def start_server(served_models: Mapping[str, ServedModel], address: str = '127.0.0.1:0',
                 num_threads: int = 64,
                 mixtures: Sequence[tuple[str, str]] = (),
                 guided: Sequence[str] = ()) -> tuple[grpc.Server, int]:
  """Starts serving on `address` (loopback unless told otherwise); returns (server, port).

  Args:
    served_models: the models, by name.
    address: host:port; port 0 picks a free one.
    num_threads: gRPC worker threads.
    mixtures: (model, mixture_model) pairs to build (and compile, with warm_up) now
      rather than at their first request; other pairs are built on first use.
    guided: decoders whose guidance lane to build and compile now, likewise.
  """
  for name, mixture_name in mixtures:
    for needed in (name, mixture_name):
      if needed not in served_models:
        raise ValueError(f'Mixture ({name!r}, {mixture_name!r}) names {needed!r}, which is not '
                         f'among the served models {sorted(served_models)}.')
    served_models[name].add_mixture(served_models[mixture_name]).warm_up()
  for name in guided:
    if name not in served_models:
      raise ValueError(f'Guided model {name!r} is not among the served models '
                       f'{sorted(served_models)}.')
    served_models[name].add_guidance().warm_up()
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=num_threads),
                       options=GRPC_OPTIONS)
  inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(served_models),
                                                            server)
  port = server.add_insecure_port(address)
  if port == 0:
    raise OSError(f'Could not bind the inference server to {address}; is the port in use?')
  server.start()
  return server, port
