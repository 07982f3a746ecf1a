"""The Redis key layout: every key of a federation in one Redis Cluster slot, and a federation kept by an older
release (keys without the hash tag) carried over on the first start of this one, losing nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import redis
from redis.crc import key_slot

from aggregator.keys import Keys
from aggregator.rounds import Blob, RecordResult, RoundStatus, StoredRelease
from aggregator.stores.redis import OlderLayoutInUse, RedisRoundStore
from tests.aggregator.test_round_store_contract import _record, _release, _update
from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.services]


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(REDIS_URL)
    yield r
    r.close()


FIRST = _update("c1", "update-first")


def _a_round_and_a_half(store: RedisRoundStore) -> None:
    """A committed round (a plain and a staged adapter), an update in the next round, and a transfer under way."""
    assert store.record(FIRST, b"one", now=1.0) is RecordResult.RECORDED
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None
    staged = store.put_blob("cut-8", [b"ada", b"pter"], ttl_s=60)
    big = StoredRelease(_release("c2", 1, rank=8).header, staged)
    assert store.commit(lease, 1, [_release("c1", 1), big], _record(1), 2.0)
    store.record(_update("c2", base=1), b"two", now=3.0)
    store.put_chunk("u-000001", 0, b"ch", count=2, signature="s", client_id="c3", sha256="2" * 64, now=4.0, expiry_s=60)


def _keys(client: redis.Redis, federation: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"*{federation}*", count=1000))


def test_every_key_of_a_federation_hashes_to_one_slot(client: redis.Redis, federation: str) -> None:
    store = RedisRoundStore(client, federation)
    try:
        _a_round_and_a_half(store)
        keys = _keys(client, federation)
        assert len(keys) >= 10
        assert all(key.startswith(f"flexlora:{{{federation}}}:") for key in keys)
        assert {key_slot(key.encode()) for key in keys} == {key_slot(Keys(federation).version.encode())}
    finally:
        store.wipe()


def test_a_pruned_round_leaves_only_its_membership_behind(client: redis.Redis, federation: str) -> None:
    """Rounds committed and pruned as the service does (keep_versions=2): Redis keeps each old round's membership
    (the exactly-once guard reads it) and the history, nothing else of it, however many rounds go by."""
    store = RedisRoundStore(client, federation)
    try:
        for v in range(12):
            assert store.record(_update(f"c{v}", f"update-{v}", base=v), b"payload", now=1.0) is RecordResult.RECORDED
            store.note_norm(v, 1.0)
            lease = store.acquire(v, "agg", ttl_s=30)
            assert lease is not None and store.commit(lease, 1, [_release("c", v + 1)], _record(v + 1), now=2.0)
            store.prune(before_version=v + 1 - 2 + 1)
        prefix = Keys(federation).namespace
        old = [k[len(prefix) :] for k in _keys(client, federation) if k.startswith(prefix + "round:")]
        pruned = {k for k in old if int(k.split(":")[1]) < 10}
        assert pruned == {f"round:{v}:updates" for v in range(10)}
    finally:
        store.wipe()


def _to_older_layout(client: redis.Redis, federation: str) -> None:
    """What an older release kept: the same keys without braces, and update hashes naming such payload keys."""
    new, old = Keys(federation).namespace, Keys(federation).legacy_namespace
    for key in _keys(client, federation):
        client.rename(key, old + key[len(new) :])
    for raw in client.scan_iter(match=old + "update:*"):
        payload = cast(bytes | None, client.hget(raw, "payload")) if client.type(raw) == b"hash" else None
        if payload is not None:
            client.hset(raw, "payload", old + payload.decode()[len(new) :])


def test_a_federation_of_the_older_layout_is_carried_over_with_everything_it_held(
    client: redis.Redis, federation: str
) -> None:
    store = RedisRoundStore(client, federation)
    try:
        _a_round_and_a_half(store)
        before = (store.version(), store.status(), store.history(), store.refusals())
        _to_older_layout(client, federation)
        assert not any("{" in key for key in _keys(client, federation))
        assert RedisRoundStore(client, federation).version() == before[0]  # this start moved them

        again = RedisRoundStore(client, federation)
        assert again.adopted == 0  # once only
        assert (again.version(), again.status(), again.history(), again.refusals()) == before
        assert before[1] == RoundStatus(round_id=1, count=1, opened_at=3.0)
        [pending] = again.round_updates(1)
        assert pending.payload == b"two"
        releases = again.releases(1)
        assert releases["c1"].payload == b"adapter"
        staged = releases["c2"].payload
        assert isinstance(staged, Blob) and again.read_blob(staged) == b"adapter"
        assert again.record(FIRST, b"one", now=5.0) is RecordResult.DUPLICATE  # still counted once
        assert again.transfer_payload("c3", "u-000001", 2) is not None  # the transfer under way goes on
        assert all(key.startswith(f"flexlora:{{{federation}}}:") for key in _keys(client, federation))
    finally:
        store.wipe()


def test_a_start_is_refused_while_an_aggregator_of_the_older_layout_is_alive(
    client: redis.Redis, federation: str
) -> None:
    store = RedisRoundStore(client, federation)
    try:
        _a_round_and_a_half(store)
        _to_older_layout(client, federation)
        old = Keys(federation).legacy_namespace
        client.set(old + "health:agg-old", "{}", px=60_000)
        with pytest.raises(OlderLayoutInUse, match="agg-old"):
            RedisRoundStore(client, federation)
        assert client.exists(old + "version")  # nothing moved
        client.delete(old + "health:agg-old")
        assert RedisRoundStore(client, federation).version() == 1
    finally:
        store.wipe()
