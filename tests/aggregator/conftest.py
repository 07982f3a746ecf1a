"""Fixtures shared by the round-store tests: every store backend, each test on its own federation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aggregator.rounds import RoundStore
from aggregator.stores import open_store
from aggregator.stores.memory import MemoryRoundStore
from tests.conftest import REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, federation: str) -> Iterator[RoundStore]:
    if request.param == "memory":
        yield MemoryRoundStore()
        return
    s = open_store(REDIS_URL, federation)
    yield s
    s.wipe()
