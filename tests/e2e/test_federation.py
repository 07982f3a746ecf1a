"""End to end: heterogeneous-rank clients and an aggregator, over the real services and the embedded default."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.memory import MemoryRoundStore
from aggregator.stores.redis import RedisRoundStore
from broker.transports.memory import MemoryBroker, MemoryTransport
from edge_client.app import build_worker
from edge_client.model import tiny_model
from edge_client.settings import ClientSettings
from edge_client.worker import EdgeWorker
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.checks import assert_round_matches_dense, dense_update, rabbit_queue_counts

RANKS = (4, 8, 16, 8)
ROUNDS = 2
TRAIN = ("--local-steps", "2", "--batch-size", "4", "--samples-per-task", "8")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexlora.cli", *args]


def _wait(proc: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{' '.join(map(str, proc.args))} did not finish; its log:\n{log.read_text()[-3000:]}")  # type: ignore[arg-type]


@pytest.mark.services
@pytest.mark.slow
def test_federation_over_rabbitmq_and_redis_in_separate_processes(
    federation: str, amqp_cleanup: list[str], tmp_path: Path
) -> None:
    clients = [f"c{i}" for i in range(len(RANKS))]
    amqp_cleanup.extend(f"flexlora.{federation}.adapters.{c}" for c in clients)
    env = {**os.environ, "FLEXLORA_BROKER_URL": AMQP_URL, "FLEXLORA_REDIS_URL": REDIS_URL}
    agg_log = tmp_path / "aggregator.log"
    aggregator = subprocess.Popen(
        _cli("aggregator", "--federation", federation, "--max-updates", str(len(clients))),
        env=env,
        stdout=agg_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    store = RedisRoundStore.from_url(REDIS_URL, federation)
    procs = []
    try:
        for client_id, rank in zip(clients, RANKS, strict=True):
            log = tmp_path / f"{client_id}.log"
            args = _cli("client", "--client-id", client_id, "--federation", federation, "--model", "tiny")
            args += ["--rank", str(rank), "--rounds", str(ROUNDS), "--seed", str(rank), *TRAIN]
            args += ["--state-dir", str(tmp_path / "state" / client_id)]
            procs.append((subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT), log))
        for proc, log in procs:
            assert _wait(proc, 240, log) == 0, log.read_text()[-3000:]
        for (_, log), client_id, rank in zip(procs, clients, RANKS, strict=True):
            text = log.read_text()
            for version in range(1, ROUNDS + 1):
                assert f"{client_id} loaded global version {version} at rank {rank}" in text, text[-2000:]

        assert store.version() == ROUNDS
        history = store.history()
        assert [h.version for h in history] == list(range(1, ROUNDS + 1))
        for record in history:
            assert sorted(p.client_id for p in record.participants) == clients
            assert assert_round_matches_dense(store, record.version) == len(clients)
    finally:
        aggregator.send_signal(signal.SIGTERM)
        assert _wait(aggregator, 30, agg_log) == 0, agg_log.read_text()[-3000:]
        store.wipe()
    # Nothing left behind: every update acked, every adapter taken.
    counts = rabbit_queue_counts(federation)
    assert counts, "the federation's queues should exist"
    assert all(c == (0, 0) for c in counts.values()), counts


def test_same_federation_on_the_embedded_default() -> None:
    broker, store = MemoryBroker(), MemoryRoundStore()
    federation = "embedded"
    service = AggregatorService(
        MemoryTransport(broker),
        store,
        AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=len(RANKS)), fail_fast=True),
    )
    service.setup()
    base = tiny_model()
    workers = []
    for i, rank in enumerate(RANKS):
        settings = ClientSettings(
            client_id=f"c{i}",
            federation=federation,
            model="tiny",
            rank=rank,
            local_steps=2,
            batch_size=4,
            samples_per_task=8,
            seed=rank,
            adapter_timeout_s=60,
        )
        workers.append(build_worker(settings, MemoryTransport(broker), base))
    stop, errors = threading.Event(), []

    def serve() -> None:
        sub = service.subscribe()
        try:
            while not stop.is_set():
                service.step(sub)
        except BaseException as exc:
            errors.append(exc)
        finally:
            sub.close()

    def client(worker: EdgeWorker) -> None:
        try:
            assert worker.run(ROUNDS, stop) == ROUNDS
        except BaseException as exc:
            errors.append(exc)

    agg = threading.Thread(target=serve)
    agg.start()
    threads = [threading.Thread(target=client, args=(w,)) for w in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    stop.set()
    agg.join(timeout=10)
    assert not errors, errors
    assert [w.version for w in workers] == [ROUNDS] * len(RANKS)
    assert store.version() == ROUNDS
    for version in range(1, ROUNDS + 1):
        assert assert_round_matches_dense(store, version) == len(RANKS)
    for w in workers:
        w.close()
    assert all(q.ready == type(q.ready)() for q in broker.queues.values()), "no message left in any queue"


def test_a_client_joining_mid_run_gets_the_newest_global_adapter_at_its_rank_at_once() -> None:
    broker, store = MemoryBroker(), MemoryRoundStore()
    federation = "joining"
    service = AggregatorService(
        MemoryTransport(broker),
        store,
        AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=3), fail_fast=True, global_rank=16),
    )
    service.setup()
    base = tiny_model()

    def worker(client_id: str, rank: int) -> EdgeWorker:
        settings = ClientSettings(
            client_id=client_id,
            federation=federation,
            model="tiny",
            rank=rank,
            local_steps=1,
            batch_size=4,
            samples_per_task=4,
            seed=rank,
        )
        w = build_worker(settings, MemoryTransport(broker), base)
        w.config = dataclasses.replace(w.config, join_wait_s=0.2)
        return w

    stop = threading.Event()
    sub = service.subscribe()

    def serve() -> None:
        while not stop.is_set():
            service.step(sub)

    serving = threading.Thread(target=serve)
    serving.start()
    try:
        early = [worker(f"c{i}", r) for i, r in enumerate((4, 8, 16))]
        threads = [threading.Thread(target=w.run, args=(2,)) for w in early]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert store.version() == 2
        late = worker("late", 8)
        late.config = dataclasses.replace(late.config, join_wait_s=10.0)
        late.setup()
        release = late.join()
        assert release is not None and release.version == 2 and release.rank == 8
        assert late.version == 2
        # Its adapter is the best rank-8 cut of round 2's ΔW, though it never took part.
        got = {k: v.double() for k, v in late.trainer.adapter().items()}
        want = dense_update(store, 2)
        for module, delta in want.items():
            b = got[f"base_model.model.{module}.lora_B.weight"].numpy()
            a = got[f"base_model.model.{module}.lora_A.weight"].numpy()
            u, s, vt = np.linalg.svd(delta, full_matrices=False)
            best = (u[:, :8] * s[:8]) @ vt[:8]
            scale = release.lora_alpha / release.rank
            assert np.linalg.norm(scale * b @ a - best) <= 1e-4 * np.linalg.norm(best)
        assert late.join() is None or late.version == 2, "nothing newer: no second copy"
        for w in [*early, late]:
            w.close()
    finally:
        stop.set()
        serving.join(timeout=10)
        sub.close()
