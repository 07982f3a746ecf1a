"""RabbitMQ and Redis restarted under a running federation (the test's own servers, never the shared ones):
clients and aggregators reconnect, and every update that reached the broker is counted once.

Redis runs with `appendonly yes`, `appendfsync everysec`. Redis writes each command to the append-only
file (the OS page cache) before it replies, and fsyncs once a second; SIGTERM fsyncs and exits, and SIGKILL
loses only what was not yet written, which with everysec is nothing a client got a reply for unless an
fsync stalls for over 2 s. What everysec can lose (≤ 1-2 s of acknowledged writes) is an OS crash or power
cut's page cache, which a process signal does not reproduce: those updates were acked to RabbitMQ after
Redis recorded them, so the ledger would show them lost. Both signals are run; the ledgers say what happened.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import Topology
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.procs import wait_for
from tests.faults.federation import SyntheticClient, aggregator_group, run_clients, safe_version, start_serving
from tests.faults.ledger import UpdateTap, ledger, settle
from tests.faults.servers import OwnRabbitMQ, OwnRedis

pytestmark = [pytest.mark.services, pytest.mark.slow]
AGGREGATOR_ARGS = ("--max-updates", "6", "--round-deadline-s", "1", "--lease-s", "5", "--quiet")


def _recorded(store: RedisRoundStore) -> int:
    try:
        return len(store.r.smembers(store.keys.seen))
    except Exception:  # Redis restarting
        return 0


def _dead_lettered(amqp_url: str, federation: str) -> int:
    with connect(amqp_url) as transport:
        return transport.queue_depth(Topology(federation).dead_letter_queue)


def test_rabbitmq_stopped_and_killed_under_a_running_federation(
    federation: str, store: RedisRoundStore, rabbit_node: OwnRabbitMQ, tmp_path: Path
) -> None:
    url = rabbit_node.url
    tap = UpdateTap(url, federation)
    restarts = []
    with aggregator_group(federation, tmp_path, url, REDIS_URL, *AGGREGATOR_ARGS) as group:
        start_serving(group, store, 2)
        clients = [
            SyntheticClient(url, federation, f"c{i}", updates=30, version=safe_version(store), pace_s=0.2, seed=i * 100)
            for i in range(3)
        ]
        for client in clients:
            client.start()
        for kill, after in ((False, 10), (True, 40)):
            wait_for(lambda n=after: _recorded(store) >= n, 120, f"{after} updates recorded")  # type: ignore[misc]
            restarts.append(round(rabbit_node.restart(kill=kill), 1))
        run_clients(clients, timeout=180)
        settle(tap, store, timeout=120)
        time.sleep(1.0)
        result = ledger(
            "RabbitMQ clean restart, then SIGKILL restart",
            tap,
            store,
            node_start_s=restarts,
            publishes_in_doubt=sum(c.failed_publishes for c in clients),
            dead_lettered=_dead_lettered(url, federation),
        )
    result.notes["rounds"] = store.version()
    assert sorted(result.published) == sorted(i for c in clients for i in c.confirmed)
    result.assert_clean()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_redis_restarted_with_an_append_only_file(
    how: str, federation: str, amqp_cleanup: list[str], redis_server: OwnRedis, tmp_path: Path
) -> None:
    store = RedisRoundStore.from_url(redis_server.url, federation)
    tap = UpdateTap(AMQP_URL, federation)
    amqp_cleanup.append(tap.queue)
    amqp_cleanup.extend(Topology(federation).adapter_queue(f"c{i}") for i in range(3))
    try:
        with aggregator_group(federation, tmp_path, AMQP_URL, redis_server.url, *AGGREGATOR_ARGS) as group:
            start_serving(group, store, 2)
            clients = [
                SyntheticClient(AMQP_URL, federation, f"c{i}", updates=20, version=safe_version(store), pace_s=0.1)
                for i in range(3)
            ]
            for client in clients:
                client.start()
            wait_for(lambda: _recorded(store) >= 15, 90, "15 updates recorded")
            before = _recorded(store)
            redis_server.restart(kill=how == "SIGKILL")
            after = _recorded(store)
            run_clients(clients)
            settle(tap, store, timeout=90)
            time.sleep(1.0)
            result = ledger(
                f"Redis {how} restart (appendfsync everysec)",
                tap,
                store,
                recorded_before_restart=before,
                recorded_after_restart=after,
                dead_lettered=_dead_lettered(AMQP_URL, federation),
            )
    finally:
        tap.close()
    result.notes["rounds"] = store.version()
    result.assert_clean()
