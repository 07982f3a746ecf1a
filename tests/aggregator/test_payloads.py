"""The payload store: one contract for both backends, and the Redis round store keeping markers, not bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from aggregator.payloads import (
    FilePayloads,
    MemoryPayloads,
    PayloadStore,
    PayloadStoreMismatch,
    PayloadUnavailable,
    open_payloads,
)
from aggregator.rounds import RecordResult, StoredRelease
from aggregator.stores.redis import SPILLED, RedisRoundStore
from schemas.messages import PayloadInfo
from tests.aggregator.test_round_store_contract import _chunked, _put, _record, _release, _update
from tests.conftest import AMQP_URL, REDIS_URL

DAY = 24 * 3600.0


@pytest.fixture(params=["memory", "file"])
def payloads(request: pytest.FixtureRequest, tmp_path: Path) -> PayloadStore:
    return MemoryPayloads() if request.param == "memory" else FilePayloads(tmp_path / "fed", fsync=True)


def test_put_get_delete(payloads: PayloadStore) -> None:
    payloads.put("updates/c1/u-1/abc", b"bytes")
    payloads.put("updates/c1/u-2/def", memoryview(bytearray(b"more")))
    assert payloads.get("updates/c1/u-1/abc") == b"bytes"
    assert payloads.get("updates/c1/u-2/def") == b"more"
    assert payloads.get("updates/c1/u-3/x") is None
    payloads.put("updates/c1/u-1/abc", b"bytes")  # a redelivery writes it again: harmless
    assert payloads.usage() == (2, 9)
    assert payloads.delete(["updates/c1/u-1/abc", "updates/nobody/x/y"]) == 1
    assert payloads.get("updates/c1/u-1/abc") is None
    assert payloads.wipe() == 1 and payloads.usage() == (0, 0)


@pytest.mark.parametrize("location", ["", "a//b", "../etc/passwd", "a/.hidden", "a b", "a/b\\c"])
def test_locations_are_ids_not_paths(payloads: PayloadStore, location: str) -> None:
    with pytest.raises(ValueError, match="payload location"):
        payloads.put(location, b"x")


def test_older_than_lists_what_a_sweep_may_take(payloads: PayloadStore) -> None:
    payloads.put("staged/t1/0", b"old")
    assert list(payloads.older_than(DAY)) == []
    assert list(payloads.older_than(DAY, now=time.time() + 2 * DAY)) == ["staged/t1/0"]


def test_a_write_that_died_half_way_is_never_a_payload(tmp_path: Path) -> None:
    store = FilePayloads(tmp_path)
    store.put("updates/c1/u-1/abc", b"whole")
    torn = tmp_path / "updates" / "c1" / "u-1" / ".tmp-dead-abc"
    torn.write_bytes(b"wh")
    os.utime(torn, (time.time() - 2 * DAY,) * 2)
    assert store.usage() == (1, 5), "a temporary file is not a payload"
    assert list(store.older_than(DAY)) == [] and not torn.exists(), "a sweep takes torn writes"
    assert store.delete(["updates/c1/u-1/abc"]) == 1
    assert list(tmp_path.iterdir()) == [], "empty folders go with their last payload"


def test_wiping_a_federations_files_leaves_no_folder_and_writing_after_still_works(tmp_path: Path) -> None:
    """A wiped federation (a finished benchmark, `flexlora` resetting one) leaves nothing in the shared directory,
    not even an empty folder of its name; an aggregator still writing after it makes the folders again."""
    store = FilePayloads(tmp_path / "fed-1")
    store.put("updates/c1/u-1/abc", b"whole")
    store.put("staged/t1/0", b"adapter")
    assert store.wipe() == 2
    assert list(tmp_path.iterdir()) == []
    assert store.wipe() == 0  # wiping again (nothing there, not even the folder) is no error
    store.put("updates/c1/u-2/def", b"again")
    assert store.get("updates/c1/u-2/def") == b"again" and store.usage() == (1, 5)


def test_a_folder_pruned_between_making_it_and_writing_into_it_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread or aggregator deleting the last payload of a folder removes the folder; a write into it
    that made it just before must not fail (it would dead-letter a sound update as `internal`)."""
    store = FilePayloads(tmp_path)
    mkdir, pruned = Path.mkdir, list[Path]()

    def mkdir_then_pruned(self: Path, *args: object, **kwargs: object) -> None:
        mkdir(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.name == "u-1" and not pruned:  # the payload's own folder, once
            pruned.append(self)
            self.rmdir()  # what a concurrent delete's pruning does to an empty folder

    monkeypatch.setattr(Path, "mkdir", mkdir_then_pruned)
    store.put("updates/c1/u-1/abc", b"whole")
    assert pruned and store.get("updates/c1/u-1/abc") == b"whole"


def test_open_payloads_by_url(tmp_path: Path) -> None:
    assert open_payloads("redis", "f") is None
    assert isinstance(open_payloads("memory://", "f"), MemoryPayloads)
    files = open_payloads(f"file://{tmp_path}", "fed-1")
    assert isinstance(files, FilePayloads) and files.root == tmp_path / "fed-1"
    for bad in ("file://relative/dir", "s3://bucket"):
        with pytest.raises(ValueError):
            open_payloads(bad, "f")


# --- the Redis round store with a payload store -----------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(REDIS_URL)
    yield r
    r.close()


@pytest.fixture
def files(tmp_path: Path) -> FilePayloads:
    return FilePayloads(tmp_path / "payloads")


@pytest.fixture
def spilled(client: redis.Redis, federation: str, files: FilePayloads) -> Iterator[RedisRoundStore]:
    store = RedisRoundStore(client, federation, payloads=files)
    yield store
    store.wipe()


def _redis_bytes(client: redis.Redis, federation: str) -> int:
    """Bytes of the federation's values in Redis (strings and hash fields)."""
    total = 0
    for key in client.scan_iter(match=f"*{{{federation}}}*", count=1000):
        kind = client.type(key)
        if kind == b"string":
            total += int(client.strlen(key))
        elif kind == b"hash":
            total += sum(len(v) for v in client.hvals(key))
    return total


@pytest.mark.services
def test_redis_keeps_markers_and_the_payload_store_the_bytes(
    spilled: RedisRoundStore, client: redis.Redis, federation: str, files: FilePayloads
) -> None:
    big = os.urandom(1 << 20)
    plain = _update("c1", "update-plain").model_copy(update={"payload": PayloadInfo(size=len(big), sha256="a" * 64)})
    assert spilled.record(plain, big, now=1.0) is RecordResult.RECORDED
    header, chunks = _chunked("update-chunky")
    for i, c in enumerate(chunks):
        _put(spilled, header, i, c)
        _put(spilled, header, i, c)  # a redelivered chunk: its second copy's file is not kept
    assert spilled.record_transfer(header, now=2.0) is RecordResult.RECORDED
    staged = spilled.put_blob("cut-8", [big[:1000], big[1000:2000]], ttl_s=60)
    assert _redis_bytes(client, federation) < 16_000, "Redis holds records and markers, not the megabyte"
    assert files.usage() == (1 + len(chunks) + 2, len(big) + sum(map(len, chunks)) + 2000)
    got = {u.header.update_id: bytes(spilled.payload(u)) for u in spilled.round_updates(0)}
    assert got == {"update-plain": big, "update-chunky": b"".join(chunks)}
    assert spilled.read_blob(staged) == big[:2000]
    lease = spilled.acquire(0, "agg", ttl_s=30)
    assert lease is not None
    cut = _release("c1", 1, rank=8, payload=big[:2000]).header
    assert spilled.commit(lease, 2, [StoredRelease(cut, staged)], _record(1), 3.0)
    [release] = spilled.releases(1).values()
    assert spilled.payload(release) == big[:2000]
    assert spilled.prune(before_version=2) == 2
    assert files.usage() == (0, 0), "pruning a version drops its updates' and adapters' bytes"


@pytest.mark.services
def test_a_prepared_update_is_written_once_and_recorded_as_a_marker(
    spilled: RedisRoundStore, files: FilePayloads, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = os.urandom(1 << 16)
    info = PayloadInfo(size=len(big), sha256="b" * 64)
    header = _update("c1", "update-prepared").model_copy(update={"payload": info})
    spilled.prepare(header, big)
    assert files.usage() == (1, len(big)), "prepare writes the bytes where record will name them"
    writes: list[str] = []
    put = files.put

    def counted(location: str, data: bytes) -> None:
        writes.append(location)
        put(location, data)

    monkeypatch.setattr(files, "put", counted)
    assert spilled.record(header, big, now=1.0) is RecordResult.RECORDED
    assert writes == [], "record names the prepared bytes without writing them again"
    [got] = spilled.round_updates(0)
    assert spilled.payload(got) == big
    again = header.model_copy(update={"update_id": "update-unprepared"})
    assert spilled.record(again, big, now=1.0) is RecordResult.RECORDED
    assert len(writes) == 1, "an update not prepared is written by record"


@pytest.mark.services
@pytest.mark.parametrize("with_files", [False, True])
def test_a_prepared_update_whose_key_redis_lost_is_written_again_by_record(
    client: redis.Redis, federation: str, files: FilePayloads, with_files: bool
) -> None:
    """Preparing writes the payload's key ahead; Redis losing it before the record (a restart without persistence,
    a failover to a replica that had not got it) must not refuse the update: record writes it again."""
    store = RedisRoundStore(client, federation, payloads=files if with_files else None)
    try:
        big = os.urandom(1 << 16)
        info = PayloadInfo(size=len(big), sha256="c" * 64)
        header = _update("c1", "update-lost").model_copy(update={"payload": info})
        store.prepare(header, big)
        client.delete(store.keys.update_payload(f"c1/{header.update_id}", header.payload.sha256))
        assert store.record(header, big, now=1.0) is RecordResult.RECORDED
        [got] = store.round_updates(0)
        assert store.payload(got) == big
    finally:
        store.wipe()


@pytest.mark.services
def test_dropped_expired_and_refused_bytes_do_not_stay(
    spilled: RedisRoundStore, files: FilePayloads, client: redis.Redis
) -> None:
    header, chunks = _chunked("update-expires")
    _put(spilled, header, 0, chunks[0])
    dropped, _ = _chunked("update-dropped")
    _put(spilled, dropped, 0, chunks[0])
    spilled.drop_transfer(dropped.client_id, dropped.update_id)
    assert [e.update_id for e in spilled.expire_transfers(now=1e12)] == ["update-expires"]
    assert files.usage() == (0, 0), "a transfer's chunks go when it expires or is dropped"
    kept = _update("c1", "update-kept")
    assert spilled.record(kept, b"abc", now=1.0) is RecordResult.RECORDED
    culprit = _update("c2", "update-culprit")
    assert spilled.record(culprit, b"bad", now=1.0) is RecordResult.RECORDED
    lease = spilled.acquire(0, "agg", ttl_s=30)
    assert lease is not None and spilled.drop_update(lease, "c2", "update-culprit")
    # Refused (from the future): its bytes were written before the verdict and are an orphan now.
    assert spilled.record(_update("c3", "update-future", base=9), b"zzz", now=1.0) is RecordResult.FUTURE
    assert files.usage()[0] == 2
    assert spilled.sweep_payloads() == 0, "an orphan younger than a day may yet be named: kept"
    assert spilled.sweep_payloads(now=time.time() + 2 * DAY) == 0, "its marker is still in Redis: kept"
    marker = spilled.keys.update_payload("c3/update-future", "0" * 64)
    assert 0 < int(client.ttl(marker)) <= DAY
    client.delete(marker)  # what its TTL does in a day
    assert spilled.sweep_payloads(now=time.time() + 2 * DAY) == 1, "the refused update's bytes go"
    [left] = spilled.round_updates(0)
    assert left.header.update_id == "update-kept" and left.payload == b"abc"


@pytest.mark.services
def test_an_aggregator_without_the_federations_payload_store_says_so(
    spilled: RedisRoundStore, client: redis.Redis, federation: str, tmp_path: Path
) -> None:
    assert spilled.record(_update("c1", "update-plain"), b"abc", now=1.0) is RecordResult.RECORDED
    value = client.get(spilled.keys.update_payload("c1/update-plain", "0" * 64))
    assert isinstance(value, bytes) and value.startswith(SPILLED)
    with pytest.raises(PayloadUnavailable, match="start this aggregator with the federation's payload_store"):
        RedisRoundStore(client, federation).round_updates(0)
    elsewhere = RedisRoundStore(client, federation, payloads=FilePayloads(tmp_path / "not-shared"))
    with pytest.raises(PayloadUnavailable, match="must use the same one"):
        elsewhere.round_updates(0)
    assert isinstance(PayloadUnavailable("x"), OSError), "the service retries it; it never drops the update"


@pytest.mark.services
def test_an_aggregator_whose_payload_store_is_not_the_federations_refuses_to_start(
    spilled: RedisRoundStore, client: redis.Redis, federation: str, files: FilePayloads, tmp_path: Path
) -> None:
    spilled.check_payload_store()  # the first: it names the federation's payload store
    RedisRoundStore(client, federation, payloads=FilePayloads(files.root)).check_payload_store()  # same directory
    elsewhere = RedisRoundStore(client, federation, payloads=FilePayloads(tmp_path / "another-host"))
    with pytest.raises(PayloadStoreMismatch, match=f"payload store \\(file://{tmp_path}/another-host\\) does not"):
        elsewhere.check_payload_store()
    with pytest.raises(PayloadStoreMismatch, match="start this aggregator with the same payload_store"):
        RedisRoundStore(client, federation).check_payload_store()
    assert spilled.sweep_payloads(now=time.time() + 30 * DAY) == 0, "the sweep keeps what names the store"
    spilled.check_payload_store()
    spilled.wipe()
    assert files.usage() == (0, 0)
    RedisRoundStore(client, federation).check_payload_store()  # a fresh federation may keep its bytes in Redis


@pytest.mark.services
def test_the_aggregator_process_says_why_it_cannot_start(
    spilled: RedisRoundStore, federation: str, tmp_path: Path
) -> None:
    spilled.check_payload_store()
    command = [sys.executable, "-m", "flexlora.cli", "aggregator", "--quiet", "--federation", federation]
    command += ["--redis-url", REDIS_URL, "--broker-url", AMQP_URL, "--payload-store", f"file://{tmp_path}/b"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join((done.stdout + done.stderr).split())
    assert "cannot start" in said and "must use the same payload store" in said and "Traceback" not in said


@pytest.mark.services
def test_dropping_a_transfer_another_aggregator_just_recorded_keeps_its_bytes(
    spilled: RedisRoundStore, files: FilePayloads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Aggregator B refuses a complete transfer (say, a norm outlier by its view of the round) while A, seeing
    it otherwise, records it: B's drop must not delete bytes that A's recorded update now names."""
    header, chunks = _chunked("update-raced")
    for i, c in enumerate(chunks):
        _put(spilled, header, i, c)
    looked_up = spilled._locations

    def then_recorded_elsewhere(keys: list[str]) -> list[str]:
        found = looked_up(keys)
        assert spilled.record_transfer(header, now=5.0) is RecordResult.RECORDED  # aggregator A, in between
        return found

    monkeypatch.setattr(spilled, "_locations", then_recorded_elsewhere)
    spilled.drop_transfer(header.client_id, header.update_id)
    monkeypatch.undo()
    [recorded] = spilled.round_updates(0)
    assert spilled.payload(recorded) == b"".join(chunks), "the recorded update's bytes are all there"
