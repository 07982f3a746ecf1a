"""Shared fixtures: the real RabbitMQ and Redis on loopback, and unique names so tests never collide."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

AMQP_URL = os.environ.get("FLEXLORA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("FLEXLORA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# Every federation a test was handed: what the end-of-suite check looks for on the shared broker.
FEDERATIONS: set[str] = set()
# What the end-of-suite check found left behind (said in the terminal summary).
LEFT_BEHIND: list[str] = []


@pytest.fixture
def federation() -> str:
    name = f"t{uuid.uuid4().hex[:12]}"
    FEDERATIONS.add(name)
    return name


def leftover_queues(federations: set[str], attempts: int = 5) -> list[str]:
    """Queues of these federations still on the shared RabbitMQ (asked of `rabbitmqctl`; an exclusive queue of a
    connection that just closed may take a moment to go, so a queue must stay through every attempt)."""
    import shutil
    import subprocess
    import time

    if not federations or shutil.which("rabbitmqctl") is None or "@127.0.0.1:" not in AMQP_URL:
        return []
    prefixes = tuple(f"flexlora.{f}." for f in federations)
    left: set[str] | None = None
    for attempt in range(attempts):
        try:
            listed = subprocess.run(
                ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            return []  # not allowed to ask the broker here: nothing to check against
        now = {q for q in listed if q.startswith(prefixes)}
        left = now if left is None else left & now
        if not left:
            return []
        if attempt + 1 < attempts:
            time.sleep(1.0)
    return sorted(left or ())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A suite that leaves queues behind on the shared broker fails, naming them (and deletes them)."""
    if exitstatus != 0 or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    left = leftover_queues(FEDERATIONS)
    if not left:
        return
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = conn.channel()
        for name in left:
            channel.queue_delete(name)
    finally:
        conn.close()
    LEFT_BEHIND.append(f"tests left {len(left)} queue(s) on the shared broker: {', '.join(left[:10])}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Said last, just above the counts, so that a log's tail shows why a suite with every test passed failed."""
    for line in LEFT_BEHIND:
        terminalreporter.write_line(line, red=True)


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
