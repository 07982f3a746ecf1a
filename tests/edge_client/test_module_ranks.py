"""Edge clients with ranks per module on the embedded federation: a tiered client trains the pattern with peft,
gets its releases cut per module, a tiered client joining mid-run gets the global cut at its pattern, and a
release at other ranks per module is refused."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.memory import MemoryRoundStore
from broker.transports.memory import MemoryBroker, MemoryTransport
from edge_client.app import build_worker
from edge_client.model import BaseModel, tiny_model
from edge_client.settings import ClientSettings
from edge_client.worker import EdgeWorker
from schemas.errors import SchemaError
from schemas.lora import split_lora
from tests.e2e.checks import assert_round_matches_dense, dense_update

TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")
PATTERN = "q_proj=2,v_proj=2,gate_proj=12,down_proj=12"
WANT = {"q_proj": 2, "v_proj": 2, "gate_proj": 12, "down_proj": 12}


def _worker(broker: MemoryBroker, base: BaseModel, client_id: str, rank: int, pattern: str = "") -> EdgeWorker:
    settings = ClientSettings(
        client_id=client_id,
        federation="tiers",
        model="tiny",
        rank=rank,
        rank_pattern=pattern,  # type: ignore[arg-type]  # text, as from the flag
        target_modules=TARGETS,
        local_steps=1,
        batch_size=4,
        samples_per_task=4,
        seed=rank,
        adapter_timeout_s=60,
    )
    w = build_worker(settings, MemoryTransport(broker), base)
    w.config = dataclasses.replace(w.config, join_wait_s=0.2)
    return w


def _ranks(worker: EdgeWorker) -> dict[str, int]:
    factors = split_lora(worker.trainer.adapter(), rank=worker.request, target_modules=TARGETS)
    return {m: f.A.shape[0] for m, f in factors.items()}


def test_tiered_and_uniform_clients_federate_and_a_tiered_one_joins_mid_run() -> None:
    broker, store = MemoryBroker(), MemoryRoundStore()
    config = AggregatorConfig(federation="tiers", policy=RoundPolicy(max_updates=3), fail_fast=True, global_rank=8)
    service = AggregatorService(MemoryTransport(broker), store, config)
    service.setup()
    base = tiny_model()
    stop, errors = threading.Event(), []
    sub = service.subscribe()

    def serve() -> None:
        try:
            while not stop.is_set():
                service.step(sub)
        except BaseException as exc:
            errors.append(exc)

    serving = threading.Thread(target=serve)
    serving.start()
    try:
        workers = [
            _worker(broker, base, "tiered", 4, PATTERN),
            _worker(broker, base, "u4", 4),
            _worker(broker, base, "u8", 8),
        ]
        assert {m.rsplit(".", 1)[-1]: r for m, r in _ranks(workers[0]).items()} == WANT  # peft built the pattern
        threads = [threading.Thread(target=w.run, args=(2,)) for w in workers]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not errors, errors
        assert [w.version for w in workers] == [2, 2, 2]
        for version in (1, 2):
            assert assert_round_matches_dense(store, version) == 3
        assert store.releases(2)["tiered"].header.rank_pattern == WANT
        assert {m.rsplit(".", 1)[-1]: r for m, r in _ranks(workers[0]).items()} == WANT

        late = _worker(broker, base, "late", 8, "gate_proj=10")
        late.config = dataclasses.replace(late.config, join_wait_s=10.0)
        late.setup()
        release = late.join()
        assert release is not None and release.version == 2 and release.rank_pattern == {"gate_proj": 10}
        got = split_lora(late.trainer.adapter(), rank=late.request, target_modules=TARGETS)
        for module, delta in dense_update(store, 2).items():
            at = release.request.at(module)
            assert got[module].A.shape[0] == (10 if module.endswith("gate_proj") else 8)
            u, s, vt = np.linalg.svd(delta, full_matrices=False)
            best = (u[:, : at.rank] * s[: at.rank]) @ vt[: at.rank]
            mine = (at.alpha / at.rank) * (got[module].B.double().numpy() @ got[module].A.double().numpy())
            assert np.linalg.norm(mine - best) <= 1e-4 * np.linalg.norm(best), module

        # a join above the global cut on some module (12 is the largest any module was cut at) is refused
        greedy = _worker(broker, base, "greedy", 8, "gate_proj=16")
        greedy.setup()
        assert greedy.join() is None and greedy.version == 0

        # a release at other ranks per module than the client trains is refused; the pattern never changes rank
        other = release.model_copy(update={"rank_pattern": {"gate_proj": 12}})
        with pytest.raises(SchemaError, match="this client trains rank 8 \\(gate_proj=10\\)"):
            late._check_release(other)
        with pytest.raises(ValueError, match="rank pattern"):
            late.change_rank(4)
        for w in [*workers, late, greedy]:
            w.close()
    finally:
        stop.set()
        serving.join(timeout=10)
        sub.close()
