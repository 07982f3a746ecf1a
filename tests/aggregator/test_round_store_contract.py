"""One contract for every round store: the in-memory twin and the real Redis."""

from __future__ import annotations

import threading
import time

import pytest

from aggregator.rounds import (
    Blob,
    ChunkResult,
    ExpiredTransfer,
    RecordResult,
    RoundPolicy,
    RoundRecord,
    RoundStatus,
    RoundStore,
    StoredRelease,
    TransferGone,
)
from aggregator.stores.redis import RedisRoundStore
from schemas.messages import AdapterRelease, LoraUpdate, PayloadInfo
from tests.conftest import REDIS_URL

FP = "f" * 64


def _update(client: str = "c1", update_id: str | None = None, base: int = 0) -> LoraUpdate:
    update = LoraUpdate(
        federation="f",
        client_id=client,
        base_version=base,
        rank=4,
        lora_alpha=8.0,
        num_samples=10,
        target_modules=("q_proj",),
        base_model_fingerprint=FP,
        payload=PayloadInfo(size=3, sha256="0" * 64),
    )
    return update.model_copy(update={"update_id": update_id}) if update_id else update


def _release(client: str, version: int, rank: int = 4, payload: bytes = b"adapter") -> StoredRelease:
    header = AdapterRelease(
        federation="f",
        version=version,
        client_id=client,
        rank=rank,
        lora_alpha=8.0,
        target_modules=("q_proj",),
        base_model_fingerprint=FP,
        num_updates=1,
        payload=PayloadInfo(size=len(payload), sha256="1" * 64),
    )
    return StoredRelease(header, payload)


def _record(version: int) -> RoundRecord:
    return RoundRecord(
        version=version,
        strategy="flexlora",
        participants=[],
        opened_at=None,
        closed_at=0.0,
        aggregate_seconds=0.0,
        finalised_by="t",
    )


def test_record_is_idempotent_on_update_id(store: RoundStore) -> None:
    u = _update()
    assert store.record(u, b"abc", now=100.0) is RecordResult.RECORDED
    assert store.record(u, b"abc", now=101.0) is RecordResult.DUPLICATE
    assert store.status() == RoundStatus(round_id=0, count=1, opened_at=100.0)
    [got] = store.round_updates(0)
    assert got.header == u and got.payload == b"abc"


def test_update_ids_are_scoped_per_client(store: RoundStore) -> None:
    """A client that learns another's update id and sends under it first (other bytes) must not get the
    other's update refused as a replay, or dropped as a duplicate; each client's own id stays exactly-once."""
    mallory = _update("mallory", "update-shared")
    victim = _update("victim", "update-shared").model_copy(update={"payload": PayloadInfo(size=3, sha256="9" * 64)})
    assert store.record(mallory, b"abc", now=1.0) is RecordResult.RECORDED
    assert store.record(victim, b"xyz", now=2.0) is RecordResult.RECORDED
    assert store.record(victim, b"xyz", now=3.0) is RecordResult.DUPLICATE
    assert store.record(mallory.model_copy(update={"payload": victim.payload}), b"xyz", 4.0) is RecordResult.REPLAY
    got = {u.header.client_id: bytes(store.payload(u)) for u in store.round_updates(0)}
    assert got == {"mallory": b"abc", "victim": b"xyz"}
    assert store.round_update_ids(0) == ["update-shared", "update-shared"]
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None and store.drop_update(lease, "mallory", "update-shared")
    assert [u.header.client_id for u in store.round_updates(0)] == ["victim"]


def test_chunked_transfers_are_scoped_per_client(store: RoundStore) -> None:
    header, chunks = _chunked("update-shared")
    other = header.model_copy(update={"client_id": "victim"})
    assert _put(store, header, 0, chunks[0], sig="mallory") is ChunkResult.STORED
    for i, c in enumerate(chunks):  # another client's transfer under the same id: no mismatch, no mixing
        _put(store, other, i, c, sig="victim")
    assert store.transfer_payload("victim", other.update_id, other.payload.size) == bytearray(b"".join(chunks))
    assert store.record_transfer(other, now=11.0) is RecordResult.RECORDED
    assert _put(store, header, 1, chunks[1], sig="mallory") is ChunkResult.STORED, "still its own transfer"
    [expired] = store.expire_transfers(now=1e9)
    assert expired == ExpiredTransfer("update-shared", "c1", received=2, count=3)
    assert [u.header.client_id for u in store.round_updates(0)] == ["victim"]


