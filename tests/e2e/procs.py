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
    """A queue of the test's own bound to the adapters exchange for some clients: counts every adapter
    the aggregators publish (the clients' mailboxes drop their oldest when full, and the clients consume)."""

    def __init__(self, federation: str, clients: list[str]) -> None:
        self.topology = Topology(federation)
        self.queue = f"flexlora.{federation}.test-tap"
        self.transport: Transport = connect(AMQP_URL)
        from broker.topology import BindingSpec, ExchangeSpec, QueueSpec

        specs: list[ExchangeSpec | QueueSpec | BindingSpec] = [
            ExchangeSpec(self.topology.adapters_exchange),
            QueueSpec(self.queue),
        ]
        specs += [BindingSpec(self.queue, self.topology.adapters_exchange, c) for c in clients]
        self.transport.declare(specs)
        self.seen: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def drain(self, timeout: float = 0.5) -> list[tuple[str, int]]:
        from schemas.messages import HEADER_KEY, parse_release

        sub = self.transport.subscribe(
            self.queue, prefetch=100, dead_letter_exchange=self.topology.dead_letter_exchange
        )
        try:
            while (d := sub.get(timeout)) is not None:
                header = parse_release(d.message.headers.get(HEADER_KEY))
                with self._lock:
                    self.seen.append((header.client_id, header.version))
                d.ack()
        finally:
            sub.close()
        return list(self.seen)

    def close(self) -> None:
        from broker.topology import QueueSpec

        self.transport.delete([QueueSpec(self.queue)])
        self.transport.close()
