"""A RabbitMQ cluster of three nodes of the test's own: the federation's quorum queues are replicated on all
three, clients and aggregators are given every node's address, and the node leading the updates queue is
SIGKILLed mid-round. Clients and aggregators connected to it reconnect to another node, re-send what was in
flight under the same ids, and the ledger ends 0 lost, 0 counted twice, 0 unexpected."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import Topology
from tests.conftest import REDIS_URL
from tests.e2e.procs import wait_for
from tests.faults.federation import SyntheticClient, aggregator_group, run_clients, safe_version, start_serving
from tests.faults.ledger import UpdateTap, ledger, settle
from tests.faults.servers import OwnRabbitMQ, ServerUnavailable

pytestmark = [pytest.mark.services, pytest.mark.slow]
AGGREGATOR_ARGS = ("--max-updates", "6", "--round-deadline-s", "1", "--lease-s", "5", "--quiet")


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[OwnRabbitMQ]]:
    try:
        nodes = [OwnRabbitMQ() for _ in range(3)]
    except ServerUnavailable as exc:
        pytest.skip(f"no private RabbitMQ nodes here: {exc}")
    try:
        for node in nodes:
            node.start()
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", nodes[0].node)
            node.ctl("start_app")
        wait_for(
            lambda: all(n.node in nodes[0].ctl("cluster_status", "--formatter", "json") for n in nodes),
            120,
            "three nodes in one cluster",
        )
        yield nodes
    finally:
        for node in reversed(nodes):
            node.close()


def _leader(node: OwnRabbitMQ, queue: str) -> str:
    for line in node.ctl("list_queues", "-q", "--no-table-headers", "name", "leader").splitlines():
        name, _, leader = line.partition("\t")
        if name.strip() == queue:
            return leader.strip()
    raise AssertionError(f"{queue} is not on the cluster")


def test_the_node_leading_the_updates_queue_killed_mid_round(
    federation: str, store: RedisRoundStore, cluster: list[OwnRabbitMQ], tmp_path: Path
) -> None:
    first, doomed, third = cluster
    everyone = ",".join(n.url for n in (doomed, first, third))  # the doomed node first: most connect to it
    topology = Topology(federation)
    with connect(doomed.url) as transport:  # declared there, so the updates queue's leader is that node
        transport.declare(topology.core())
    assert _leader(first, topology.updates_queue) == doomed.node
    tap = UpdateTap(first.url, federation)  # a queue on a node that stays, to see every update routed
    with aggregator_group(federation, tmp_path, everyone, REDIS_URL, *AGGREGATOR_ARGS) as group:
        start_serving(group, store, 2)
        clients = [
            SyntheticClient(everyone, federation, f"c{i}", updates=25, version=safe_version(store), pace_s=0.2, seed=i)
            for i in range(3)
        ]
        for client in clients:
            client.start()
        wait_for(lambda: len(store.r.smembers(store.keys.seen)) >= 15, 120, "15 updates recorded")
        doomed.kill()
        killed_at = time.monotonic()
        wait_for(lambda: _leader(first, topology.updates_queue) != doomed.node, 60, "a new leader elected")
        new_leader_s = round(time.monotonic() - killed_at, 1)
        run_clients(clients, timeout=240)
        settle(tap, store, timeout=120)
        time.sleep(1.0)
        result = ledger(
            "RabbitMQ 3-node cluster, the updates queue's leader SIGKILLed",
            tap,
            store,
            new_leader_s=new_leader_s,
            publishes_in_doubt=sum(c.failed_publishes for c in clients),
        )
    tap.close()
    result.notes["rounds"] = store.version()
    assert sorted(result.published) == sorted(i for c in clients for i in c.confirmed)
    result.assert_clean()
