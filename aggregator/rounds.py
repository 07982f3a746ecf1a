"""The round store contract: where updates are recorded exactly once and rounds are committed under a fence."""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from schemas.messages import AdapterRelease, LoraUpdate

# The release stored under this id is the global adapter at the federation's largest rank; joining
# clients get their rank's cut of it. It is never published as is.
GLOBAL_RELEASE = "_global"


class RecordResult(enum.Enum):
    RECORDED = "recorded"
    DUPLICATE = "duplicate"  # a redelivery or a replay: already counted, ack it and move on
    STALE = "stale"  # trained from a version more than max_staleness behind the open round: refused
    FUTURE = "future"  # claims a base version that has not been released yet: refused


@dataclass(frozen=True)
class RoundStatus:
    round_id: int  # the open round; committing it produces version round_id + 1
    count: int
    opened_at: float | None  # when its first update arrived (None while empty)


@dataclass(frozen=True)
class RecordedUpdate:
    header: LoraUpdate
    payload: bytes


@dataclass(frozen=True)
class Lease:
    round_id: int
    owner: str
    token: int


@dataclass(frozen=True)
class StoredRelease:
    """What a client is sent: its header and the payload of its rank's cut."""

    header: AdapterRelease
    payload: bytes


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

    @abc.abstractmethod
    def version(self) -> int:
        """The newest committed global version (0 before the first round)."""

    @abc.abstractmethod
    def status(self) -> RoundStatus:
        """The open round and how full it is."""

    @abc.abstractmethod
    def record(self, header: LoraUpdate, payload: bytes, now: float, max_staleness: int | None = None) -> RecordResult:
        """Add an update to the open round, at most once per update id, atomically. Its staleness (open
        round − base version) is judged in the same step, so a commit cannot slip in between."""

    @abc.abstractmethod
    def round_updates(self, round_id: int) -> list[RecordedUpdate]:
        """The updates recorded in a round, in arrival order (none once the round is pruned)."""

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
