"""The transport contract every broker implementation fulfils (RabbitMQ, in-memory)."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from broker.topology import Spec
from schemas.messages import DETAIL_KEY, DROPPED_KEY, MAX_HEADERS_BYTES, REASON_KEY

# What a refusal adds to a message's headers is bounded, so a dead-lettered copy never outgrows the broker's
# frame limit (RabbitMQ's default frame_max is 128 KiB and the whole header table must fit in one frame).
MAX_DETAIL_BYTES = 500


def headers_size(headers: Mapping[str, str]) -> int:
    """Roughly the AMQP field-table size of string headers: key, type, length and value bytes."""
    return sum(len(k.encode()) + len(v.encode()) + 6 for k, v in headers.items())


def dead_letter_headers(headers: Mapping[str, str], reason: str, detail: str) -> dict[str, str]:
    """The headers of a message's dead-lettered copy: its own plus the reason and a bounded detail. When that
    would exceed MAX_HEADERS_BYTES, its largest headers are dropped (named under DROPPED_KEY) until it fits:
    the copy must be publishable whatever the original carried, or the refusal itself would fail."""
    added = {REASON_KEY: reason[:64], DETAIL_KEY: detail.encode()[:MAX_DETAIL_BYTES].decode("utf-8", "ignore")}
    kept = {k: v for k, v in headers.items() if k not in added and k != DROPPED_KEY}
    dropped: list[str] = []
    budget = MAX_HEADERS_BYTES - headers_size(added) - 1024  # room for the DROPPED_KEY list itself
    for key in sorted(kept, key=lambda k: len(k.encode()) + len(kept[k].encode()), reverse=True):
        if headers_size(kept) <= budget:
            break
        del kept[key]
        dropped.append(key[:64])
    out = {**kept, **added}
    if dropped:
        out[DROPPED_KEY] = ",".join(dropped)[:900]
    return out


@dataclass(frozen=True)
class Message:
    """A message as a consumer sees it. `redelivered` means some consumer held it before: be idempotent."""

    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    message_id: str | None = None
    routing_key: str = ""
    redelivered: bool = False
    # Set by the broker from the authenticated connection (RabbitMQ validates it), never from the body.
    user_id: str | None = None


class Delivery(abc.ABC):
    """One unacknowledged message. Exactly one of ack / dead_letter / requeue settles it."""

    message: Message

    @abc.abstractmethod
    def ack(self) -> None:
        """Settle the message as done. Call only after its effect is durably recorded."""

    @abc.abstractmethod
    def dead_letter(self, reason: str, detail: str = "") -> None:
        """Move the message to the dead-letter queue with a reason header (confirmed), then ack it."""

    @abc.abstractmethod
    def requeue(self) -> None:
        """Give the message back to the queue for another consumer (e.g. a dependency is down)."""


class Subscription(abc.ABC):
    """Manual-ack consumption of one queue with a prefetch limit; pulled from the caller's thread."""

    @abc.abstractmethod
    def get(self, timeout: float) -> Delivery | None:
        """The next delivery, or None when none arrived within `timeout` seconds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop consuming; unsettled deliveries go back to the queue."""


class Transport(abc.ABC):
    """A connection to a broker. Its methods are safe to call from any thread."""

    @abc.abstractmethod
    def declare(self, specs: Sequence[Spec]) -> None:
        """Declare exchanges, queues and bindings (idempotent)."""

    @abc.abstractmethod
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        message_id: str | None = None,
        bcc: Sequence[str] = (),
    ) -> None:
        """Publish persistently and wait for the broker's confirm; PublishRefused if unroutable or nacked. `bcc`:
        more routing keys the one message also goes to (RabbitMQ's sender-selected distribution: the broker keeps
        one body for every queue it reaches, and no recipient sees the list)."""

    @abc.abstractmethod
    def subscribe(self, queue: str, *, prefetch: int, dead_letter_exchange: str) -> Subscription:
        """Start consuming `queue`; dead_letter() on its deliveries publishes to `dead_letter_exchange`."""

    @abc.abstractmethod
    def delete(self, specs: Sequence[Spec]) -> None:
        """Delete the queues and exchanges among `specs` (bindings go with them), with their messages."""

    @abc.abstractmethod
    def queue_depth(self, queue: str) -> int:
        """Messages ready in `queue` (not counting unacknowledged ones)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; unsettled deliveries go back to their queues."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
