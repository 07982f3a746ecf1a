"""Prometheus metrics of one aggregator process, in a registry of its own (several services may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Rounds take from milliseconds (tiny models) to minutes (7B shapes, exact mode).
_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STALENESS = (0, 1, 2, 3, 5, 8, 13, 21, 34)


class AggregatorMetrics:
    """What an operator watches: updates accepted and refused by reason, round and SVD durations,
    staleness, queue lag, the global version, the open round's fill and, with differential privacy, ε. Every
    metric carries the federation as a label, so one Prometheus can scrape the aggregators of several federations."""

    def __init__(self, federation: str, registry: CollectorRegistry | None = None) -> None:
        self.federation = federation
        self.registry = registry or CollectorRegistry()
        r = self.registry
        fed = ["federation"]
        self._updates = Counter(
            "flexlora_updates",
            "Updates handled, by outcome: accepted, duplicate, requeued",
            [*fed, "outcome"],
            registry=r,
        )
        self._refused = Counter(
            "flexlora_refused", "Messages dead-lettered by this process, by reason", [*fed, "reason"], registry=r
        )
        self._rounds = Counter("flexlora_rounds", "Rounds this process committed", fed, registry=r)
        self._round_errors = Counter(
            "flexlora_round_errors", "Failed attempts to finalise or publish (retried)", fed, registry=r
        )
        self._round_seconds = Histogram(
            "flexlora_round_seconds",
            "Finalising a round: reading its updates to committing",
            fed,
            buckets=_SECONDS,
            registry=r,
        )
        self._svd_seconds = Histogram(
            "flexlora_svd_seconds",
            "The aggregation strategy alone (FlexLoRA: SVDs and cuts)",
            fed,
            buckets=_SECONDS,
            registry=r,
        )
        self._staleness = Histogram(
            "flexlora_update_staleness_versions",
            "Versions between an update's base and the round that counted it",
            fed,
            buckets=_STALENESS,
            registry=r,
        )
        self._queue_lag = Histogram(
            "flexlora_update_queue_lag_seconds",
            "From an update's creation on its client to its recording here (clock skew included)",
            fed,
            buckets=_SECONDS,
            registry=r,
        )
        self._version = Gauge("flexlora_global_version", "Newest committed global version", fed, registry=r)
        self._open_round = Gauge("flexlora_open_round_updates", "Updates recorded in the open round", fed, registry=r)
        self._published = Counter(
            "flexlora_adapters_published", "Adapters this process published to clients", fed, registry=r
        )
        self._joins = Counter("flexlora_joins", "Join requests answered", fed, registry=r)
        self._epsilon = Gauge(
            "flexlora_privacy_epsilon",
            "Client-level differential privacy: the federation's ε (at its δ) up to the newest version",
            fed,
            registry=r,
        )
        self._epsilon_budget = Gauge(
            "flexlora_privacy_epsilon_budget",
            "The ε past which this process refuses to commit a round",
            fed,
            registry=r,
        )
        self._privacy_refusals = Counter(
            "flexlora_privacy_refusals",
            "Rounds this process refused to commit: their ε would pass the budget",
            fed,
            registry=r,
        )
        self._chunks = Counter(
            "flexlora_update_chunks",
            "Chunks of chunked updates taken in (stored: update still incomplete; counted: a late duplicate)",
            [*fed, "outcome"],
            registry=r,
        )

    def update(self, outcome: str) -> None:
        self._updates.labels(self.federation, outcome).inc()

    def refused(self, reason: str) -> None:
        self._refused.labels(self.federation, reason).inc()

    def round_committed(self, round_seconds: float, svd_seconds: float, staleness: list[int], version: int) -> None:
        self._rounds.labels(self.federation).inc()
        self._round_seconds.labels(self.federation).observe(round_seconds)
        self._svd_seconds.labels(self.federation).observe(svd_seconds)
        for tau in staleness:
            self._staleness.labels(self.federation).observe(tau)
        self._version.labels(self.federation).set(version)

    def privacy(self, epsilon: float, budget: float | None) -> None:
        """The ε spent up to the newest version (and the budget, when there is one)."""
        self._epsilon.labels(self.federation).set(epsilon)
        if budget is not None:
            self._epsilon_budget.labels(self.federation).set(budget)

    def privacy_refused(self) -> None:
        self._privacy_refusals.labels(self.federation).inc()

    def round_error(self) -> None:
        self._round_errors.labels(self.federation).inc()

    def queue_lag(self, seconds: float) -> None:
        self._queue_lag.labels(self.federation).observe(max(0.0, seconds))

    def open_round(self, version: int, updates: int) -> None:
        self._version.labels(self.federation).set(version)
        self._open_round.labels(self.federation).set(updates)

    def published(self) -> None:
        self._published.labels(self.federation).inc()

    def chunk(self, outcome: str) -> None:
        self._chunks.labels(self.federation, outcome).inc()

    def joined(self) -> None:
        self._joins.labels(self.federation).inc()
