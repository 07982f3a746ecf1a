"""Load mode: many synthetic-update clients (updates of real shapes, no training) federated through the real
aggregator service, embedded or over RabbitMQ and Redis; measures each round's turnaround, the memory it took
(Redis `used_memory`, this process's RSS: it runs the aggregator and the publishers), and, over RabbitMQ, the
floor: raw pika moving the same bytes once each way (the round's updates in, its adapters out)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from rich.console import Console

from aggregator.lowrank import SvdMode
from broker.connect import connect
from broker.transport import Transport
from edge_client.synthetic import SyntheticShape, publish_update, synthetic_update
from experiments import rawpika
from experiments.federation import ServiceFederation
from experiments.ranks import assign_ranks, sample_clients, scaled_ranks
from experiments.runner import progress_bar
from schemas.messages import LoraUpdate

SMOLLM2_HIDDEN = 576


@dataclass(frozen=True)
class LoadConfig:
    clients: int = 1613  # the paper's federation: one Natural Instructions task per client
    per_round: int = 80
    rounds: int = 50
    distribution: str = "heavy-tail-strong"
    tiers: tuple[int, ...] = scaled_ranks(SMOLLM2_HIDDEN)
    layers: int = 30  # SmolLM2-135M's q_proj and v_proj in every layer
    strategy: str = "flexlora"
    svd_mode: SvdMode = "exact"
    broker_url: str = "memory://"
    redis_url: str = "memory://"
    seed: int = 0
    federation: str | None = None  # default: a fresh load-<hex> name
    publishers: int = 4  # connections publishing a round's updates side by side (over RabbitMQ)
    raw_every: int = 10  # measure the raw-pika floor on round 1 and every raw_every-th round after (0: never)
    hold_bytes: int | None = None  # the aggregator's (None: its default); 0 reads every update back from the store
    payload_store: str = "redis"  # where the aggregators keep update bytes (aggregator.payloads)
    fold_bytes: int | None = None  # the aggregator's (None: its default); 0 folds nothing (aggregator.folding)
    # 0: the aggregator runs on a thread of this process; N: N `flexlora aggregator` processes, as deployed
    aggregators: int = 0


@dataclass(frozen=True)
class LoadRound:
    version: int
    ranks: dict[int, int]
    payload_mb: float
    publish_s: float  # publishing (with confirms) the round's updates
    commit_s: float  # first publish until the round is committed
    turnaround_s: float  # first publish until every participant took its adapter from its mailbox
    aggregate_s: float  # the finaliser's own time (read updates, aggregate, encode, commit)
    adapters_mb: float = 0.0  # the adapters the participants took from their mailboxes
    redis_used_peak_mb: float | None = None  # Redis used_memory, the most seen during the round
    rss_peak_mb: float = 0.0  # this process's resident memory, the most seen during the round
    raw_s: float | None = None  # raw pika moving the round's bytes once each way, where measured
    generate_s: float = 0.0  # making the synthetic updates (the clients' training stand-in), before the first publish
    aggregator_rss_peak_mb: float | None = None  # the largest aggregator process's, with aggregator processes


@dataclass
class LoadReport:
    config: LoadConfig
    rounds: list[LoadRound] = field(default_factory=list)
    wall_s: float = 0.0
    measuring_s: float = 0.0  # of the wall: raw pika measuring the floor (none of the federation's work)

    def raw_mb_per_s(self) -> float | None:
        """The raw-pika floor's rate over the rounds where it was measured."""
        measured = [r for r in self.rounds if r.raw_s is not None]
        if not measured:
            return None
        return sum(r.payload_mb + r.adapters_mb for r in measured) / sum(r.raw_s or 0.0 for r in measured)

    def summary(self) -> dict[str, float]:
        turn = [r.turnaround_s for r in self.rounds]
        rate = self.raw_mb_per_s()
        moved_mb = sum(r.payload_mb + r.adapters_mb for r in self.rounds)
        redis_peaks = [r.redis_used_peak_mb for r in self.rounds if r.redis_used_peak_mb is not None]
        return {
            "rounds": float(len(self.rounds)),
            "wall_s": self.wall_s,
            # The floor for the whole run: every round's bytes at the rate raw pika reached where measured.
            "raw_total_s": moved_mb / rate if rate else float("nan"),
            "wall_to_raw": self.wall_s * rate / moved_mb if rate and moved_mb else float("nan"),
            # The federation's own time: every round from its first publish to its last adapter taken; the wall
            # also holds generating the synthetic updates and measuring the raw floor.
            "federation_s": math.fsum(turn),
            "federation_to_raw": math.fsum(turn) * rate / moved_mb if rate and moved_mb else float("nan"),
            "generate_s": math.fsum(r.generate_s for r in self.rounds),
            "measuring_s": self.measuring_s,
            "redis_used_peak_mb": max(redis_peaks, default=float("nan")),
            "rss_peak_mb": max((r.rss_peak_mb for r in self.rounds), default=float("nan")),
            "aggregator_rss_peak_mb": max(
                (r.aggregator_rss_peak_mb for r in self.rounds if r.aggregator_rss_peak_mb is not None),
                default=float("nan"),
            ),
            "turnaround_median_s": statistics.median(turn) if turn else float("nan"),
            "turnaround_max_s": max(turn, default=float("nan")),
            "aggregate_median_s": statistics.median([r.aggregate_s for r in self.rounds]) if turn else float("nan"),
            "publish_median_s": statistics.median([r.publish_s for r in self.rounds]) if turn else float("nan"),
            "payload_mb_per_round": statistics.fmean([r.payload_mb for r in self.rounds]) if turn else float("nan"),
            "updates": float(sum(sum(r.ranks.values()) for r in self.rounds)),
        }

    def to_json(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["broker_url"] = config["broker_url"].split("@")[-1]  # no credentials in results
        rounds = [{**asdict(r), "ranks": {str(k): v for k, v in r.ranks.items()}} for r in self.rounds]
        return {"config": config, "summary": self.summary(), "rounds": rounds}


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def _rss_mb(pid: int | None = None) -> float | None:
    """A process's resident memory (this one's by default); None once it is gone."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Peaks:
    """The most a round saw: Redis `used_memory` (None: not Redis), this process's RSS, and the largest
    aggregator process's (None: no aggregator processes)."""

    redis_mb: float | None = None
    rss_mb: float = 0.0
    aggregator_rss_mb: float | None = None


def _most(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


class MemorySampler:
    """Samples Redis `used_memory` (when the store is Redis), this process's RSS and the aggregator processes'
    every `every_s` on its own thread; `take()` returns the most seen since the last take."""

    def __init__(self, redis_url: str, pids: Sequence[int] = (), every_s: float = 0.25) -> None:
        self._redis = redis.Redis.from_url(redis_url) if redis_url.startswith(("redis://", "rediss://")) else None
        self._every = every_s
        self._pids = list(pids)  # aggregator processes: the largest one's RSS is sampled too
        self._lock = threading.Lock()
        self._peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def _sample(self) -> None:
        used = None
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError):
                used = int(self._redis.info("memory")["used_memory"]) / 1e6
        rss = _rss_mb() or 0.0
        others = max((r for pid in self._pids if (r := _rss_mb(pid)) is not None), default=None)
        with self._lock:
            p = self._peaks
            self._peaks = Peaks(_most(p.redis_mb, used), max(p.rss_mb, rss), _most(p.aggregator_rss_mb, others))

    def take(self) -> Peaks:
        """The most seen since the last take, this moment included (a round shorter than `every_s` has a reading)."""
        self._sample()
        with self._lock:
            peaks, self._peaks = self._peaks, Peaks()
        return peaks

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._redis is not None:
            self._redis.close()


class Publishers:
    """`count` broker connections publishing a round's updates side by side, so the load generator is not the
    bottleneck it measures (one connection with confirms waits for each message in turn)."""

    def __init__(self, fed: ServiceFederation, count: int) -> None:
        self.fed = fed
        self.transports: list[Transport] = []
        if not fed.embedded:
            self.transports = [connect(fed.broker_url, connection_name=f"{fed.name}-load-{i}") for i in range(count)]
        self.pool = ThreadPoolExecutor(max(1, len(self.transports)))

    def publish(self, updates: list[tuple[LoraUpdate, bytes]]) -> None:
        if not self.transports:
            for header, payload in updates:
                self.fed.submit(header, payload)
            return
        for header, _ in updates:
            self.fed.expect(header.client_id)
        shares = [updates[i :: len(self.transports)] for i in range(len(self.transports))]
        done = [
            self.pool.submit(self._send, transport, share)
            for transport, share in zip(self.transports, shares, strict=True)
        ]
        for future in done:
            future.result()

    def receive(self, client_ids: list[str], version: int) -> None:
        """Every participant takes its adapter, the mailboxes shared out over the connections."""
        if not self.transports:
            self.fed.receive(client_ids, version)
            return
        shares = [client_ids[i :: len(self.transports)] for i in range(len(self.transports))]
        done = [
            self.pool.submit(self.fed.receive, share, version, transport=transport)
            for transport, share in zip(self.transports, shares, strict=True)
        ]
        for future in done:
            future.result()

    def _send(self, transport: Transport, share: list[tuple[LoraUpdate, bytes]]) -> None:
        for header, payload in share:
            publish_update(transport, self.fed.topology, header, payload)

    def close(self) -> None:
        self.pool.shutdown()
        for transport in self.transports:
            transport.close()


def run_load(config: LoadConfig, console: Console | None = None) -> LoadReport:
    """`config.rounds` rounds of `per_round` clients drawn from `clients`, each sending a fresh random update
    at its rank; every participant then takes its adapter from its mailbox."""
    console = console or Console(stderr=True)
    started = time.monotonic()
    ranks = assign_ranks(config.clients, config.distribution, config.tiers, config.seed)
    shape = SyntheticShape(layers=config.layers)
    report = LoadReport(config)
    fed = ServiceFederation(
        config.strategy,
        config.per_round,
        max(config.tiers),
        broker_url=config.broker_url,
        redis_url=config.redis_url,
        svd_mode=config.svd_mode,
        prefix="load",
        name=config.federation,
        hold_bytes=config.hold_bytes,
        processes=config.aggregators,
        payload_store=config.payload_store,
        fold_bytes=config.fold_bytes,
    )
    publishers = Publishers(fed, config.publishers)
    sampler = MemorySampler(config.redis_url, [p.pid for p in fed.procs])
    makers = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="make-update")  # one update per core
    try:
        with progress_bar(console) as progress:
            bar = progress.add_task("rounds", total=config.rounds)
            for t in range(config.rounds):
                chosen = sample_clients(config.clients, config.per_round, t, config.seed)
                sampler.take()
                # The clients' training stand-in, timed apart: devices train in parallel, away from the federation.
                generating = time.monotonic()
                made = [
                    makers.submit(
                        synthetic_update,
                        fed.name,
                        f"client-{c}",
                        ranks[c],
                        t,
                        shape=shape,
                        seed=_seed(config.seed, t, c),
                    )
                    for c in chosen
                ]
                updates = [future.result() for future in made]
                first = time.monotonic()
                publishers.publish(updates)
                published = time.monotonic()
                record, releases = fed.wait_commit()
                committed = time.monotonic()
                publishers.receive([f"client-{c}" for c in chosen], record.version)
                done = time.monotonic()
                peaks = sampler.take()
                sizes = [len(payload) for _, payload in updates]
                sizes += [releases[f"client-{c}"].header.payload.size for c in chosen]
                raw = None
                if not fed.embedded and config.raw_every and t % config.raw_every == 0:
                    raw_started = time.monotonic()
                    raw = rawpika.move(config.broker_url, sizes).seconds
                    report.measuring_s += time.monotonic() - raw_started
                chosen_ranks = [ranks[c] for c in chosen]
                report.rounds.append(
                    LoadRound(
                        version=record.version,
                        ranks={r: chosen_ranks.count(r) for r in sorted(set(chosen_ranks))},
                        payload_mb=sum(sizes[: len(updates)]) / 1e6,
                        publish_s=published - first,
                        commit_s=committed - first,
                        turnaround_s=done - first,
                        aggregate_s=record.aggregate_seconds,
                        adapters_mb=sum(sizes[len(updates) :]) / 1e6,
                        redis_used_peak_mb=peaks.redis_mb,
                        rss_peak_mb=peaks.rss_mb,
                        raw_s=raw,
                        generate_s=first - generating,
                        aggregator_rss_peak_mb=peaks.aggregator_rss_mb,
                    )
                )
                del updates
                progress.update(bar, advance=1, description=f"round {t + 1}: turnaround {done - first:.1f} s")
    finally:
        makers.shutdown()
        sampler.close()
        publishers.close()
        fed.close()
    report.wall_s = time.monotonic() - started
    return report


