"""Helpers for tests that run aggregators as real processes against the real RabbitMQ and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from broker.connect import connect
from broker.topology import Topology
from broker.transport import Transport
from tests.conftest import AMQP_URL, REDIS_URL


@dataclass
class Aggregators:
    """Aggregator processes of one federation; each logs to its own file."""

    federation: str
    logs: Path
    args: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, count: int = 1) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(count):
            log = self.logs / f"aggregator-{len(self.procs)}.log"
            cmd = [sys.executable, "-m", "flexlora.cli", "aggregator", "--federation", self.federation, *self.args]
            env = {**os.environ, "FLEXLORA_BROKER_URL": AMQP_URL, "FLEXLORA_REDIS_URL": REDIS_URL}
            proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
            self.procs.append(proc)
            started.append(proc)
        return started

    def log(self, index: int) -> str:
        return (self.logs / f"aggregator-{index}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def aggregators(federation: str, logs: Path, *args: str) -> Iterator[Aggregators]:
    group = Aggregators(federation, logs, list(args))
    try:
        yield group
    finally:
        group.stop_all()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll until `condition` holds; returns the seconds it took. Fails the test with `what` on timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


class AdapterTap:
    """Queues of the test's own, one per client, bound to the adapters exchange as that client's mailbox is:
    counts every adapter that reaches each client (the clients' mailboxes drop their oldest when full, and the
    clients consume). A release shared by several clients reaches each of their taps once."""

    def __init__(self, federation: str, clients: list[str]) -> None:
        from broker.topology import BindingSpec, ExchangeSpec, QueueSpec

        self.topology = Topology(federation)
        self.queues = {c: f"flexlora.{federation}.test-tap.{c}" for c in clients}
        self.transport: Transport = connect(AMQP_URL)
        specs: list[ExchangeSpec | QueueSpec | BindingSpec] = [ExchangeSpec(self.topology.adapters_exchange)]
        for client, queue in self.queues.items():
            specs += [QueueSpec(queue), BindingSpec(queue, self.topology.adapters_exchange, client)]
        self.transport.declare(specs)
        self.seen: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def drain(self, timeout: float = 0.5) -> list[tuple[str, int]]:
        """(client, version) for every adapter that reached a client so far; each must be addressed to that
        client or shared."""
        from schemas.messages import HEADER_KEY, SHARED_RELEASE, parse_release

        for client, queue in self.queues.items():
            sub = self.transport.subscribe(queue, prefetch=100, dead_letter_exchange=self.topology.dead_letter_exchange)
            try:
                while (d := sub.get(timeout)) is not None:
                    header = parse_release(d.message.headers.get(HEADER_KEY))
                    assert header.client_id in (client, SHARED_RELEASE), f"{client} got {header.client_id}'s adapter"
                    with self._lock:
                        self.seen.append((client, header.version))
                    d.ack()
            finally:
                sub.close()
        return list(self.seen)

    def close(self) -> None:
        from broker.topology import QueueSpec

        self.transport.delete([QueueSpec(q) for q in self.queues.values()])
        self.transport.close()
