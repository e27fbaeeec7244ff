"""Per-method request size limits, and requests that do not parse refused as such.

gRPC's own cap (`config.MAX_MESSAGE_BYTES`) is one number for every method of a server,
sized for parameter chunks. A Generate or Score request can hold at most `max_batch_size`
rows of the served sequence lengths (the service refuses more), a status request is
empty and a health check names one service; anything larger is refused
RESOURCE_EXHAUSTED before protobuf parses it, with a message that says the sizes and
never the payload. A message that does not parse is refused INVALID_ARGUMENT.
"""
from collections.abc import Iterable, Mapping
import dataclasses

import grpc

from chorus import core
from chorus.inference_server import health_pb2
from chorus.inference_server import inference_pb2
from chorus.inference_server.config import InferenceServerConfig


def _path(module, service: str, method: str) -> str:
  """The gRPC path of `method`, from the proto (as service.py names its services)."""
  descriptor = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
  return f'/{descriptor.containing_service.full_name}/{descriptor.name}'


GENERATE, SCORE, STATUS = (_path(inference_pb2, 'InferenceService', method)
                           for method in ('Generate', 'Score', 'GetStatus'))
HEALTH_CHECK = _path(health_pb2, 'Health', 'Check')

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
class _Refused:
  """Stands in for a request message the service never sees: the status and the reason."""
  code: grpc.StatusCode
  message: str


class RequestLimitInterceptor(grpc.ServerInterceptor):
  """Refuses request messages before the service sees them.

  - Over its method's limit (`limits`): RESOURCE_EXHAUSTED, unparsed. Methods not in
    `limits` (the parameter stream) keep gRPC's server-wide cap.
  - Not a valid message of its type: INVALID_ARGUMENT. gRPC itself would answer INTERNAL,
    as for a fault of the server's.
  """

  def __init__(self, limits: Mapping[str, int]):
    self._limits = dict(limits)

  def intercept_service(self, continuation, handler_call_details):
    handler = continuation(handler_call_details)
    if handler is None or handler.request_deserializer is None:
      return handler
    method, parse = handler_call_details.method, handler.request_deserializer
    limit = self._limits.get(method)

    def checked_parse(raw: bytes):
      if limit is not None and len(raw) > limit:
        return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f'{method} takes requests of at most {limit} bytes on this server '
                        '(what the method can need with its max_batch_size and sequence '
                        f'lengths); this one has {len(raw)}. Send fewer or shorter rows per '
                        'request.')
      try:
        return parse(raw)
      except Exception:  # pylint: disable=broad-except  (the parser's DecodeError and kin)
        return _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                        f'{method} got a message of {len(raw)} bytes that does not parse as '
                        'its request type; send one serialized by the protocol\'s own stubs '
                        '(inference_server/inference.proto).')

    def admitted(request, context):
      if isinstance(request, _Refused):
        context.abort(request.code, request.message)
      return request

    def admitted_stream(requests: Iterable, context):
      for request in requests:
        yield admitted(request, context)

    kind = ('stream_' if handler.request_streaming else 'unary_') + (
        'stream' if handler.response_streaming else 'unary')
    serve = getattr(handler, kind)
    if handler.request_streaming:
      behaviour = lambda requests, context: serve(admitted_stream(requests, context), context)
    else:
      behaviour = lambda request, context: serve(admitted(request, context), context)
    return handler._replace(request_deserializer=checked_parse, **{kind: behaviour})
