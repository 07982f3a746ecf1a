"""`flexlora status`: a federation's state gathered from Redis and RabbitMQ, as data and as a terminal view."""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from aggregator.rounds import RoundRecord, RoundStore
from broker.errors import BrokerError
from broker.topology import Topology
from broker.transport import Transport


@dataclass(frozen=True)
class LiveAggregator:
    owner: str
    host: str
    pid: int
    seen_s_ago: float  # since its last health write
    busy_s: float  # since its last completed step (large while a long SVD runs)
    counters: dict[str, int]
    # The open round's sum it is folding (aggregator.folding): round, updates and bytes; None when it folds none.
    fold: dict[str, int] | None = None


@dataclass(frozen=True)
class OpenRound:
    round_id: int
    updates: int
    max_updates: int | None  # from a live aggregator's policy; None when none is alive
    opened_at: float | None
    deadline_at: float | None  # when the deadline policy closes it (once min_updates are in)


@dataclass(frozen=True)
class RoundSummary:
    version: int
    participants: int
    rank_mix: dict[int, int]  # rank -> how many participants trained at it
    train_loss: float | None  # the participants' weighted mean local training loss
    eval_score: float | None  # their weighted mean held-out ROUGE-L of the version they trained from
    aggregate_seconds: float
    closed_at: float
    max_staleness: int
    # Clients that trained this round at another rank than in their previous round: "client old→new".
    rank_changes: list[str] = field(default_factory=list)
    epsilon: float | None = None  # with differential privacy: the federation's ε up to this version


@dataclass(frozen=True)
class Privacy:
    """Client-level differential privacy as of the newest private version, and why a live aggregator refuses
    to commit the open round, if one does."""

    epsilon: float
    delta: float
    rounds: int
    noise_multiplier: float
    sampling_rate: float
    clip_norm: float
    epsilon_budget: float | None
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FederationStatus:
    federation: str
    version: int
    open_round: OpenRound
    aggregators: list[LiveAggregator]
    queues: dict[str, int | None]  # ready messages by queue; None where the queue does not exist yet
    refusals: dict[str, int]
    rounds: list[RoundSummary] = field(default_factory=list)
    privacy: Privacy | None = None  # None: no round of this federation was private

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def summarise_all(records: Sequence[RoundRecord]) -> list[RoundSummary]:
    """Every round's summary, in order, with the rank changes since each client's previous round."""
    last: dict[str, int] = {}
    out = []
    for record in records:
        changes = []
        for p in record.participants:
            if p.client_id in last and last[p.client_id] != p.rank:
                changes.append(f"{p.client_id} {last[p.client_id]}→{p.rank}")
            last[p.client_id] = p.rank
        out.append(summarise(record, changes))
    return out


def summarise(record: RoundRecord, rank_changes: list[str] | None = None) -> RoundSummary:
    ranks = collections.Counter(p.rank for p in record.participants)
    return RoundSummary(
        rank_changes=list(rank_changes or ()),
        version=record.version,
        participants=len(record.participants),
        rank_mix=dict(sorted(ranks.items())),
        train_loss=record.metrics.get("train_loss"),
        eval_score=record.metrics.get("eval_score"),
        aggregate_seconds=record.aggregate_seconds,
        closed_at=record.closed_at,
        max_staleness=max((p.staleness for p in record.participants), default=0),
        epsilon=None if record.privacy is None else record.privacy.epsilon,
    )


def _privacy(records: Sequence[RoundRecord], refused: list[str]) -> Privacy | None:
    spent = next((r.privacy for r in reversed(records) if r.privacy is not None), None)
    if spent is None:
        return None
    return Privacy(**spent.model_dump(), refused=refused)


def _depth(transport: Transport, queue: str) -> int | None:
    try:
        return transport.queue_depth(queue)
    except BrokerError:  # not declared yet: nothing has run in this federation
        return None


