"""Clients of the inference service: `InferenceClient` (actors), `ParameterPublisher` (learners).

Imports gRPC, the stubs and the shared config only, so actors load neither JAX nor the server.
"""
from collections.abc import Sequence
import dataclasses
import time
from typing import Any
import uuid

import grpc
import numpy as np

from chorus.inference_server import auth
from chorus.inference_server import inference_pb2
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server import tls
from chorus.inference_server.config import GRPC_OPTIONS


class InferenceError(RuntimeError):
  """A failed call to an inference server; `code` is the gRPC status code."""

  def __init__(self, message: str, code: grpc.StatusCode | None = None):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sampled completion: tokens [T], behaviour log-probs [T], EOS seen or not.

  `param_version` and `newest_param_version` are the oldest and newest version of the
  model's parameters that drew its tokens (the mixture model's likewise): they differ
  where a parameter swap fell between its decode steps. Each log-prob is that of the
  distribution that drew its token either way; count policy lag from `param_version`.
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  terminated: bool
  param_version: int | None = None
  newest_param_version: int | None = None
  mixture_param_version: int | None = None
  newest_mixture_param_version: int | None = None


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  """Completions of one Generate call.

  Attributes:
    completions: prompt-major, `num_samples` per prompt: prompt 0's, then prompt 1's...
    param_version: the oldest version of the model's parameters that drew any of their
      tokens (each completion says its own).
    mixture_param_version: with a mixture model, the oldest version of its parameters;
      else None.
  """
  completions: list[Completion]
  param_version: int
  mixture_param_version: int | None = None


@dataclasses.dataclass(frozen=True)
class LogprobScores:
  """A decoder's scores of given completions.

  Attributes:
    logprobs: per completion, [T_i] float32 log pi(y_t | x, y_<t) of each of its tokens.
    total_logprobs: [B] float32, log pi(y | x) of each completion (the sums).
    param_version: version of the parameters that scored all of them.
  """
  logprobs: list[np.ndarray]
  total_logprobs: np.ndarray
  param_version: int


@dataclasses.dataclass(frozen=True)
class RewardScores:
  """A reward model's scores: rewards [B] float32, one per completion."""
  rewards: np.ndarray
  param_version: int


@dataclasses.dataclass(frozen=True)
class PreferenceScores:
  """A preference model's scores: probabilities [B] float32, P(completion > comparison)."""
  probabilities: np.ndarray
  param_version: int


def _token_sequences(sequences) -> list[inference_pb2.TokenSequence]:
  """Token lists (or Completions, whose tokens are taken) as TokenSequence messages."""
  return [inference_pb2.TokenSequence(tokens=[int(t) for t in getattr(s, 'tokens', s)])
          for s in sequences]


def _call(name: str, method, request, timeout_s: float, address: str):
  """Calls `method`, riding out a server restart for up to `timeout_s`.

  wait_for_ready queues calls while the channel reconnects; a call that was in flight
  when the server died fails UNAVAILABLE and is sent again (generation and versioned
  pushes are safe to repeat). Other errors are raised at once. `request` is the request,
  or for a client-streaming method a callable making a new request iterator per attempt.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      return method(request() if callable(request) else request,
                    timeout=max(deadline - time.monotonic(), 0.001), wait_for_ready=True)
    except grpc.RpcError as error:
      if error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
        time.sleep(0.5)
        continue
      raise InferenceError(f'{name} to inference server {address} failed: '
                           f'{error.code().name}: {error.details()}', error.code()) from None


class _Connection:
  """A channel to one inference server; every call carries `secret` (auth.py): by default
  the run's, from this process's environment; '' sends none. With `tls_dir` (tls.py) the
  channel is TLS, verified against its CA certificate."""

  def __init__(self, address: str, timeout_s: float, secret: str | None = None,
               tls_dir: str = ''):
    self.address = address
    self.timeout_s = timeout_s
    self._channel = tls.channel(address, tls_dir, GRPC_OPTIONS)
    secret = auth.run_secret() if secret is None else secret
    self._authenticated_channel = auth.secure_channel(self._channel, secret)
    self._stub = inference_pb2_grpc.InferenceServiceStub(self._authenticated_channel)

  def status(self) -> dict[str, dict[str, int | str]]:
    """Per model: its kind, param_version, traffic counters (generated_tokens /
    decoded_row_steps is the batch or slot fill) and the scheduler's compilations."""
    response = _call('GetStatus', self._stub.GetStatus, inference_pb2.StatusRequest(),
                     self.timeout_s, self.address)
    return {model.name: dict(param_version=model.param_version, requests=model.requests,
                             sequences=model.sequences, generated_tokens=model.generated_tokens,
                             batches=model.batches, param_updates=model.param_updates,
                             kind=model.kind, score_requests=model.score_requests,
                             scored_sequences=model.scored_sequences,
                             score_batches=model.score_batches,
                             decoded_row_steps=model.decoded_row_steps,
                             compilations=model.compilations)
            for model in response.models}

  def wait_until_ready(self, timeout_s: float = 120.0):
    """Blocks until the server answers, or raises InferenceError after `timeout_s`."""
    try:
      grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
      raise InferenceError(f'Inference server {self.address} did not come up within '
                           f'{timeout_s} s; check its log.') from None

  def close(self):
    self._channel.close()

  def __enter__(self):
    return self

  def __exit__(self, *unused_exc):
    self.close()


