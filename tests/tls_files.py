"""A CA and a server certificate for 127.0.0.1 and localhost, written as a TLS directory."""
import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chorus.inference_server import tls


def _name(common_name: str) -> x509.Name:
  return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(certificate: x509.Certificate) -> bytes:
  return certificate.public_bytes(serialization.Encoding.PEM)


def write_tls_dir(directory, ca_name: str = 'Chorus test CA') -> str:
  """Writes tls.FILES into `directory`: a fresh CA and a server certificate it signed."""
  now = datetime.datetime.now(datetime.timezone.utc)
  ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
      ec.SECP256R1())
  ca = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256()))
  server = (x509.CertificateBuilder().subject_name(_name('localhost')).issuer_name(ca.subject)
            .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName('localhost'), x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
  os.makedirs(directory, exist_ok=True)
  contents = {tls.CERTIFICATE: _pem(server), tls.CA_CERTIFICATE: _pem(ca),
              tls.PRIVATE_KEY: server_key.private_bytes(
                  serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                  serialization.NoEncryption())}
  for name, data in contents.items():
    with open(os.path.join(directory, name), 'wb') as file:
      file.write(data)
  return str(directory)
