"""Device certificates for mutual TLS, issued by the federation's own CA (`flexlora provision --ca-cert`), and
the CA and server certificates of a deployment (`flexlora server-certs`).

A device's certificate names it (subject common name = its client id, which is also its RabbitMQ user under
the EXTERNAL login), is good for client authentication only, and has a key of its own (ECDSA P-256) that is
written next to it and never leaves the operator's output folder and the device.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class DeviceCertificate:
    cert_pem: bytes
    key_pem: bytes


def _authority(
    ca_cert_pem: bytes, ca_key_pem: bytes, password: bytes | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    """The CA's certificate and key; ValueError when they do not belong together or the key cannot sign."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=password)
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        raise ValueError("the CA key does not belong to the CA certificate")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"a {type(ca_key).__name__} CA key is not supported here (use an EC or RSA CA key)")
    return ca_cert, ca_key


def issue_device_certificate(
    ca_cert_pem: bytes, ca_key_pem: bytes, client_id: str, *, days: int = 365, password: bytes | None = None
) -> DeviceCertificate:
    """A client certificate for `client_id` signed by the CA; ValueError when the CA files do not belong
    together or the key cannot sign."""
    ca_cert, ca_key = _authority(ca_cert_pem, ca_key_pem, password)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_named(client_id), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return DeviceCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _named(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    """A certificate for `key` naming `subject`, from five minutes ago (clocks differ) for `days` days."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def new_authority(name: str = "flexlora federation CA", *, days: int = 3650) -> DeviceCertificate:
    """A self-signed CA (ECDSA P-256) that may sign certificates only (no intermediate CAs below it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_named(name), _named(name), key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return DeviceCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_server_certificate(
    ca_cert_pem: bytes, ca_key_pem: bytes, hosts: Sequence[str], *, days: int = 825, password: bytes | None = None
) -> DeviceCertificate:
    """A server certificate for every name or IP address in `hosts` (subject alternative names; clients verify
    the one they dialled), good for server and client authentication: RabbitMQ nodes and Redis replicas also
    dial each other with it."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    ca_cert, ca_key = _authority(ca_cert_pem, ca_key_pem, password)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_named(hosts[0]), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return DeviceCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
