"""An in-process round store with the Redis store's semantics: the embedded default and unit tests."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aggregator.rounds import (
    Blob,
    ChunkResult,
    ExpiredTransfer,
    Lease,
    Payload,
    RecordedUpdate,
    RecordResult,
    RoundRecord,
    RoundStatus,
    RoundStore,
    StoredRelease,
    TransferGone,
    record_id,
    split_record_id,
)
from schemas.messages import LoraUpdate


@dataclass
class _Transfer:
    signature: str
    client_id: str
    count: int
    deadline: float
    chunks: dict[int, bytes] = field(default_factory=dict)


class MemoryRoundStore(RoundStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._empty()

    def wipe(self) -> int:
        with self._lock:
            gone = len(self._updates) + len(self._history) + sum(len(r) for r in self._releases.values())
            self._empty()
        return gone

    def _empty(self) -> None:
        self._version = 0
        # Updates and transfers are keyed by record_id(client, update id), like the Redis store's.
        self._seen: set[str] = set()
        self._rounds: dict[int, list[str]] = {}
        self._opened: dict[int, float] = {}
        self._updates: dict[str, RecordedUpdate] = {}
        self._leases: dict[int, tuple[Lease, float]] = {}  # round -> (lease, expires at, monotonic)
        self._fences: dict[int, int] = {}
        self._tokens = itertools.count(1)
        self._releases: dict[int, dict[str, StoredRelease]] = {}
        self._unpublished: set[int] = set()
        self._history: list[RoundRecord] = []
        self._pins: dict[str, str] = {}
        self._refusals: collections.Counter[str] = collections.Counter()
        self._publish_claims: dict[int, float] = {}  # version -> claim expiry (monotonic)
        self._health: dict[str, tuple[str, float]] = {}  # owner -> (info, expiry)
        self._transfers: dict[str, _Transfer] = {}
        self._norms: dict[int, list[float]] = {}
        self._blobs: dict[str, list[bytes]] = {}  # staged or adopted chunked payloads (no expiry in memory)

    def version(self) -> int:
        with self._lock:
            return self._version

    def status(self) -> RoundStatus:
        with self._lock:
            ids = self._rounds.get(self._version, [])
            return RoundStatus(self._version, len(ids), self._opened.get(self._version))

    def record(
        self,
        header: LoraUpdate,
        payload: Payload,
        now: float,
        max_staleness: int | None = None,
        pins: Mapping[str, str] | None = None,
    ) -> RecordResult:
        rid = record_id(header.client_id, header.update_id)
        with self._lock:
            if rid in self._seen:
                return self._seen_again(rid, header)
            if header.base_version > self._version:
                return RecordResult.FUTURE
            if max_staleness is not None and self._version - header.base_version > max_staleness:
                return RecordResult.STALE
            pins = pins or {}
            if any(self._pins.get(name, value) != value for name, value in pins.items()):
                return RecordResult.CONFLICT
            for name, value in pins.items():
                self._pins.setdefault(name, value)
            self._seen.add(rid)
            # bytes stay bytes; an assembled bytearray is kept as it is (no copy of a large payload)
            self._updates[rid] = RecordedUpdate(header, payload)
            ids = self._rounds.setdefault(self._version, [])
            ids.append(rid)
            self._opened.setdefault(self._version, now)
            return RecordResult.RECORDED

    def _seen_again(self, rid: str, header: LoraUpdate) -> RecordResult:
        """An id counted already: a replay if it was counted with another payload, else a duplicate."""
        had = self._updates.get(rid)
        if had is not None and had.header.payload.sha256 != header.payload.sha256:
            return RecordResult.REPLAY
        return RecordResult.DUPLICATE

    def put_chunk(
        self,
        update_id: str,
        index: int,
        body: bytes,
        *,
        count: int,
        signature: str,
        client_id: str,
        sha256: str,
        now: float,
        expiry_s: float,
        max_open: tuple[int, int] | None = None,
    ) -> ChunkResult:
        rid = record_id(client_id, update_id)
        with self._lock:
            if rid in self._seen:
                had = self._updates.get(rid)
                replay = had is not None and had.header.payload.sha256 != sha256
                return ChunkResult.REPLAY if replay else ChunkResult.RECORDED
            if rid not in self._transfers and max_open is not None:
                mine = sum(t.client_id == client_id for t in self._transfers.values())
                if len(self._transfers) >= max_open[1] or mine >= max_open[0]:
                    return ChunkResult.BUSY
            transfer = self._transfers.setdefault(rid, _Transfer(signature, client_id, count, now + expiry_s))
            if transfer.signature != signature:
                return ChunkResult.MISMATCH
            transfer.deadline = now + expiry_s
            fresh = index not in transfer.chunks
            if fresh:
                transfer.chunks[index] = bytes(body)
            if len(transfer.chunks) >= transfer.count:
                return ChunkResult.COMPLETE
            return ChunkResult.STORED if fresh else ChunkResult.DUPLICATE

    def transfer_payload(self, client_id: str, update_id: str, size: int) -> bytearray | None:
        with self._lock:
            transfer = self._transfers.get(record_id(client_id, update_id))
            chunks = [transfer.chunks.get(i) for i in range(transfer.count)] if transfer else None
        if chunks is None or any(c is None for c in chunks):
            return None
        out = bytearray().join(c for c in chunks if c is not None)
        return out if len(out) == size else None

    def record_transfer(
        self,
        header: LoraUpdate,
        now: float,
        max_staleness: int | None = None,
        pins: Mapping[str, str] | None = None,
    ) -> RecordResult:
        rid = record_id(header.client_id, header.update_id)
        with self._lock:
            if rid in self._seen:
                return self._seen_again(rid, header)
        payload = self.transfer_payload(header.client_id, header.update_id, header.payload.size)
        if payload is None:
            raise TransferGone(f"the chunks of update {header.update_id} were dropped before it was recorded")
        result = self.record(header, payload, now, max_staleness, pins)
        if result is RecordResult.RECORDED:
            self.drop_transfer(header.client_id, header.update_id)
        return result

    def drop_transfer(self, client_id: str, update_id: str) -> None:
        with self._lock:
            self._transfers.pop(record_id(client_id, update_id), None)

    def expire_transfers(self, now: float) -> list[ExpiredTransfer]:
        with self._lock:
            due = [i for i, t in self._transfers.items() if t.deadline <= now]
            out = []
            for rid in due:
                t = self._transfers.pop(rid)
                out.append(ExpiredTransfer(split_record_id(rid)[1], t.client_id, len(t.chunks), t.count))
            return out

    def put_blob(self, name: str, chunks: Iterable[bytes], ttl_s: float) -> Blob:
        stored = [bytes(c) for c in chunks]
        with self._lock:
            self._blobs[name] = stored
        return Blob(name, sum(map(len, stored)))

    def read_chunk(self, blob: Blob, index: int) -> bytes | None:
        with self._lock:
            chunks = self._blobs.get(blob.key, [])
            return chunks[index] if index < len(chunks) else None

    def round_updates(self, round_id: int, held: Collection[str] = frozenset()) -> list[RecordedUpdate]:
        with self._lock:
            found = [(i, self._updates[i]) for i in self._rounds.get(round_id, []) if i in self._updates]
        return [RecordedUpdate(u.header, None) if i in held else u for i, u in found]

    def note_norm(self, round_id: int, norm: float) -> None:
        with self._lock:
            self._norms.setdefault(round_id, []).append(norm)

    def norms(self, round_id: int) -> list[float]:
        with self._lock:
            return list(self._norms.get(round_id, []))

    def round_update_ids(self, round_id: int) -> list[str]:
        with self._lock:
            return [split_record_id(rid)[1] for rid in self._rounds.get(round_id, [])]

    def acquire(self, round_id: int, owner: str, ttl_s: float) -> Lease | None:
        with self._lock:
            if round_id != self._version:
                return None
            held = self._leases.get(round_id)
            if held is not None and held[1] > time.monotonic():
                return None
            lease = Lease(round_id, owner, next(self._tokens))
            self._leases[round_id] = (lease, time.monotonic() + ttl_s)
            self._fences[round_id] = lease.token
            return lease

    def release_lease(self, lease: Lease) -> None:
        with self._lock:
            held = self._leases.get(lease.round_id)
            if held is not None and held[0] == lease:
                del self._leases[lease.round_id]

    def commit(
        self, lease: Lease, consumed: int, releases: Sequence[StoredRelease], record: RoundRecord, now: float
    ) -> bool:
        with self._lock:
            round_id = lease.round_id
            if self._version != round_id or self._fences.get(round_id) != lease.token:
                return False
            ids = self._rounds.get(round_id, [])
            if not 1 <= consumed <= len(ids):
                return False
            carried = ids[consumed:]
            self._rounds[round_id] = ids[:consumed]
            self._version = round_id + 1
            if carried:
                self._rounds[self._version] = carried
                self._opened[self._version] = now
            self._releases[self._version] = {r.header.client_id: r for r in releases}
            self._unpublished.add(self._version)
            self._history.append(record)
            self._leases.pop(round_id, None)
            return True

    def releases(self, version: int) -> dict[str, StoredRelease]:
        with self._lock:
            return dict(self._releases.get(version, {}))

    def unpublished(self) -> list[int]:
        with self._lock:
            return sorted(self._unpublished)

    def mark_published(self, version: int) -> None:
        with self._lock:
            self._unpublished.discard(version)

    def claim_publish(self, version: int, owner: str, ttl_s: float) -> bool:
        with self._lock:
            if self._publish_claims.get(version, 0.0) > time.monotonic():
                return False
            self._publish_claims[version] = time.monotonic() + ttl_s
            return True

    def prune(self, before_version: int) -> int:
        with self._lock:
            dropped = 0
            for round_id, ids in self._rounds.items():
                if round_id + 1 < before_version:
                    for rid in ids:
                        dropped += self._updates.pop(rid, None) is not None
            # What only an open round needs (its opening time, lease, fence and norms) goes with its payloads.
            for per_round in (self._opened, self._leases, self._fences, self._norms):
                for round_id in [r for r in per_round if r + 1 < before_version]:
                    del per_round[round_id]
            for version in [v for v in self._publish_claims if v < before_version]:
                del self._publish_claims[version]
            for version in [v for v in self._releases if v < before_version]:
                for release in self._releases.pop(version).values():
                    if isinstance(release.payload, Blob):
                        self._blobs.pop(release.payload.key, None)
            return dropped

    def record_health(self, owner: str, info: str, ttl_s: float) -> None:
        with self._lock:
            self._health[owner] = (info, time.monotonic() + ttl_s)

    def check_payload_store(self) -> None:
        return  # one process, its bytes with its records: nothing another aggregator could fail to read

    def health(self) -> dict[str, str]:
        with self._lock:
            now = time.monotonic()
            return {owner: info for owner, (info, expiry) in self._health.items() if expiry > now}

    def history(self) -> list[RoundRecord]:
        with self._lock:
            return list(self._history)

    def count_refusal(self, reason: str) -> None:
        with self._lock:
            self._refusals[reason] += 1

    def refusals(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._refusals.items()))

    def pin(self, name: str, value: str) -> str:
        with self._lock:
            return self._pins.setdefault(name, value)

    def pinned(self, name: str) -> str | None:
        with self._lock:
            return self._pins.get(name)

    def counted(self, client_id: str, update_id: str) -> bool:
        with self._lock:
            return record_id(client_id, update_id) in self._seen

    def drop_update(self, lease: Lease, client_id: str, update_id: str) -> bool:
        rid = record_id(client_id, update_id)
        round_id = lease.round_id
        with self._lock:
            ids = self._rounds.get(round_id, [])
            if round_id != self._version or self._fences.get(round_id) != lease.token or rid not in ids:
                return False
            ids.remove(rid)
            self._updates.pop(rid, None)
            return True
