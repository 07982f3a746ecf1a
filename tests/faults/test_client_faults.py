"""Client-side faults: the TCP link cut mid-publish, a device process SIGKILLed mid-training and while its
update awaits an answer (then restarted from its checkpoint), and the same update delivered twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import Topology
from edge_client.checkpoint import PENDING_HEADER, STATE_FILE
from edge_client.synthetic import SyntheticShape, publish_update, synthetic_update
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.procs import wait_for
from tests.e2e.proxy import CuttableProxy
from tests.faults.federation import SyntheticClient, aggregator_group, run_clients, safe_version, start_serving
from tests.faults.ledger import UpdateTap, ledger, settle

pytestmark = [pytest.mark.services, pytest.mark.slow]
# About 0.6 MB per update, so a publish spans many TCP segments and a cut lands inside one.
BULKY = SyntheticShape(layers=8, projections=(("self_attn.q_proj", 576, 576),))


def test_a_clients_connection_cut_mid_publish(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, tmp_path: Path
) -> None:
    amqp_cleanup.extend(Topology(federation).adapter_queue(f"c{i}") for i in range(3))
    tap = UpdateTap(AMQP_URL, federation)
    amqp_cleanup.append(tap.queue)
    proxy = CuttableProxy("127.0.0.1", int(AMQP_URL.rsplit(":", 1)[1].split("/")[0]))
    via_proxy = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
    done = threading.Event()

    def cutter() -> None:
        while not done.wait(0.15):
            proxy.cut()

    args = ("--max-updates", "6", "--round-deadline-s", "1", "--lease-s", "5", "--quiet")
    try:
        with aggregator_group(federation, tmp_path, AMQP_URL, REDIS_URL, *args) as group:
            start_serving(group, store, 1)
            clients = [
                SyntheticClient(
                    via_proxy, federation, f"c{i}", updates=8, version=safe_version(store), shape=BULKY, pace_s=0.05
                )
                for i in range(3)
            ]
            for client in clients:
                client.start()
            threading.Thread(target=cutter, daemon=True).start()
            run_clients(clients)
            done.set()
            settle(tap, store, timeout=90)
            time.sleep(1.0)
            result = ledger(
                "client TCP link cut mid-publish",
                tap,
                store,
                cuts=proxy.cuts,
                publishes_in_doubt=sum(c.failed_publishes for c in clients),
            )
    finally:
        done.set()
        proxy.close()
        tap.close()
    assert result.notes["publishes_in_doubt"], "no cut landed on a publish; the scenario did not happen"
    assert sorted(result.published) == sorted(i for c in clients for i in c.confirmed)
    result.assert_clean()


def _client(federation: str, client_id: str, state: Path, steps: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "flexlora.cli", "client", "--client-id", client_id, "--federation", federation]
    cmd += ["--model", "tiny", "--rank", "4", "--local-steps", str(steps), "--batch-size", "4", "--rounds", "3"]
    cmd += ["--samples-per-task", "8", "--state-dir", str(state), "--broker-url", AMQP_URL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _state(directory: Path) -> tuple[int, bool]:
    """(global version held, an update awaiting its answer) from a client's checkpoint folder."""
    try:
        version = int(json.loads((directory / STATE_FILE).read_text())["version"])
    except (OSError, ValueError, KeyError):
        version = 0
    return version, (directory / PENDING_HEADER).exists()


def test_a_client_killed_mid_training_and_while_waiting_resumes_from_its_checkpoint(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, tmp_path: Path
) -> None:
    amqp_cleanup.extend(Topology(federation).adapter_queue(c) for c in ("fast", "slow"))
    tap = UpdateTap(AMQP_URL, federation)
    amqp_cleanup.append(tap.queue)
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    # Rounds of two: the fast client's update waits for the slow one's, a window to kill it in.
    args = ("--max-updates", "2", "--quiet")
    kills = []
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        with aggregator_group(federation, tmp_path, AMQP_URL, REDIS_URL, *args) as group:
            start_serving(group, store, 1)
            procs["fast"] = _client(federation, "fast", fast, 4, tmp_path / "fast.log")
            procs["slow"] = _client(federation, "slow", slow, 16, tmp_path / "slow.log")
            # 1: mid-training. Round 1 is done and nothing is pending: it is training its round-2 update.
            wait_for(lambda: _state(fast) == (1, False), 180, "the fast client training round 2", every=0.01)
            # The slow client, which just got version 1 too, is held before it can send its round-2 update, so
            # the fast client's round-2 update waits for it however long the restart takes.
            procs["slow"].send_signal(signal.SIGSTOP)
            procs["fast"].send_signal(signal.SIGKILL)
            procs["fast"].wait()
            kills.append(_state(fast))
            procs["fast"] = _client(federation, "fast", fast, 4, tmp_path / "fast.log")
            # 2: its round-2 update sent and checkpointed, its adapter not yet come.
            wait_for(lambda: _state(fast) == (1, True), 180, "the fast client's pending update", every=0.05)
            procs["fast"].send_signal(signal.SIGKILL)
            procs["fast"].wait()
            kills.append(_state(fast))
            procs["fast"] = _client(federation, "fast", fast, 4, tmp_path / "fast.log")
            procs["slow"].send_signal(signal.SIGCONT)
            for name, proc in procs.items():
                assert proc.wait(timeout=240) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
            settle(tap, store, timeout=60)
            time.sleep(1.0)
            result = ledger("client SIGKILLed mid-training and while waiting", tap, store, kills_at=kills)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        tap.close()
    result.notes["rounds"] = store.version()
    assert _state(fast) == _state(slow) == (3, False), "both finished 3 rounds, resumed from their checkpoints"
    assert result.copies > len(result.published), "the pending update was re-sent after the restart"
    result.assert_clean()


def test_the_same_update_delivered_twice_is_counted_once(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, tmp_path: Path
) -> None:
    amqp_cleanup.extend(Topology(federation).adapter_queue(f"c{i}") for i in range(4))
    tap = UpdateTap(AMQP_URL, federation)
    amqp_cleanup.append(tap.queue)
    topology = Topology(federation)
    updates = [synthetic_update(federation, f"c{i}", 4, 0, seed=i, shape=BULKY) for i in range(4)]
    try:
        with aggregator_group(federation, tmp_path, AMQP_URL, REDIS_URL, "--max-updates", "2", "--quiet") as group:
            with connect(AMQP_URL) as transport:
                # Before any aggregator runs, so both copies wait in the queue together.
                for header, payload in (updates[0], updates[0], updates[1]):
                    publish_update(transport, topology, header, payload)
                start_serving(group, store, 1)
                wait_for(lambda: store.version() == 1, 60, "round 1")
                # A replay after its round was committed, then a new round.
                for header, payload in (updates[0], updates[2], updates[2], updates[3]):
                    publish_update(transport, topology, header, payload)
            settle(tap, store, timeout=60)
            time.sleep(1.0)
            result = ledger("same update delivered twice", tap, store)
    finally:
        tap.close()
    result.notes["rounds"] = store.version()
    assert result.copies == 7 and len(result.published) == 4
    assert store.version() == 2
    result.assert_clean()
