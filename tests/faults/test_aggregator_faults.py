"""Aggregator processes SIGKILLed while ingesting or aggregating, or SIGSTOPped past their lease: every
update that reached the broker is counted once, in some committed round, by the survivors."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from aggregator.stores.redis import SPILLED, RedisRoundStore
from broker.connect import connect
from broker.topology import Topology
from edge_client.synthetic import SyntheticShape, publish_update, synthetic_update
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.procs import wait_for
from tests.faults.federation import (
    SyntheticClient,
    aggregator_group,
    process_of,
    run_clients,
    safe_version,
    signal_process,
    start_serving,
)
from tests.faults.ledger import UpdateTap, ledger, settle

pytestmark = [pytest.mark.services, pytest.mark.slow]
# Heavy enough that aggregating a round takes well over the polling interval, so a signal lands inside it.
HEAVY = SyntheticShape(layers=20, projections=(("self_attn.q_proj", 512, 512), ("self_attn.v_proj", 128, 512)))


def _counted(store: RedisRoundStore, name: str) -> int:
    """A counter summed over the live aggregators' health."""
    return sum(json.loads(info)["counters"].get(name, 0) for info in store.health().values())


def _duplicates_seen(store: RedisRoundStore) -> int:
    return _counted(store, "duplicate")


def test_sigkill_an_aggregator_while_it_ingests(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, tmp_path: Path
) -> None:
    tap = UpdateTap(AMQP_URL, federation)
    amqp_cleanup.append(tap.queue)
    amqp_cleanup.extend(Topology(federation).adapter_queue(f"c{i}") for i in range(4))
    # A short lease: the kill may land while the victim finalises a round, which then waits out its lease.
    args = ("--max-updates", "6", "--round-deadline-s", "1", "--prefetch", "16", "--lease-s", "5", "--quiet")
    try:
        with aggregator_group(federation, tmp_path, AMQP_URL, REDIS_URL, *args) as group:
            start_serving(group, store, 2)
            clients = [
                SyntheticClient(AMQP_URL, federation, f"c{i}", updates=15, version=safe_version(store), pace_s=0.05)
                for i in range(4)
            ]
            for client in clients:
                client.start()
            wait_for(lambda: len(store.r.smembers(store.keys.seen)) >= 12, 90, "a dozen updates recorded")
            group.procs[0].send_signal(signal.SIGKILL)  # with deliveries prefetched and unacked
            killed_at = store.version()
            start_serving(group, store, 1)
            run_clients(clients)
            settle(tap, store, timeout=90)
            time.sleep(1.0)  # anything counted twice would have been committed by now
            duplicates = _duplicates_seen(store)
            # The survivors' finalisers: updates they held decoded, and those read back from Redis (the victim's).
            held, read_back = _counted(store, "round_updates_held"), _counted(store, "round_updates_read_back")
        result = ledger("aggregator SIGKILLed while ingesting", tap, store, killed_at_version=killed_at)
    finally:
        tap.close()
    result.notes.update(rounds=store.version(), redelivered_duplicates=duplicates, held=held, read_back=read_back)
    result.assert_clean()


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_finaliser_killed_or_paused_past_its_lease_mid_aggregation(
    fault: str, federation: str, amqp_cleanup: list[str], store: RedisRoundStore, tmp_path: Path
) -> None:
    clients = [f"c{i}" for i in range(6)]
    tap = UpdateTap(AMQP_URL, federation)
    amqp_cleanup.append(tap.queue)
    amqp_cleanup.extend(Topology(federation).adapter_queue(c) for c in clients)
    lease_s = 4.0
    args = ("--max-updates", str(len(clients)), "--lease-s", str(lease_s), "--round-deadline-s", "2")
    try:
        with aggregator_group(federation, tmp_path, AMQP_URL, REDIS_URL, *args) as group:
            start_serving(group, store, 2)
            with connect(AMQP_URL) as transport:
                for i, client in enumerate(clients):
                    header, payload = synthetic_update(federation, client, 16, 0, shape=HEAVY, seed=i)
                    publish_update(transport, Topology(federation), header, payload)
            lease_key = store.keys.lease(0)
            wait_for(lambda: store.r.get(lease_key) is not None, 60, "a finaliser's lease", every=0.005)
            holder = store.r.get(lease_key)
            assert isinstance(holder, bytes)
            pid = int(holder.decode().rsplit("|", 1)[0].split(":")[1])  # host:pid:nonce|token
            signal_process(pid, signal.Signals[fault])
            assert store.version() == 0, "the round must still be open when the finaliser is hit"
            wait_for(lambda: store.version() == 1, lease_s + 60, "another aggregator's commit")
            if fault == "SIGSTOP":
                signal_process(pid, signal.SIGCONT)
                paused = process_of(group, pid)
                wait_for(lambda: "lease lost" in group.log(paused), 60, "the paused finaliser's commit refused")
            # A second round over the survivors, so the ledger also covers ingesting after the fault.
            with connect(AMQP_URL) as transport:
                for i, client in enumerate(clients[:2]):
                    header, payload = synthetic_update(federation, client, 4, 1, shape=HEAVY, seed=100 + i)
                    publish_update(transport, Topology(federation), header, payload)
            settle(tap, store, timeout=90)
            time.sleep(1.0)
        result = ledger(f"finaliser {fault} mid-aggregation", tap, store, rounds=store.version())
    finally:
        tap.close()
    assert [h.version for h in store.history()] == [1, 2], "each round committed exactly once"
    result.assert_clean()


