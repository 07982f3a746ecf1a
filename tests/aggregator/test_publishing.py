"""Publishing a version's adapters: the mailboxes declared ahead of the commit, and nothing declared after."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from aggregator.metrics import AggregatorMetrics
from aggregator.publishing import Publisher
from aggregator.stores.memory import MemoryRoundStore
from broker.connect import connect
from broker.topology import QueueSpec, Spec, Topology
from broker.transports.memory import MemoryBroker
from tests.aggregator.test_round_store_contract import _record, _release, _update


class _SlowDeclares:
    """A memory transport whose declarations wait for `go` (a broker slow to answer)."""

    def __init__(self) -> None:
        self.inner = connect("memory://", memory=MemoryBroker())
        self.go = threading.Event()
        self.started = threading.Event()
        self.declared: list[str] = []

    def declare(self, specs: Sequence[Spec]) -> None:
        self.started.set()
        self.go.wait(5)
        self.inner.declare(specs)
        self.declared.extend(s.name for s in specs if isinstance(s, QueueSpec))


def test_closing_the_publisher_waits_for_the_mailboxes_it_is_declaring(federation: str) -> None:
    """A declaration still running once the aggregator has left would make the mailboxes again after whoever
    cleans up the federation deleted them (its tests do; so may an operator)."""
    transport = _SlowDeclares()
    topology = Topology(federation)
    publisher = Publisher(
        transport,  # type: ignore[arg-type]
        MemoryRoundStore(),
        topology,
        AggregatorMetrics(federation),
        owner="a1",
        chunk_bytes=1 << 20,
        claim_s=30,
    )
    publisher.declare_ahead(["c1", "c2"])
    assert transport.started.wait(5)
    closing = threading.Thread(target=publisher.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive(), "close() returned while a declaration was still under way"
    transport.go.set()
    closing.join(5)
    assert not closing.is_alive()
    assert topology.adapter_queue("c1") in transport.declared and topology.adapter_queue("c2") in transport.declared


def test_a_version_published_while_another_aggregator_paused_is_not_published_again(federation: str) -> None:
    """B read version 1 as pending, then paused past A's claim while A published it: B, claiming it afterwards,
    once sent every participant a second copy."""
    broker, store, topology = MemoryBroker(), MemoryRoundStore(), Topology(federation)
    connect("memory://", memory=broker).declare(topology.core())

    def publisher(owner: str) -> Publisher:
        transport = connect("memory://", memory=broker)
        return Publisher(
            transport, store, topology, AggregatorMetrics(federation), owner=owner, chunk_bytes=1 << 20, claim_s=0.1
        )

    a, b = publisher("a"), publisher("b")
    store.record(_update("c1", "update-one"), b"x", now=1.0)
    lease = store.acquire(0, "a", ttl_s=30)
    release = _release("c1", 1)
    assert lease is not None and store.commit(lease, 1, [release], _record(1), now=2.0)
    pending = store.unpublished()  # what B's publish_pending read
    a.publish(1, {"c1": release})
    time.sleep(0.2)  # B pauses past A's claim
    for version in pending:
        b.publish(version)
    assert broker.depth(topology.adapter_queue("c1")) == 1
    a.close()
    b.close()
