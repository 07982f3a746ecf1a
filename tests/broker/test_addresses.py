"""Several broker addresses (the nodes of one cluster): a connection takes the first that answers, and says
which user its messages come from at that address."""

from __future__ import annotations

import pytest

from broker.connect import connect
from broker.errors import BrokerError, ConnectionLost
from broker.topology import Topology
from tests.conftest import AMQP_URL
from tests.faults.servers import free_port

DEAD = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"  # nothing listens there


def test_a_dead_first_address_is_skipped_and_the_next_one_serves(federation: str, amqp_cleanup: list[str]) -> None:
    transport = connect(f"{DEAD}, {AMQP_URL}")
    try:
        topology = Topology(federation)
        transport.declare(topology.core())
        assert transport.queue_depth(topology.updates_queue) == 0
        assert transport.user_id == "guest"  # type: ignore[attr-defined]
    finally:
        transport.close()


def test_no_address_answering_is_a_lost_connection_naming_them() -> None:
    with pytest.raises(ConnectionLost):
        connect(f"{DEAD} {DEAD.replace('guest:guest', 'a:b')}")
    with pytest.raises(BrokerError):
        connect(" , ")