class InferenceClient(_Connection):
  """What an actor holds: asks one inference server for completions."""

  def __init__(self, address: str, timeout_s: float = 120.0, *, secret: str | None = None,
               tls_dir: str = ''):
    super().__init__(address, timeout_s, secret, tls_dir)
    # Random per process, so the server can tell a restarted actor from the old one.
    self.actor_run_id = uuid.uuid4().hex

  def generate(self, prompts: Sequence[Sequence[int]], *, model: str = 'policy',
               max_new_tokens: int = 0, temperature: float = 1.0, num_samples: int = 1,
               mixture_model: str = '', mixture_coef: float = 0.0,
               guidance_scale: float = 0.0,
               unconditional_prompts: Sequence[Sequence[int]] | None = None,
               seed: int | None = None) -> GenerateResult:
    """Samples `num_samples` completions per prompt.

    Args:
      prompts: token-id prompts; len(prompts) * num_samples must fit the server's
        max_batch_size.
      model: a decoder served by the server.
      max_new_tokens: completion length cap; 0 means the server's limit (its
        sequence.completion_len).
      temperature: > 0; divides the logits.
      num_samples: completions per prompt, returned prompt-major.
      mixture_model: if set, a second decoder on the server: tokens come from
        softmax(((1 - b) * logits_model + b * logits_mixture) / temperature), b =
        `mixture_coef` in [0, 1], and the log-probs are of that distribution.
      mixture_coef: b above; only with `mixture_model`.
      guidance_scale: g of classifier-free guidance; 0 means none, else > 0 (e.g. 3):
        tokens come from softmax((g * logits(.|prompt) + (1 - g) * logits(.|
        unconditional prompt)) / temperature), both passes run batched on the server,
        and the log-probs are of that distribution. Not with `mixture_model`.
      unconditional_prompts: with `guidance_scale` only, and required there: the
        unconditional prompts (e.g. [BOS, NULL_CAPTION]), one for all prompts or one
        per prompt.
      seed: in [0, 2**32): the same request with the same seed and parameters gives the
        same completions, whatever else the server is sampling; None: the server's own
        random stream.

    Raises:
      InferenceError: the server rejected the request (its `code` says why) or did not
        answer in time.
    """
    request = inference_pb2.GenerateRequest(
        model=model, max_new_tokens=max_new_tokens, temperature=temperature,
        actor_run_id=self.actor_run_id, prompts=_token_sequences(prompts),
        num_samples=num_samples, mixture_model=mixture_model, mixture_coef=mixture_coef,
        guidance_scale=guidance_scale,
        unconditional_prompts=_token_sequences(unconditional_prompts or ()), seed=seed)
    response = _call('Generate', self._stub.Generate, request, self.timeout_s, self.address)
    completions = [Completion(
        np.array(c.tokens, np.int32), np.array(c.logprobs, np.float32), c.terminated,
        c.param_version, c.newest_param_version,
        c.mixture_param_version if c.HasField('mixture_param_version') else None,
        c.newest_mixture_param_version if c.HasField('newest_mixture_param_version') else None)
                   for c in response.completions]
    mixture_version = (response.mixture_param_version
                       if response.HasField('mixture_param_version') else None)
    return GenerateResult(completions, response.param_version, mixture_version)

  def _score(self, kind: str, model: str, prompts, completions, comparisons=(),
             temperature: float | None = None):
    request = inference_pb2.ScoreRequest(
        model=model, expected_kind=kind, actor_run_id=self.actor_run_id,
        prompts=_token_sequences(prompts), completions=_token_sequences(completions),
        comparisons=_token_sequences(comparisons), temperature=temperature)
    return _call('Score', self._stub.Score, request, self.timeout_s, self.address)

  def score_logprobs(self, prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]], *, model: str = 'policy',
                     temperature: float = 1.0) -> LogprobScores:
    """Per-token log-probs of given completions under a decoder model, batched.

    Args:
      prompts: [B] token-id prompts.
      completions: [B] completions (token lists or `Completion`s), one per prompt, each
        1 to the server's sequence.completion_len tokens.
      model: a decoder served by the server.
      temperature: > 0; scores log softmax(logits / temperature), as Generate samples.
    """
    response = self._score('decoder', model, prompts, completions, temperature=temperature)
    logprobs = [np.array(row.logprobs, np.float32) for row in response.logprobs]
    totals = np.array([row.total for row in response.logprobs], np.float32)
    return LogprobScores(logprobs, totals, response.param_version)

  def score_rewards(self, prompts: Sequence[Sequence[int]],
                    completions: Sequence[Sequence[int]], *,
                    model: str = 'reward') -> RewardScores:
    """One scalar reward per (prompt, completion) from a reward model, batched."""
    response = self._score('reward', model, prompts, completions)
    return RewardScores(np.array(response.rewards, np.float32), response.param_version)

  def score_preferences(self, prompts: Sequence[Sequence[int]],
                        completions: Sequence[Sequence[int]],
                        comparisons: Sequence[Sequence[int]], *,
                        model: str = 'preference') -> PreferenceScores:
    """P(completions[i] > comparisons[i] | prompts[i]) from a preference model, batched."""
    response = self._score('preference', model, prompts, completions, comparisons)
    return PreferenceScores(np.array(response.preferences, np.float32), response.param_version)


