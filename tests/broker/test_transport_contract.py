"""One contract, run against every transport: the in-memory twin and the real RabbitMQ."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pika.adapters.utils import io_services_utils

from broker.connect import connect
from broker.errors import BrokerError, DeliveryGone, PublishRefused
from broker.topology import UPDATE_ROUTING_KEY, BindingSpec, ExchangeSpec, QueueSpec, Topology
from broker.transport import Transport
from broker.transports.memory import MemoryBroker
from broker.transports.rabbitmq import PIKA_READ_BYTES, read_in_large_pieces
from schemas.messages import REASON_KEY
from tests.conftest import AMQP_URL

Factory = Callable[..., Transport]


@pytest.fixture(params=["memory", "rabbitmq"])
def transport_factory(request: pytest.FixtureRequest, federation: str) -> Iterator[tuple[Factory, Topology]]:
    opened: list[Transport] = []
    memory = MemoryBroker()

    def factory(heartbeat: int = 30) -> Transport:
        url = "memory://" if request.param == "memory" else AMQP_URL
        transport = connect(url, memory=memory, heartbeat=heartbeat)
        opened.append(transport)
        return transport

    if request.param == "rabbitmq":
        cleanup = request.getfixturevalue("amqp_cleanup")
        cleanup.extend(Topology(federation).adapter_queue(c) for c in ("c1", "c2"))
    topo = Topology(federation, delivery_limit=2)
    yield factory, topo
    for transport in opened:
        transport.close()


@pytest.fixture
def transport(transport_factory: tuple[Factory, Topology]) -> Transport:
    factory, topo = transport_factory
    t = factory()
    t.declare(topo.core())
    return t


@pytest.fixture
def topo(transport_factory: tuple[Factory, Topology]) -> Topology:
    return transport_factory[1]


def _publish_update(t: Transport, topo: Topology, body: bytes, **headers: str) -> None:
    t.publish(topo.updates_exchange, UPDATE_ROUTING_KEY, body, headers, message_id=body.decode(errors="replace"))


def _drain(t: Transport, queue: str, dlx: str, timeout: float = 2.0) -> list[bytes]:
    sub = t.subscribe(queue, prefetch=10, dead_letter_exchange=dlx)
    bodies = []
    while (d := sub.get(timeout)) is not None:
        bodies.append(d.message.body)
        d.ack()
        timeout = 0.5
    sub.close()
    return bodies


def test_publish_consume_ack(transport: Transport, topo: Topology) -> None:
    _publish_update(transport, topo, b"one", hello="world")
    sub = transport.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    delivery = sub.get(5)
    assert delivery is not None
    assert delivery.message.body == b"one"
    assert delivery.message.headers["hello"] == "world"
    assert delivery.message.message_id == "one"
    assert not delivery.message.redelivered
    assert delivery.message.user_id in (None, "guest")
    delivery.ack()
    assert sub.get(0.3) is None
    sub.close()
    assert transport.queue_depth(topo.updates_queue) == 0


def test_large_bodies_of_many_frames_arrive_whole_and_in_order(transport: Transport, topo: Topology) -> None:
    """Bodies of many AMQP frames, of sizes that end mid-frame and mid-read, back to back: what the transport's
    socket reads (PIKA_READ_BYTES at a time, several frames each) must reassemble byte for byte."""
    sizes = [PIKA_READ_BYTES * 3 + 1, 131_072 * 5 - 7, 1, 4_000_000 + 13]
    bodies = [os.urandom(n) for n in sizes]
    for body in bodies:
        transport.publish(topo.updates_exchange, UPDATE_ROUTING_KEY, body, {}, message_id=str(len(body)))
    sub = transport.subscribe(topo.updates_queue, prefetch=4, dead_letter_exchange=topo.dead_letter_exchange)
    got = []
    for _ in bodies:
        delivery = sub.get(10)
        assert delivery is not None
        got.append(delivery.message.body)
        delivery.ack()
    sub.close()
    assert [hashlib.sha256(b).hexdigest() for b in got] == [hashlib.sha256(b).hexdigest() for b in bodies]


def test_pika_reads_the_socket_in_large_pieces() -> None:
    """This pika has the read-size setting the transport raises (a pika upgrade that drops it would bring back
    4 KiB reads, and three times the CPU per byte received: bench/pika_reads.py)."""
    assert io_services_utils._AsyncTransportBase._MAX_RECV_BYTES >= PIKA_READ_BYTES, "set by importing the transport"
    assert read_in_large_pieces()


def test_unroutable_publish_is_refused(transport: Transport, topo: Topology) -> None:
    with pytest.raises(PublishRefused):
        transport.publish(topo.adapters_exchange, "nobody-listens", b"x", {})


def test_dead_letter_carries_reason_and_removes_original(transport: Transport, topo: Topology) -> None:
    _publish_update(transport, topo, b"bad")
    sub = transport.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    delivery = sub.get(5)
    assert delivery is not None
    delivery.dead_letter("schema", "rank: Input should be a valid integer")
    sub.close()
    assert transport.queue_depth(topo.updates_queue) == 0
    dead = transport.subscribe(topo.dead_letter_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    got = dead.get(5)
    assert got is not None
    assert got.message.body == b"bad"
    assert got.message.headers[REASON_KEY] == "schema"
    got.ack()
    dead.close()


def test_unsettled_delivery_comes_back_redelivered(
    transport_factory: tuple[Factory, Topology], transport: Transport, topo: Topology
) -> None:
    _publish_update(transport, topo, b"held")
    first = transport.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    assert first.get(5) is not None
    first.close()  # as if the consumer died holding it
    other = transport_factory[0]()
    second = other.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    again = second.get(5)
    assert again is not None
    assert again.message.body == b"held"
    assert again.message.redelivered
    again.ack()
    second.close()


def test_an_ack_is_settled_before_the_subscription_closes(
    transport_factory: tuple[Factory, Topology], transport: Transport, topo: Topology
) -> None:
    """RabbitMQ's ack is handed to the I/O thread without waiting: it must still go out before the close that
    follows it, or the message would come back to the next consumer."""
    _publish_update(transport, topo, b"done")
    sub = transport.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    got = sub.get(5)
    assert got is not None
    got.ack()
    sub.close()
    other = transport_factory[0]().subscribe(
        topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange
    )
    assert other.get(1.0) is None
    assert transport.queue_depth(topo.updates_queue) == 0
    other.close()


def test_an_ack_is_settled_before_the_connection_closes(
    transport_factory: tuple[Factory, Topology], transport: Transport, topo: Topology
) -> None:
    _publish_update(transport, topo, b"last")
    consumer = transport_factory[0]()
    sub = consumer.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    got = sub.get(5)
    assert got is not None
    got.ack()
    consumer.close()  # a client that acks its last message and leaves
    other = transport.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    assert other.get(2.0) is None  # an unsent ack would have handed it back with the connection
    other.close()


def test_settling_twice_is_refused_at_once_or_at_the_next_get(transport: Transport, topo: Topology) -> None:
    """A consumer learns that its subscription can no longer settle anything (an ack the broker refused closes
    the channel), so it subscribes again instead of waiting on a dead channel for deliveries that never come."""
    _publish_update(transport, topo, b"twice")
    sub = transport.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    got = sub.get(5)
    assert got is not None
    got.ack()
    with pytest.raises(DeliveryGone):
        got.ack()  # the memory twin refuses here; RabbitMQ closes the channel, and the next get says so
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sub.get(0.2)
    sub.close()
    assert transport.queue_depth(topo.updates_queue) == 0  # the connection itself carries on


def test_prefetch_limits_unacked_deliveries(transport: Transport, topo: Topology) -> None:
    for body in (b"a", b"b"):
        _publish_update(transport, topo, body)
    sub = transport.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    first = sub.get(5)
    assert first is not None
    assert sub.get(0.5) is None  # the second waits for the first's ack
    first.ack()
    second = sub.get(5)
    assert second is not None and second.message.body != first.message.body
    second.ack()
    sub.close()


def test_poison_message_is_dead_lettered_past_the_delivery_limit(transport: Transport, topo: Topology) -> None:
    _publish_update(transport, topo, b"poison")
    sub = transport.subscribe(topo.updates_queue, prefetch=1, dead_letter_exchange=topo.dead_letter_exchange)
    for _ in range(topo.delivery_limit + 3):
        delivery = sub.get(3)
        if delivery is None:
            break
        delivery.requeue()
    sub.close()
    dead = _drain(transport, topo.dead_letter_queue, topo.dead_letter_exchange)
    assert dead == [b"poison"]


def test_a_byte_bounded_mailbox_drops_the_oldest_first(transport: Transport, topo: Topology) -> None:
    # The adapter mailbox's semantics (x-max-length-bytes with drop-head), at a bound small enough to test.
    queue = topo.adapter_queue("c1")
    bounded = QueueSpec(queue, {"x-queue-type": "classic", "x-max-length-bytes": 10, "x-overflow": "drop-head"})
    transport.declare([ExchangeSpec(topo.adapters_exchange), bounded, BindingSpec(queue, topo.adapters_exchange, "c1")])
    for body in (b"v1-a", b"v2-b", b"v3-c"):
        transport.publish(topo.adapters_exchange, "c1", body, {})
    assert _drain(transport, queue, topo.dead_letter_exchange) == [b"v2-b", b"v3-c"]


def test_the_mailbox_holds_two_of_the_largest_adapters() -> None:
    from aggregator.settings import AggregatorSettings
    from broker.topology import MAILBOX_MAX_BYTES

    (spec,) = [s for s in Topology("f").client("c1") if isinstance(s, QueueSpec)]
    assert spec.arguments["x-max-length-bytes"] == MAILBOX_MAX_BYTES
    assert AggregatorSettings.model_fields["max_update_bytes"].default * 2 <= MAILBOX_MAX_BYTES


def test_concurrent_publishers_share_one_transport(transport: Transport, topo: Topology) -> None:
    bodies = [f"m{i}".encode() for i in range(40)]

    def send(chunk: list[bytes]) -> None:
        for body in chunk:
            _publish_update(transport, topo, body)

    threads = [threading.Thread(target=send, args=(bodies[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(_drain(transport, topo.updates_queue, topo.dead_letter_exchange)) == sorted(bodies)


def test_connection_survives_a_busy_caller(transport_factory: tuple[Factory, Topology], topo: Topology) -> None:
    # The caller's thread blocks far longer than the heartbeat; the I/O thread must keep the link alive.
    t = transport_factory[0](heartbeat=1)
    t.declare(topo.core())
    time.sleep(4.0)
    _publish_update(t, topo, b"after-sleep")
    assert _drain(t, topo.updates_queue, topo.dead_letter_exchange) == [b"after-sleep"]


def test_delete_removes_queues_with_their_messages(transport: Transport, topo: Topology) -> None:
    transport.declare(topo.client("c2"))
    transport.publish(topo.adapters_exchange, "c2", b"v1", {})
    assert transport.queue_depth(topo.adapter_queue("c2")) == 1
    transport.delete(topo.client("c2"))
    with pytest.raises(BrokerError):
        transport.queue_depth(topo.adapter_queue("c2"))


def test_one_publish_with_bcc_reaches_every_named_mailbox_once_and_none_sees_the_list(
    transport: Transport, topo: Topology
) -> None:
    transport.declare([*topo.client("c1"), *topo.client("c2")])
    transport.publish(topo.adapters_exchange, "c1", b"shared", {"h": "v"}, message_id="cut-1", bcc=["c2", "c1"])
    for client in ("c1", "c2"):
        sub = transport.subscribe(
            topo.adapter_queue(client), prefetch=5, dead_letter_exchange=topo.dead_letter_exchange
        )
        delivery = sub.get(5)
        assert delivery is not None and delivery.message.body == b"shared"
        assert delivery.message.message_id == "cut-1" and dict(delivery.message.headers) == {"h": "v"}
        delivery.ack()
        assert sub.get(0.3) is None  # once, though c1 was named twice
        sub.close()
    with pytest.raises(PublishRefused):  # routed nowhere: refused, as any unroutable publish
        transport.publish(topo.adapters_exchange, "nobody", b"x", {}, bcc=["nobody-either"])
