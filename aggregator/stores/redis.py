"""The Redis round store: every transition is one Lua script, so concurrent aggregators never interleave."""

from __future__ import annotations

import collections
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, cast

import redis
from redis.client import Pipeline
from redis.cluster import RedisCluster

from aggregator.keys import Keys
from aggregator.payloads import PayloadStore, PayloadStoreMismatch, PayloadUnavailable
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
    PUT_CHUNK,
    RECORD,
    RELEASE,
)
from aggregator.stores.replication import NO_WAIT, Replication
from broker.tls import TlsFiles
from schemas.messages import LoraUpdate, parse_release, parse_update

_ORPHAN_PAYLOAD_TTL_S = 24 * 3600
# With a payload store, Redis keeps this followed by the bytes' location in place of the bytes themselves (no
# safetensors payload starts so: its first 8 bytes are its header's length, and this reads as petabytes).
SPILLED = b"\xffflexlora-spilled:"
_LOCATION_MAX = 512  # bytes of a marker read to find its location (locations are ids and digests: ~150 bytes)
_SWEEP_EVERY_S = 3600.0
_TRANSFER_GRACE_S = 60.0
_PREPARED_MAX = 256  # locations `prepare` wrote that `record` may skip writing (the service prepares a few ahead)
_READ_AGAIN = 100  # a script that says its caller's read is stale is retried this often (each a commit)
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


def _update_location(header: LoraUpdate) -> str:
    """Where a payload store keeps a whole update's bytes (its sha256 in the name: a replay with other bytes lands
    elsewhere)."""
    return f"updates/{record_id(header.client_id, header.update_id)}/{header.payload.sha256}"


def _servers(url: str, what: str) -> list[tuple[str, int]]:
    """The `host:port` list of a `scheme://[user:pass@]h1:p1,h2:p2/…` URL (Sentinels, cluster nodes)."""
    from urllib.parse import urlsplit

    servers = []
    for address in urlsplit(url).netloc.rpartition("@")[2].split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{what} {address!r} in {url!r} is not host:port")
        servers.append((host, int(port)))
    return servers


def sentinel_primary(url: str, tls: Mapping[str, Any] | None = None) -> redis.Redis:
    """A client of the primary Redis Sentinel names for `redis+sentinel://h1:p1,h2:p2/<name>[/<db>]`; it asks the
    sentinels again after a connection error, so a promoted replica is found without a restart. With `tls`
    (redis-py's ssl_* options; `rediss+sentinel://`) both the sentinels and the primary are reached over TLS."""
    from urllib.parse import unquote, urlsplit

    from redis.sentinel import Sentinel

    parts = urlsplit(url)
    hosts = _servers(url, "sentinel address")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{url!r}: give the primary's name and optionally a db, e.g. .../mymaster/0")
    password = unquote(parts.password) if parts.password else None
    secure = {} if tls is None else {"ssl": True, **tls}
    # The password is the primary's; sentinels are asked without one (as before TLS was possible).
    sentinels = Sentinel(hosts, sentinel_kwargs={"socket_timeout": 2.0, **secure})
    db = int(path[1]) if len(path) == 2 else 0
    primary: redis.Redis = sentinels.master_for(
        path[0], db=db, decode_responses=False, socket_timeout=5.0, password=password, **secure
    )
    return primary


def cluster_client(url: str, options: Mapping[str, Any]) -> redis.Redis:
    """A Redis Cluster client for `redis+cluster://h1:p1,h2:p2[/]` (`rediss+cluster://` over TLS): any of the
    nodes will do to start, the client learns the slots' owners and follows them when they move."""
    from urllib.parse import unquote, urlsplit

    from redis.cluster import ClusterNode, RedisCluster

    parts = urlsplit(url)
    nodes = [ClusterNode(host, port) for host, port in _servers(url, "cluster node")]
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"{url!r}: Redis Cluster has only database 0")
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    tls = {"ssl": True, **options} if parts.scheme == "rediss+cluster" else {}
    client = RedisCluster(
        startup_nodes=nodes, decode_responses=False, password=password, username=username, socket_timeout=5.0, **tls
    )
    return cast(redis.Redis, client)


class OlderLayoutInUse(RuntimeError):
    """An aggregator of a release before hash-tagged keys still serves the federation: moving its keys now would
    split the federation between two layouts."""


