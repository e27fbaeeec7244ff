"""The gRPC inference service: named models, dynamic batching, versioned parameter updates."""
from collections.abc import Mapping
import concurrent.futures
import dataclasses
import math
import threading
from typing import Any

import grpc
import jax
import numpy as np

from chorus import models
from chorus.inference_server import inference_pb2
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server import sampler as sampler_lib
from chorus.inference_server.batcher import DynamicBatcher

# Parameter pushes of real models exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 1 << 30
GRPC_OPTIONS = [('grpc.max_send_message_length', MAX_MESSAGE_BYTES),
                ('grpc.max_receive_message_length', MAX_MESSAGE_BYTES)]


@dataclasses.dataclass(frozen=True)
class InferenceServerConfig:
  """How one inference server batches and bounds requests.

  Attributes:
    max_batch_size: most prompts in one accelerator batch (also the most in one request).
    max_wait_ms: longest a request waits for others to fill its batch.
    max_prompt_len: prompts are left-padded to this many tokens; longer ones are rejected.
    max_new_tokens: completion length cap.
    request_timeout_s: a Generate call that waits longer fails with DEADLINE_EXCEEDED.
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


class StaleVersionError(ValueError):
  """A parameter update whose version is not newer than the served one."""


@dataclasses.dataclass(frozen=True)
class _Row:
  prompt: list[int]
  max_new_tokens: int
  temperature: float


@dataclasses.dataclass(frozen=True)
class _RowResult:
  tokens: np.ndarray
  logprobs: np.ndarray
  terminated: bool
  param_version: int


def _shape_and_dtype(array) -> tuple:
  return np.shape(array), np.asarray(array).dtype.name


class ServedModel:
  """One named model: its parameters and version, a jit-compiled sampler and a batcher."""

  def __init__(self, name: str, decoder_config: models.DecoderConfig, params: Any,
               version: int, config: InferenceServerConfig):
    self.name = name
    self.decoder_config = decoder_config
    self.config = config
    self._params_and_version = (params, version)
    self._template = jax.tree_util.tree_map(_shape_and_dtype, params)
    self._lock = threading.Lock()
    self._sample = sampler_lib.make_sampler(decoder_config, config.max_prompt_len,
                                            config.max_new_tokens)
    self._rng = jax.random.PRNGKey(config.seed)
    self._num_batches = 0
    self.counters = dict(requests=0, sequences=0, generated_tokens=0, batches=0, param_updates=0)
    self._batcher = DynamicBatcher(self._process_batch, max_batch_size=config.max_batch_size,
                                   max_wait_ms=config.max_wait_ms, name=f'batcher-{name}')

  @property
  def param_version(self) -> int:
    return self._params_and_version[1]

  def warm_up(self):
    """Compiles the sampler for every batch bucket before traffic arrives."""
    for size in self.config.batch_buckets():
      self._process_batch([_Row([models.BOS_ID], 1, 1.0)] * size)
    self._num_batches = 0
    self.counters.update(batches=0, sequences=0, generated_tokens=0)

  def submit(self, rows: list[_Row]) -> concurrent.futures.Future:
    with self._lock:
      self.counters['requests'] += 1
    return self._batcher.submit(rows)

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

  def counters_snapshot(self) -> dict[str, int]:
    with self._lock:
      return dict(self.counters)

  def close(self):
    self._batcher.close()

  def _process_batch(self, rows: list[_Row]) -> list[_RowResult]:
    params, version = self._params_and_version  # One consistent version for the batch.
    bucket = next(size for size in self.config.batch_buckets() if size >= len(rows))
    padding = [_Row([models.BOS_ID], 1, 1.0)] * (bucket - len(rows))
    padded = rows + padding
    prompt_tokens, prompt_mask = models.left_pad_prompts([row.prompt for row in padded],
                                                         self.config.max_prompt_len)
    temperature = np.array([row.temperature for row in padded], np.float32)
    max_new_tokens = np.array([row.max_new_tokens for row in padded], np.int32)
    rng = jax.random.fold_in(self._rng, self._num_batches)
    self._num_batches += 1
    output = jax.device_get(self._sample(params, prompt_tokens, prompt_mask, temperature,
                                         max_new_tokens, rng))
    results = []
    for index in range(len(rows)):
      length = int(output.lengths[index])
      results.append(_RowResult(np.asarray(output.tokens[index, :length]),
                                np.asarray(output.logprobs[index, :length]),
                                bool(output.terminated[index]), version))
    with self._lock:
      self.counters['batches'] += 1
      self.counters['sequences'] += len(rows)
      self.counters['generated_tokens'] += int(output.lengths[:len(rows)].sum())
    return results


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
  """Validates requests, hands them to the named model's batcher and answers."""

  def __init__(self, served_models: Mapping[str, ServedModel]):
    self._models = dict(served_models)

  def _model(self, name: str, context) -> ServedModel:
    if name not in self._models:
      context.abort(grpc.StatusCode.NOT_FOUND,
                    f'Unknown model {name!r}; this server serves {sorted(self._models)}.')
    return self._models[name]

  def Generate(self, request, context):
    model = self._model(request.model, context)
    config = model.config
    if not request.prompts:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    'Empty batch: a GenerateRequest needs at least one prompt.')
    if len(request.prompts) > config.max_batch_size:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'{len(request.prompts)} prompts in one request; at most '
                    f'{config.max_batch_size}. Split the request.')
    if not (math.isfinite(request.temperature) and request.temperature > 0):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'temperature must be a finite number > 0, got {request.temperature}.')
    if not 0 <= request.max_new_tokens <= config.max_new_tokens:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'max_new_tokens must be in [0, {config.max_new_tokens}] (0 means the '
                    f'server limit), got {request.max_new_tokens}.')
    vocab_size = model.decoder_config.vocab_size
    rows = []
    for index, prompt in enumerate(request.prompts):
      tokens = list(prompt.tokens)
      if not tokens or len(tokens) > config.max_prompt_len:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f'Prompt {index} has {len(tokens)} tokens; prompts need 1 to '
                      f'{config.max_prompt_len} tokens on this server.')
      bad = [token for token in tokens if not 0 <= token < vocab_size]
      if bad:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f'Prompt {index} has token ids {bad[:5]} outside the vocabulary '
                      f'[0, {vocab_size}) of model {model.name!r}.')
      rows.append(_Row(tokens, request.max_new_tokens or config.max_new_tokens,
                       request.temperature))
    try:
      results = model.submit(rows).result(timeout=config.request_timeout_s)
    except concurrent.futures.TimeoutError:
      context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                    f'Generation took over {config.request_timeout_s} s on the server.')
    except Exception as error:  # pylint: disable=broad-except
      context.abort(grpc.StatusCode.INTERNAL, f'Generation failed: {error!r}')
    # Every row of one request rides in one batch, hence one version.
    response = inference_pb2.GenerateResponse(model=model.name,
                                              param_version=results[0].param_version)
    for result in results:
      response.completions.add(tokens=result.tokens.tolist(), logprobs=result.logprobs.tolist(),
                               terminated=result.terminated)
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
      response.models.add(name=name, param_version=model.param_version, **model.counters_snapshot())
    return response


def start_server(served_models: Mapping[str, ServedModel], address: str = '127.0.0.1:0',
                 num_threads: int = 64) -> tuple[grpc.Server, int]:
  """Starts serving on `address` (loopback unless told otherwise); returns (server, port)."""
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=num_threads),
                       options=GRPC_OPTIONS)
  inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(served_models),
                                                            server)
  port = server.add_insecure_port(address)
  if port == 0:
    raise OSError(f'Could not bind the inference server to {address}; is the port in use?')
  server.start()
  return server, port
