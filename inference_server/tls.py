"""TLS for the inference servers' traffic: optional, for clusters, where it leaves the host.

`InferenceServerConfig.tls_dir` names a directory of PEM files (`FILES`): the servers'
certificate chain and private key, and the CA certificate that clients verify the servers
against. The certificate must name the address the clients dial (an IP or DNS subject
alternative name). Empty: plaintext, as on one machine's loopback.

TLS keeps the traffic and the run's secret (auth.py) private on the network; it does not
replace the secret, which is still what a server checks on every call.
"""
import os

import grpc

CERTIFICATE, PRIVATE_KEY, CA_CERTIFICATE = 'server.crt', 'server.key', 'ca.crt'
FILES = (CERTIFICATE, PRIVATE_KEY, CA_CERTIFICATE)


def missing_files(tls_dir: str) -> list[str]:
  """Which of `FILES` `tls_dir` lacks."""
  return [name for name in FILES if not os.path.isfile(os.path.join(tls_dir, name))]


def _read(tls_dir: str, name: str) -> bytes:
  with open(os.path.join(tls_dir, name), 'rb') as file:
    return file.read()


def server_credentials(tls_dir: str) -> grpc.ServerCredentials:
  return grpc.ssl_server_credentials(
      [(_read(tls_dir, PRIVATE_KEY), _read(tls_dir, CERTIFICATE))])


def channel(address: str, tls_dir: str, options) -> grpc.Channel:
  """A channel to `address`: TLS verified against `tls_dir`'s CA, or plaintext without one."""
  if not tls_dir:
    return grpc.insecure_channel(address, options=options)
  credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls_dir, CA_CERTIFICATE))
  return grpc.secure_channel(address, credentials, options=options)
