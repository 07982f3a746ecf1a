"""A device's rank may change from round to round (a schedule, or `auto` measured again before every round):
down, it cuts the global it holds exactly; up, it asks the federation for the global at the new rank, so the new
directions are the global's next singular vectors; the update says the rank it trained at and the adapter it
gets back is cut there."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.joining import global_adapter
from aggregator.rounds import RoundPolicy, RoundStore
from aggregator.service import AggregatorService
from aggregator.status import summarise_all
from aggregator.stores.memory import MemoryRoundStore
from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import Topology
from broker.transport import Transport
from broker.transports.memory import MemoryBroker
from edge_client.app import build_worker
from edge_client.checkpoint import CheckpointStore
from edge_client.model import tiny_model
from edge_client.ranks import AutoRank, FixedRank, RankSchedule, rank_policy
from edge_client.resources import DeviceResources
from edge_client.settings import ClientSettings
from edge_client.worker import EdgeWorker
from schemas.lora import LoraFactors, RankRequest, recut, split_lora
from tests.conftest import AMQP_URL, REDIS_URL
from tests.edge_client.test_resilience import ServiceThread

TARGETS = ("q_proj", "v_proj")


def test_a_schedule_gives_a_rank_per_round_and_holds_its_last() -> None:
    schedule = RankSchedule((4, 8, 2))
    assert [schedule(i).rank for i in range(5)] == [4, 8, 2, 2, 2]
    assert "schedule" in schedule(1).reason
    with pytest.raises(ValueError, match=">= 1"):
        RankSchedule((4, 0))


def test_auto_measures_the_device_again_before_every_round() -> None:
    free = iter([40.0, 6.0, 20.0])
    policy = AutoRank(lambda: DeviceResources(64.0, None, 8, available_gib=next(free)))
    assert [policy(i).rank for i in range(3)] == [64, 8, 32]
    assert isinstance(rank_policy(8), FixedRank) and isinstance(rank_policy("auto"), AutoRank)
    assert rank_policy(8, [4, 16])(1).rank == 16


def test_the_schedule_is_a_setting_and_a_flag_value() -> None:
    settings = ClientSettings(client_id="c", rank_schedule="4, 8,16")  # type: ignore[arg-type]
    assert settings.rank_schedule == (4, 8, 16) and settings.resolved_rank().rank == 4
    with pytest.raises(ValueError, match="schedule"):
        ClientSettings(client_id="c", rank_schedule="4,0")  # type: ignore[arg-type]


@dataclass
class Rig:
    transport: Transport
    store: RoundStore
    service: ServiceThread
    federation: str

    def worker(self, client_id: str, **given: object) -> EdgeWorker:
        settings = ClientSettings(
            client_id=client_id,
            federation=self.federation,
            model="tiny",
            local_steps=2,
            batch_size=4,
            samples_per_task=8,
            adapter_timeout_s=60,
            **given,  # type: ignore[arg-type]
        )
        return build_worker(settings, self.transport, tiny_model())


@pytest.fixture(params=["embedded", "services"])
def rig(request: pytest.FixtureRequest, federation: str) -> Iterator[Rig]:
    if request.param == "embedded":
        memory = MemoryBroker()
        transport, aggregator = connect("memory://", memory=memory), connect("memory://", memory=memory)
        store: RoundStore = MemoryRoundStore()
    else:
        request.getfixturevalue("amqp_cleanup").extend(Topology(federation).adapter_queue(c) for c in ("c1", "c2"))
        transport, aggregator = connect(AMQP_URL), connect(AMQP_URL)
        store = RedisRoundStore.from_url(REDIS_URL, federation)
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=2), poll_s=0.05, global_rank=16)
    service = ServiceThread(AggregatorService(aggregator, store, config))
    yield Rig(transport, store, service, federation)
    service.close()
    transport.close()
    aggregator.close()
    if isinstance(store, RedisRoundStore):
        store.wipe()
    assert not service.errors, service.errors


def _rounds(workers: list[EdgeWorker], rounds: int) -> None:
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(rounds, stop), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(w.rounds_done == rounds for w in workers), [w.rounds_done for w in workers]


def _factors(worker: EdgeWorker) -> dict[str, LoraFactors]:
    return split_lora(worker.trainer.adapter(), rank=worker.rank, target_modules=TARGETS)


def _products(factors: dict[str, LoraFactors], request: RankRequest) -> dict[str, torch.Tensor]:
    scale = request.alpha / request.rank
    return {m: scale * f.B.double() @ f.A.double() for m, f in factors.items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for m in b:
        assert torch.allclose(a[m], b[m], atol=1e-6, rtol=1e-4), m


def test_a_scheduled_client_trains_each_round_at_its_rank_and_gets_its_adapter_there(rig: Rig) -> None:
    grower, steady = rig.worker("c1", rank_schedule=(4, 8, 2)), rig.worker("c2", rank=4)
    _rounds([grower, steady], 3)
    history = rig.store.history()
    ranks = [next(p.rank for p in record.participants if p.client_id == "c1") for record in history]
    assert ranks == [4, 8, 2]
    assert grower.rank == 2 and grower.trainer.adapter()  # the last adapter it got back is at rank 2
    # `flexlora status` and `flexlora history` show each change
    assert [s.rank_changes for s in summarise_all(history)] == [[], ["c1 4→8"], ["c1 8→2"]]


def test_a_device_restarted_after_a_rank_change_resumes_at_the_rank_it_saved(rig: Rig, tmp_path: Path) -> None:
    first = rig.worker("c1", rank_schedule=(4, 8))
    first.checkpoints = CheckpointStore(tmp_path)
    _rounds([first, rig.worker("c2", rank=4)], 2)
    # a new process whose schedule starts at 4 again: the saved adapter is at rank 8
    again = build_worker(
        ClientSettings(client_id="c1", federation=rig.federation, model="tiny", rank_schedule=(4, 8)),
        rig.transport,
        tiny_model(),
        checkpoints=CheckpointStore(tmp_path),
    )
    assert again.rank == 8 and again.version == first.version
    _close(
        _products(_factors(again), RankRequest(8, again.lora_alpha)),
        _products(_factors(first), RankRequest(8, first.lora_alpha)),
    )


def test_growing_starts_from_the_globals_next_directions_and_shrinking_cuts_what_is_held(rig: Rig) -> None:
    one, two = rig.worker("c1", rank=4), rig.worker("c2", rank=4)
    _rounds([one, two], 1)
    version = rig.store.version()
    found = global_adapter(rig.store, version)
    assert found is not None
    top, factors = found
    one.change_rank(8, reason="test")
    want = RankRequest(8, one.lora_alpha)
    assert one.version == version
    _close(_products(_factors(one), want), _products(recut(factors, top, want), want))
    one.change_rank(2, reason="test")
    small = RankRequest(2, one.lora_alpha)
    _close(_products(_factors(one), small), _products(recut(factors, top, small), small))


def test_growing_past_what_the_federation_allows_keeps_the_held_directions_and_trains_new_ones(
    federation: str,
) -> None:
    memory = MemoryBroker()
    config = AggregatorConfig(
        federation=federation, policy=RoundPolicy(max_updates=1), poll_s=0.05, global_rank=4, max_rank=4
    )
    service = ServiceThread(AggregatorService(connect("memory://", memory=memory), MemoryRoundStore(), config))
    try:
        rig = Rig(connect("memory://", memory=memory), MemoryRoundStore(), service, federation)
        worker = rig.worker("c1", rank=4)
        worker.config = dataclasses.replace(worker.config, join_wait_s=1.0)
        _rounds([worker], 1)
        held, before = _factors(worker), RankRequest(4, worker.lora_alpha)
        worker.change_rank(8, reason="test")  # the join at rank 8 is refused (max_rank 4): no answer comes
        grown = _factors(worker)
        _close(_products(grown, RankRequest(8, worker.lora_alpha)), _products(held, before))
        for m, f in held.items():
            assert torch.equal(grown[m].A[:4], f.A)
            assert torch.count_nonzero(grown[m].B[:, 4:]) == 0
            assert torch.count_nonzero(grown[m].A[4:]) > 0  # fresh rows, not zeros: they get gradients
        assert service.errors == []
    finally:
        service.close()
