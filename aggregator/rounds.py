"""The round store contract: where updates are recorded exactly once and rounds are committed under a fence."""

from __future__ import annotations

import abc
import enum
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from schemas.messages import AdapterRelease, LoraUpdate, PrivacySpent

# The release stored under this id is the global adapter at the federation's largest rank; joining
# clients get their rank's cut of it. It is never published as is.
GLOBAL_RELEASE = "_global"


def record_id(client_id: str, update_id: str) -> str:
    """What a store keys one update by. Update ids are each client's own namespace: a client that learns
    another's update id cannot get that client's update refused as a replay (or dropped as a duplicate) by
    sending under it first. Neither kind of id may hold "/", so the pair is unambiguous."""
    return f"{client_id}/{update_id}"


def split_record_id(rid: str) -> tuple[str, str]:
    """(client id, update id) of a `record_id` (an id stored before ids were scoped has no client: "")."""
    client_id, _, update_id = rid.rpartition("/")
    return client_id, update_id


class TransferGone(RuntimeError):
    """A chunked payload lost chunks while being read or recorded (it expired meanwhile)."""


class RecordResult(enum.Enum):
    RECORDED = "recorded"
    DUPLICATE = "duplicate"  # a redelivery or a replay: already counted, ack it and move on
    STALE = "stale"  # trained from a version more than max_staleness behind the open round: refused
    FUTURE = "future"  # claims a base version that has not been released yet: refused
    REPLAY = "replay"  # an update id counted already, now with another payload: refused
    CONFLICT = "conflict"  # its facts differ from those the federation pinned (perhaps just now): refused


@dataclass(frozen=True)
class RoundStatus:
    round_id: int  # the open round; committing it produces version round_id + 1
    count: int
    opened_at: float | None  # when its first update arrived (None while empty)


# Payloads that went through the broker in chunks are kept and handed around as a bytearray (assembled
# once, in place) rather than bytes, so a payload of hundreds of MB is never copied to change its type.
Payload = bytes | bytearray


@dataclass(frozen=True)
class RecordedUpdate:
    """A counted update; a chunked one's payload stays in the store (a Blob) until someone reads it."""

    header: LoraUpdate
    payload: Payload | Blob | None  # None: not read, the caller holds it (RoundStore.round_updates `held`)


@dataclass(frozen=True)
class Blob:
    """A payload kept in the store as numbered chunks (too large to be one value: Redis refuses values over
    512 MB, and a Lua script's arguments cost three copies). Only its key travels; `read_blob` assembles it
    and `iter_blob` streams it."""

    key: str
    size: int


class ChunkResult(enum.Enum):
    STORED = "stored"  # kept; chunks are still missing
    DUPLICATE = "duplicate"  # this chunk was kept already (a redelivery); chunks are still missing
    COMPLETE = "complete"  # every chunk is in: assemble, validate and record the update
    RECORDED = "recorded"  # the update was counted already: the chunk is a late duplicate
    REPLAY = "replay"  # the update id was counted already with another payload: refused
    MISMATCH = "mismatch"  # the transfer id was seen with another header or chunking: refused
    BUSY = "busy"  # a new transfer while its client (or the federation) has as many open as allowed: refused


@dataclass(frozen=True)
class ExpiredTransfer:
    """An update whose chunks stopped arriving before it was complete; it was dropped, never counted."""

    update_id: str
    client_id: str
    received: int
    count: int


@dataclass(frozen=True)
class Lease:
    round_id: int
    owner: str
    token: int


@dataclass(frozen=True)
class StoredRelease:
    """What a client is sent: its header and the payload of its rank's cut."""

    header: AdapterRelease
    payload: bytes | Blob


class Participant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    update_id: str
    client_id: str
    rank: int
    lora_alpha: float
    num_samples: int
    base_version: int
    staleness: int
    weight: float


