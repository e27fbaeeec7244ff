"""Per-method request size limits: each call is parsed only if its method could need its size.

gRPC's own cap (`config.MAX_MESSAGE_BYTES`) is one number for every method of a server,
sized for parameter chunks. A Generate or Score request can hold at most `max_batch_size`
rows of the served sequence lengths (the service refuses more), a status request is
empty and a health check names one service; anything larger is refused
RESOURCE_EXHAUSTED before protobuf parses it, with a message that says the sizes and
never the payload.
"""
from collections.abc import Iterable, Mapping
import dataclasses

import grpc

from chorus import core
from chorus.inference_server.config import InferenceServerConfig

_SERVICE = '/chorus.inference.InferenceService/'
GENERATE, SCORE, STATUS = _SERVICE + 'Generate', _SERVICE + 'Score', _SERVICE + 'GetStatus'
HEALTH_CHECK = '/grpc.health.v1.Health/Check'

_TOKEN_BYTES = 5  # The longest varint of a token id (a non-negative int32).
_SEQUENCE_BYTES = 8  # A TokenSequence's field tags and lengths.
_NAMES_BYTES = 4096  # Model names, expected kind, actor run id and the scalar settings.
_EMPTY_BYTES = 64  # GetStatus's request has no fields.
_SERVICE_NAME_BYTES = 1024  # A health check's service name.


def request_bytes_needed(config: InferenceServerConfig, sequence: core.SequenceSpec) -> int:
  """The largest Generate or Score request a model of `config` and `sequence` can take.

  Generate: up to max_batch_size prompts and as many unconditional prompts. Score: up to
  max_batch_size prompts, completions and comparisons. The bound covers both.
  """
  row_tokens = 2 * (sequence.prompt_len + sequence.completion_len)
  return config.max_batch_size * (row_tokens * _TOKEN_BYTES + 3 * _SEQUENCE_BYTES) + _NAMES_BYTES


def method_limits(served: Iterable[tuple[InferenceServerConfig, core.SequenceSpec]]
                  ) -> dict[str, int]:
  """The request limit in bytes of each limited method, for a server of `served` models."""
  needed = max((request_bytes_needed(config, sequence) for config, sequence in served),
               default=_NAMES_BYTES)
  return {GENERATE: needed, SCORE: needed, STATUS: _EMPTY_BYTES,
          HEALTH_CHECK: _SERVICE_NAME_BYTES}


@dataclasses.dataclass(frozen=True)
class _Oversized:
  """Stands in for a request that was too large to parse."""
  size: int


class RequestLimitInterceptor(grpc.ServerInterceptor):
  """Refuses, unparsed, any request of a limited unary method over its limit.

  Methods not in `limits` (the parameter stream) keep gRPC's server-wide cap.
  """

  def __init__(self, limits: Mapping[str, int]):
    self._limits = dict(limits)

  def intercept_service(self, continuation, handler_call_details):
    handler = continuation(handler_call_details)
    method = handler_call_details.method
    if handler is None or method not in self._limits or handler.request_streaming:
      return handler
    limit, parse = self._limits[method], handler.request_deserializer

    def checked_parse(raw: bytes):
      return _Oversized(len(raw)) if len(raw) > limit else parse(raw)

    def behaviour(serve):
      def limited(request, context):
        if isinstance(request, _Oversized):
          context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f'{method} takes requests of at most {limit} bytes on this server '
                        f'(what the method can need with its max_batch_size and sequence '
                        f'lengths); this one has {request.size}. Send fewer or shorter rows '
                        'per request.')
        return serve(request, context)
      return limited

    if handler.response_streaming:
      return handler._replace(request_deserializer=checked_parse,
                              unary_stream=behaviour(handler.unary_stream))
    return handler._replace(request_deserializer=checked_parse,
                            unary_unary=behaviour(handler.unary_unary))
