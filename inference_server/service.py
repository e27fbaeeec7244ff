"""The gRPC inference service: named models, batched generation, versioned parameter updates.

A server holds several named models at once (a policy; a frozen reference or moving
anchor; reward and preference models), each with its own parameters, version and
updates. Each request kind runs through its own lane (continuous decode-step slots or a
dynamic batcher, as `InferenceServerConfig.scheduler` says) and compiled functions:

* plain generation from one decoder (`ServedModel.submit`);
* generation from the geometric mixture of two decoders, one lane per
  (model, mixture_model) pair (`ServedModel.submit_mixture`);
* generation with classifier-free guidance, one decoder run on the prompts and on
  unconditional prompts (`ServedModel.submit_guided`): the pair (model, model), whose
  two passes share one decoder call of 2B rows;
* scoring of given completions (`ServedModel.submit_score`).

This module validates requests and answers them; `served_model` and `lanes` do the work.
"""
from collections.abc import Mapping, Sequence
import concurrent.futures
import math

import grpc
from grpc_reflection.v1alpha import reflection

from chorus import core
from chorus import models
from chorus import prefetch
from chorus.inference_server import auth
from chorus.inference_server import health_pb2
from chorus.inference_server import health_pb2_grpc
from chorus.inference_server import inference_pb2
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server import param_stream
from chorus.inference_server import request_limits
from chorus.inference_server import tls
from chorus.inference_server.config import GRPC_OPTIONS
from chorus.inference_server.config import InferenceServerConfig
from chorus.inference_server.lanes import Row
from chorus.inference_server.lanes import ScoreRow
from chorus.inference_server.served_model import ServedModel
from chorus.inference_server.served_model import FrozenModelError
from chorus.inference_server.served_model import RefusedVersionError
from chorus.inference_server.served_model import StaleVersionError
from chorus.inference_server.served_model import WrongModelKindError

# Chunks of a push received ahead of the one being assembled (4 MiB each by default).
_CHUNKS_READ_AHEAD = 4


