"""The window asynchronous Redis replication leaves open, closed: with `min_replicas`, an update is acked to
RabbitMQ only once a replica holds its record (Redis WAIT). Here the replica is down when the update arrives, so
the record reaches the primary only; the primary then dies before any replica has it, and the replica is
promoted. The update was never acked, so it is redelivered and counted once on the new primary: nothing lost,
nothing twice. (Without the guard the update is acked at once and this scenario loses it.)"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aggregator.config import AggregatorConfig
from aggregator.rounds import RecordResult, RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.redis import NotReplicated, RedisRoundStore
from aggregator.stores.replication import Replication
from broker.connect import connect
from broker.topology import Topology
from edge_client.synthetic import SyntheticShape, publish_update, synthetic_update
from tests.conftest import AMQP_URL
from tests.e2e.procs import wait_for
from tests.edge_client.test_resilience import ServiceThread
from tests.faults.servers import OwnRedis, ServerUnavailable

pytestmark = [pytest.mark.services]
SMALL = SyntheticShape(layers=1, projections=(("self_attn.q_proj", 32, 24),))
WAIT = Replication(replicas=1, timeout_s=0.3)


class Serving(ServiceThread):
    """An aggregator service on its own thread, over the shared RabbitMQ and a given Redis; closing it closes its
    connection, so whatever it held unacked goes back to the queue."""

    def __init__(self, federation: str, store: RedisRoundStore) -> None:
        # The update it cannot make safe is held and retried for store_retry_s before it is requeued: each requeue
        # counts towards the updates queue's delivery limit, so it must not spin through them in the test.
        config = AggregatorConfig(
            federation=federation, policy=RoundPolicy(max_updates=99), poll_s=0.05, store_retry_s=5.0
        )
        super().__init__(AggregatorService(connect(AMQP_URL), store, config))

    def close(self) -> None:
        super().close()
        self.service.transport.close()


@pytest.fixture
def redis_pair(tmp_path: Path) -> Iterator[tuple[OwnRedis, OwnRedis]]:
    try:
        primary = OwnRedis(tmp_path / "primary", appendonly=False)
        primary.start()
    except ServerUnavailable as exc:
        pytest.skip(f"no private Redis here: {exc}")
    replica = OwnRedis(tmp_path / "replica", appendonly=True, replica_of=primary.port)
    replica.start()
    wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up", 30, "the replica in sync")
    yield primary, replica
    replica.close()
    primary.close()


def _counted(store: RedisRoundStore) -> list[str]:
    return [i for r in range(store.version() + 1) for i in store.round_update_ids(r)]


def test_an_update_recorded_on_a_primary_that_dies_before_any_replica_has_it_is_redelivered_and_counted_once(
    federation: str, amqp_cleanup: list[str], redis_pair: tuple[OwnRedis, OwnRedis], tmp_path: Path
) -> None:
    primary, replica = redis_pair
    topology = Topology(federation)
    store = RedisRoundStore.from_url(primary.url, federation, replication=WAIT)
    serving = Serving(federation, store)
    client = connect(AMQP_URL)
    try:
        first, payload = synthetic_update(federation, "c1", 4, 0, shape=SMALL, seed=1)
        publish_update(client, topology, first, payload)
        # Accepted, not only counted: the record script runs before the wait for the replica, so a replica killed
        # as soon as the record shows would leave the first update unsafe too, and both would go back to the queue.
        accepted = serving.service.counters
        wait_for(lambda: accepted["accepted"] == 1, 30, "the first update recorded while the replica is up")

        replica.kill()  # from here on, nothing the primary records reaches a replica
        second, payload = synthetic_update(federation, "c2", 4, 0, shape=SMALL, seed=2)
        publish_update(client, topology, second, payload)
        wait_for(lambda: len(_counted(store)) == 2, 30, "the second update on the primary")
        with pytest.raises(NotReplicated):  # what the service meets each time it tries to make the record safe
            store.record(second, payload, 0.0)
        serving.close()  # the update it could not make safe was never acked: it goes back to the queue
        wait_for(lambda: client.queue_depth(topology.updates_queue) == 1, 30, "the unacked update back in the queue")

        primary.kill()  # the primary dies; the record of the second update dies with it
        replica.replica_of = None
        replica.start()  # its own append-only file: the first update only
        replica.client().replicaof("NO", "ONE")  # promoted
        spare = OwnRedis(tmp_path / "spare", appendonly=False, replica_of=replica.port)
        spare.start()
        try:
            promoted = RedisRoundStore.from_url(replica.url, federation, replication=WAIT)
            assert len(_counted(promoted)) == 1  # the promoted replica never had the second update
            serving = Serving(federation, promoted)
            wait_for(lambda: len(_counted(promoted)) == 2, 60, "the redelivered update recorded on the new primary")
            counted = _counted(promoted)
            assert len(counted) == len(set(counted)) == 2  # each once
            assert any(second.update_id in i for i in counted)
            wait_for(lambda: client.queue_depth(topology.updates_queue) == 0, 30, "nothing left unrecorded")
        finally:
            serving.close()
            spare.close()
    finally:
        client.close()


class EveryCommandItsOwnConnection(redis.ConnectionPool):
    """A pool at its busiest: another thread of the process took the connection the last write went down, so
    every command gets another one."""

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = self.make_connection()
        connection.connect()
        return connection

    def release(self, connection: Any) -> None:
        connection.disconnect()


def test_the_wait_for_a_replica_covers_the_record_even_when_the_pool_hands_out_another_connection(
    federation: str, redis_pair: tuple[OwnRedis, OwnRedis]
) -> None:
    """Redis documents WAIT as covering the writes of the client it is sent by, so the store sends it down the
    record's own connection. (Redis 7.0 here was not seen to answer differently on another connection; this
    pins the guarantee whichever connection the pool hands out.)"""
    primary, replica = redis_pair
    client = redis.Redis(connection_pool=EveryCommandItsOwnConnection.from_url(primary.url))
    store = RedisRoundStore(client, federation, replication=WAIT)
    first, payload = synthetic_update(federation, "c1", 4, 0, shape=SMALL, seed=1)
    assert store.record(first, payload, 0.0) is RecordResult.RECORDED  # the replica is up: made safe, acked next
    second, payload = synthetic_update(federation, "c2", 4, 0, shape=SMALL, seed=2)
    os.kill(replica.pid, signal.SIGSTOP)  # still connected, acknowledging nothing
    try:
        with pytest.raises(NotReplicated):
            store.record(second, payload, 0.0)
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    assert store.record(second, payload, 0.0) is RecordResult.DUPLICATE  # counted once, and safe now
