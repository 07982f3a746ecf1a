"""A small federation for fault scenarios: aggregator processes on given servers and synthetic clients
that behave like edge devices on a lost connection (reconnect, re-send the same update under its id)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.errors import BrokerError
from broker.topology import Topology
from broker.transport import Transport
from edge_client.synthetic import SyntheticShape, publish_update, synthetic_update
from schemas.messages import LoraUpdate
from tests.e2e.procs import Aggregators, aggregators, wait_for

SMALL = SyntheticShape(layers=2, projections=(("self_attn.q_proj", 96, 80),))


@contextmanager
def aggregator_group(federation: str, logs: Path, amqp_url: str, redis_url: str, *args: str) -> Iterator[Aggregators]:
    """tests/e2e/procs.Aggregators pointed at these servers (flags win over its environment)."""
    with aggregators(federation, logs, "--broker-url", amqp_url, "--redis-url", redis_url, *args) as group:
        yield group


def start_serving(group: Aggregators, store: RedisRoundStore, count: int, timeout: float = 90) -> None:
    """Start `count` aggregators and wait until each has reported health (it is consuming then)."""
    before = len(store.health())
    group.start(count)
    wait_for(lambda: len(store.health()) >= before + count, timeout, f"{count} aggregators serving")


def process_of(group: Aggregators, pid: int) -> int:
    return next(i for i, p in enumerate(group.procs) if p.pid == pid)


def signal_process(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)


def safe_version(store: RedisRoundStore) -> Callable[[], int]:
    """The store's version, or the last one read while Redis is away (a device keeps its own version)."""
    last = [0]

    def read() -> int:
        with contextlib.suppress(Exception):  # Redis restarting: a device would not know either
            last[0] = store.version()
        return last[0]

    return read


class SyntheticClient(threading.Thread):
    """Publishes `updates` synthetic updates; on a broker error reconnects with backoff and re-sends the same
    update (same id), as the edge worker does. `confirmed` holds the ids the broker confirmed."""

    def __init__(
        self,
        amqp_url: str,
        federation: str,
        client_id: str,
        *,
        updates: int,
        version: Callable[[], int],
        shape: SyntheticShape = SMALL,
        rank: int = 4,
        pace_s: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(name=f"client-{client_id}", daemon=True)
        self.amqp_url, self.federation, self.client_id = amqp_url, federation, client_id
        self.updates, self.version, self.shape, self.rank = updates, version, shape, rank
        self.pace_s, self.seed = pace_s, seed
        self.topology = Topology(federation)
        self.confirmed: list[str] = []
        self.failed_publishes = 0  # publishes in doubt: the connection went while the update was in flight
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self._transport: Transport | None = None

    def _connect(self) -> Transport:
        delay = 0.2
        while not self.stop.is_set():
            try:
                return connect(self.amqp_url, heartbeat=5, connection_name=self.client_id)
            except BrokerError:
                time.sleep(delay)
                delay = min(1.0, delay * 2)
        raise RuntimeError("stopped")

    def send(self, header: LoraUpdate, payload: bytes) -> None:
        while True:
            if self._transport is None:
                self._transport = self._connect()
            try:
                publish_update(self._transport, self.topology, header, payload)
                return
            except BrokerError:
                self.failed_publishes += 1
                self._transport.close()
                self._transport = None

    def run(self) -> None:
        rng = random.Random(self.seed)
        try:
            for n in range(self.updates):
                if self.stop.is_set():
                    return
                header, payload = synthetic_update(
                    self.federation, self.client_id, self.rank, self.version(), shape=self.shape, seed=self.seed + n
                )
                self.send(header, payload)
                self.confirmed.append(header.update_id)
                time.sleep(self.pace_s * rng.uniform(0.5, 1.5))
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            if self._transport is not None:
                self._transport.close()


def run_clients(clients: list[SyntheticClient], timeout: float = 180) -> None:
    """Wait for every client to finish; re-raise the first error one had."""
    deadline = time.monotonic() + timeout
    for client in clients:
        client.join(max(0.1, deadline - time.monotonic()))
    alive = [c.client_id for c in clients if c.is_alive()]
    for client in clients:
        client.stop.set()
    assert not alive, f"clients still publishing after {timeout:.0f}s: {alive}"
    for client in clients:
        if client.errors:
            raise client.errors[0]
