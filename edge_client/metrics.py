"""Prometheus metrics of one edge client process, in a registry of its own."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STEP_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ClientMetrics:
    """Rounds completed, training step time and loss, the global version held, reconnects. Labelled with
    the federation and client id, so one Prometheus can watch a fleet of devices."""

    def __init__(self, federation: str, client_id: str, rank: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._labels = (federation, client_id)
        names = ["federation", "client"]
        r = self.registry
        self._rounds = Counter(
            "flexlora_client_rounds", "Rounds completed (update sent, adapter received)", names, registry=r
        )
        self._steps = Histogram(
            "flexlora_client_train_step_seconds", "Local training step time", names, buckets=_STEP_SECONDS, registry=r
        )
        self._loss = Gauge(
            "flexlora_client_train_loss", "Mean training loss of the last local epoch", names, registry=r
        )
        self._version = Gauge("flexlora_client_global_version", "Global version of the adapter held", names, registry=r)
        self._score = Gauge(
            "flexlora_client_eval_score",
            "ROUGE-L on held-out examples of the adapter the last round started from",
            names,
            registry=r,
        )
        self._reconnects = Counter(
            "flexlora_client_reconnects", "Broker connections lost and re-made", names, registry=r
        )
        self._rank = Gauge("flexlora_client_rank", "LoRA rank this device trains at", names, registry=r)
        self._rank.labels(*self._labels).set(rank)
        self._last_step: float | None = None

    def step(self, step: int) -> None:
        """Call after each local step; step 0 starts a new epoch, so the wait for an adapter is not timed."""
        now = time.perf_counter()
        if step > 0 and self._last_step is not None:
            self._steps.labels(*self._labels).observe(now - self._last_step)
        self._last_step = now

    def round_done(
        self, mean_loss: float, version: int, start_score: float | None = None, *, rank: int | None = None
    ) -> None:
        """`rank`: what the round trained at (a rank policy may change it from round to round)."""
        self._rounds.labels(*self._labels).inc()
        if rank is not None:
            self._rank.labels(*self._labels).set(rank)
        if start_score is not None:
            self._score.labels(*self._labels).set(start_score)
        self._loss.labels(*self._labels).set(mean_loss)
        self._version.labels(*self._labels).set(version)

    def reconnected(self) -> None:
        self._reconnects.labels(*self._labels).inc()
