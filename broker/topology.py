"""Every exchange, queue, binding and argument of a federation, declared in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ExchangeType = Literal["direct", "fanout"]
UPDATE_ROUTING_KEY = "update"
JOIN_ROUTING_KEY = "join"  # join requests share the updates queue, so any aggregator answers them
# The largest update a federation may accept (aggregator setting max_update_bytes) is at most half this:
# a client's adapter is the size of its update, and its mailbox must hold one whole while the next arrives.
MAILBOX_MAX_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: ExchangeType = "direct"


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str


Spec = ExchangeSpec | QueueSpec | BindingSpec


@dataclass(frozen=True)
class Topology:
    """Names and arguments for one federation; several federations can share one vhost."""

    federation: str
    prefix: str = "flexlora"
    # A message that makes consumers die this many times is dead-lettered instead of looping forever.
    delivery_limit: int = 5
    # The dead-letter queue keeps at most this many messages and bytes, dropping the oldest first, so a flood of
    # refused messages cannot fill the broker's disk (RabbitMQ refuses to redeclare a queue with other
    # arguments: an older federation's dead-letter queue must be deleted once, see the README).
    dead_letter_max_length: int = 100_000
    dead_letter_max_bytes: int = 8 * 1024**3

    def _name(self, *parts: str) -> str:
        return ".".join((self.prefix, self.federation, *parts))

    @property
    def updates_exchange(self) -> str:
        return self._name("updates")

    @property
    def updates_queue(self) -> str:
        return self._name("updates")

    @property
    def dead_letter_exchange(self) -> str:
        return self._name("dead-letter")

    @property
    def dead_letter_queue(self) -> str:
        return self._name("dead-letter")

    @property
    def adapters_exchange(self) -> str:
        return self._name("adapters")

    def adapter_queue(self, client_id: str) -> str:
        return self._name("adapters", client_id)

    def client_user(self, client_id: str) -> str:
        """The RabbitMQ user a provisioned client connects as, which the broker stamps as `user_id` on every
        message it publishes ("~" appears in no federation or client id, so the name is unambiguous)."""
        return "~".join((self.prefix, self.federation, client_id))

    def core(self) -> list[Spec]:
        """What the aggregators need: the updates path and the dead-letter path."""
        return [
            ExchangeSpec(self.updates_exchange),
            ExchangeSpec(self.dead_letter_exchange, "fanout"),
            ExchangeSpec(self.adapters_exchange),
            QueueSpec(
                self.updates_queue,
                {
                    "x-queue-type": "quorum",
                    "x-delivery-limit": self.delivery_limit,
                    "x-dead-letter-exchange": self.dead_letter_exchange,
                },
            ),
            QueueSpec(
                self.dead_letter_queue,
                {
                    "x-queue-type": "quorum",
                    "x-max-length": self.dead_letter_max_length,
                    "x-max-length-bytes": self.dead_letter_max_bytes,
                    "x-overflow": "drop-head",
                },
            ),
            BindingSpec(self.updates_queue, self.updates_exchange, UPDATE_ROUTING_KEY),
            BindingSpec(self.updates_queue, self.updates_exchange, JOIN_ROUTING_KEY),
            BindingSpec(self.dead_letter_queue, self.dead_letter_exchange, ""),
        ]

    def client(self, client_id: str) -> list[Spec]:
        """One client's adapter mailbox. A client is sent an adapter only for a round it took part in and on
        joining, so little builds up; the byte bound drops the oldest messages first, and as it is twice the
        largest update, the newest adapter always survives whole even when sent in chunks."""
        queue = self.adapter_queue(client_id)
        arguments: dict[str, str | int] = {
            "x-queue-type": "classic",
            "x-max-length-bytes": MAILBOX_MAX_BYTES,
            "x-overflow": "drop-head",
        }
        return [
            ExchangeSpec(self.adapters_exchange),
            QueueSpec(queue, arguments),
            BindingSpec(queue, self.adapters_exchange, client_id),
        ]
