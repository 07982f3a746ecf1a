"""Shared fixtures: the real RabbitMQ and Redis on loopback, and unique names so tests never collide."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

AMQP_URL = os.environ.get("FLEXLORA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("FLEXLORA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def federation() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def delete_federation_queues(federation: str) -> None:
    """Remove what a test declared on the shared RabbitMQ, so the server does not fill with test queues."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        from broker.topology import Topology

        topo = Topology(federation)
        names = [topo.updates_queue, topo.dead_letter_queue]
        channel = conn.channel()
        for name in names:
            channel.queue_delete(name)
        for name in (topo.updates_exchange, topo.dead_letter_exchange, topo.adapters_exchange):
            channel.exchange_delete(name)
    finally:
        conn.close()


@pytest.fixture
def amqp_cleanup(federation: str) -> Iterator[list[str]]:
    """Yields a list the test appends extra queue names to; deletes those and the federation's core queues."""
    extra: list[str] = []
    yield extra
    import pika

    delete_federation_queues(federation)
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = conn.channel()
        for name in extra:
            channel.queue_delete(name)
    finally:
        conn.close()
