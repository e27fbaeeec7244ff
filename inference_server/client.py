"""Clients of the inference service: `InferenceClient` for actors, `ParameterPublisher` for learners."""
from collections.abc import Sequence
import dataclasses
import time
from typing import Any
import uuid

import grpc
import numpy as np

from chorus import models
from chorus.inference_server import inference_pb2
from chorus.inference_server import inference_pb2_grpc
from chorus.inference_server.server import GRPC_OPTIONS


class InferenceError(RuntimeError):
  """A failed call to an inference server; `code` is the gRPC status code."""

  def __init__(self, message: str, code: grpc.StatusCode | None = None):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sampled completion: tokens [T], behaviour log-probs [T], EOS seen or not."""
  tokens: np.ndarray
  logprobs: np.ndarray
  terminated: bool


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  completions: list[Completion]
  param_version: int


def _call(name: str, method, request, timeout_s: float, address: str):
  """Calls `method`, riding out a server restart for up to `timeout_s`.

  wait_for_ready queues calls while the channel reconnects; a call that was in flight
  when the server died fails UNAVAILABLE and is sent again (generation and versioned
  pushes are safe to repeat). Other errors are raised at once.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      return method(request, timeout=max(deadline - time.monotonic(), 0.001),
                    wait_for_ready=True)
    except grpc.RpcError as error:
      if error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
        time.sleep(0.5)
        continue
      raise InferenceError(f'{name} to inference server {address} failed: '
                           f'{error.code().name}: {error.details()}', error.code()) from None


class _Connection:

  def __init__(self, address: str, timeout_s: float):
    self.address = address
    self.timeout_s = timeout_s
    self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)

  def status(self) -> dict[str, dict[str, int]]:
    """Per model: param_version and traffic counters."""
    response = _call('GetStatus', self._stub.GetStatus, inference_pb2.StatusRequest(), self.timeout_s,
                     self.address)
    return {model.name: dict(param_version=model.param_version, requests=model.requests,
                             sequences=model.sequences, generated_tokens=model.generated_tokens,
                             batches=model.batches, param_updates=model.param_updates)
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

  def __init__(self, address: str, timeout_s: float = 120.0):
    super().__init__(address, timeout_s)
    # Random per process, so the server can tell a restarted actor from the old one.
    self.actor_run_id = uuid.uuid4().hex

  def generate(self, prompts: Sequence[Sequence[int]], *, model: str = 'policy',
               max_new_tokens: int = 0, temperature: float = 1.0) -> GenerateResult:
    """Samples one completion per prompt; all of them come from one parameter version."""
    request = inference_pb2.GenerateRequest(
        model=model, max_new_tokens=max_new_tokens, temperature=temperature,
        actor_run_id=self.actor_run_id,
        prompts=[inference_pb2.TokenSequence(tokens=[int(t) for t in prompt])
                 for prompt in prompts])
    response = _call('Generate', self._stub.Generate, request, self.timeout_s, self.address)
    completions = [Completion(np.array(c.tokens, np.int32), np.array(c.logprobs, np.float32),
                              c.terminated) for c in response.completions]
    return GenerateResult(completions, response.param_version)


class ParameterPublisher(_Connection):
  """What a learner holds: pushes versioned parameters of one model to inference servers."""

  def __init__(self, address: str, model: str = 'policy', timeout_s: float = 60.0):
    super().__init__(address, timeout_s)
    self.model = model

  def publish(self, params: Any, version: int, resume: bool = False) -> float:
    """Sends `params` as `version`; returns seconds taken. Raises InferenceError on failure.

    `resume=True` lets a learner restarted from a checkpoint go back to its version.
    """
    start = time.monotonic()
    request = inference_pb2.UpdateParamsRequest(model=self.model, version=version,
                                                params=models.params_to_bytes(params),
                                                resume=resume)
    _call('UpdateParams', self._stub.UpdateParams, request, self.timeout_s, self.address)
    return time.monotonic() - start
