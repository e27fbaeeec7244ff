"""The run's secret: only the run's own nodes may call its inference servers.

The launcher makes one secret per run (`new_secret`) and hands it to every node in its
environment (`SECRET_ENV`), never in a file of the run directory, a log or config.json.
Clients send it as call metadata (`METADATA_KEY`) on every call; a server started with a
secret refuses any call without it, or with another, as UNAUTHENTICATED before the call
reaches the service, so a stranger on the host can neither sample, score, read status nor
push weights. Health checks (grpc.health.v1) and reflection are exempt: they say only
SERVING, and what the services' methods are.
"""
import hmac
import os
import secrets

import grpc

SECRET_ENV = 'CHORUS_RUN_SECRET'
METADATA_KEY = 'chorus-run-secret'
# Exempt from the secret: health says only SERVING, and reflection only the services'
# schema, which is this repository's own .proto files.
OPEN_METHOD_PREFIXES = ('/grpc.health.v1.Health/', '/grpc.reflection.v1alpha.ServerReflection/')


def new_secret() -> str:
  """A fresh random secret (256 bits, URL-safe text)."""
  return secrets.token_urlsafe(32)


def run_secret() -> str | None:
  """This process's run secret (from its environment), or None outside a run."""
  return os.environ.get(SECRET_ENV) or None


class _ClientCallDetails(grpc.ClientCallDetails):

  def __init__(self, details: grpc.ClientCallDetails, metadata):
    self.method = details.method
    self.timeout = details.timeout
    self.metadata = metadata
    self.credentials = details.credentials
    self.wait_for_ready = details.wait_for_ready
    self.compression = getattr(details, 'compression', None)


class ClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
  """Adds the run's secret to every unary and client-streaming call."""

  def __init__(self, secret: str):
    self._secret = secret

  def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
    metadata = list(details.metadata or []) + [(METADATA_KEY, self._secret)]
    return _ClientCallDetails(details, metadata)

  def intercept_unary_unary(self, continuation, client_call_details, request):
    return continuation(self._details(client_call_details), request)

  def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
    return continuation(self._details(client_call_details), request_iterator)


def secure_channel(channel: grpc.Channel, secret: str | None) -> grpc.Channel:
  """`channel` sending `secret` with every call; `channel` itself without one."""
  return grpc.intercept_channel(channel, ClientInterceptor(secret)) if secret else channel


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
  """A handler of `handler`'s kind that answers UNAUTHENTICATED without reading the call."""

  def refuse(unused_request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                  "This inference server serves only its run's nodes; the call did not carry "
                  "the run's secret.")

  if handler.request_streaming and handler.response_streaming:
    return grpc.stream_stream_rpc_method_handler(refuse)
  if handler.request_streaming:
    return grpc.stream_unary_rpc_method_handler(refuse)
  if handler.response_streaming:
    return grpc.unary_stream_rpc_method_handler(refuse)
  return grpc.unary_unary_rpc_method_handler(refuse)


class ServerInterceptor(grpc.ServerInterceptor):
  """Lets through only calls carrying `secret` (compared in constant time), health checks
  and reflection."""

  def __init__(self, secret: str):
    if not secret:
      raise ValueError('A server interceptor needs a non-empty secret.')
    self._secret = secret.encode()

  def intercept_service(self, continuation, handler_call_details):
    handler = continuation(handler_call_details)
    if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
      return handler
    sent = [value for key, value in handler_call_details.invocation_metadata or ()
            if key == METADATA_KEY]
    if len(sent) == 1 and hmac.compare_digest(
        sent[0].encode() if isinstance(sent[0], str) else sent[0], self._secret):
      return handler
    return _refusal(handler)
