"""Implementations of the round store contract (aggregator.rounds.RoundStore), opened by URL."""

from __future__ import annotations

from aggregator.payloads import PayloadStore
from aggregator.rounds import RoundStore
from aggregator.stores.replication import NO_WAIT, Replication
from broker.tls import TlsFiles

SCHEMES = (
    "memory://",
    "redis://",
    "rediss://",
    "unix://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
)


def check_store_url(url: str) -> str:
    """`url` if it names a round store; else ValueError listing what does (settings check it at start-up)."""
    if not url.startswith(SCHEMES):
        raise ValueError(f"no round store for {url!r}; give one of {', '.join(SCHEMES)}")
    return url


def open_store(
    url: str,
    federation: str,
    *,
    tls: TlsFiles | None = None,
    replication: Replication | None = None,
    payloads: PayloadStore | None = None,
) -> RoundStore:
    """The round store at `url` for `federation`: `memory://` is a fresh in-process store (the embedded default
    and tests; nothing is shared between processes, and it keeps its bytes itself), `redis://…` the shared one
    every aggregator uses, keeping the bytes in `payloads` when given (aggregator.payloads) and in Redis if not."""
    if url.startswith("memory://"):
        from aggregator.stores.memory import MemoryRoundStore

        return MemoryRoundStore()
    if url.startswith(SCHEMES[1:]):
        from aggregator.stores.redis import RedisRoundStore

        return RedisRoundStore.from_url(url, federation, tls=tls, replication=replication or NO_WAIT, payloads=payloads)
    check_store_url(url)
    raise AssertionError("unreachable: check_store_url refuses every other URL")