def _mb(value: float) -> str:
    return "–" if value != value else f"{value:.0f} MB"  # NaN: not measured (the embedded store)


def markdown(report: LoadReport) -> str:
    s = report.summary()
    c = report.config
    measured = s["raw_total_s"] == s["raw_total_s"]
    raw = f"{s['raw_total_s']:.0f} s ({s['wall_to_raw']:.1f}× / {s['federation_to_raw']:.1f}×)" if measured else "–"
    return "\n".join(
        [
            "| clients | per round | rounds | ranks (tiers) | wall (federation, generating, measuring) "
            "| raw pika, same bytes (wall × / federation ×) "
            "| turnaround median / max | aggregate median | publish median | MB per round "
            "| Redis used_memory peak | RSS peak (this process) | RSS peak (largest aggregator process) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {c.clients} | {c.per_round} | {len(report.rounds)} | {c.distribution} {list(c.tiers)} "
            f"| {s['wall_s']:.0f} s ({s['federation_s']:.0f} s, {s['generate_s']:.0f} s, {s['measuring_s']:.0f} s) "
            f"| {raw} | {s['turnaround_median_s']:.2f} / {s['turnaround_max_s']:.2f} s "
            f"| {s['aggregate_median_s']:.2f} s | {s['publish_median_s']:.2f} s | {s['payload_mb_per_round']:.0f} "
            f"| {_mb(s['redis_used_peak_mb'])} | {_mb(s['rss_peak_mb'])} | {_mb(s['aggregator_rss_peak_mb'])} |",
        ]
    )
