"""Where an experiment's rounds are aggregated: the real aggregator service (embedded, or over RabbitMQ and
Redis; the same code) or, for FLoRA and quick math-only runs, the strategy called directly."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import IO, Protocol

from aggregator.config import AggregatorConfig
from aggregator.flexlora import ClientAdapter, RankRequest, recut
from aggregator.lowrank import SvdMode
from aggregator.payloads import open_payloads
from aggregator.planning import PLAIN_STEP, Private, RoundInput, ServerStep, aggregate_round
from aggregator.registry import strategy_spec
from aggregator.rounds import RoundPolicy, RoundRecord, StoredRelease
from aggregator.service import AggregatorService
from aggregator.stores import open_store
from aggregator.strategies import get_strategy, get_weighting
from broker.connect import connect
from broker.topology import QueueSpec, Topology
from broker.transport import Transport
from broker.transports.memory import MemoryBroker
from edge_client.synthetic import publish_update
from schemas.lora import LoraFactors, split_lora
from schemas.messages import HEADER_KEY, SHARED_RELEASE, LoraUpdate, parse_release
from schemas.recipe import DEFAULT_RECIPE
from schemas.settings import ENV_PREFIX
from schemas.tensors import decode_tensors

Factors = dict[str, LoraFactors]


@dataclass(frozen=True)
class RoundOutput:
    """A committed round: the largest-rank adapter released (every smaller release is its exact cut, for
    FlexLoRA by nested SVD truncation, for HetLoRA by truncation, for FedIT there is one rank)."""

    version: int
    top: RankRequest
    factors: Factors
    merge_into_base: bool = False  # FLoRA: merge `factors` into the base and start a fresh LoRA
    aggregate_seconds: float = 0.0
    participants: int = 0
    record: RoundRecord | None = None

    def cut(self, rank: int, alpha: float) -> Factors:
        """The global adapter at a client's rank and alpha (zero-padded above the released rank)."""
        return recut(self.factors, self.top, RankRequest(rank, alpha))


class Federation(Protocol):
    """Takes a round's updates (as a client sends them) and returns the committed round."""

    name: str

    def submit(self, header: LoraUpdate, payload: bytes) -> None: ...

    def close_round(self, timeout_s: float = 600.0) -> RoundOutput: ...

    def close(self) -> None: ...


def _decode(header: LoraUpdate, payload: bytes) -> Factors:
    return split_lora(
        decode_tensors(payload, header.payload), rank=header.request, target_modules=header.target_modules
    )


@dataclass
class DirectFederation:
    """The strategy called in-process on the round's updates: the service's round step (aggregator.planning)
    without the broker and the store."""

    strategy: str
    global_rank: int
    step: ServerStep = PLAIN_STEP
    privacy: Private | None = None
    name: str = field(default_factory=lambda: f"sim-{uuid.uuid4().hex[:8]}")
    version: int = 0
    _pending: list[tuple[LoraUpdate, Factors]] = field(default_factory=list)
    _globals: dict[int, tuple[RankRequest, Factors]] = field(default_factory=dict)

    def submit(self, header: LoraUpdate, payload: bytes) -> None:
        self._pending.append((header, _decode(header, payload)))

    def close_round(self, timeout_s: float = 600.0) -> RoundOutput:
        if not self._pending:
            raise RuntimeError("close_round with no updates submitted")
        started = time.perf_counter()
        inputs = [
            RoundInput(h.client_id, h.num_samples, h.base_version, ClientAdapter.of(f, h.request))
            for h, f in self._pending
        ]
        plan = aggregate_round(
            get_strategy(self.strategy),
            get_weighting("data_size"),
            inputs,
            self.version,
            global_rank=self.global_rank,
            recipe=DEFAULT_RECIPE,
            step=self.step,
            global_at=self._globals.get,
            privacy=self.privacy,
        )
        result = plan.result
        best = max(result.adapters, key=lambda r: r.rank)
        self.version += 1
        self._globals = {self.version: (best, result.adapters[best])}  # what the next round's clients start from
        participants = len(self._pending)
        self._pending = []
        return RoundOutput(
            self.version,
            best,
            result.adapters[best],
            result.merge_into_base,
            time.perf_counter() - started,
            participants,
        )

    def close(self) -> None:
        self._pending = []


