"""Fixtures shared by the round-store tests: every store backend, each test on its own federation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.payloads import FilePayloads
from aggregator.rounds import RoundStore
from aggregator.stores import open_store
from aggregator.stores.memory import MemoryRoundStore
from tests.conftest import REDIS_URL
from tests.faults.servers import OwnRedisCluster, ServerUnavailable


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedisCluster]:
    """Three Redis Cluster primaries on loopback, shared by the tests of one run and stopped after it."""
    directory: Path = tmp_path_factory.mktemp("redis-cluster")
    try:
        cluster = OwnRedisCluster(directory, primaries=3)
        cluster.start()
    except ServerUnavailable as exc:
        pytest.skip(f"no private Redis Cluster here: {exc}")
    yield cluster
    cluster.close()


# A prologue that makes a script fail on any key it was not given: Redis Cluster routes a script by its KEYS and
# can only serve keys of their slot, and Redis 7.0 itself lets a script reach undeclared keys of the same slot.
KEY_GUARD = """
local declared = {}
for _, name in ipairs(KEYS) do declared[name] = true end
local every_argument_a_key = {DEL = true, EXISTS = true, RENAME = true}
local function guarded(command, ...)
  local args = {...}
  local keys = every_argument_a_key[string.upper(command)] and #args or 1
  for i = 1, keys do
    if not declared[args[i]] then error('script touched undeclared key ' .. tostring(args[i])) end
  end
  return redis.call(command, ...)
end
"""


def guarded_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's scripts, each failing on a key it was not given (see KEY_GUARD)."""
    from aggregator.stores import redis as redis_store
    from aggregator.stores import redis_scripts

    for name, script in vars(redis_scripts).items():
        if name.isupper() and isinstance(script, str):
            monkeypatch.setattr(redis_store, name, KEY_GUARD + script.replace("redis.call(", "guarded("), raising=False)


@pytest.fixture(params=["memory", "redis", "redis-cluster", "redis-file-payloads"])
def store(
    request: pytest.FixtureRequest, federation: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[RoundStore]:
    """Every round store; "redis-file-payloads" is Redis keeping markers, the bytes in a directory."""
    if request.param == "memory":
        yield MemoryRoundStore()
        return
    guarded_scripts(monkeypatch)  # Redis Cluster refuses only keys of other slots: the guard catches the rest
    url = request.getfixturevalue("redis_cluster").url if request.param == "redis-cluster" else REDIS_URL
    payloads = FilePayloads(tmp_path / "payloads") if request.param == "redis-file-payloads" else None
    s = open_store(url, federation, payloads=payloads)
    yield s
    s.wipe()
    if payloads is not None:
        assert payloads.usage() == (0, 0), "wipe removes the federation's payloads too"
