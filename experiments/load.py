"""Load mode: many synthetic-update clients (updates of real shapes, no training) federated through the real
aggregator service, embedded or over RabbitMQ and Redis; measures each round's turnaround."""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from aggregator.lowrank import SvdMode
from edge_client.synthetic import SyntheticShape, synthetic_update
from experiments.federation import ServiceFederation
from experiments.ranks import assign_ranks, sample_clients, scaled_ranks
from experiments.runner import progress_bar

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


@dataclass(frozen=True)
class LoadRound:
    version: int
    ranks: dict[int, int]
    payload_mb: float
    publish_s: float  # generating and publishing (with confirms) the round's updates
    commit_s: float  # first publish until the round is committed
    turnaround_s: float  # first publish until every participant took its adapter from its mailbox
    aggregate_s: float  # the finaliser's own time (read updates, aggregate, encode, commit)


@dataclass
class LoadReport:
    config: LoadConfig
    rounds: list[LoadRound] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        turn = [r.turnaround_s for r in self.rounds]
        return {
            "rounds": float(len(self.rounds)),
            "wall_s": self.wall_s,
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
    )
    try:
        with progress_bar(console) as progress:
            bar = progress.add_task("rounds", total=config.rounds)
            for t in range(config.rounds):
                chosen = sample_clients(config.clients, config.per_round, t, config.seed)
                first = time.monotonic()
                payload_bytes = 0
                for c in chosen:
                    header, payload = synthetic_update(
                        fed.name, f"client-{c}", ranks[c], t, shape=shape, seed=_seed(config.seed, t, c)
                    )
                    fed.submit(header, payload)
                    payload_bytes += len(payload)
                published = time.monotonic()
                record, _ = fed.wait_commit()
                committed = time.monotonic()
                fed.receive([f"client-{c}" for c in chosen], record.version)
                done = time.monotonic()
                chosen_ranks = [ranks[c] for c in chosen]
                report.rounds.append(
                    LoadRound(
                        version=record.version,
                        ranks={r: chosen_ranks.count(r) for r in sorted(set(chosen_ranks))},
                        payload_mb=payload_bytes / 1e6,
                        publish_s=published - first,
                        commit_s=committed - first,
                        turnaround_s=done - first,
                        aggregate_s=record.aggregate_seconds,
                    )
                )
                progress.update(bar, advance=1, description=f"round {t + 1}: turnaround {done - first:.1f} s")
    finally:
        fed.close()
    report.wall_s = time.monotonic() - started
    return report


def markdown(report: LoadReport) -> str:
    s = report.summary()
    c = report.config
    return "\n".join(
        [
            "| clients | per round | rounds | ranks (tiers) | wall | turnaround median / max | aggregate median "
            "| publish median | MB per round |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {c.clients} | {c.per_round} | {len(report.rounds)} | {c.distribution} {list(c.tiers)} "
            f"| {s['wall_s']:.0f} s | {s['turnaround_median_s']:.2f} / {s['turnaround_max_s']:.2f} s "
            f"| {s['aggregate_median_s']:.2f} s | {s['publish_median_s']:.2f} s | {s['payload_mb_per_round']:.0f} |",
        ]
    )