class ServiceFederation:
    """An AggregatorService on its own thread, over the embedded broker and store (memory://) or over
    RabbitMQ and Redis (amqp://, redis://); or, with `processes`, that many `flexlora aggregator` processes (as
    a deployment runs them: their own interpreters, configured by FLEXLORA_* variables). Updates go in through
    the updates exchange like any client's; the committed round comes back from the service's commit hook
    (from the store, with processes). Everything it declared or stored is deleted on close, so runs on the
    shared services leave nothing behind."""

    def __init__(
        self,
        strategy: str,
        per_round: int,
        global_rank: int,
        *,
        broker_url: str = "memory://",
        redis_url: str = "memory://",
        svd_mode: SvdMode = "exact",
        step: ServerStep = PLAIN_STEP,
        keep_versions: int = 2,
        prefix: str = "sim",
        name: str | None = None,
        hold_bytes: int | None = None,
        processes: int = 0,
        payload_store: str = "redis",
        fold_bytes: int | None = None,
    ) -> None:
        self.name = name or f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.embedded = broker_url.startswith("memory://")
        self.memory = MemoryBroker() if self.embedded else None
        self.broker_url = broker_url
        self.topology = Topology(self.name)
        self.payload_store = payload_store
        self.store = open_store(redis_url, self.name, payloads=open_payloads(payload_store, self.name))
        self.transport = connect(broker_url, memory=self.memory, connection_name=f"{self.name}-clients")
        self._committed: queue.Queue[tuple[RoundRecord, dict[str, StoredRelease]]] = queue.Queue()
        config = AggregatorConfig(
            federation=self.name,
            policy=RoundPolicy(max_updates=per_round),
            strategy=strategy,
            svd_mode=svd_mode,
            global_rank=global_rank,
            carry_residual=step.carry_residual,
            server_lr=step.server_lr,
            keep_versions=keep_versions,
            poll_s=0.05,
            fail_fast=self.embedded,
        )
        if hold_bytes is not None:
            config = replace(config, hold_bytes=hold_bytes)
        if fold_bytes is not None:
            config = replace(config, fold_bytes=fold_bytes)
        self._clients: set[str] = set()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self.service: AggregatorService | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._files = contextlib.ExitStack()
        self._seen = self.store.version()
        if processes:
            if self.embedded:
                raise ValueError("aggregator processes need RabbitMQ and Redis, not memory://")
            self.transport.declare(self.topology.core())
            try:
                self._start_processes(processes, config, broker_url, redis_url)
            except BaseException:
                self._stop_processes()
                self._files.close()
                raise
            return
        self.service = AggregatorService(
            connect(broker_url, memory=self.memory, connection_name=f"{self.name}-aggregator"),
            self.store,
            config,
            on_commit=lambda record, releases: self._committed.put((record, releases)),
        )
        self.service.setup()
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-aggregator", daemon=True)
        self._thread.start()

    def _start_processes(self, count: int, config: AggregatorConfig, broker_url: str, redis_url: str) -> None:
        env = {
            **os.environ,
            **{
                f"{ENV_PREFIX}{name.upper()}": str(value)
                for name, value in {
                    "federation": config.federation,
                    "broker_url": broker_url,
                    "redis_url": redis_url,
                    "max_updates": config.policy.max_updates,
                    "strategy": config.strategy,
                    "svd_mode": config.svd_mode,
                    "global_rank": config.global_rank,
                    "carry_residual": config.carry_residual,
                    "server_lr": config.server_lr,
                    "keep_versions": config.keep_versions,
                    "hold_bytes": config.hold_bytes,
                    "fold_bytes": config.fold_bytes,
                    "payload_store": self.payload_store,
                }.items()
                if value is not None
            },
        }
        for _ in range(count):
            log = self._files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 -- closed by close()
            self._logs.append(log)
            command = [sys.executable, "-m", "flexlora.cli", "aggregator", "--quiet"]
            self.procs.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        deadline = time.monotonic() + 120
        while len(self.store.health()) < count:  # each writes its health once it consumes
            self._check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} aggregator process(es) did not start within 120 s")
            time.sleep(0.1)

    def _stop_processes(self) -> None:
        for proc in self.procs:
            proc.terminate()  # SIGTERM: it stops between steps
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _serve(self) -> None:
        assert self.service is not None
        try:
            subscription = self.service.subscribe()
            try:
                while not self._stop.is_set():
                    self.service.step(subscription)
            finally:
                subscription.close()
        except BaseException as exc:
            self._errors.append(exc)

    def _check(self) -> None:
        if self._errors:
            raise RuntimeError(f"the aggregator failed: {self._errors[0]!r}") from self._errors[0]
        for proc, log in zip(self.procs, self._logs, strict=True):
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"aggregator process {proc.pid} exited with {proc.returncode}:\n{tail}")

    def submit(self, header: LoraUpdate, payload: bytes) -> None:
        self.expect(header.client_id)
        publish_update(self.transport, self.topology, header, payload)

    def expect(self, client_id: str) -> None:
        """`client_id` takes part (an update of its is published by other means): its mailbox goes on close. With
        aggregator processes it is declared here first, as a device declares its own: the round may commit
        before the aggregator that publishes it has declared it."""
        self._check()
        if self.procs and client_id not in self._clients:
            self.transport.declare(self.topology.client(client_id))
        self._clients.add(client_id)

    def wait_commit(self, timeout_s: float = 600.0) -> tuple[RoundRecord, dict[str, StoredRelease]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check()
            if self.procs:  # the next version, from the store
                if self.store.version() <= self._seen:
                    time.sleep(0.02)
                    continue
                self._seen += 1
                record = next(r for r in self.store.history() if r.version == self._seen)
                return record, self.store.releases(self._seen)
            try:
                return self._committed.get(timeout=0.2)
            except queue.Empty:
                continue
        raise TimeoutError(f"no round committed within {timeout_s:.0f} s")

    def close_round(self, timeout_s: float = 600.0) -> RoundOutput:
        record, releases = self.wait_commit(timeout_s)
        best = max(releases.values(), key=lambda r: r.header.rank)
        h = best.header
        return RoundOutput(
            record.version,
            h.request,
            split_lora(
                decode_tensors(self.store.payload(best), h.payload), rank=h.request, target_modules=h.target_modules
            ),
            aggregate_seconds=record.aggregate_seconds,
            participants=len(record.participants),
            record=record,
        )

    def receive(
        self, client_ids: Iterable[str], version: int, timeout_s: float = 600.0, *, transport: Transport | None = None
    ) -> None:
        """Take each client's adapter of `version` from its mailbox, as the device would (ack, check the
        header), over `transport` (default: the federation's own); raises TimeoutError if one does not arrive."""
        for client_id in client_ids:
            sub = (transport or self.transport).subscribe(
                self.topology.adapter_queue(client_id),
                prefetch=1,
                dead_letter_exchange=self.topology.dead_letter_exchange,
            )
            try:
                deadline = time.monotonic() + timeout_s
                while True:
                    self._check()
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{client_id} got no adapter of version {version} in {timeout_s:.0f} s")
                    delivery = sub.get(0.2)
                    if delivery is None:
                        continue
                    release = parse_release(delivery.message.headers.get(HEADER_KEY))
                    delivery.ack()
                    if release.version >= version and release.client_id in (client_id, SHARED_RELEASE):
                        break
            finally:
                sub.close()

    def close(self) -> None:
        self._stop.set()
        if self.service is not None:
            self._thread.join(timeout=30)
        self._stop_processes()
        try:
            if not self.embedded:
                mailboxes = [
                    s for c in sorted(self._clients) for s in self.topology.client(c) if isinstance(s, QueueSpec)
                ]
                self.transport.delete([*self.topology.core(), *mailboxes])
                self.store.wipe()
        finally:
            if self.service is not None:
                self.service.transport.close()
            self.transport.close()
            self._files.close()
        if self.service is not None:
            self._check()


def make_federation(
    strategy: str,
    per_round: int,
    global_rank: int,
    *,
    broker_url: str = "memory://",
    redis_url: str = "memory://",
    svd_mode: SvdMode = "exact",
    step: ServerStep = PLAIN_STEP,
    privacy: Private | None = None,
) -> Federation:
    """`direct://` as the broker URL calls the strategy in-process. FLoRA always does: the service refuses it
    (its clients merge each release into the base, which its pinned base-model check does not model yet).
    Differential privacy (`privacy`) runs in-process only."""
    if broker_url.startswith("direct://") or strategy_spec(strategy).merges_into_base or privacy is not None:
        return DirectFederation(strategy, global_rank, step, privacy)
    return ServiceFederation(
        strategy, per_round, global_rank, broker_url=broker_url, redis_url=redis_url, svd_mode=svd_mode, step=step
    )
