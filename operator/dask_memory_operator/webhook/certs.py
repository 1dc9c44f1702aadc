"""A CA and a webhook server certificate for local use (the operator without
``--webhook-cert-dir``, the stack, the tests), made with ``cryptography``. In a
cluster the certificate comes from a Secret (the chart, or cert-manager), mounted
where ``--webhook-cert-dir`` points.

Also, for the stack and the tests, a client CA and the client certificates it signs:
what an API server presents to the webhook (``--webhook-client-ca``)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_webhook_certs(folder: Path, dns_names: list[str], ips: list[str], days: int = 7) -> bytes:
    """``tls.crt``, ``tls.key`` and ``ca.crt`` in ``folder``, for those names; returns
    the CA's PEM (the webhook configuration's ``caBundle``, base64-encoded)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("dask-memory-operator-ca")).issuer_name(_name("dask-memory-operator-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(_name((dns_names or ips)[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (folder / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (folder / "ca.crt").write_bytes(ca_pem)
    return ca_pem


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_client_ca(folder: Path, cn: str = "webhook-client-ca", days: int = 7) -> Path:
    """``client-ca.crt`` and ``client-ca.key`` in ``folder``; returns the certificate's path
    (``--webhook-client-ca``)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    (folder / "client-ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "client-ca.key").write_bytes(_pem_key(key))
    return folder / "client-ca.crt"


def write_client_cert(folder: Path, cn: str, days: int = 7) -> tuple[Path, Path]:
    """A client certificate for ``cn`` (also its DNS SAN) signed by the client CA of
    ``folder``: ``<cn>.crt`` and ``<cn>.key`` there, returned as paths."""
    ca = x509.load_pem_x509_certificate((folder / "client-ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "client-ca.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (folder / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{cn}.key").write_bytes(_pem_key(key))
    return folder / f"{cn}.crt", folder / f"{cn}.key"