class ParameterPublisher(_Connection):
  """What a learner holds: pushes versioned parameters of one model to an inference server.

  Args:
    address: the server's host:port.
    model: the served model's name.
    timeout_s: how long one push may take, retries included.
    chunk_bytes: the most tensor bytes in one streamed message.
    wire_dtype: '' sends tensors as they are; 'bfloat16' sends floating ones at half size.
  """

  def __init__(self, address: str, model: str = 'policy', timeout_s: float = 60.0, *,
               chunk_bytes: int = 4 << 20, wire_dtype: str = '',
               secret: str | None = None, tls_dir: str = ''):
    # Only learners publish, and they hold JAX already: importing param_stream at the top
    # would load JAX into every actor that imports this module for InferenceClient.
    from chorus.inference_server import param_stream  # pylint: disable=g-import-not-at-top
    param_stream.keep_freed_memory_for_chunks()
    super().__init__(address, timeout_s, secret, tls_dir)
    self.model = model
    self.chunk_bytes = chunk_bytes
    self.wire_dtype = wire_dtype
    # push_chunks serializes its messages itself (param_stream.py), so they go as bytes.
    self._stream_params = self._authenticated_channel.stream_unary(
        f"/{inference_pb2.DESCRIPTOR.services_by_name['InferenceService'].full_name}"
        '/StreamParams',
        response_deserializer=inference_pb2.UpdateParamsResponse.FromString)

  def publish(self, params: Any, version: int, resume: bool = False) -> float:
    """Streams `params` as `version` (param_stream.py); returns the seconds it took.

    `resume=True` lets a learner restarted from a checkpoint go back to its version.

    Raises:
      InferenceError: the server refused the push (a stale version, another architecture,
        non-finite values) or did not take it in time; it serves what it served before.
    """
    from chorus.inference_server import param_stream  # pylint: disable=g-import-not-at-top
    start = time.monotonic()
    _call('StreamParams', self._stream_params,
          lambda: param_stream.push_chunks(params, model=self.model, version=version,
                                           resume=resume, chunk_bytes=self.chunk_bytes,
                                           wire_dtype=self.wire_dtype),
          self.timeout_s, self.address)
    return time.monotonic() - start
