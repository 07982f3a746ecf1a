"""The ledger every fault scenario ends with: what reached the broker against what committed rounds counted.

`published` is every update id that reached the updates exchange, read from a tap queue of the test's own
bound beside the updates queue (so it also sees what real client processes send, re-sends included).
`counted` is every update id in the committed rounds' history (`RoundRecord.participants`), with repeats.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field

from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.errors import BrokerError
from broker.topology import UPDATE_ROUTING_KEY, BindingSpec, ExchangeSpec, QueueSpec, Topology

# Every scenario's ledger, for the terminal summary (tests/faults/conftest.py prints them).
LEDGERS: list[Ledger] = []


@dataclass
class Ledger:
    scenario: str
    published: set[str]
    counted: list[str]
    copies: int = 0  # messages that reached the broker, re-sends and replays included
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def lost(self) -> set[str]:
        return self.published - set(self.counted)

    @property
    def duplicated(self) -> set[str]:
        return {i for i, n in collections.Counter(self.counted).items() if n > 1}

    @property
    def unexpected(self) -> set[str]:
        return set(self.counted) - self.published

    def summary(self) -> str:
        figures = {
            "published": len(self.published),
            "copies": self.copies,
            "counted": len(self.counted),
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "unexpected": len(self.unexpected),
            **self.notes,
        }
        return f"{self.scenario}: " + json.dumps(figures)

    def assert_clean(self) -> None:
        LEDGERS.append(self)
        print("LEDGER", self.summary())
        assert self.published, "the scenario published nothing"
        assert not self.lost, f"lost {sorted(self.lost)}"
        assert not self.duplicated, f"counted twice {sorted(self.duplicated)}"
        assert not self.unexpected, f"counted but never published {sorted(self.unexpected)}"


def counted_ids(store: RedisRoundStore) -> list[str]:
    return [p.update_id for record in store.history() for p in record.participants]


class UpdateTap:
    """A durable queue of the test's own that gets a copy of every update the updates exchange routes."""

    def __init__(self, amqp_url: str, federation: str) -> None:
        self.amqp_url = amqp_url
        self.topology = Topology(federation)
        self.queue = f"flexlora.{federation}.test-update-tap"
        self.seen: collections.Counter[str] = collections.Counter()
        with connect(amqp_url) as transport:
            transport.declare(
                [
                    *self.topology.core(),
                    QueueSpec(self.queue),
                    BindingSpec(self.queue, self.topology.updates_exchange, UPDATE_ROUTING_KEY),
                    ExchangeSpec(self.topology.adapters_exchange),
                ]
            )

    def drain(self) -> set[str]:
        """Read what arrived since the last drain; returns every distinct update id seen so far."""
        with connect(self.amqp_url) as transport:
            sub = transport.subscribe(self.queue, prefetch=200, dead_letter_exchange=self.topology.dead_letter_exchange)
            while (delivery := sub.get(0.3)) is not None:
                self.seen[delivery.message.message_id or "?"] += 1
                delivery.ack()
            sub.close()
        return set(self.seen)

    def close(self) -> None:
        try:
            with connect(self.amqp_url) as transport:
                transport.delete([QueueSpec(self.queue)])
        except BrokerError:
            pass  # a private node already gone takes the queue with it


def settle(tap: UpdateTap, store: RedisRoundStore, timeout: float, what: str = "every update counted") -> None:
    """Wait until every update that reached the broker is in a committed round (or fail naming the gap)."""
    deadline = time.monotonic() + timeout
    while True:
        published = tap.drain()
        missing = published - set(counted_ids(store))
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {len(missing)} not counted")
        time.sleep(0.5)


def ledger(scenario: str, tap: UpdateTap, store: RedisRoundStore, **notes: object) -> Ledger:
    published = tap.drain()
    return Ledger(scenario, published, counted_ids(store), copies=sum(tap.seen.values()), notes=dict(notes))
