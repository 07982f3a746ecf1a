"""TLS for every connection a federation makes: amqps:// to RabbitMQ and rediss:// to Redis.

Certificates are verified by default (against the system's CAs, or the federation's own CA file), host names
included. A client certificate turns on mutual TLS; on RabbitMQ it also logs the device in by its certificate
(the EXTERNAL mechanism, rabbitmq_auth_mechanism_ssl) when the URL carries no password.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path | None = None  # trust this CA (PEM) instead of the system's
    cert_file: Path | None = None  # present this certificate (PEM, with its chain): mutual TLS
    key_file: Path | None = None  # its private key (PEM); None: in cert_file

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("a TLS key file needs its certificate file (tls_cert_file)")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls_{name} {path} is not a readable file")

    def context(self) -> ssl.SSLContext:
        """A client-side context that verifies the server's certificate and host name."""
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return context

    def redis_options(self) -> dict[str, str | None]:
        """What redis-py takes for a rediss:// connection (it verifies the server by default)."""
        return {
            "ssl_ca_certs": str(self.ca_file) if self.ca_file else None,
            "ssl_certfile": str(self.cert_file) if self.cert_file else None,
            "ssl_keyfile": str(self.key_file) if self.key_file else None,
        }
