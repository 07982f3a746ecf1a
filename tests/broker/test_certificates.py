"""Device certificates issued by the federation's CA: named by the client id, for client authentication only,
signed by that CA (and refused when the CA's key is not the certificate's)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.certificates import issue_device_certificate
from flexlora.provision import issue_certificates


def test_a_device_certificate_names_the_client_and_is_for_client_auth_only() -> None:
    ca = trustme.CA()
    issued = issue_device_certificate(ca.cert_pem.bytes(), ca.private_key_pem.bytes(), "phone-1", days=30)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "phone-1"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem.bytes()))


def test_a_ca_key_that_is_not_the_certificates_is_refused() -> None:
    ca, other = trustme.CA(), trustme.CA()
    with pytest.raises(ValueError, match="does not belong"):
        issue_device_certificate(ca.cert_pem.bytes(), other.private_key_pem.bytes(), "phone-1")


def test_provision_writes_each_clients_files_with_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_cert, ca_key = tmp_path / "ca-in.pem", tmp_path / "ca-in.key"
    ca_cert.write_bytes(ca.cert_pem.bytes())
    ca_key.write_bytes(ca.private_key_pem.bytes())
    out = tmp_path / "out"
    issue_certificates(out, ca_cert, ca_key, ["phone-1", "laptop-1"], 90)
    for client in ("phone-1", "laptop-1"):
        assert (out / f"{client}.key").stat().st_mode & 0o777 == 0o600
        context = ssl.create_default_context(cafile=str(out / "ca.pem"))
        context.load_cert_chain(str(out / f"{client}.pem"), str(out / f"{client}.key"))  # a usable pair


@pytest.mark.services
def test_a_server_certificate_from_a_new_ca_serves_tls_for_the_names_it_carries_and_no_other(tmp_path: Path) -> None:
    import redis

    from broker.certificates import issue_server_certificate, new_authority
    from tests.faults.servers import OwnRedis, ServerTls, ServerUnavailable

    ca = new_authority(days=30)
    issued = issue_server_certificate(ca.cert_pem, ca.key_pem, ["localhost"], days=30)
    files = ServerTls(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")
    for path, pem in zip(files.__dict__.values(), (ca.cert_pem, issued.cert_pem, issued.key_pem), strict=True):
        path.write_bytes(pem)
    try:
        server = OwnRedis(tmp_path / "redis", appendonly=False, tls=files)
        server.start()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        verified: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(files.ca_file), "socket_timeout": 5}
        assert redis.Redis(host="localhost", port=server.port, **verified).ping()
        with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate|hostname|IP address"):
            redis.Redis(host="127.0.0.1", port=server.port, **verified).ping()  # not a name it carries
        other = new_authority()
        (tmp_path / "other.pem").write_bytes(other.cert_pem)
        with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate"):
            redis.Redis(
                host="localhost", port=server.port, **{**verified, "ssl_ca_certs": str(tmp_path / "other.pem")}
            ).ping()
    finally:
        server.close()


def test_a_server_certificate_needs_a_host_and_its_cas_key() -> None:
    from broker.certificates import issue_server_certificate, new_authority

    ca, other = new_authority(), new_authority()
    with pytest.raises(ValueError, match="at least one"):
        issue_server_certificate(ca.cert_pem, ca.key_pem, [])
    with pytest.raises(ValueError, match="does not belong"):
        issue_server_certificate(ca.cert_pem, other.key_pem, ["localhost"])
