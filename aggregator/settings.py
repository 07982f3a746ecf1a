"""Aggregator settings: CLI flags and FLEXLORA_* environment variables; unknown keys refused."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aggregator.rounds import RoundPolicy
from schemas.settings import FlexloraSettings


class AggregatorSettings(FlexloraSettings):
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    redis_url: str = "redis://127.0.0.1:6379/0"
    federation: str = Field(default="default", pattern=r"^[A-Za-z0-9_.\-]+$")
    max_updates: int = Field(default=4, ge=1)
    min_updates: int = Field(default=1, ge=1)
    round_deadline_s: float | None = Field(default=None, gt=0)
    lease_s: float = Field(default=120.0, gt=0)
    prefetch: int = Field(default=8, ge=1)
    heartbeat_s: int = Field(default=30, ge=1)
    strategy: Literal["flexlora", "fedit", "hetlora"] = "flexlora"
    svd_mode: Literal["exact", "fast"] = "exact"
    weighting: Literal["data_size", "uniform", "staleness"] = "data_size"
    staleness_exponent: float = Field(default=0.5, ge=0)
    max_staleness: int | None = Field(default=None, ge=0)
    keep_versions: int | None = Field(default=20, ge=1, description="versions whose updates stay in Redis")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve Prometheus metrics here")

    @model_validator(mode="after")
    def _policy_is_valid(self) -> AggregatorSettings:
        self.policy()
        return self

    def policy(self) -> RoundPolicy:
        return RoundPolicy(self.max_updates, self.min_updates, self.round_deadline_s)
