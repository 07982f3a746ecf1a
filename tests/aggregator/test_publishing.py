"""Publishing a version's adapters: the mailboxes declared ahead of the commit, and nothing declared after."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from aggregator.metrics import AggregatorMetrics
from aggregator.publishing import Publisher
from aggregator.stores.memory import MemoryRoundStore
from broker.connect import connect
from broker.topology import QueueSpec, Spec, Topology
from broker.transports.memory import MemoryBroker


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