class RedisRoundStore(RoundStore):
    transient_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def __init__(
        self,
        client: redis.Redis,
        federation: str,
        *,
        prefix: str = "flexlora",
        replication: Replication = NO_WAIT,
        payloads: PayloadStore | None = None,
    ) -> None:
        self.r = client
        self.keys = Keys(federation, prefix)
        self.replication = replication
        self.payloads = payloads  # None: Redis keeps the bytes too
        # The updates (by payload location) whose bytes and key `prepare` wrote and `record` has not yet used: the
        # newest few (one not here is written again by `record`, which is only slower), shared with the threads
        # that prepare.
        self._prepared: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self._prepared_lock = threading.Lock()
        self._swept_at = time.monotonic()
        self._version_seen = 0  # the version status() read last: which round's counters to read with it
        self._record = client.register_script(RECORD)
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._commit = client.register_script(COMMIT)
        self._open_transfer = client.register_script(OPEN_TRANSFER)
        self._expire_transfer = client.register_script(EXPIRE_TRANSFER)
        self._drop_update = client.register_script(DROP_UPDATE)
        self._put_chunk = client.register_script(PUT_CHUNK)
        self.adopted = self._adopt_older_layout()

    def _adopt_older_layout(self) -> int:
        """Move a federation's keys from the layout before hash tags (`flexlora:<name>:…`) to this one
        (`flexlora:{<name>}:…`), once, on the first start of this release; returns how many keys moved. The
        version goes last, so a start that dies half-way is finished by the next one. Refuses while an
        aggregator of the older release is alive (its health key): stop them all first."""
        k = self.keys
        old = k.legacy_namespace
        if old == k.namespace or not self.r.exists(old + "version", old + "seen", old + "history"):
            return 0
        alive = [key.decode()[len(old + "health:") :] for key in self.r.scan_iter(match=old + "health:*")]
        if alive:
            raise OlderLayoutInUse(
                f"aggregator(s) {', '.join(sorted(alive))} of an older release still serve federation "
                f"{k.federation!r} with the keys before hash tags; stop every aggregator, wait for their health "
                "keys to expire, then start this release (it moves the keys once)"
            )
        if self.r.exists(old + "version") and self.r.exists(k.version):
            raise OlderLayoutInUse(
                f"federation {k.federation!r} has keys in both layouts ({old}version and {k.version}): an older "
                "and a newer aggregator both served it; move or wipe one by hand"
            )
        moved = 0
        for raw in list(self.r.scan_iter(match=old + "*", count=500)):
            key = raw.decode()
            if key != old + "version":
                moved += self._move(key, k.namespace + key[len(old) :])
        for raw in list(self.r.scan_iter(match=k.namespace + "update:*", count=500)):
            # An update's hash names the key of its payload: point it at the moved key.
            payload = cast(bytes | None, self.r.hget(raw, "payload")) if self.r.type(raw) == b"hash" else None
            if payload is not None and payload.decode().startswith(old):
                self.r.hset(raw, "payload", k.namespace + payload.decode()[len(old) :])
        return moved + self._move(old + "version", k.version)

    def _move(self, key: str, to: str) -> int:
        try:
            return int(bool(self.r.renamenx(key, to)))
        except redis.exceptions.ResponseError:  # gone: another aggregator starting at once moved it
            return 0

    @classmethod
    def from_url(
        cls,
        url: str,
        federation: str,
        *,
        prefix: str = "flexlora",
        tls: TlsFiles | None = None,
        replication: Replication = NO_WAIT,
        payloads: PayloadStore | None = None,
    ) -> RedisRoundStore:
        """`rediss://` connects over TLS, verifying the server against `tls.ca_file` (or the system's CAs).
        `redis+sentinel://host:26379,host2:26379/<primary name>[/db]` finds the primary through Redis Sentinel
        and follows it across failovers (`rediss+sentinel://`: over TLS). `redis+cluster://host:7000,host:7001` (or
        `rediss+cluster://`) uses a Redis Cluster; a federation's keys share one slot."""
        options: dict[str, Any] = {}
        if url.startswith(("rediss://", "rediss+cluster://", "rediss+sentinel://")):
            options = {k: v for k, v in (tls or TlsFiles()).redis_options().items() if v is not None}
        elif tls is not None:
            raise ValueError("TLS files were given but the Redis URL is not rediss://; use rediss:// to encrypt")
        if url.startswith("redis+sentinel://"):
            client = sentinel_primary(url)
        elif url.startswith("rediss+sentinel://"):
            client = sentinel_primary(url, options)
        elif url.startswith(("redis+cluster://", "rediss+cluster://")):
            if replication.replicas:
                # WAIT covers the writes of the connection it is sent on; a cluster client's pipeline does not
                # keep a keyless command on the connection of the script before it.
                raise ValueError(
                    "min_replicas (Redis WAIT) is not supported on Redis Cluster: use Sentinel for a replicated "
                    "store whose acks wait for a replica, or set min_replicas=0"
                )
            client = cluster_client(url, options)
        else:
            client = redis.Redis.from_url(url, decode_responses=False, **options)
        return cls(client, federation, prefix=prefix, replication=replication, payloads=payloads)

    # --- bytes: in Redis, or in the payload store with a marker in Redis --------------------------------------
    def _spill(self, location: str, data: Payload | memoryview) -> Payload | memoryview:
        """What Redis keeps for `data`: the bytes themselves, or with a payload store, a marker naming where they
        were put (written before the marker, so a marker never names bytes that are not there yet)."""
        if self.payloads is None:
            return data
        self.payloads.put(location, data)
        return SPILLED + location.encode()

    def prepare(self, header: LoraUpdate, payload: Payload) -> None:
        """The payload's bytes (to the payload store, if there is one) and its key in Redis (the bytes, or a marker
        naming where they are), as `record` would write them: so the update's `record` is the script alone."""
        location = _update_location(header)
        value = self._spill(location, payload)  # the same bytes to the same place as `record` would: idempotent
        self.r.set(self._payload_key(header), value, nx=True, ex=_ORPHAN_PAYLOAD_TTL_S)
        with self._prepared_lock:
            self._prepared[location] = True
            while len(self._prepared) > _PREPARED_MAX:
                self._prepared.popitem(last=False)

    def _payload_key(self, header: LoraUpdate) -> str:
        return self.keys.update_payload(record_id(header.client_id, header.update_id), header.payload.sha256)

    def _resolve(self, value: bytes | None) -> bytes | None:
        """The bytes a value Redis kept stands for (itself, unless it is a marker)."""
        if value is None or not value.startswith(SPILLED):
            return value
        location = value[len(SPILLED) :].decode()
        if self.payloads is None:
            raise PayloadUnavailable(
                f"payload {location} of federation {self.keys.federation!r} is kept in a payload store: start this "
                "aggregator with the federation's payload_store"
            )
        data = self.payloads.get(location)
        if data is None:
            raise PayloadUnavailable(
                f"payload {location} is not in this aggregator's payload store ({self.payloads!r}): every aggregator "
                "of a federation must use the same one (for file://, a directory on a mount they all share)"
            )
        return data

    def _locations(self, keys: Sequence[str | bytes]) -> list[str]:
        """The payload-store locations that the values of these keys (strings and hashes) name."""
        if self.payloads is None or not keys:
            return []
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        kinds = pipe.execute()
        pipe = self.r.pipeline(transaction=False)
        for key, kind in zip(keys, kinds, strict=True):
            if kind == b"string":
                pipe.getrange(key, 0, len(SPILLED) + _LOCATION_MAX)
            elif kind == b"hash":
                pipe.hvals(key)
        values: list[bytes] = []
        for got in pipe.execute() if len(pipe) else []:
            values += got if isinstance(got, list) else [got]
        return [v[len(SPILLED) :].decode() for v in values if isinstance(v, bytes) and v.startswith(SPILLED)]

    def _forget(self, locations: Sequence[str]) -> None:
        if self.payloads is not None and locations:
            self.payloads.delete(locations)

    def check_payload_store(self) -> None:
        """The first aggregator of a federation to use a payload store writes a file with a fresh token into it
        and names it in Redis (as a marker, so the sweep keeps it); every later one must find that file in its
        own payload store. So an aggregator on a host that does not share the directory, or one started without
        the federation's payload store, refuses to start instead of failing on every round it finalises."""
        key = self.keys.payload_store
        current = cast(bytes | None, self.r.get(key))
        if self.payloads is None:
            if current is not None:
                raise PayloadStoreMismatch(
                    f"federation {self.keys.federation!r} keeps its payloads in a payload store; start this "
                    "aggregator with the same payload_store as the others (--payload-store file:///<shared dir>)"
                )
            return
        if current is None:
            token = uuid.uuid4().hex
            location = f"identity/{token}"
            self.payloads.put(location, token.encode())
            if self.r.set(key, SPILLED + location.encode(), nx=True):
                return
            self.payloads.delete([location])  # another aggregator named its own first
            current = cast(bytes, self.r.get(key))
        location = current[len(SPILLED) :].decode()
        if self.payloads.get(location) != location.rsplit("/", 1)[-1].encode():
            raise PayloadStoreMismatch(
                f"this aggregator's payload store ({self.payloads!r}) does not hold {location!r}, which the first "
                f"aggregator of federation {self.keys.federation!r} wrote into its own: every aggregator of a "
                "federation must use the same payload store (for file://, a directory on a mount they all share)"
            )

    def sweep_payloads(self, now: float | None = None) -> int:
        """Delete the payload store's bytes that no key of the federation names and that were written over a day
        ago: the payloads of refused updates, chunks of transfers that expired while no aggregator ran, adapters
        staged by a finaliser that died before its commit (Redis expires their markers; this their bytes).
        Returns how many went. Run by `prune` at most hourly."""
        if self.payloads is None:
            return 0
        named: set[str] = set()
        for batch in self._scan_batches():
            named.update(self._locations(batch))
        orphans = [loc for loc in self.payloads.older_than(_ORPHAN_PAYLOAD_TTL_S, now) if loc not in named]
        return self.payloads.delete(orphans)

    def _replicated_call(
        self,
        script: Any,
        keys: Sequence[str],
        args: Sequence[Any],
        what: str,
        safe_when: tuple[int, ...] | None,
        before: Callable[[Pipeline], object] | None = None,
    ) -> Any:
        """Run `script`; when it answers one of `safe_when` (None: whatever it answers), a write the caller acks
        or publishes next, wait
        until the required replicas hold it (WAIT) or raise NotReplicated. The script and the WAIT go down one
        connection: WAIT covers only the writes of the connection it is sent on, and another thread of this
        process may take a pooled connection in between. `before` adds commands that go ahead of the script, in
        the same round trip."""
        need = self.replication.replicas
        if need == 0 and before is None:
            return script(keys=keys, args=args)
        pipe = self.r.pipeline(transaction=False)
        if before is not None:
            before(pipe)
        script(keys=keys, args=args, client=pipe)
        if need == 0:
            return pipe.execute()[-1]
        pipe.wait(need, max(1, int(self.replication.timeout_s * 1000)))
        done, got = pipe.execute()[-2:]
        if (safe_when is None or int(done) in safe_when) and int(got) < need:
            raise NotReplicated(
                f"{what} reached the primary but {got} of the {need} replica(s) required within "
                f"{self.replication.timeout_s:g} s"
            )
        return done

    def version(self) -> int:
        return int(cast(bytes | None, self.r.get(self.keys.version)) or 0)

    def status(self) -> RoundStatus:
        # One MULTI so the version and its round's counters are read together: the counters of the version this
        # store saw last, which is the open one but right after a commit (then read again with the new one). One
        # round trip, where reading the version first took two, on every step of the service.
        guess = self._version_seen
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.keys.version)
        pipe.llen(self.keys.round_updates(guess))
        pipe.get(self.keys.round_opened(guess))
        raw_version, count, opened = pipe.execute()
        version = int(raw_version or 0)
        if version != guess:
            self._version_seen = version
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
        payload_key, location = self._payload_key(header), _update_location(header)
        # Against the version status() saw last (the open round's but right after a commit, when the script says so
        # and is run again with the version read afresh).
        version = self._version_seen
        with self._prepared_lock:
            prepared = self._prepared.pop(location, False)
        if prepared:
            try:
                return self._run_record(
                    header, payload_key, payload_key, now, max_staleness, pins, chunked=False, version=version
                )
            except TransferGone:
                pass  # what `prepare` wrote is gone (Redis restarted, or failed over, since): written again below
        # NX: never overwrite a payload once written; the key names its sha256, so a replay with other bytes
        # lands elsewhere. Unrecorded payloads (refused, or a crash before the script) expire in a day.
        value = self._spill(location, payload)

        def write(pipe: Pipeline) -> None:
            pipe.set(payload_key, value, nx=True, ex=_ORPHAN_PAYLOAD_TTL_S)

        before: Callable[[Pipeline], None] | None = write  # one round trip: the bytes, then the script
        if isinstance(self.r, RedisCluster):  # redis-py refuses a script in a cluster's pipeline: two round trips
            pipe = self.r.pipeline(transaction=False)  # the bytes, and the version to record against
            write(pipe)
            pipe.get(self.keys.version)
            version, before = int(pipe.execute()[1] or 0), None
        return self._run_record(
            header, payload_key, payload_key, now, max_staleness, pins, chunked=False, version=version, before=before
        )

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
        version: int | None = None,
        before: Callable[[Pipeline], object] | None = None,
    ) -> RecordResult:
        """The RECORD script (its KEYS and ARGV in its order): `staged` holds the bytes, `payload` is the key the
        recorded update's bytes live under (the same key unless the update came in chunks); `version`: the
        version the caller read just now, or saw last, if it did (the script checks it, so a stale one costs a
        retry); `before`: commands sent ahead of the script's first run, in its round trip."""
        k = self.keys
        rid = record_id(header.client_id, header.update_id)
        pins_args = [part for pin in sorted((pins or {}).items()) for part in pin]
        for attempt in range(_READ_AGAIN):
            expected = version if attempt == 0 and version is not None else self.version()
            keys = [k.seen, k.version, k.update(rid), k.pins, staged, payload, k.transfers_open, k.transfer_meta(rid)]
            keys += [k.round_updates(expected), k.round_opened(expected), k.transfer_owners]
            args = [rid, header.model_dump_json(), repr(now), str(expected), header.base_version]
            args += [-1 if max_staleness is None else max_staleness, "1" if chunked else "0", *pins_args]
            done = self._replicated_call(
                self._record, keys, args, f"update {header.update_id}", (0, 1), before if attempt == 0 else None
            )
            if int(done) != 6:  # 6: a commit moved the version between the read and the script
                break
        else:
            raise redis.exceptions.ConnectionError(f"the round moved on {_READ_AGAIN} times while recording")
        result = int(done)
        if result == -1:
            raise TransferGone(f"payload of update {header.update_id} vanished before it was recorded")
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
                    k.transfer_owners,
                ],
                args=[rid, signature, client_id, count, repr(now + expiry_s), ttl_ms, per_client, total],
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
        # Acked next: a chunk a failover could take back would lose the update, so it is made safe first.
        what = f"chunk {index} of update {update_id}"
        # A chunk's location names its transfer's signature (header and chunking), its index and this copy: the
        # signature does not cover a chunk's own bytes, so a second copy with other bytes, under the first's name,
        # would have replaced bytes the transfer's marker names, after they were checked.
        digest = hashlib.sha256(signature.encode()).hexdigest()[:32]
        location = f"transfers/{rid}/{digest}/{index}-{uuid.uuid4().hex[:16]}"
        value = self._spill(location, body)
        added, have = self._replicated_call(self._put_chunk, [k.transfer(rid)], [str(index), value, ttl_ms], what, None)
        if not int(added) and self.payloads is not None and self.r.hget(k.transfer(rid), str(index)) != value:
            self._forget([location])  # a copy kept before this one is the chunk: this one's bytes are named nowhere
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
        spilled = self._locations([k.transfer(rid)])
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(k.transfers_open, rid)
        pipe.hdel(k.transfer_owners, rid)
        pipe.delete(k.transfer(rid))
        pipe.delete(k.transfer_meta(rid))
        dropped = pipe.execute()[2]
        if dropped:  # not if another aggregator recorded it meanwhile: its update names these bytes now
            self._forget(spilled)

    def expire_transfers(self, now: float) -> list[ExpiredTransfer]:
        k = self.keys
        due = cast(list[bytes], self.r.zrangebyscore(k.transfers_open, "-inf", repr(now), start=0, num=100))
        out = []
        for raw in due:
            rid = raw.decode()
            keys = [k.transfers_open, k.transfer(rid), k.transfer_meta(rid), k.transfer_owners]
            spilled = self._locations([k.transfer(rid)])
            got = self._expire_transfer(keys=keys, args=[rid])
            if got:
                self._forget(spilled)
                received, client, count = got
                out.append(ExpiredTransfer(split_record_id(rid)[1], bytes(client).decode(), int(received), int(count)))
        return out

    def put_blob(self, name: str, chunks: Iterable[bytes], ttl_s: float) -> Blob:
        key = self.keys.staged(name)
        ttl_ms = max(1, int(ttl_s * 1000))
        size = 0
        token = uuid.uuid4().hex  # two finalisers staging under one name never share a location
        for index, chunk in enumerate(chunks):
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(key, str(index), self._spill(f"staged/{token}/{index}", chunk))
            pipe.pexpire(key, ttl_ms)
            pipe.execute()
            size += len(chunk)
        return Blob(key, size)

    def read_chunk(self, blob: Blob, index: int) -> bytes | None:
        return self._resolve(cast(bytes | None, self.r.hget(blob.key, str(index))))

    def round_updates(self, round_id: int, held: Collection[str] = frozenset()) -> list[RecordedUpdate]:
        rids = [rid.decode() for rid in cast(list[bytes], self.r.lrange(self.keys.round_updates(round_id), 0, -1))]
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            pipe.hmget(self.keys.update(rid), ["header", "payload", "chunked"])
        rows = [
            (rid, parse_update(h), key, c)
            for rid, (h, key, c) in zip(rids, pipe.execute(), strict=True)
            if h is not None  # pruned: gone
        ]
        pipe = self.r.pipeline(transaction=False)
        for rid, _, payload_key, chunked in rows:
            if not chunked and rid not in held:
                pipe.get(payload_key)
        plain = iter(pipe.execute())
        out = []
        for rid, header, payload_key, chunked in rows:
            if rid in held:
                out.append(RecordedUpdate(header, None))
                continue
            # A chunked payload stays in Redis: the round reads it a module at a time (aggregator.blobs).
            payload: Payload | Blob | None = (
                Blob(payload_key.decode(), header.payload.size) if chunked else self._resolve(next(plain))
            )
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
        keys = [k.version, k.fence(lease.round_id), k.lease(lease.round_id), k.unpublished, k.history]
        keys += [k.releases(version), k.round_updates(lease.round_id)]
        keys += [k.round_updates(version), k.round_opened(version)]
        args: list[str | bytes | int] = [
            str(lease.round_id),
            str(lease.token),
            consumed,
            record.model_dump_json(),
            repr(now),
            len(adapters),
        ]
        for key, payload in adapters.items():
            keys += [key, payload.key] if isinstance(payload, Blob) else [key, key]
        args += [b"" if isinstance(payload, Blob) else payload for payload in adapters.values()]
        args += headers
        # Published next: a version that a failover could take back must not reach the clients.
        done = int(self._replicated_call(self._commit, keys, args, f"version {version}", (1,)))
        if done == -1:
            raise TransferGone(f"a staged adapter of version {version} expired before the commit")
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
            out[h.client_id] = StoredRelease(h, bytes(cast(bytes, self._resolve(payload))))
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
            adapters = list(self.r.scan_iter(match=k.adapter_prefix(version) + "*", count=200))
            spilled = self._locations([*payload_keys, *adapters])  # only these hold bytes (or their markers)
            doomed = [*payload_keys, *(k.update(i.decode()) for i in rids), k.releases(version), *adapters]
            # What only an open round needs (its opening time, fence and norms) goes with its payloads.
            doomed += [k.round_norms(version - 1), k.round_opened(version - 1), k.fence(version - 1)]
            self.r.delete(*doomed)
            self._forget(spilled)
            dropped += len(payload_keys)
            self.r.set(k.pruned_below, version + 1)
        if self.payloads is not None and time.monotonic() - self._swept_at >= _SWEEP_EVERY_S:
            self._swept_at = time.monotonic()
            self.sweep_payloads()
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

    def counted(self, client_id: str, update_id: str) -> bool:
        return bool(self.r.sismember(self.keys.seen, record_id(client_id, update_id)))

    def drop_update(self, lease: Lease, client_id: str, update_id: str) -> bool:
        k = self.keys
        rid, round_id = record_id(client_id, update_id), lease.round_id
        for _ in range(_READ_AGAIN):
            payload = cast(bytes | None, self.r.hget(k.update(rid), "payload"))
            # No payload: the update is not recorded; its own payload key (never written) keeps the script simple.
            own = payload.decode() if payload else k.update(rid)
            keys = [k.version, k.fence(round_id), k.round_updates(round_id), k.update(rid), own]
            spilled = self._locations([payload]) if payload else []
            done = int(self._drop_update(keys=keys, args=[str(round_id), str(lease.token), rid]))
            if done == 1:
                self._forget(spilled)
            if done != -1:
                return done == 1
        raise redis.exceptions.ConnectionError(f"update {update_id} changed {_READ_AGAIN} times while dropping it")

    def wipe(self) -> int:
        """Delete every key of this federation (tests and `reset`); returns how many went."""
        deleted = 0
        for batch in self._scan_batches():
            deleted += int(self.r.delete(*batch))
        return deleted + (self.payloads.wipe() if self.payloads is not None else 0)

    def _scan_batches(self) -> list[list[bytes]]:
        keys = list(self.r.scan_iter(match=self.keys.namespace + "*", count=500))
        return [keys[i : i + 500] for i in range(0, len(keys), 500)]
