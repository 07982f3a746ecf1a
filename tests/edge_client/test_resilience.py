"""The edge client through broker outages and restarts: nothing lost, nothing counted twice."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.memory import MemoryRoundStore
from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import Topology
from broker.transport import Transport
from broker.transports.memory import MemoryBroker, MemoryTransport
from edge_client.app import build_worker, run_resilient
from edge_client.checkpoint import CheckpointStore
from edge_client.model import tiny_model
from edge_client.settings import ClientSettings
from edge_client.trainer import TrainResult
from edge_client.worker import EdgeWorker
from schemas.messages import LoraUpdate
from schemas.recipe import DEFAULT_RECIPE
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.checks import assert_round_matches_dense
from tests.e2e.proxy import CuttableProxy


def _settings(federation: str, client_id: str = "c1", rank: int = 4) -> ClientSettings:
    return ClientSettings(
        client_id=client_id,
        federation=federation,
        model="tiny",
        rank=rank,
        local_steps=3,
        batch_size=4,
        samples_per_task=8,
        seed=rank,
        adapter_timeout_s=60,
    )


class ServiceThread:
    def __init__(self, service: AggregatorService) -> None:
        self.service = service
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        service.setup()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sub = self.service.subscribe()
        try:
            while not self.stop.is_set():
                self.service.step(sub)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            sub.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _counted(store: RedisRoundStore | MemoryRoundStore) -> list[str]:
    return [i for r in range(store.version() + 1) for i in store.round_update_ids(r)]


@pytest.fixture
def redis_store(federation: str) -> Iterator[RedisRoundStore]:
    store = RedisRoundStore.from_url(REDIS_URL, federation)
    yield store
    store.wipe()


@pytest.mark.services
@pytest.mark.slow
def test_connection_cut_mid_training_and_mid_round_counts_each_update_once(
    federation: str, amqp_cleanup: list[str], redis_store: RedisRoundStore, tmp_path: Path
) -> None:
    amqp_cleanup.append(Topology(federation).adapter_queue("c1"))
    proxy = CuttableProxy("127.0.0.1", 5672)
    proxy_url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
    aggregator = connect(AMQP_URL)
    service = ServiceThread(
        AggregatorService(
            aggregator, redis_store, AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=1))
        )
    )
    reconnects: list[Transport] = []

    def reconnect() -> Transport:
        transport = connect(proxy_url, heartbeat=2)
        reconnects.append(transport)
        return transport

    worker = build_worker(_settings(federation), connect(proxy_url, heartbeat=2), tiny_model())
    worker.config = dataclasses.replace(worker.config, join_wait_s=0.5)
    # Cut 1: the link dies while the device trains (round 1, second step).
    worker.trainer.on_step = lambda step, _loss: proxy.cut() if step == 1 and worker.rounds_done == 0 else None
    # Cut 2: the link dies right after an update went out and before its adapter came back (round 2).
    send = worker.send

    def send_then_cut(update: LoraUpdate, data: bytes) -> None:
        send(update, data)
        if worker.rounds_done == 1 and proxy.cuts == 1:
            proxy.cut()

    worker.send = send_then_cut  # type: ignore[method-assign]
    try:
        assert run_resilient(worker, reconnect, rounds=2, stop=threading.Event()) == 2
    finally:
        worker.close()
        worker.transport.close()
        for t in reconnects:
            t.close()
        service.close()
        aggregator.close()
        proxy.close()
    assert not service.errors, service.errors
    assert proxy.cuts >= 2 and len(reconnects) >= 2, "both outages happened and were survived"
    counted = _counted(redis_store)
    assert len(counted) == len(set(counted)) == 2, counted
    assert service.service.counters["duplicate"] >= 1, "the re-sent update was recognised, not counted again"
    assert redis_store.version() == 2
    for version in (1, 2):
        assert_round_matches_dense(redis_store, version)


@pytest.mark.services
@pytest.mark.slow
def test_a_30_second_training_step_keeps_a_5_second_heartbeat_connection(
    federation: str, amqp_cleanup: list[str]
) -> None:
    amqp_cleanup.append(Topology(federation).adapter_queue("c1"))
    transport = connect(AMQP_URL, heartbeat=5)
    worker = build_worker(_settings(federation), transport, tiny_model())
    train = worker.trainer.train

    def slow_train(stop: threading.Event | None = None) -> TrainResult:
        time.sleep(30)  # one long step: nothing on this thread talks to the broker meanwhile
        return train(stop)

    worker.trainer.train = slow_train  # type: ignore[method-assign]
    try:
        transport.declare(Topology(federation).core())  # what an aggregator would have declared
        worker.setup()
        header, data = worker.prepare(worker.trainer.train())
        worker.send(header, data)  # would raise ConnectionLost had the broker dropped us
        assert transport.queue_depth(Topology(federation).updates_queue) == 1
    finally:
        worker.close()
        transport.delete(Topology(federation).core())
        transport.close()


def test_a_restarted_device_resends_its_unanswered_update_instead_of_training_anew(tmp_path: Path) -> None:
    broker, store = MemoryBroker(), MemoryRoundStore()
    service = ServiceThread(
        AggregatorService(
            MemoryTransport(broker), store, AggregatorConfig(federation="f", policy=RoundPolicy(max_updates=1))
        )
    )
    base = tiny_model()
    checkpoints = CheckpointStore(tmp_path / "state")
    first = build_worker(_settings("f"), MemoryTransport(broker), base, checkpoints=checkpoints)
    header, data = first.prepare(first.trainer.train())
    checkpoints.save_pending(header, data)  # the device dies right after this
    try:
        second: EdgeWorker = build_worker(_settings("f"), MemoryTransport(broker), base, checkpoints=checkpoints)
        assert second.pending is not None and second.pending[0].update_id == header.update_id
        trained: list[int] = []
        second.trainer.on_step = lambda step, _loss: trained.append(step)
        assert second.run(1) == 1
        assert trained == [], "the pending update was re-sent, not trained again"
        assert _counted(store) == [header.update_id]
        third = build_worker(_settings("f"), MemoryTransport(broker), base, checkpoints=checkpoints)
        assert (third.version, third.rounds_done, third.pending) == (1, 1, None)
        assert all((third.trainer.adapter()[k] == v).all() for k, v in second.trainer.adapter().items()), (
            "the adapter survived the restart"
        )
        for w in (second, third):
            w.close()
    finally:
        service.close()
    assert not service.errors


def test_client_refuses_malformed_or_empty_data_and_resolves_rank_auto(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge_client.datasets import DataError
    from flexlora.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n{"instruction": "c"}\n')
    with pytest.raises(DataError, match=r"(?s)line 2: not valid JSON.*line 3: no output"):
        build_worker(_settings("f").model_copy(update={"data": bad}), MemoryTransport(MemoryBroker()), tiny_model())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = CliRunner().invoke(
        app, ["client", "--client-id", "c1", "--model", "tiny", "--data", str(empty), "--broker-url", "memory://"]
    )
    assert result.exit_code == 2 and "empty" in result.output
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Say yo.", "context": "", "response": "yo"}\n'
    )
    auto = _settings("f").model_copy(update={"data": good, "rank": "auto"})
    worker = build_worker(auto, MemoryTransport(MemoryBroker()), tiny_model())
    assert worker.config.rank == auto.resolved_rank().rank >= 1
    assert worker.config.lora_alpha == DEFAULT_RECIPE.alpha(worker.config.rank)
    assert worker.trainer.num_samples == 2


def test_a_client_asked_to_stop_mid_training_stops_after_that_step_and_publishes_nothing() -> None:
    """SIGTERM or Ctrl-C mid-epoch once let the epoch run to its end and published the update."""
    broker = MemoryBroker()
    settings = _settings("f").model_copy(update={"local_steps": 50})
    transport = MemoryTransport(broker)
    transport.declare(Topology("f").core())
    worker = build_worker(settings, transport, tiny_model())
    before = worker.trainer.adapter()
    stop, steps = threading.Event(), list[int]()

    def on_step(step: int, _loss: float) -> None:
        steps.append(step)
        if step == 2:
            stop.set()  # the signal arrives during step 3

    worker.trainer.on_step = on_step
    assert worker.round(stop) is None
    assert steps == [0, 1, 2], "it stopped after the step under way"
    assert broker.depth(Topology("f").updates_queue) == 0, "nothing was published"
    assert worker.pending is None and worker.rounds_done == 0
    assert all(torch.equal(worker.trainer.adapter()[k], v) for k, v in before.items()), "the part-epoch is undone"
    worker.close()
