"""Aggregator settings: CLI flags and FLEXLORA_* environment variables; unknown keys refused."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from aggregator.registry import SERVICE_STRATEGIES, served
from aggregator.rounds import RoundPolicy
from aggregator.stores.replication import Replication
from broker.connect import check_broker_url
from broker.topology import MAILBOX_MAX_BYTES
from schemas.chunks import DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES
from schemas.recipe import RecipeSettings

if TYPE_CHECKING:
    from aggregator.payloads import PayloadStore
    from aggregator.privacy import PrivacyConfig


class AggregatorSettings(RecipeSettings):
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    redis_url: str = "redis://127.0.0.1:6379/0"
    federation: str = Field(default="default", pattern=r"^[A-Za-z0-9_.\-]+$")
    max_updates: int = Field(default=4, ge=1)
    min_updates: int = Field(default=1, ge=1)
    round_deadline_s: float | None = Field(default=None, gt=0)
    lease_s: float = Field(default=120.0, gt=0)
    prefetch: int = Field(default=8, ge=1)
    heartbeat_s: int = Field(default=30, ge=1)
    strategy: str = Field(default="flexlora", description=f"one of {', '.join(SERVICE_STRATEGIES)}")
    svd_mode: Literal["exact", "fast"] = "exact"
    weighting: Literal["data_size", "uniform", "staleness"] = "data_size"
    staleness_exponent: float = Field(default=0.5, ge=0)
    max_staleness: int | None = Field(default=None, ge=0)
    keep_versions: int | None = Field(default=20, ge=1, description="versions whose updates stay in the store")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve Prometheus metrics here")
    chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=MIN_CHUNK_BYTES, description="larger payloads are chunked")
    max_update_bytes: int = Field(default=2 * 1024**3, ge=1, le=MAILBOX_MAX_BYTES // 2)
    min_rank: int = Field(default=1, ge=1, description="refuse updates below this rank")
    max_rank: int | None = Field(default=None, ge=1, description="refuse updates above this rank")
    max_update_norm: float | None = Field(default=None, gt=0, description="refuse updates whose ‖ΔW‖ exceeds this")
    norm_outlier_factor: float | None = Field(
        default=None, gt=1, description="refuse updates whose ‖ΔW‖ exceeds this times the open round's median"
    )
    max_weight_share: float | None = Field(
        default=None, gt=0, le=1, description="cap on one client's share of a round's weight"
    )
    carry_residual: bool = Field(
        default=True, description="average clients' changes, keeping what a low-rank client cannot hold (flexlora)"
    )
    server_lr: float = Field(default=1.0, gt=0, description="server learning rate on the changes (carry_residual)")
    global_rank: int = Field(default=64, ge=1, description="rank the global adapter is kept and joins are cut at")
    max_transfers_per_client: int = Field(default=4, ge=1, description="chunked updates under way per client")
    max_transfers: int = Field(default=256, ge=1, description="chunked updates under way in the federation")
    require_identity: bool = Field(default=False, description="senders must be the client's provisioned broker user")
    signing_keys: Path | None = Field(default=None, description="JSON of client id -> hex HMAC key; signs required")
    transfer_expiry_s: float = Field(default=300.0, gt=0, description="idle time after which a chunked update expires")
    hold_bytes: int = Field(
        default=1024**3, ge=0, description="bytes of recorded updates kept decoded for the rounds this process closes"
    )
    fold_bytes: int = Field(
        default=1024**3, ge=0, description="bytes of dense round sums this process folds recorded updates into"
    )
    payload_store: str = Field(
        default="redis",
        description="where update and adapter bytes live: redis, or file:///dir on a mount every aggregator shares",
    )
    payload_fsync: bool = Field(default=True, description="file:// payloads reach the disk before an update is acked")
    min_replicas: int = Field(
        default=0, ge=0, description="ack an update only once this many Redis replicas hold its record (WAIT)"
    )
    replica_timeout_s: float = Field(default=1.0, gt=0, description="how long to wait for them before retrying")
    # Client-level differential privacy (aggregator.privacy): on when dp_clip_norm is given.
    dp_clip_norm: float | None = Field(default=None, gt=0, description="clip each client's change to this norm")
    dp_noise_multiplier: float | None = Field(default=None, gt=0, description="noise std on the sum, times the clip")
    dp_population: int | None = Field(default=None, ge=1, description="clients in the federation (sampling rate)")
    dp_delta: float = Field(default=1e-5, gt=0, lt=1, description="the δ that ε is reported at")
    dp_epsilon_budget: float | None = Field(default=None, gt=0, description="refuse to commit a round past this ε")
    dp_weight_cap: int | None = Field(default=None, ge=1, description="a client weighs min(samples / cap, 1)")

    @field_validator("strategy")
    @classmethod
    def _served_strategy(cls, name: str) -> str:
        key = name.strip().lower()
        if key not in served():
            raise ValueError(f"an aggregator serves {', '.join(served())}; got {name!r}")
        return key

    @model_validator(mode="after")
    def _policy_is_valid(self) -> AggregatorSettings:
        self.policy()
        if self.server_lr != 1.0 and not self.carry_residual:
            raise ValueError("server_lr scales the clients' changes: it needs carry_residual")
        if self.privacy() is not None and self.strategy != "flexlora":
            raise ValueError("differential privacy aggregates by FlexLoRA's dense path: use --strategy flexlora")
        return self

    @field_validator("broker_url")
    @classmethod
    def _known_broker_url(cls, url: str) -> str:
        return check_broker_url(url)

    @field_validator("redis_url")
    @classmethod
    def _known_store_url(cls, url: str) -> str:
        from aggregator.stores import check_store_url

        return check_store_url(url)

    @field_validator("payload_store")
    @classmethod
    def _known_payload_store(cls, url: str) -> str:
        from aggregator.payloads import check_payload_url

        return check_payload_url(url)

    def replication(self) -> Replication:
        return Replication(self.min_replicas, self.replica_timeout_s)

    def payloads(self) -> PayloadStore | None:
        """The federation's payload store (None: its bytes are kept in Redis)."""
        from aggregator.payloads import open_payloads

        return open_payloads(self.payload_store, self.federation, fsync=self.payload_fsync)

    def privacy(self) -> PrivacyConfig | None:
        """The differential-privacy mechanism, when asked for; all of clip, noise and population, or none."""
        from aggregator.privacy import PrivacyConfig

        given = {"dp_clip_norm": self.dp_clip_norm, "dp_noise_multiplier": self.dp_noise_multiplier}
        given["dp_population"] = self.dp_population
        if all(v is None for v in given.values()):
            if self.dp_epsilon_budget is not None or self.dp_weight_cap is not None:
                raise ValueError("dp_epsilon_budget and dp_weight_cap need differential privacy on (dp_clip_norm …)")
            return None
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"differential privacy needs dp_clip_norm, dp_noise_multiplier and dp_population; "
                f"missing {', '.join(missing)}"
            )
        return PrivacyConfig(
            clip_norm=float(self.dp_clip_norm or 0),
            noise_multiplier=float(self.dp_noise_multiplier or 0),
            population=int(self.dp_population or 0),
            delta=self.dp_delta,
            epsilon_budget=self.dp_epsilon_budget,
            weight_cap=self.dp_weight_cap,
        )

    def policy(self) -> RoundPolicy:
        return RoundPolicy(self.max_updates, self.min_updates, self.round_deadline_s)
