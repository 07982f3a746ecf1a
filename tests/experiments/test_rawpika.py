"""The raw-pika floors the benchmarks compare against: what they measure, and that a consumer that cannot keep
what it consumes says so at once instead of leaving the benchmark waiting out its timeout."""

from __future__ import annotations

import socket
import time

import pytest
import redis

from experiments import rawpika
from tests.conftest import AMQP_URL, REDIS_URL


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.services
def test_the_keeping_drain_acks_every_body_and_leaves_nothing_kept() -> None:
    drained = rawpika.drain(AMQP_URL, [4096] * 12, keep=rawpika.Keep(REDIS_URL), timeout_s=60)
    assert drained.messages == 12 and drained.messages_per_s > 0
    with redis.Redis.from_url(REDIS_URL) as client:
        assert not list(client.scan_iter(f"{drained.queue}:*"))


@pytest.mark.services
def test_a_consumer_that_cannot_keep_a_body_fails_the_run_at_once() -> None:
    keep = rawpika.Keep(f"redis://127.0.0.1:{_closed_port()}/0")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="keeping a body failed: ConnectionError"):
        rawpika.drain(AMQP_URL, [4096] * 12, keep=keep, timeout_s=60)
    assert time.monotonic() - started < 30  # not the 60 s timeout
