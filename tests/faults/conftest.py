"""Fixtures of the fault scenarios: private servers to restart, the shared round store, and the ledgers'
summary at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.stores.redis import RedisRoundStore
from tests.conftest import REDIS_URL
from tests.faults.ledger import LEDGERS
from tests.faults.servers import OwnRabbitMQ, OwnRedis, ServerUnavailable


@pytest.fixture
def store(federation: str) -> Iterator[RedisRoundStore]:
    """The federation's rounds in the shared Redis, wiped afterwards."""
    s = RedisRoundStore.from_url(REDIS_URL, federation)
    yield s
    s.wipe()


@pytest.fixture(scope="module")
def rabbit_node() -> Iterator[OwnRabbitMQ]:
    """A RabbitMQ node of this module's own (no management plugin), to restart and kill."""
    try:
        node = OwnRabbitMQ(management=False)
        node.start()
    except ServerUnavailable as exc:
        pytest.skip(f"no private RabbitMQ node here: {exc}")
    print(f"private RabbitMQ node started in {node.started_in:.1f}s")
    yield node
    node.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis of the test's own with an append-only file fsynced every second."""
    try:
        server = OwnRedis(tmp_path / "redis", appendonly=True, appendfsync="everysec")
        server.start()
    except ServerUnavailable as exc:
        pytest.skip(f"no private Redis here: {exc}")
    yield server
    server.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LEDGERS:
        terminalreporter.section("fault ledgers")
        for ledger in LEDGERS:
            terminalreporter.write_line(ledger.summary())
