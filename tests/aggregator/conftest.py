"""Fixtures shared by the round-store tests: every store backend, each test on its own federation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aggregator.rounds import RoundStore
from aggregator.stores.memory import MemoryRoundStore
from aggregator.stores.redis import RedisRoundStore
from tests.conftest import REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, federation: str) -> Iterator[RoundStore]:
    if request.param == "memory":
        yield MemoryRoundStore()
        return
    s = RedisRoundStore.from_url(REDIS_URL, federation)
    yield s
    s.wipe()