def _health(store: RedisRoundStore) -> dict[int, dict[str, object]]:
    """Each live aggregator's health info, by pid."""
    return {int(info["pid"]): info for info in map(json.loads, store.health().values())}


def test_sigkill_an_aggregator_holding_a_partial_sum(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, tmp_path: Path
) -> None:
    """Two aggregators fold what each records into the open round's sum (aggregator.folding), the bytes kept in
    a file payload store, not in Redis. The one holding the larger sum is SIGKILLed mid-round: its sum is gone,
    its updates are not: the survivor reads them back from the payload store and counts every one once."""
    clients = [f"c{i}" for i in range(8)]
    tap = UpdateTap(AMQP_URL, federation)
    amqp_cleanup.append(tap.queue)
    amqp_cleanup.extend(Topology(federation).adapter_queue(c) for c in clients)
    payloads = f"file://{tmp_path / 'payloads'}"
    # Rank 64 over 8 updates reaches min(d) of every HEAVY module: each aggregator folds what it records.
    args = ("--max-updates", str(len(clients)), "--prefetch", "1", "--payload-store", payloads, "--quiet")
    try:
        with aggregator_group(federation, tmp_path, AMQP_URL, REDIS_URL, *args) as group:
            start_serving(group, store, 2)
            with connect(AMQP_URL) as transport:
                for i, client in enumerate(clients[:5]):
                    header, payload = synthetic_update(federation, client, 64, 0, shape=HEAVY, seed=i)
                    publish_update(transport, Topology(federation), header, payload)

            def folds() -> dict[int, int]:
                found = {}
                for pid, info in _health(store).items():
                    fold = info.get("fold")
                    found[pid] = int(fold["updates"]) if isinstance(fold, dict) and fold["round"] == 0 else 0
                return found

            wait_for(lambda: sum(folds().values()) == 5 and len(folds()) == 2, 90, "five updates folded", every=0.1)
            victim, holding = max(folds().items(), key=lambda kv: kv[1])
            assert holding >= 1 and store.version() == 0, "the victim holds a partial sum of the open round"
            signal_process(victim, signal.SIGKILL)
            with connect(AMQP_URL) as transport:
                for i, client in enumerate(clients[5:], start=5):
                    header, payload = synthetic_update(federation, client, 64, 0, shape=HEAVY, seed=i)
                    publish_update(transport, Topology(federation), header, payload)
            wait_for(lambda: store.version() == 1, 120, "the survivor's commit")
            settle(tap, store, timeout=90)
            time.sleep(1.0)

            def survivor_counters() -> dict[str, int]:
                [info] = [info for pid, info in _health(store).items() if pid != victim]  # the victim's expires
                counters = info["counters"]
                assert isinstance(counters, dict)
                return counters

            wait_for(lambda: survivor_counters().get("rounds", 0) >= 1, 30, "the survivor's health after its commit")
            counters = survivor_counters()
        result = ledger("aggregator SIGKILLed holding a partial sum", tap, store, victim_folded=holding)
    finally:
        tap.close()
    [record] = store.history()
    assert len(record.participants) == len(clients), "the round counts every update, the victim's included"
    assert counters.get("round_updates_read_back", 0) >= holding, "the victim's updates were read back"
    assert counters.get("round_updates_folded", 0) == len(clients) - counters.get("round_updates_read_back", 0)
    spilled = list(store.r.scan_iter(match=store.keys.namespace + "update:*:payload:*", count=1000))
    assert len(spilled) == len(clients), "every payload recorded once"
    assert all(store.r.getrange(k, 0, len(SPILLED) - 1) == SPILLED for k in spilled), "Redis holds markers only"
    result.notes.update(survivor_counters={k: v for k, v in counters.items() if k.startswith("round_updates")})
    result.assert_clean()
