"""The aggregator process's main loop (`run_aggregator`) over the real RabbitMQ and Redis: a broker error of any
kind, not only a lost connection, is logged and followed by a reconnect; the process keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest

from aggregator.app import run_aggregator
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.errors import BrokerError
from broker.topology import UPDATE_ROUTING_KEY, Topology
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.messages import HEADER_KEY, parse_release
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.procs import wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]
SHAPE = SyntheticShape(layers=1, projections=(("self_attn.q_proj", 16, 16),))
CLIENTS = ("honest1", "honest2", "victim")


class Process:
    """`run_aggregator` in a thread, as the process runs it; `error` is what made it return, if anything."""

    def __init__(self, federation: str) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        settings = AggregatorSettings(broker_url=AMQP_URL, redis_url=REDIS_URL, federation=federation, max_updates=2)
        self.thread = threading.Thread(target=self._run, args=(settings,), daemon=True)
        self.thread.start()

    def _run(self, settings: AggregatorSettings) -> None:
        try:
            run_aggregator(settings, self.stop)
        except BaseException as exc:
            self.error = exc

    def alive(self) -> bool:
        assert self.error is None, f"the aggregator process exited: {self.error!r}"
        return self.thread.is_alive()


@pytest.fixture
def federation_run(federation: str, amqp_cleanup: list[str]) -> Iterator[tuple[RedisRoundStore, Callable[..., Any]]]:
    topology = Topology(federation)
    amqp_cleanup.extend(topology.adapter_queue(c) for c in CLIENTS)
    store = RedisRoundStore.from_url(REDIS_URL, federation)
    client = connect(AMQP_URL)
    processes: list[Process] = []

    def round_of(*clients: str) -> Process:
        if not processes:
            processes.append(Process(federation))
            wait_for(lambda: bool(store.health()), timeout=30, what="the aggregator serving")
        base = store.version()
        for n, name in enumerate(clients):
            header, data = synthetic_update(
                federation, name, rank=4, base_version=base, shape=SHAPE, seed=10 * base + n
            )
            client.publish(topology.updates_exchange, UPDATE_ROUTING_KEY, data, {HEADER_KEY: header.model_dump_json()})
        wait_for(lambda: store.version() == base + 1 or not processes[0].alive(), 60, f"version {base + 1}")
        assert processes[0].alive(), "the aggregator process exited"
        return processes[0]

    yield store, round_of
    for process in processes:
        process.stop.set()
        process.thread.join(timeout=30)
    client.close()
    store.wipe()


def test_the_process_survives_a_broker_error_that_is_not_a_lost_connection(
    federation_run: tuple[RedisRoundStore, Callable[..., Process]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, round_of = federation_run
    real = AggregatorService.maybe_finalise
    raised = threading.Event()

    def once(self: AggregatorService) -> object:
        if not raised.is_set():
            raised.set()
            raise BrokerError("channel closed by the broker: 406 PRECONDITION_FAILED")
        return real(self)

    monkeypatch.setattr(AggregatorService, "maybe_finalise", once)
    process = round_of("honest1", "honest2")
    assert raised.is_set() and process.alive()
    round_of("honest1", "honest2")
    assert store.version() == 2


def test_a_mailbox_the_broker_refuses_neither_stops_the_process_nor_the_other_adapters(
    federation: str, federation_run: tuple[RedisRoundStore, Callable[..., Process]]
) -> None:
    """A participant's mailbox declared with other arguments (by hand, an older release) makes the broker close
    the declaring channel; that client is skipped, the others get their adapters, and rounds go on."""
    store, round_of = federation_run
    topology = Topology(federation)
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    conn.channel().queue_declare(topology.adapter_queue("victim"), durable=True)  # no mailbox arguments
    conn.close()
    round_of("honest1", "victim")
    reader = connect(AMQP_URL)
    sub = reader.subscribe(topology.adapter_queue("honest1"), prefetch=1, dead_letter_exchange="")
    try:
        got = sub.get(20.0)
        assert got is not None and parse_release(got.message.headers[HEADER_KEY]).version == 1
        got.ack()
    finally:
        sub.close()
        reader.close()
    wait_for(lambda: store.unpublished() == [], timeout=30, what="version 1 marked published")
    process = round_of("honest1", "honest2")
    assert process.alive() and store.version() == 2