class RoundRecord(BaseModel):
    """The history entry of one committed round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    strategy: str
    participants: list[Participant]
    opened_at: float | None
    closed_at: float
    aggregate_seconds: float
    finalised_by: str
    metrics: dict[str, float] = Field(default_factory=dict)
    # With client-level differential privacy: what the federation has spent, this round included.
    privacy: PrivacySpent | None = None


@dataclass(frozen=True)
class RoundPolicy:
    """Close a round at `max_updates`, or once `deadline_s` has passed since its first update and
    at least `min_updates` have arrived."""

    max_updates: int = 4
    min_updates: int = 1
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_updates <= self.max_updates:
            raise ValueError(f"need 1 ≤ min_updates ≤ max_updates, got {self.min_updates}, {self.max_updates}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")

    def should_close(self, status: RoundStatus, now: float) -> bool:
        if status.count >= self.max_updates:
            return True
        if self.deadline_s is None or status.opened_at is None or status.count < self.min_updates:
            return False
        return now - status.opened_at >= self.deadline_s


class RoundStore(abc.ABC):
    """One federation's rounds. Every mutation is atomic; commits are refused without the newest fence."""

    # Errors that mean "unreachable for now, try again" (a restart, a network blip), not a bad message.
    transient_errors: tuple[type[BaseException], ...] = ()

    @abc.abstractmethod
    def wipe(self) -> int:
        """Delete everything of this federation (tests, demos, `flexlora reset`); returns how many entries went."""

    @abc.abstractmethod
    def version(self) -> int:
        """The newest committed global version (0 before the first round)."""

    @abc.abstractmethod
    def status(self) -> RoundStatus:
        """The open round and how full it is."""

    @abc.abstractmethod
    def record(
        self,
        header: LoraUpdate,
        payload: Payload,
        now: float,
        max_staleness: int | None = None,
        pins: Mapping[str, str] | None = None,
    ) -> RecordResult:
        """Add an update to the open round, at most once per (client id, update id), atomically: a client's own
        id again is a DUPLICATE (a REPLAY with another payload), another client's id is no concern of it. Its
        staleness (open round − base version) is judged in the same step, so a commit cannot slip in between.
        `pins` are the federation facts the update carries (`pin`): in the same step, one that differs from a
        pinned value makes it a CONFLICT, and those unset are set if (and only if) it is recorded, so two
        aggregators recording at once can never pin different facts."""

    def prepare(self, header: LoraUpdate, payload: Payload) -> None:
        """Optional, before `record` of this header and payload, on any thread: do the part of recording that is
        only bytes, so `record` itself is left the quick atomic step (the service prepares the updates waiting
        behind the one it records). The Redis store writes the payload (to the payload store, synced, if there is
        one) and its key now; this default leaves it all to `record`. Preparing changes nothing `status` or
        `round_updates` shows, and an update prepared but never recorded leaves only what an update refused after
        `record` began would (bytes that expire, or that a sweep takes, after a day)."""
        return  # this default keeps the bytes with the round, in `record`

    # --- chunked transfers: an update's chunks may reach different aggregators, in any order, twice ----------
    @abc.abstractmethod
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
        """Keep chunk `index` of `count` of a client's update's payload (whose sha256 is `sha256`; transfers, like
        updates, are keyed by client id and update id). `signature` names
        the header and chunking; a chunk with another signature for the same update is a MISMATCH, one of an
        update counted with another payload a REPLAY. An update that gets no new chunk for `expiry_s` seconds
        is incomplete: `expire_transfers` drops and reports it. With `max_open` (per client, in all), a chunk
        that would open a transfer past either bound is BUSY and nothing is kept."""

    @abc.abstractmethod
    def transfer_payload(self, client_id: str, update_id: str, size: int) -> bytearray | None:
        """The chunks of a complete transfer, assembled in order into one buffer (None if it was dropped)."""

    @abc.abstractmethod
    def record_transfer(
        self,
        header: LoraUpdate,
        now: float,
        max_staleness: int | None = None,
        pins: Mapping[str, str] | None = None,
    ) -> RecordResult:
        """`record` for an update whose chunks are all kept: they become its payload without being copied.
        Raises TransferGone if the chunks were dropped (expired) meanwhile."""

    @abc.abstractmethod
    def drop_transfer(self, client_id: str, update_id: str) -> None:
        """Forget a transfer's chunks (its update was refused)."""

    @abc.abstractmethod
    def expire_transfers(self, now: float) -> list[ExpiredTransfer]:
        """Drop every transfer idle past its expiry; each is returned to exactly one caller, to report."""

    @abc.abstractmethod
    def put_blob(self, name: str, chunks: Iterable[bytes], ttl_s: float) -> Blob:
        """Stage a payload chunk by chunk as `name`, in the federation's namespace (so `wipe` finds it), expiring
        unless a commit adopts it."""

    @abc.abstractmethod
    def read_chunk(self, blob: Blob, index: int) -> bytes | None:
        """One chunk of a stored payload (None past its end or if it is gone)."""

    def iter_blob(self, blob: Blob) -> Iterator[bytes]:
        """A stored payload's chunks in order, one at a time."""
        index = 0
        while (chunk := self.read_chunk(blob, index)) is not None:
            yield chunk
            index += 1

    def read_blob(self, blob: Blob) -> bytearray:
        """A stored payload assembled into one buffer."""
        out = bytearray(blob.size)
        at = 0
        for chunk in self.iter_blob(blob):
            out[at : at + len(chunk)] = chunk
            at += len(chunk)
        if at != blob.size:
            raise TransferGone(f"payload {blob.key} has {at} of its {blob.size} bytes")
        return out

    def payload(self, item: StoredRelease | RecordedUpdate) -> Payload:
        """A release's or an update's payload, assembled if it is kept in chunks."""
        if item.payload is None:
            raise ValueError("this update's payload was not read: its reader holds it (round_updates `held`)")
        return self.read_blob(item.payload) if isinstance(item.payload, Blob) else item.payload

    @abc.abstractmethod
    def round_updates(self, round_id: int, held: Collection[str] = frozenset()) -> list[RecordedUpdate]:
        """The updates recorded in a round, in arrival order (none once the round is pruned). Those whose record id
        is in `held` come back with payload None, unread: the caller holds them (aggregator.held)."""

    @abc.abstractmethod
    def note_norm(self, round_id: int, norm: float) -> None:
        """Remember an accepted update's ‖ΔW‖ in a round (for the median-outlier check)."""

    @abc.abstractmethod
    def norms(self, round_id: int) -> list[float]:
        """The ‖ΔW‖ of the updates noted in a round."""

    @abc.abstractmethod
    def round_update_ids(self, round_id: int) -> list[str]:
        """The ids of the updates a round counted, in arrival order; kept when the round is pruned."""

    @abc.abstractmethod
    def acquire(self, round_id: int, owner: str, ttl_s: float) -> Lease | None:
        """Take the finalising lease of an open round with a fresh fencing token, or None if held."""

    @abc.abstractmethod
    def release_lease(self, lease: Lease) -> None:
        """Give a lease back early (only if it is still this holder's)."""

    @abc.abstractmethod
    def commit(
        self,
        lease: Lease,
        consumed: int,
        releases: Sequence[StoredRelease],
        record: RoundRecord,
        now: float,
    ) -> bool:
        """Atomically, if `lease` carries the round's newest token and the round is still open: advance the
        version, store the releases and the history entry, mark the version unpublished, and move updates
        recorded after the first `consumed` into the next round. False (and no change) otherwise."""

    @abc.abstractmethod
    def releases(self, version: int) -> dict[str, StoredRelease]:
        """Every client's release of a version."""

    @abc.abstractmethod
    def unpublished(self) -> list[int]:
        """Committed versions whose releases are not all confirmed published."""

    @abc.abstractmethod
    def mark_published(self, version: int) -> None: ...

    @abc.abstractmethod
    def claim_publish(self, version: int, owner: str, ttl_s: float) -> bool:
        """Take the right to publish a version's adapters for `ttl_s`, so one aggregator publishes each
        version (another may take over once the claim expires, if the version is still unpublished)."""

    @abc.abstractmethod
    def history(self) -> list[RoundRecord]: ...

    @abc.abstractmethod
    def prune(self, before_version: int) -> int:
        """Drop the update payloads of rounds that built versions before `before_version`, and those versions'
        releases; keep update ids (the exactly-once guard), round membership and history. Returns how many
        updates were dropped. Without this a federation's Redis grows by every round's updates forever."""

    @abc.abstractmethod
    def check_payload_store(self) -> None:
        """Raise PayloadStoreMismatch unless this store keeps payloads where every other aggregator of the
        federation does (a store whose bytes live with its records has nothing to check)."""

    @abc.abstractmethod
    def record_health(self, owner: str, info: str, ttl_s: float) -> None:
        """Say that aggregator `owner` is alive, for `ttl_s` seconds; `info` is a JSON summary."""

    @abc.abstractmethod
    def health(self) -> dict[str, str]:
        """Every live aggregator's latest health info, by owner."""

    @abc.abstractmethod
    def count_refusal(self, reason: str) -> None:
        """Count one message dead-lettered for `reason`, across every aggregator of the federation."""

    @abc.abstractmethod
    def refusals(self) -> dict[str, int]:
        """How many messages were dead-lettered, by reason, since the federation began."""

    @abc.abstractmethod
    def pin(self, name: str, value: str) -> str:
        """Set a federation fact if unset; returns the value in force (the first one set)."""

    @abc.abstractmethod
    def pinned(self, name: str) -> str | None:
        """A federation fact, or None while unset (reading never sets it)."""

    @abc.abstractmethod
    def counted(self, client_id: str, update_id: str) -> bool:
        """Whether this client's update id was counted (recorded in some round; dropped ones stay counted)."""

    @abc.abstractmethod
    def drop_update(self, lease: Lease, client_id: str, update_id: str) -> bool:
        """Take an update out of the leased round, still open (it cannot be aggregated); its id stays counted as
        seen, so a redelivery is not counted again. Fenced like `commit`: only the holder of the round's newest
        token may drop, so a finaliser that lost its lease cannot take an update out of the round another is
        about to commit. False when the round, the update or the lease is no longer there."""
