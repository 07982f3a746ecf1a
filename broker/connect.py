"""Open a transport from a URL: amqp(s):// for RabbitMQ, memory:// for the in-process broker."""

from __future__ import annotations

from broker.errors import BrokerError
from broker.tls import TlsFiles
from broker.transport import Transport
from broker.transports.memory import MemoryBroker, MemoryTransport


def connect(
    url: str,
    *,
    memory: MemoryBroker | None = None,
    heartbeat: int = 30,
    connection_name: str = "flexlora",
    user_id: str | None = None,
    tls: TlsFiles | None = None,
) -> Transport:
    """A memory:// URL needs the MemoryBroker to join (there is no global one, so tests stay isolated)."""
    if url.startswith("memory://"):
        if memory is None:
            raise BrokerError("a memory:// transport needs the MemoryBroker instance it should join")
        return MemoryTransport(memory, user_id=user_id)
    if url.startswith(("amqp://", "amqps://")):
        # pika is imported only here, so the embedded default runs without a broker library loaded.
        from broker.transports.rabbitmq import RabbitMQTransport

        return RabbitMQTransport(url, heartbeat=heartbeat, connection_name=connection_name, tls=tls)
    raise BrokerError(f"unsupported broker URL {url!r}: use amqp://user:pass@host:port/vhost or memory://")