def collect(
    store: RoundStore, transport: Transport | None, federation: str, now: float, last_rounds: int = 5
) -> FederationStatus:
    """Read everything `flexlora status` shows; `transport` None skips the queue depths."""
    live = []
    policies: list[dict[str, Any]] = []
    refused: list[str] = []
    for owner, raw in sorted(store.health().items()):
        info = json.loads(raw)
        policies.append(info.get("policy") or {})
        if info.get("privacy_refused") and info["privacy_refused"] not in refused:
            refused.append(str(info["privacy_refused"]))
        live.append(
            LiveAggregator(
                owner=owner,
                host=str(info.get("host", "?")),
                pid=int(info.get("pid", 0)),
                seen_s_ago=now - float(info.get("at", now)),
                busy_s=now - float(info.get("last_step", now)),
                counters={str(k): int(v) for k, v in (info.get("counters") or {}).items()},
                fold={str(k): int(v) for k, v in info["fold"].items()} if info.get("fold") else None,
            )
        )
    status = store.status()
    history = store.history()
    policy = policies[0] if policies else {}
    deadline = policy.get("deadline_s")
    topology = Topology(federation)
    queues: dict[str, int | None] = {}
    if transport is not None:
        queues = {
            "updates": _depth(transport, topology.updates_queue),
            "dead-letter": _depth(transport, topology.dead_letter_queue),
        }
    return FederationStatus(
        federation=federation,
        version=status.round_id,  # round N builds version N + 1, so the open round's id is the newest version
        open_round=OpenRound(
            round_id=status.round_id,
            updates=status.count,
            max_updates=policy.get("max_updates"),
            opened_at=status.opened_at,
            deadline_at=None if deadline is None or status.opened_at is None else status.opened_at + float(deadline),
        ),
        aggregators=live,
        queues=queues,
        refusals=store.refusals(),
        rounds=summarise_all(history)[-last_rounds:] if last_rounds > 0 else [],
        privacy=_privacy(history, refused),
    )


def render(status: FederationStatus, console: Console, now: float) -> None:
    """The terminal view: one line on the open round, then tables of aggregators, queues and rounds."""
    r = status.open_round
    fill = f"{r.updates}/{r.max_updates}" if r.max_updates else f"{r.updates}"
    deadline = "" if r.deadline_at is None else f", deadline in {max(0.0, r.deadline_at - now):.0f} s"
    console.print(
        f"[bold]{status.federation}[/]: global version [bold]{status.version}[/] · open round {r.round_id} "
        f"holds {fill} updates{deadline}"
    )
    agg = Table(title=f"{len(status.aggregators)} live aggregator(s)", title_justify="left")
    for column in ("owner", "seen", "busy", "accepted", "refused", "rounds", "folding"):
        agg.add_column(column)
    for a in status.aggregators:
        refused = sum(v for k, v in a.counters.items() if k.startswith("refused:"))
        agg.add_row(
            a.owner,
            f"{a.seen_s_ago:.0f} s ago",
            f"{a.busy_s:.0f} s",
            str(a.counters.get("accepted", 0)),
            str(refused),
            str(a.counters.get("rounds", 0)),
            "-"
            if a.fold is None
            else f"round {a.fold['round']}: {a.fold['updates']} updates, {a.fold['bytes'] / 1e6:.1f} MB",
        )
    console.print(agg)
    if status.queues:
        console.print(
            "queues: " + " · ".join(f"{name} {'-' if n is None else n} ready" for name, n in status.queues.items()),
            highlight=False,
        )
    refusals = ", ".join(f"{reason} {n}" for reason, n in status.refusals.items()) or "none"
    console.print(f"dead-lettered by reason: {refusals}", highlight=False)
    if (p := status.privacy) is not None:
        budget = "no budget" if p.epsilon_budget is None else f"budget {p.epsilon_budget:g}"
        console.print(
            f"differential privacy: ε = [bold]{p.epsilon:.3g}[/] at δ = {p.delta:g} after {p.rounds} private "
            f"round(s) ({budget}; noise {p.noise_multiplier:g}·C, C = {p.clip_norm:g}, sampling {p.sampling_rate:.3g})",
            highlight=False,
        )
        for reason in p.refused:
            console.print(f"[red]open round not committed[/]: {reason}", highlight=False)
    rounds = Table(title=f"last {len(status.rounds)} round(s)", title_justify="left")
    columns = ("version", "updates", "ranks", "rank changes", "held-out ROUGE-L", "train loss", "max staleness")
    private = any(s.epsilon is not None for s in status.rounds)
    for column in (*columns, "aggregate s", *(("ε",) if private else ())):
        rounds.add_column(column, justify="right")
    for s in status.rounds:
        rounds.add_row(
            str(s.version),
            str(s.participants),
            " ".join(f"{rank}×{n}" for rank, n in s.rank_mix.items()),
            ", ".join(s.rank_changes[:3]) + (f" +{len(s.rank_changes) - 3}" if len(s.rank_changes) > 3 else "") or "-",
            "-" if s.eval_score is None else f"{s.eval_score:.3f}",
            "-" if s.train_loss is None else f"{s.train_loss:.3f}",
            str(s.max_staleness),
            f"{s.aggregate_seconds:.2f}",
            *(("-" if s.epsilon is None else f"{s.epsilon:.3g}",) if private else ()),
        )
    console.print(rounds)
