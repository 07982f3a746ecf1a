"""Open a transport from a URL: amqp(s):// for RabbitMQ, memory:// for the in-process broker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tenacity import RetryCallState

from broker.errors import BrokerError
from broker.tls import TlsFiles
from broker.transport import Transport
from broker.transports.memory import MemoryBroker, MemoryTransport

SCHEMES = ("amqp://", "amqps://", "memory://")


def check_broker_url(url: str) -> str:
    """`url` if every address in it (several, separated by commas or spaces: one cluster) is a broker URL; else
    ValueError saying what is expected. Settings check it, so a typo stops a process at once, not on connect."""
    urls = [u for u in url.replace(",", " ").split() if u]
    if not urls or not all(u.startswith(SCHEMES) for u in urls):
        raise ValueError(f"unsupported broker URL {url!r}: use amqp://user:pass@host:port/vhost (amqps:// with TLS)")
    return url


def say_retrying(log: logging.Logger) -> Callable[[RetryCallState], None]:
    """A tenacity `before_sleep` that logs one line per failed attempt, the traceback only at debug level (with
    --verbose): an outage of minutes costs a few lines, where each retry's traceback once cost seventy."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning("%s; trying again in %.0f s", exc, wait)
        log.debug("the error in full", exc_info=exc)

    return before_sleep


def sleeping_until(stop: threading.Event) -> Callable[[float], None]:
    """A tenacity `sleep` that ends at once when `stop` is set (SIGTERM, Ctrl-C), not after the back-off."""

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


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