def _quoted(text: str, limit: int = 64) -> str:
  """`text` for an error message: quoted, and cut short so that no payload is echoed."""
  return repr(text[:limit]) + ('...' if len(text) > limit else '')


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
  """Validates requests, hands them to the named model's lanes and answers."""

  def __init__(self, served_models: Mapping[str, ServedModel]):
    self._models = dict(served_models)

  def _model(self, name: str, context, role: str = 'model') -> ServedModel:
    if name not in self._models:
      context.abort(grpc.StatusCode.NOT_FOUND,
                    f'Unknown {role} {_quoted(name)}; this server serves '
                    f'{sorted(self._models)}.')
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
      # The exception's type only: its text may hold request data.
      context.abort(grpc.StatusCode.INTERNAL, f'{what} failed on the server '
                    f'({type(error).__name__}); see its log.')

  def Generate(self, request, context):
    model = self._model(request.model, context)
    config, sequence = model.config, model.sequence
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
    temperature_error = core.temperature_error(request.temperature)
    if temperature_error:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, temperature_error)
    if not 0 <= request.max_new_tokens <= sequence.completion_len:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'max_new_tokens must be in [0, {sequence.completion_len}] (the server\'s '
                    f'sequence.completion_len; 0 means that limit), got {request.max_new_tokens}.')
    seed = request.seed if request.HasField('seed') else None
    key = model.request_key(seed)
    rows = []
    for index, prompt in enumerate(request.prompts):
      tokens = list(prompt.tokens)
      self._check_tokens(context, f'Prompt {index}', tokens, sequence.prompt_len, model)
      coef, second_prompt = request.mixture_coef, None
      if unconditional_prompts:
        # Guidance: logits g * cond + (1 - g) * uncond, i.e. coef 1 - g on the second pass.
        coef = 1.0 - request.guidance_scale
        second_prompt = unconditional_prompts[index % len(unconditional_prompts)]
      # Prompt-major: prompt 0's samples, then prompt 1's; row i draws with fold_in(key, i).
      rows.extend(Row(tokens, request.max_new_tokens or sequence.completion_len,
                      request.temperature, coef, second_prompt, key, len(rows) + sample)
                  for sample in range(num_samples))
    if unconditional_prompts:
      future = model.submit_guided(rows)
    elif mixture is not None:
      future = model.submit_mixture(mixture, rows)
    else:
      future = model.submit(rows)
    results = self._wait(context, future, config, 'Generation')
    # The oldest versions, so that policy lag counted from them is never under-stated.
    response = inference_pb2.GenerateResponse(
        model=model.name, param_version=min(result.param_version for result in results))
    if mixture is not None:
      response.mixture_param_version = min(result.second_param_version for result in results)
    for result in results:
      completion = response.completions.add(
          tokens=result.tokens.tolist(), logprobs=result.logprobs.tolist(),
          terminated=result.terminated, param_version=result.param_version,
          newest_param_version=result.newest_param_version)
      if mixture is not None:
        completion.mixture_param_version = result.second_param_version
        completion.newest_mixture_param_version = result.newest_second_param_version
    return response

  def _unconditional_prompts(self, request, context, model: ServedModel) -> list[list[int]]:
    """A guided request's unconditional prompts, one or one per prompt; [] without guidance.

    Aborts INVALID_ARGUMENT on a bad guidance_scale, on guidance with a mixture_model,
    and on missing, surplus or malformed unconditional prompts.
    """
    scale = request.guidance_scale
    unconditional = [list(prompt.tokens) for prompt in request.unconditional_prompts]
    if not (math.isfinite(scale) and 0 <= scale <= core.MAX_GUIDANCE_SCALE):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'guidance_scale must be a finite number >= 0 and <= '
                    f'{core.MAX_GUIDANCE_SCALE:g} (0 means no guidance), got {scale}.')
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
                    f'{_quoted(request.mixture_model)}: a request samples either a geometric '
                    'mixture or classifier-free guidance. Drop one of them.')
    if len(unconditional) not in (1, len(request.prompts)):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'guidance_scale={scale} needs unconditional_prompts (e.g. [BOS, '
                    f'NULL_CAPTION]): one for all prompts or one per prompt; got '
                    f'{len(unconditional)} for {len(request.prompts)} prompts.')
    for index, tokens in enumerate(unconditional):
      self._check_tokens(context, f'Unconditional prompt {index}', tokens,
                         model.sequence.prompt_len, model)
    return unconditional

  def Score(self, request, context):
    model = self._model(request.model, context)
    config, sequence = model.config, model.sequence
    if request.expected_kind and request.expected_kind != model.kind:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f'Model {model.name!r} is a {model.kind} model (kind {model.kind!r}), not '
                    f'{_quoted(request.expected_kind)}; call the scoring method for its kind or '
                    'name another model.')
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
      temperature_error = core.temperature_error(temperature)
      if temperature_error:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, temperature_error)
    rows = []
    for index in range(num_rows):
      prompt = list(request.prompts[index].tokens)
      completion = list(request.completions[index].tokens)
      self._check_tokens(context, f'Prompt {index}', prompt, sequence.prompt_len, model)
      self._check_tokens(context, f'Completion {index}', completion, sequence.completion_len,
                         model)
      comparison = None
      if model.kind == 'preference':
        comparison = list(request.comparisons[index].tokens)
        self._check_tokens(context, f'Comparison {index}', comparison, sequence.completion_len,
                           model)
      rows.append(ScoreRow(prompt, completion, comparison, temperature))
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

  def StreamParams(self, request_iterator, context):
    """Assembles a pushed version from its chunks (param_stream.py), then swaps it in."""
    first = next(request_iterator, None)
    if first is None or first.header is None:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    'A parameter push starts with a header (param_stream.push_chunks).')
    header = first.header
    model = self._model(header.model, context)
    try:
      model.check_version(header.version, header.resume)  # Before any bytes arrive.
      assembly = param_stream.Assembly(header, model.tensor_layout,
                                       buffers=model.push_buffers)
      # The next chunks are received (gRPC's copy out of its buffers) while this one is
      # checked and copied: the server's two largest costs per byte, on two threads.
      chunks = prefetch.Prefetcher(request_iterator, buffer_size=_CHUNKS_READ_AHEAD)
      try:
        for chunk in chunks:
          assembly.add(chunk)
      finally:
        chunks.close()
      model.update_params(model.unflatten(assembly.arrays()), header.version, header.resume)
    except StaleVersionError as error:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    except FrozenModelError as error:
      context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    except RefusedVersionError as error:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    except param_stream.PushError as error:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, f'Push to {model.name!r} refused: {error}')
    return inference_pb2.UpdateParamsResponse(version=model.param_version)

  def GetStatus(self, request, context):
    response = inference_pb2.StatusResponse()
    for name, model in self._models.items():
      response.models.add(name=name, kind=model.kind, param_version=model.param_version,
                          **model.counters_snapshot())
    return response


SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name['InferenceService'].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name['Health'].full_name


class HealthServicer(health_pb2_grpc.HealthServicer):
  """Standard gRPC health checking: SERVING for the server ('') and the inference service."""

  def Check(self, request, context):
    if request.service not in ('', SERVICE_NAME):
      context.abort(grpc.StatusCode.NOT_FOUND,
                    f'Unknown service {_quoted(request.service)}; this server has '
                    f'{SERVICE_NAME!r}.')
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def start_server(served_models: Mapping[str, ServedModel], address: str = '127.0.0.1:0',
                 num_threads: int = 64,
                 mixtures: Sequence[tuple[str, str]] = (),
                 guided: Sequence[str] = (),
                 secret: str | None = None, tls_dir: str = '') -> tuple[grpc.Server, int]:
  """Starts serving on `address` (loopback unless told otherwise); returns (server, port).

  The server answers standard gRPC health checks (grpc.health.v1.Health/Check: SERVING) once
  it is started, that is once every model is compiled, and gRPC reflection (v1alpha, which
  grpcurl falls back to). Each unary method reads requests only up to the size it can need
  (request_limits.py).

  Args:
    served_models: the models, by name.
    address: host:port; port 0 picks a free one.
    num_threads: gRPC worker threads.
    mixtures: (model, mixture_model) pairs to build (and compile, with warm_up) now
      rather than at their first request; other pairs are built on first use.
    guided: decoders whose guidance lane to build and compile now, likewise.
    secret: the run's secret (auth.py): every call but health checks and reflection must
      carry it, or is refused UNAUTHENTICATED; None serves anyone (tests, a server of
      one's own).
    tls_dir: '' serves plaintext; else a directory of tls.FILES: serves TLS (tls.py).
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
  param_stream.keep_freed_memory_for_chunks()
  limits = request_limits.RequestLimitInterceptor(request_limits.method_limits(
      (model.config, model.sequence) for model in served_models.values()))
  # The secret first: a stranger's call is refused before its size is even looked at.
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=num_threads),
                       options=GRPC_OPTIONS,
                       interceptors=[auth.ServerInterceptor(secret), limits] if secret
                       else [limits])
  servicer = InferenceServicer(served_models)
  # Registered first, so it takes StreamParams: chunks parsed in place (param_stream.py).
  server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
      'StreamParams': grpc.stream_unary_rpc_method_handler(
          servicer.StreamParams, request_deserializer=param_stream.decode_chunk,
          response_serializer=inference_pb2.UpdateParamsResponse.SerializeToString)}),))
  inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
  health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
  reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME,
                                       reflection.SERVICE_NAME), server)
  port = (server.add_secure_port(address, tls.server_credentials(tls_dir)) if tls_dir
          else server.add_insecure_port(address))
  if port == 0:
    raise OSError(f'Could not bind the inference server to {address}; is the port in use?')
  server.start()
  return server, port
