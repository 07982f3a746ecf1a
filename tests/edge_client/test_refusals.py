"""A client whose update an aggregator refuses is told, in its mailbox: it stops saying why, or, for a refusal
that training again meets (stale), trains again from the newest version. It once waited an hour in silence."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.memory import MemoryRoundStore
from broker.topology import Topology
from broker.transports.memory import MemoryBroker, MemoryTransport
from edge_client.app import build_worker
from edge_client.checkpoint import CheckpointStore
from edge_client.model import tiny_model
from edge_client.worker import UpdateRefused
from schemas.messages import DETAIL_KEY, REASON_KEY, REFUSED_KEY
from tests.edge_client.test_resilience import ServiceThread, _counted, _settings


def _federation(**config: object) -> tuple[MemoryBroker, MemoryRoundStore, ServiceThread]:
    broker, store = MemoryBroker(), MemoryRoundStore()
    settings = AggregatorConfig(federation="f", policy=RoundPolicy(max_updates=1), **config)  # type: ignore[arg-type]
    return broker, store, ServiceThread(AggregatorService(MemoryTransport(broker), store, settings))


def test_a_client_refused_for_its_rank_stops_saying_why_and_forgets_the_update(tmp_path: Path) -> None:
    broker, store, service = _federation(max_rank=8)
    checkpoints = CheckpointStore(tmp_path / "state")
    worker = build_worker(_settings("f", rank=16), MemoryTransport(broker), tiny_model(), checkpoints=checkpoints)
    try:
        with pytest.raises(UpdateRefused) as refused:
            worker.run(1)
        assert refused.value.reason == "rank" and "outside the federation's bounds [1, 8]" in refused.value.detail
        saved = checkpoints.load()
        assert worker.pending is None and (saved is None or saved.pending is None), "a restart must not resend it"
        assert store.refusals() == {"rank": 2} and _counted(store) == []  # its join, and its update
    finally:
        worker.close()
        service.close()
    assert not service.errors


def test_a_stale_client_trains_again_from_the_newest_version_and_is_counted() -> None:
    broker, store, service = _federation(max_staleness=0)
    worker = build_worker(_settings("f"), MemoryTransport(broker), tiny_model())
    other = build_worker(_settings("f", client_id="other"), MemoryTransport(broker), tiny_model())
    try:
        worker.setup()  # it holds version 0 ...
        other.setup()
        other.send(*other.prepare(other.trainer.train()))
        deadline = time.monotonic() + 30
        while store.version() < 1 and time.monotonic() < deadline:  # ... while the federation moves on to 1
            time.sleep(0.05)
        assert store.version() == 1
        assert worker.run(1) == 1
        assert store.refusals() == {"stale": 1}
        [mine] = store.round_updates(1)
        assert mine.header.client_id == "c1" and mine.header.base_version == 1
        assert worker.version == 2
    finally:
        for w in (worker, other):
            w.close()
        service.close()
    assert not service.errors


def test_a_notice_naming_another_update_is_ignored() -> None:
    """Update ids are random, so only the aggregator that refused this client's update can name it: a notice
    naming any other id (an old update's, or one forged under this client's name) changes nothing."""
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    transport.declare(Topology("f").core())
    worker = build_worker(_settings("f"), transport, tiny_model())
    try:
        worker.setup()
        header, data = worker.prepare(worker.trainer.train())
        worker.pending = (header, data, None)
        notice = {REFUSED_KEY: "not-" + header.update_id, REASON_KEY: "rank", DETAIL_KEY: "forged"}
        transport.publish(Topology("f").adapters_exchange, "c1", b"", notice)
        assert worker.wait_for_adapter(timeout_s=1.0, required=False) is None
        assert broker.depth(Topology("f").adapter_queue("c1")) == 0, "read and let go"
        assert worker.pending is not None
    finally:
        worker.close()