def test_recording_checks_and_sets_the_pins_in_the_same_step(store: RoundStore) -> None:
    mine, theirs = {"fp": "a", "shapes": "s"}, {"fp": "b", "shapes": "s"}
    assert store.record(_update("c0", "update-futr", base=5), b"x", 1.0, pins=theirs) is RecordResult.FUTURE
    assert store.pinned("fp") is None, "an update not recorded pins nothing"
    assert store.record(_update("c1", "update-0001"), b"x", 1.0, pins=mine) is RecordResult.RECORDED
    assert (store.pinned("fp"), store.pinned("shapes")) == ("a", "s")
    assert store.record(_update("c2", "update-0002"), b"y", 2.0, pins=theirs) is RecordResult.CONFLICT
    assert store.record(_update("c1", "update-0001"), b"x", 3.0, pins=theirs) is RecordResult.DUPLICATE
    assert [u.header.client_id for u in store.round_updates(0)] == ["c1"]
    assert store.record(_update("c2", "update-0002"), b"y", 4.0, pins=mine) is RecordResult.RECORDED, "not seen"


def test_concurrent_records_never_pin_different_facts(store: RoundStore) -> None:
    start = threading.Barrier(8)
    results: dict[int, RecordResult] = {}

    def record(n: int) -> None:
        start.wait()
        results[n] = store.record(_update(f"c{n}", f"update-{n:04d}"), b"x", 1.0, pins={"fp": str(n % 2)})

    threads = [threading.Thread(target=record, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pinned = store.pinned("fp")
    recorded = {n for n, r in results.items() if r is RecordResult.RECORDED}
    assert recorded == {n for n in range(8) if str(n % 2) == pinned}
    assert all(results[n] is RecordResult.CONFLICT for n in set(range(8)) - recorded)


def test_updates_keep_arrival_order_and_first_arrival_opens_the_round(store: RoundStore) -> None:
    ids = [f"update-{i:04d}" for i in range(5)]
    for i, uid in enumerate(ids):
        store.record(_update(client=f"c{i}", update_id=uid), bytes([i]), now=10.0 + i)
    assert [r.header.update_id for r in store.round_updates(0)] == ids
    assert store.status().opened_at == 10.0


def test_only_one_lease_at_a_time_and_tokens_grow(store: RoundStore) -> None:
    first = store.acquire(0, "a", ttl_s=30)
    assert first is not None
    assert store.acquire(0, "b", ttl_s=30) is None
    store.release_lease(first)
    second = store.acquire(0, "b", ttl_s=30)
    assert second is not None and second.token > first.token
    assert store.acquire(5, "c", ttl_s=30) is None, "only the open round can be leased"


def test_commit_advances_version_and_stores_everything(store: RoundStore) -> None:
    store.record(_update("c1", "update-aaaa"), b"x", now=1.0)
    store.record(_update("c2", "update-bbbb"), b"y", now=2.0)
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None
    releases = [_release("c1", 1, rank=4, payload=b"r4"), _release("c2", 1, rank=8, payload=b"r8")]
    assert store.commit(lease, consumed=2, releases=releases, record=_record(1), now=3.0)
    assert store.version() == 1
    assert store.status() == RoundStatus(1, 0, None)
    stored = store.releases(1)
    assert {c: r.payload for c, r in stored.items()} == {"c1": b"r4", "c2": b"r8"}
    assert stored["c2"].header.rank == 8
    assert store.unpublished() == [1]
    store.mark_published(1)
    assert store.unpublished() == []
    assert [h.version for h in store.history()] == [1]
    assert not store.commit(lease, consumed=2, releases=releases, record=_record(1), now=4.0), "a round commits once"


def test_updates_recorded_during_aggregation_move_to_the_next_round(store: RoundStore) -> None:
    store.record(_update("c1", "update-0001"), b"1", now=1.0)
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None
    store.record(_update("c2", "update-0002"), b"2", now=2.0)  # arrives while round 0 aggregates
    assert store.commit(lease, consumed=1, releases=[_release("c1", 1)], record=_record(1), now=3.0)
    assert [u.header.update_id for u in store.round_updates(0)] == ["update-0001"]
    assert [u.header.update_id for u in store.round_updates(1)] == ["update-0002"]
    assert store.status() == RoundStatus(1, 1, 3.0)


def test_a_stale_lease_holder_cannot_commit(store: RoundStore) -> None:
    store.record(_update(), b"x", now=1.0)
    stale = store.acquire(0, "paused", ttl_s=0.05)
    assert stale is not None
    time.sleep(0.15)  # the holder "pauses" past its lease
    fresh = store.acquire(0, "other", ttl_s=30)
    assert fresh is not None
    assert not store.commit(stale, consumed=1, releases=[_release("c1", 1)], record=_record(1), now=2.0)
    assert store.version() == 0
    assert store.commit(fresh, consumed=1, releases=[_release("c1", 1)], record=_record(1), now=2.0)
    assert store.version() == 1


def test_counted_says_which_ids_a_client_had_counted_even_after_a_drop(store: RoundStore) -> None:
    assert not store.counted("c1", "update-1")
    store.record(_update("c1", "update-1"), b"x", now=1.0)
    assert store.counted("c1", "update-1") and not store.counted("c2", "update-1")
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None and store.drop_update(lease, "c1", "update-1")
    assert store.counted("c1", "update-1"), "a dropped update stays counted: its redelivery is not counted again"


def test_a_stale_lease_holder_cannot_drop_an_update_from_the_round_another_commits(store: RoundStore) -> None:
    """A finaliser paused past its lease must not take an update out of the round while the new holder commits
    the updates it read by count: the late one would be acked, then neither aggregated nor carried over."""
    for n in (1, 2, 3):
        store.record(_update(f"c{n}", f"update-{n}"), b"x", now=1.0)
    stale = store.acquire(0, "paused", ttl_s=0.05)
    assert stale is not None
    time.sleep(0.15)
    fresh = store.acquire(0, "other", ttl_s=30)
    assert fresh is not None
    read = store.round_update_ids(0)  # what the new holder aggregates: three updates
    assert store.record(_update("c4", "update-4"), b"x", now=2.0) is RecordResult.RECORDED  # arrives meanwhile
    assert not store.drop_update(stale, "c2", "update-2")
    assert store.commit(fresh, consumed=len(read), releases=[_release("c1", 1)], record=_record(1), now=3.0)
    assert store.round_update_ids(0) == ["update-1", "update-2", "update-3"]
    assert store.round_update_ids(1) == ["update-4"], "the late update is carried into the next round"


def test_commit_needs_at_least_the_consumed_updates(store: RoundStore) -> None:
    store.record(_update(), b"x", now=1.0)
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None
    assert not store.commit(lease, consumed=2, releases=[], record=_record(1), now=2.0)
    assert not store.commit(lease, consumed=0, releases=[], record=_record(1), now=2.0)
    assert store.version() == 0


def test_pin_keeps_the_first_value(store: RoundStore) -> None:
    assert store.pin("fingerprint", "aaa") == "aaa"
    assert store.pin("fingerprint", "bbb") == "aaa"


def test_refusals_are_counted_by_reason_across_aggregators(store: RoundStore) -> None:
    assert store.refusals() == {}
    for reason in ("schema", "stale", "schema"):
        store.count_refusal(reason)
    assert store.refusals() == {"schema": 2, "stale": 1}


def test_concurrent_recorders_count_each_update_once(store: RoundStore) -> None:
    ids = [f"update-{i:04d}" for i in range(60)]
    results: list[RecordResult] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        # Every worker tries every id, as redeliveries to several aggregators would.
        for uid in ids[offset:] + ids[:offset]:
            res = store.record(_update(update_id=uid), b"p", now=1.0)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=worker, args=(k * 15,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results.count(RecordResult.RECORDED) == len(ids)
    assert sorted(u.header.update_id for u in store.round_updates(0)) == ids


def test_redis_lua_keys_match_the_key_module(federation: str) -> None:
    s = RedisRoundStore.from_url(REDIS_URL, federation)
    try:
        s.record(_update(update_id="update-keys"), b"x", now=5.0)
        assert s.r.llen(s.keys.round_updates(0)) == 1
        assert float(s.r.get(s.keys.round_opened(0))) == 5.0  # type: ignore[arg-type]
        assert all(k.startswith(s.keys.namespace.encode()) for k in s.r.scan_iter(match=f"*{federation}*"))
    finally:
        s.wipe()


def test_a_redis_store_sees_the_round_another_aggregator_opened_by_committing(federation: str) -> None:
    """Each store reads the round status against the version it saw last; another process's commit moves it."""
    mine, theirs = RedisRoundStore.from_url(REDIS_URL, federation), RedisRoundStore.from_url(REDIS_URL, federation)
    try:
        mine.record(_update("c1", "update-0001"), b"1", now=1.0)
        assert mine.status() == RoundStatus(0, 1, 1.0)
        for version in (1, 2):  # two commits by the other aggregator, unseen by this one
            theirs.record(_update("c2", f"update-1{version}"), b"2", now=2.0)
            lease = theirs.acquire(version - 1, "theirs", ttl_s=30)
            assert lease is not None
            consumed = theirs.status().count
            assert theirs.commit(lease, consumed, [_release("c2", version)], _record(version), now=3.0)
        assert mine.status() == RoundStatus(2, 0, None)
        assert mine.record(_update("c1", "update-0003", base=2), b"3", now=4.0) is RecordResult.RECORDED
        assert mine.status() == RoundStatus(2, 1, 4.0) and theirs.status() == RoundStatus(2, 1, 4.0)
        # Recording goes against the version this store saw last, too: one more commit it has not seen, and its next
        # update must still land in the round open now, not in the one it saw.
        lease = theirs.acquire(2, "theirs", ttl_s=30)
        assert lease is not None
        assert theirs.commit(lease, 1, [_release("c2", 3)], _record(3), now=5.0)
        assert mine.record(_update("c1", "update-0004", base=3), b"4", now=6.0) is RecordResult.RECORDED
        assert theirs.status() == RoundStatus(3, 1, 6.0) and theirs.round_update_ids(3) == ["update-0004"]
    finally:
        mine.wipe()


@pytest.mark.parametrize(
    ("count", "opened", "now", "closes"),
    [(4, 0.0, 0.0, True), (1, 0.0, 5.0, False), (2, 0.0, 9.9, False), (2, 0.0, 10.0, True), (0, None, 99.0, False)],
)
def test_round_policy(count: int, opened: float | None, now: float, closes: bool) -> None:
    policy = RoundPolicy(max_updates=4, min_updates=2, deadline_s=10.0)
    assert policy.should_close(RoundStatus(0, count, opened), now) is closes


def test_round_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RoundPolicy(max_updates=2, min_updates=3)
    with pytest.raises(ValueError):
        RoundPolicy(deadline_s=0)


def test_staleness_is_judged_against_the_open_round_atomically(store: RoundStore) -> None:
    for v in range(3):  # advance to version 3
        store.record(_update(f"c{v}", f"update-adv{v}", base=v), b"x", now=1.0)
        lease = store.acquire(v, "agg", ttl_s=30)
        assert lease is not None
        assert store.commit(lease, 1, [_release("c", v + 1)], _record(v + 1), now=2.0)
    assert store.record(_update("a", "update-fresh", base=3), b"x", 3.0, max_staleness=1) is RecordResult.RECORDED
    assert store.record(_update("b", "update-ok", base=2), b"x", 3.0, max_staleness=1) is RecordResult.RECORDED
    assert store.record(_update("c", "update-old", base=1), b"x", 3.0, max_staleness=1) is RecordResult.STALE
    assert store.record(_update("d", "update-nolimit", base=0), b"x", 3.0) is RecordResult.RECORDED
    assert store.record(_update("e", "update-future", base=4), b"x", 3.0) is RecordResult.FUTURE
    assert store.record(_update("a", "update-fresh", base=3), b"x", 3.0, max_staleness=0) is RecordResult.DUPLICATE
    assert store.status().count == 3


def test_one_publisher_per_version_until_the_claim_expires(store: RoundStore) -> None:
    assert store.claim_publish(1, "a", ttl_s=0.1)
    assert not store.claim_publish(1, "b", ttl_s=0.1)
    assert store.claim_publish(2, "b", ttl_s=0.1)
    time.sleep(0.2)
    assert store.claim_publish(1, "b", ttl_s=0.1), "a dead publisher's claim runs out"


def test_health_keys_expire(store: RoundStore) -> None:
    store.record_health("host-a:1:abc", '{"ok": 1}', ttl_s=0.2)
    store.record_health("host-b:2:def", '{"ok": 2}', ttl_s=5)
    assert store.health() == {"host-a:1:abc": '{"ok": 1}', "host-b:2:def": '{"ok": 2}'}
    time.sleep(0.3)
    assert set(store.health()) == {"host-b:2:def"}


def test_prune_drops_old_payloads_and_releases_but_keeps_the_guard_and_history(store: RoundStore) -> None:
    for v in range(4):  # versions 1..4, one update each
        store.record(_update(f"c{v}", f"update-p{v}", base=v), b"payload", now=1.0)
        store.note_norm(v, 1.5)
        lease = store.acquire(v, "agg", ttl_s=30)
        assert lease is not None
        assert store.commit(lease, 1, [_release("c", v + 1)], _record(v + 1), now=2.0)
    assert store.prune(before_version=3) == 2  # rounds 0 and 1 built versions 1 and 2
    assert store.round_updates(0) == [] and store.round_updates(1) == []
    assert store.round_update_ids(0) == ["update-p0"], "membership outlives the payloads"
    assert [u.header.update_id for u in store.round_updates(2)] == ["update-p2"]
    assert store.releases(1) == {} and store.releases(2) == {}
    assert store.norms(1) == [] and store.norms(2) == [1.5], "what only an open round needs goes with it"
    assert set(store.releases(3)) == {"c"}
    assert [h.version for h in store.history()] == [1, 2, 3, 4]
    assert store.record(_update("c0", "update-p0", base=4), b"payload", now=3.0) is RecordResult.DUPLICATE
    assert store.prune(before_version=3) == 0, "pruning again finds nothing"


# --- chunked transfers ---------------------------------------------------------------------------------------


def _chunked(update_id: str = "update-chunky", count: int = 3) -> tuple[LoraUpdate, list[bytes]]:
    chunks = [bytes([i]) * 5 for i in range(count - 1)] + [b"end"]
    whole = b"".join(chunks)
    header = _update(update_id=update_id).model_copy(update={"payload": PayloadInfo(size=len(whole), sha256="2" * 64)})
    return header, chunks


def _put(store: RoundStore, header: LoraUpdate, index: int, body: bytes, *, now: float = 10.0, sig: str = "s"):
    return store.put_chunk(
        header.update_id,
        index,
        body,
        count=3,
        signature=sig,
        client_id=header.client_id,
        sha256=header.payload.sha256,
        now=now,
        expiry_s=30.0,
    )


def test_chunks_in_any_order_and_twice_complete_once_and_record_their_bytes(store: RoundStore) -> None:
    header, chunks = _chunked()
    assert _put(store, header, 2, chunks[2]) is ChunkResult.STORED
    assert _put(store, header, 2, chunks[2]) is ChunkResult.DUPLICATE
    assert _put(store, header, 0, chunks[0]) is ChunkResult.STORED
    assert _put(store, header, 1, chunks[1]) is ChunkResult.COMPLETE
    assert _put(store, header, 1, chunks[1]) is ChunkResult.COMPLETE, "a redelivered last chunk completes again"
    whole = bytearray(b"".join(chunks))
    assert store.transfer_payload(header.client_id, header.update_id, header.payload.size) == whole
    assert store.record_transfer(header, now=11.0) is RecordResult.RECORDED
    assert store.record_transfer(header, now=11.0) is RecordResult.DUPLICATE
    [got] = store.round_updates(0)
    assert got.header == header and bytes(store.payload(got)) == b"".join(chunks)
    assert _put(store, header, 0, chunks[0]) is ChunkResult.RECORDED, "a late chunk of a counted update"
    replayed = header.model_copy(update={"payload": header.payload.model_copy(update={"sha256": "3" * 64})})
    assert _put(store, replayed, 0, chunks[0]) is ChunkResult.REPLAY, "its id with other bytes"
    assert store.expire_transfers(now=1e9) == [], "nothing of a counted update is left to expire"


def test_a_second_copy_of_a_chunk_with_other_bytes_never_replaces_the_first(store: RoundStore) -> None:
    """The transfer is complete and its whole payload checked; another copy of chunk 0 (same header and chunking,
    other bytes) comes before the record. Files named by the transfer and index alone were overwritten, and the
    counted bytes were not the checked ones."""
    header, chunks = _chunked()
    for i, chunk in enumerate(chunks):
        _put(store, header, i, chunk)
    checked = store.transfer_payload(header.client_id, header.update_id, header.payload.size)
    assert checked is not None
    assert _put(store, header, 0, b"EVIL!") is ChunkResult.COMPLETE
    assert store.record_transfer(header, now=11.0) is RecordResult.RECORDED
    [got] = store.round_updates(0)
    assert bytes(store.payload(got)) == bytes(checked) == b"".join(chunks)


def test_a_chunk_under_another_header_is_a_mismatch(store: RoundStore) -> None:
    header, chunks = _chunked()
    _put(store, header, 0, chunks[0], sig="first")
    assert _put(store, header, 1, chunks[1], sig="forged") is ChunkResult.MISMATCH


def test_an_idle_transfer_expires_once_and_cannot_be_recorded_after(store: RoundStore) -> None:
    header, chunks = _chunked()
    _put(store, header, 0, chunks[0], now=10.0)
    _put(store, header, 2, chunks[2], now=20.0)  # each chunk pushes the expiry back
    assert store.expire_transfers(now=45.0) == []
    [expired] = store.expire_transfers(now=51.0)
    assert expired == ExpiredTransfer(header.update_id, header.client_id, received=2, count=3)
    assert store.expire_transfers(now=52.0) == [], "reported by exactly one caller"
    assert store.transfer_payload(header.client_id, header.update_id, header.payload.size) is None
    with pytest.raises(TransferGone):
        store.record_transfer(header, now=53.0)
    assert store.round_updates(0) == []


def test_a_transfer_that_expired_is_gone_even_when_it_is_also_stale(store: RoundStore) -> None:
    """Reported expired (incomplete) by the reaper, then its last chunk's record: gone, not refused "stale" as
    well, which counted one update refused twice."""
    header, chunks = _chunked()
    _put(store, header, 0, chunks[0], now=10.0)
    store.record(_update("c9", "update-other"), b"x", now=10.0)
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None and store.commit(lease, 1, [_release("c9", 1)], _record(1), now=11.0)
    assert len(store.expire_transfers(now=1e9)) == 1
    with pytest.raises(TransferGone):
        store.record_transfer(header, now=1e9, max_staleness=0)


def test_an_id_counted_whole_then_completed_in_chunks_with_other_bytes_is_a_replay(store: RoundStore) -> None:
    header, chunks = _chunked()
    for i, chunk in enumerate(chunks):  # its chunks, kept before an update of its id (other bytes) is counted whole
        _put(store, header, i, chunk)
    whole = header.model_copy(update={"payload": PayloadInfo(size=3, sha256="9" * 64)})
    assert store.record(whole, b"abc", now=1.0) is RecordResult.RECORDED
    assert store.record_transfer(header, now=2.0) is RecordResult.REPLAY


def test_a_refused_transfer_is_dropped(store: RoundStore) -> None:
    header, chunks = _chunked()
    for i, c in enumerate(chunks):
        _put(store, header, i, c)
    store.drop_transfer(header.client_id, header.update_id)
    assert store.transfer_payload(header.client_id, header.update_id, header.payload.size) is None
    assert store.expire_transfers(now=1e9) == []


def test_a_staged_blob_release_is_adopted_by_the_commit(store: RoundStore) -> None:
    store.record(_update("c1", "update-aaaa"), b"x", now=1.0)
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None
    blob = store.put_blob("stage-1", iter([b"abc", b"def", b"g"]), ttl_s=60)
    assert blob.size == 7 and b"".join(store.iter_blob(blob)) == b"abcdefg"
    big = _release("c1", 1, payload=b"abcdefg")
    assert store.commit(lease, 1, [StoredRelease(big.header, blob), _release("c2", 1, rank=8)], _record(1), 2.0)
    stored = store.releases(1)
    assert isinstance(stored["c1"].payload, Blob) and not isinstance(stored["c2"].payload, Blob)
    assert store.payload(stored["c1"]) == bytearray(b"abcdefg")
    assert [bytes(c) for c in store.iter_blob(stored["c1"].payload)] == [b"abc", b"def", b"g"]


def test_a_chunked_payload_is_read_a_module_at_a_time_as_decoding_it_whole_would(store: RoundStore) -> None:
    import torch

    from aggregator.blobs import LazyFactors
    from schemas.lora import LoraFactors, join_lora, split_lora
    from schemas.safetensors_stream import iter_chunks
    from schemas.tensors import decode_tensors, encode_tensors

    gen = torch.Generator().manual_seed(0)
    factors = {
        f"model.layers.{i}.self_attn.{p}": LoraFactors(
            torch.randn(4, 24, generator=gen), torch.randn(40, 4, generator=gen)
        )
        for i in range(3)
        for p in ("q_proj", "v_proj")
    }
    data, _ = encode_tensors(join_lora(factors))
    blob = store.put_blob("lazy", iter_chunks([memoryview(data)], 100), ttl_s=60)  # tensors straddle chunks
    lazy = LazyFactors(store, blob)
    whole = split_lora(decode_tensors(data), rank=4)
    assert list(lazy) == sorted(whole) and len(lazy) == 6
    for module, (a, b) in whole.items():
        assert torch.equal(lazy[module].A, a) and torch.equal(lazy[module].B, b)


def test_wipe_leaves_a_fresh_federation(store: RoundStore) -> None:
    store.record(_update("c1", "update-wipe1"), b"1", now=1.0, pins={"fp": "a"})
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None
    assert store.commit(lease, consumed=1, releases=[_release("c1", 1)], record=_record(1), now=2.0)
    store.count_refusal("schema")
    assert store.wipe() > 0
    assert store.version() == 0 and store.history() == [] and store.refusals() == {}
    assert store.pinned("fp") is None and store.releases(1) == {}
    # The same update id is new again: nothing of the federation's past is left to call it a replay.
    assert store.record(_update("c1", "update-wipe1"), b"1", now=3.0) is RecordResult.RECORDED


def test_stores_open_by_url() -> None:
    from aggregator.stores import open_store
    from aggregator.stores.memory import MemoryRoundStore

    assert isinstance(open_store("memory://", "f"), MemoryRoundStore)
    assert isinstance(open_store(REDIS_URL, "f"), RedisRoundStore)
    with pytest.raises(ValueError, match="no round store for 'postgres://x'"):
        open_store("postgres://x", "f")


def test_a_staged_payload_belongs_to_its_federation(store: RoundStore) -> None:
    blob = store.put_blob("stage-wipe", iter([b"abc", b"def"]), ttl_s=60)
    assert store.read_chunk(blob, 0) == b"abc"
    store.wipe()
    assert store.read_chunk(blob, 0) is None, "wipe removes what was staged, not only the federation's other keys"


def test_preparing_an_update_shows_nothing_until_it_is_recorded(store: RoundStore) -> None:
    prepared, never = _update("c1", "update-prepared"), _update("c2", "update-never-recorded")
    store.prepare(prepared, b"abc")
    store.prepare(never, b"xyz")
    assert store.status() == RoundStatus(round_id=0, count=0, opened_at=None)
    assert store.round_updates(0) == []
    assert store.record(prepared, b"abc", now=1.0) is RecordResult.RECORDED
    assert store.record(prepared, b"abc", now=2.0) is RecordResult.DUPLICATE
    [got] = store.round_updates(0)
    assert got.header == prepared and bytes(store.payload(got)) == b"abc"
