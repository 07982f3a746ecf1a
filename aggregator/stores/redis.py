"""The Redis round store: every transition is one Lua script, so concurrent aggregators never interleave."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import redis

from aggregator.keys import Keys
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
from aggregator.stores.redis_scripts import (
    ACQUIRE,
    COMMIT,
    DROP_UPDATE,
    EXPIRE_TRANSFER,
    OPEN_TRANSFER,
    RECORD,
    RELEASE,
)
from aggregator.stores.replication import NO_WAIT, Replication
from broker.tls import TlsFiles
from schemas.messages import LoraUpdate, parse_release, parse_update

_ORPHAN_PAYLOAD_TTL_S = 24 * 3600
_TRANSFER_GRACE_S = 60.0
_RECORD_RESULTS = {
    0: RecordResult.DUPLICATE,
    1: RecordResult.RECORDED,
    2: RecordResult.STALE,
    3: RecordResult.FUTURE,
    4: RecordResult.REPLAY,
    5: RecordResult.CONFLICT,
}


class NotReplicated(redis.exceptions.ConnectionError):
    """A write reached the primary but not the replicas required in time. A store outage, for the caller: the
    message it came from is held and retried, never acked, so a failover that loses the write loses nothing
    that was acked (the redelivered message is recorded again, once)."""


def sentinel_primary(url: str) -> redis.Redis:
    """A client of the primary Redis Sentinel names for `redis+sentinel://h1:p1,h2:p2/<name>[/<db>]`; it asks the
    sentinels again after a connection error, so a promoted replica is found without a restart."""
    from urllib.parse import unquote, urlsplit

    from redis.sentinel import Sentinel

    parts = urlsplit(url)
    hosts = []
    for address in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {address!r} in {url!r} is not host:port")
        hosts.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{url!r}: give the primary's name and optionally a db, e.g. .../mymaster/0")
    password = unquote(parts.password) if parts.password else None
    sentinels = Sentinel(hosts, socket_timeout=2.0, password=password)
    db = int(path[1]) if len(path) == 2 else 0
    primary: redis.Redis = sentinels.master_for(path[0], db=db, decode_responses=False, socket_timeout=5.0)
    return primary


class RedisRoundStore(RoundStore):
    transient_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def __init__(
        self,
        client: redis.Redis,
        federation: str,
        *,
        prefix: str = "flexlora",
        replication: Replication = NO_WAIT,
    ) -> None:
        self.r = client
        self.keys = Keys(federation, prefix)
        self.replication = replication
        self._record = client.register_script(RECORD)
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._commit = client.register_script(COMMIT)
        self._open_transfer = client.register_script(OPEN_TRANSFER)
        self._expire_transfer = client.register_script(EXPIRE_TRANSFER)
        self._drop_update = client.register_script(DROP_UPDATE)

    @classmethod
    def from_url(
        cls,
        url: str,
        federation: str,
        *,
        prefix: str = "flexlora",
        tls: TlsFiles | None = None,
        replication: Replication = NO_WAIT,
    ) -> RedisRoundStore:
        """`rediss://` connects over TLS, verifying the server against `tls.ca_file` (or the system's CAs).
        `redis+sentinel://host:26379,host2:26379/<primary name>[/db]` finds the primary through Redis Sentinel
        and follows it across failovers (without TLS for now)."""
        options: dict[str, Any] = {}
        if url.startswith("rediss://"):
            options = {k: v for k, v in (tls or TlsFiles()).redis_options().items() if v is not None}
        elif tls is not None:
            raise ValueError("TLS files were given but the Redis URL is not rediss://; use rediss:// to encrypt")
        if url.startswith("redis+sentinel://"):
            client = sentinel_primary(url)
        else:
            client = redis.Redis.from_url(url, decode_responses=False, **options)
        return cls(client, federation, prefix=prefix, replication=replication)

    def _replicated(self, what: str) -> None:
        """Wait until the required replicas hold every write made so far on this connection (WAIT); raise
        NotReplicated when they do not within the timeout."""
        need = self.replication.replicas
        if need == 0:
            return
        got = int(self.r.wait(need, max(1, int(self.replication.timeout_s * 1000))))
        if got < need:
            raise NotReplicated(
                f"{what} reached the primary but {got} of the {need} replica(s) required within "
                f"{self.replication.timeout_s:g} s"
            )

    def version(self) -> int:
        return int(cast(bytes | None, self.r.get(self.keys.version)) or 0)

    def status(self) -> RoundStatus:
        # One MULTI so the version and its round's counters are read together.
        pipe = self.r.pipeline(transaction=True)
        version = self.version()
        pipe.get(self.keys.version)
        pipe.llen(self.keys.round_updates(version))
        pipe.get(self.keys.round_opened(version))
        raw_version, count, opened = pipe.execute()
        if int(raw_version or 0) != version:  # a commit slipped in between; read again
            return self.status()
        return RoundStatus(version, int(count), float(opened) if opened is not None else None)

    def record(
        self,
        header: LoraUpdate,
        payload: Payload,
        now: float,
        max_staleness: int | None = None,
        pins: Mapping[str, str] | None = None,
    ) -> RecordResult:
        k = self.keys
        payload_key = k.update_payload(record_id(header.client_id, header.update_id), header.payload.sha256)
        # NX: never overwrite a payload once written; the key names its sha256, so a replay with other bytes
        # lands elsewhere. Unrecorded payloads (refused, or a crash before the script) expire in a day.
        self.r.set(payload_key, payload, nx=True, ex=_ORPHAN_PAYLOAD_TTL_S)
        return self._run_record(header, payload_key, payload_key, now, max_staleness, pins, chunked=False)

    def _run_record(
        self,
        header: LoraUpdate,
        staged: str,
        payload: str,
        now: float,
        max_staleness: int | None,
        pins: Mapping[str, str] | None,
        *,
        chunked: bool,
    ) -> RecordResult:
        """The RECORD script (its KEYS and ARGV in its order): `staged` holds the bytes, `payload` is the key the
        recorded update's bytes live under (the same key unless the update came in chunks)."""
        k = self.keys
        rid = record_id(header.client_id, header.update_id)
        done = self._record(
            keys=[k.seen, k.version, k.update(rid), k.pins, staged, payload, k.transfers_open, k.transfer_meta(rid)],
            args=[
                rid,
                header.model_dump_json(),
                repr(now),
                k.namespace,
                header.base_version,
                -1 if max_staleness is None else max_staleness,
                "1" if chunked else "0",
                *(part for pin in sorted((pins or {}).items()) for part in pin),
            ],
        )
        result = int(done)
        if result == -1:
            raise TransferGone(f"payload of update {header.update_id} vanished before it was recorded")
        if result in (0, 1):  # counted (now or before): the caller acks it next, so the record must be safe first
            self._replicated(f"update {header.update_id}")
        return _RECORD_RESULTS[result]

    # --- chunked transfers ----------------------------------------------------------------------------------
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
        k = self.keys
        rid = record_id(client_id, update_id)
        meta_prefix, meta_suffix = k.transfer_meta("\0").split("\0")
        per_client, total = max_open or (0, 0)
        # The chunks outlive the deadline a little, so the reaper (not Redis) is what drops and reports them.
        ttl_ms = int((expiry_s + _TRANSFER_GRACE_S) * 1000)
        state = int(
            self._open_transfer(
                keys=[
                    k.seen,
                    k.transfer_meta(rid),
                    k.transfers_open,
                    k.update(rid),
                    k.update_payload(rid, sha256),
                ],
                args=[
                    rid,
                    signature,
                    client_id,
                    count,
                    repr(now + expiry_s),
                    ttl_ms,
                    per_client,
                    total,
                    meta_prefix,
                    meta_suffix,
                ],
            )
        )
        if state == 0:
            return ChunkResult.RECORDED
        if state == -1:
            return ChunkResult.MISMATCH
        if state == -2:
            return ChunkResult.REPLAY
        if state == -3:
            return ChunkResult.BUSY
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(k.transfer(rid), str(index), body)
        pipe.pexpire(k.transfer(rid), ttl_ms)
        pipe.hlen(k.transfer(rid))
        added, _, have = pipe.execute()
        self._replicated(f"chunk {index} of update {update_id}")  # acked next: a lost chunk would lose the update
        if int(have) >= count:
            return ChunkResult.COMPLETE
        return ChunkResult.STORED if int(added) else ChunkResult.DUPLICATE

    def transfer_payload(self, client_id: str, update_id: str, size: int) -> bytearray | None:
        try:
            return self.read_blob(Blob(self.keys.transfer(record_id(client_id, update_id)), size))
        except TransferGone:
            return None

    def record_transfer(
        self,
        header: LoraUpdate,
        now: float,
        max_staleness: int | None = None,
        pins: Mapping[str, str] | None = None,
    ) -> RecordResult:
        k = self.keys
        rid = record_id(header.client_id, header.update_id)
        final = k.update_payload(rid, header.payload.sha256)
        return self._run_record(header, k.transfer(rid), final, now, max_staleness, pins, chunked=True)

    def drop_transfer(self, client_id: str, update_id: str) -> None:
        k = self.keys
        rid = record_id(client_id, update_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(k.transfers_open, rid)
        pipe.delete(k.transfer(rid), k.transfer_meta(rid))
        pipe.execute()

    def expire_transfers(self, now: float) -> list[ExpiredTransfer]:
        k = self.keys
        due = cast(list[bytes], self.r.zrangebyscore(k.transfers_open, "-inf", repr(now), start=0, num=100))
        out = []
        for raw in due:
            rid = raw.decode()
            got = self._expire_transfer(keys=[k.transfers_open, k.transfer(rid), k.transfer_meta(rid)], args=[rid])
            if got:
                received, client, count = got
                out.append(ExpiredTransfer(split_record_id(rid)[1], bytes(client).decode(), int(received), int(count)))
        return out

    def put_blob(self, name: str, chunks: Iterable[bytes], ttl_s: float) -> Blob:
        key = self.keys.staged(name)
        ttl_ms = max(1, int(ttl_s * 1000))
        size = 0
        for index, chunk in enumerate(chunks):
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(key, str(index), chunk)
            pipe.pexpire(key, ttl_ms)
            pipe.execute()
            size += len(chunk)
        return Blob(key, size)

    def read_chunk(self, blob: Blob, index: int) -> bytes | None:
        return cast(bytes | None, self.r.hget(blob.key, str(index)))

    def round_updates(self, round_id: int) -> list[RecordedUpdate]:
        rids = cast(list[bytes], self.r.lrange(self.keys.round_updates(round_id), 0, -1))
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            pipe.hmget(self.keys.update(rid.decode()), ["header", "payload", "chunked"])
        rows = [(parse_update(h), key, c) for h, key, c in pipe.execute() if h is not None]  # pruned: gone
        pipe = self.r.pipeline(transaction=False)
        for _, payload_key, chunked in rows:
            if not chunked:
                pipe.get(payload_key)
        plain = iter(pipe.execute())
        out = []
        for header, payload_key, chunked in rows:
            # A chunked payload stays in Redis: the round reads it a module at a time (aggregator.blobs).
            payload: Payload | Blob | None = Blob(payload_key.decode(), header.payload.size) if chunked else next(plain)
            if payload is not None:
                out.append(RecordedUpdate(header, payload))
        return out

    def note_norm(self, round_id: int, norm: float) -> None:
        self.r.rpush(self.keys.round_norms(round_id), repr(float(norm)))

    def norms(self, round_id: int) -> list[float]:
        return [float(v) for v in cast(list[bytes], self.r.lrange(self.keys.round_norms(round_id), 0, -1))]

    def round_update_ids(self, round_id: int) -> list[str]:
        rids = cast(list[bytes], self.r.lrange(self.keys.round_updates(round_id), 0, -1))
        return [split_record_id(rid.decode())[1] for rid in rids]

    def acquire(self, round_id: int, owner: str, ttl_s: float) -> Lease | None:
        k = self.keys
        token = int(
            self._acquire(
                keys=[k.version, k.lease(round_id), k.fence(round_id), k.tokens],
                args=[str(round_id), owner, max(1, int(ttl_s * 1000))],
            )
        )
        return Lease(round_id, owner, token) if token > 0 else None

    def release_lease(self, lease: Lease) -> None:
        self._release(keys=[self.keys.lease(lease.round_id)], args=[f"{lease.owner}|{lease.token}"])

    def commit(
        self, lease: Lease, consumed: int, releases: Sequence[StoredRelease], record: RoundRecord, now: float
    ) -> bool:
        k = self.keys
        version = lease.round_id + 1
        adapters: dict[str, bytes | Blob] = {}
        headers: list[str | bytes] = []
        for rel in releases:
            h = rel.header
            adapters[k.adapter(version, h.request)] = rel.payload
            headers += [h.client_id, h.model_dump_json()]
        args: list[str | bytes | int] = [
            str(lease.round_id),
            str(lease.token),
            consumed,
            record.model_dump_json(),
            repr(now),
            k.namespace,
            len(adapters),
        ]
        for key, payload in adapters.items():
            args += [key, "b", payload.key] if isinstance(payload, Blob) else [key, "v", payload]
        args += headers
        keys = [
            k.version,
            k.fence(lease.round_id),
            k.lease(lease.round_id),
            k.unpublished,
            k.history,
            k.releases(version),
        ]
        done = int(self._commit(keys=keys, args=args))
        if done == -1:
            raise TransferGone(f"a staged adapter of version {version} expired before the commit")
        if done == 1:
            # Published next: a version that a failover could take back must not reach the clients.
            self._replicated(f"version {version}")
        return done == 1

    def releases(self, version: int) -> dict[str, StoredRelease]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(self.keys.releases(version)))
        headers = [parse_release(v) for v in raw.values()]
        keys = sorted({self.keys.adapter(version, h.request) for h in headers})
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        kinds = dict(zip(keys, pipe.execute(), strict=True))
        plain = [key for key in keys if kinds[key] == b"string"]
        payloads = dict(zip(plain, cast(list[bytes | None], self.r.mget(plain)), strict=True)) if plain else {}
        out = {}
        for h in headers:
            key = self.keys.adapter(version, h.request)
            if kinds[key] == b"hash":
                out[h.client_id] = StoredRelease(h, Blob(key, h.payload.size))
                continue
            payload = payloads.get(key)
            if payload is None:
                raise RuntimeError(f"release of {h.client_id} at version {version} has no stored adapter")
            out[h.client_id] = StoredRelease(h, bytes(payload))
        return out

    def unpublished(self) -> list[int]:
        return sorted(int(v) for v in cast(set[bytes], self.r.smembers(self.keys.unpublished)))

    def mark_published(self, version: int) -> None:
        self.r.srem(self.keys.unpublished, version)

    def claim_publish(self, version: int, owner: str, ttl_s: float) -> bool:
        return bool(self.r.set(self.keys.publish_claim(version), owner, nx=True, px=max(1, int(ttl_s * 1000))))

    def prune(self, before_version: int) -> int:
        k = self.keys
        start = int(cast(bytes | None, self.r.get(k.pruned_below)) or 0)
        dropped = 0
        # Rounds are pruned in order and the mark only moves forward, so each round is visited once.
        for version in range(max(start, 1), before_version):
            rids = cast(list[bytes], self.r.lrange(k.round_updates(version - 1), 0, -1))
            pipe = self.r.pipeline(transaction=False)
            for rid in rids:
                pipe.hget(k.update(rid.decode()), "payload")
            payload_keys = [key for key in pipe.execute() if key is not None]
            doomed = [*payload_keys, *(k.update(i.decode()) for i in rids), k.releases(version)]
            doomed.append(k.round_norms(version - 1))
            doomed += list(self.r.scan_iter(match=k.adapter_prefix(version) + "*", count=200))
            self.r.delete(*doomed)
            dropped += len(payload_keys)
            self.r.set(k.pruned_below, version + 1)
        return dropped

    def record_health(self, owner: str, info: str, ttl_s: float) -> None:
        self.r.set(self.keys.health(owner), info, px=max(1, int(ttl_s * 1000)))

    def health(self) -> dict[str, str]:
        prefix = self.keys.health("")
        keys = sorted(self.r.scan_iter(match=prefix + "*", count=200))
        values = cast(list[bytes | None], self.r.mget(keys)) if keys else []
        return {k.decode()[len(prefix) :]: v.decode() for k, v in zip(keys, values, strict=True) if v is not None}

    def history(self) -> list[RoundRecord]:
        return [RoundRecord.model_validate_json(v) for v in cast(list[bytes], self.r.lrange(self.keys.history, 0, -1))]

    def count_refusal(self, reason: str) -> None:
        self.r.hincrby(self.keys.refusals, reason, 1)

    def refusals(self) -> dict[str, int]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(self.keys.refusals))
        return {k.decode(): int(v) for k, v in sorted(raw.items())}

    def pin(self, name: str, value: str) -> str:
        self.r.hsetnx(self.keys.pins, name, value)
        return cast(bytes, self.r.hget(self.keys.pins, name)).decode()

    def pinned(self, name: str) -> str | None:
        value = cast(bytes | None, self.r.hget(self.keys.pins, name))
        return None if value is None else value.decode()

    def drop_update(self, round_id: int, client_id: str, update_id: str) -> bool:
        k = self.keys
        rid = record_id(client_id, update_id)
        keys = [k.version, k.round_updates(round_id), k.update(rid)]
        return int(self._drop_update(keys=keys, args=[str(round_id), rid])) == 1

    def wipe(self) -> int:
        """Delete every key of this federation (tests and `reset`); returns how many went."""
        deleted = 0
        for batch in self._scan_batches():
            deleted += int(self.r.delete(*batch))
        return deleted

    def _scan_batches(self) -> list[list[bytes]]:
        keys = list(self.r.scan_iter(match=self.keys.namespace + "*", count=500))
        return [keys[i : i + 500] for i in range(0, len(keys), 500)]
