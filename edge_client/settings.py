"""Edge client settings: every option is a CLI flag and a FLEXLORA_* environment variable; unknown keys refused."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from broker.connect import check_broker_url
from edge_client.ranks import RankPolicy, rank_policy
from edge_client.resources import RankChoice
from edge_client.tasks import task_names
from edge_client.worker import ADAPTER_TIMEOUT_S
from schemas.chunks import DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES
from schemas.ranks import RankRequest, parse_rank_pattern
from schemas.recipe import RecipeSettings

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


class ClientSettings(RecipeSettings):
    broker_url: str = DEFAULT_BROKER_URL
    federation: str = Field(default="default", pattern=r"^[A-Za-z0-9_.\-]+$")
    client_id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)
    model: str = "smollm2"
    rank: int | Literal["auto"] = Field(default=8, description="LoRA rank, or auto to pick it from the device")
    rank_schedule: tuple[int, ...] = Field(
        default=(), description="a rank per round, e.g. 8,16,32 (the last holds); overrides rank"
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="ranks per module, e.g. q_proj=30,gate_proj=200 or the preset paper-type2; others train at rank",
    )
    lora_alpha: float | None = Field(default=None, gt=0, description="LoRA alpha (default: the recipe's)")
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    tasks: tuple[str, ...] = ()
    data: Path | None = Field(default=None, description="JSONL of instruction/input/output records (else tasks)")
    samples_per_task: int = Field(default=32, ge=1)
    local_steps: int = Field(default=10, ge=1)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0
    rounds: int = Field(default=0, ge=0, description="0 = keep going until stopped")
    heartbeat_s: int = Field(default=30, ge=1)
    adapter_timeout_s: float = Field(
        default=ADAPTER_TIMEOUT_S, gt=0, description="how long to wait for a round's adapter"
    )
    signing_key: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="hex HMAC key, where the federation requires signatures"
    )
    chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=MIN_CHUNK_BYTES, description="larger updates are chunked")
    state_dir: Path | None = Field(default=None, description="checkpoint folder (default: the cache)")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve Prometheus metrics here")
    eval_examples: int = Field(
        default=0, ge=0, description="held-out examples scored (ROUGE-L) each round and reported; 0 = off"
    )

    @model_validator(mode="after")
    def _known_tasks(self) -> ClientSettings:
        unknown = sorted(set(self.tasks) - set(task_names()))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; choose from {task_names()}")
        return self

    @field_validator("broker_url")
    @classmethod
    def _known_broker_url(cls, url: str) -> str:
        return check_broker_url(url)

    @field_validator("rank_schedule", mode="before")
    @classmethod
    def _schedule_from_text(cls, value: object) -> object:
        if isinstance(value, str):  # "8,16,32" from a flag or FLEXLORA_RANK_SCHEDULE
            return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
        return value

    @field_validator("rank_pattern", mode="before")
    @classmethod
    def _pattern_from_text(cls, value: object) -> object:
        if isinstance(value, str):  # "q_proj=30,..." or a preset name, from a flag or FLEXLORA_RANK_PATTERN
            return parse_rank_pattern(value)
        return value

    @model_validator(mode="after")
    def _pattern_is_fixed(self) -> ClientSettings:
        if self.rank_pattern and (self.rank == "auto" or self.rank_schedule):
            raise ValueError("a rank pattern fixes the ranks per module: it cannot go with rank auto or a schedule")
        for key, r in self.rank_pattern.items():
            if not re.fullmatch(r"[A-Za-z0-9_.]{1,256}", key) or not 1 <= r <= 1024:
                raise ValueError(f"rank pattern entry {key}={r}: need a module name and a rank between 1 and 1024")
        return self

    @model_validator(mode="after")
    def _rank_in_range(self) -> ClientSettings:
        if self.rank != "auto" and not 1 <= self.rank <= 1024:
            raise ValueError(f"rank must be between 1 and 1024 or 'auto', got {self.rank}")
        if any(not 1 <= r <= 1024 for r in self.rank_schedule):
            raise ValueError(f"every rank of the schedule must be between 1 and 1024, got {list(self.rank_schedule)}")
        return self

    def rank_policy(self) -> RankPolicy:
        """What the device trains each round at: the schedule, `auto` measured again every round, or the rank."""
        return rank_policy(self.rank, self.rank_schedule)

    def resolved_rank(self) -> RankChoice:
        """The rank of the first round: as given, the schedule's first, or chosen from the device for `auto`."""
        return self.rank_policy()(0)

    def rank_request(self, rank: int) -> RankRequest:
        """The ranks per module a client at `rank` trains: the pattern's modules at theirs, each at its alpha
        (the recipe's for its rank, unless lora_alpha fixes one alpha for all, as the paper's authors did)."""
        alphas = {} if self.lora_alpha is not None else {k: self.alpha_for(r) for k, r in self.rank_pattern.items()}
        return RankRequest.of(rank, self.alpha_for(rank), self.rank_pattern, alphas)

    def alpha_for(self, rank: int) -> float:
        """LoRA alpha: as set, else the recipe's for `rank` (rsLoRA by default: alpha / rank = 4 / √rank)."""
        return self.lora_alpha if self.lora_alpha is not None else self.recipe().alpha(rank)

    @property
    def task_list(self) -> list[str]:
        """The client's tasks; by default two picked from its id, so every device holds different data."""
        if self.tasks:
            return list(self.tasks)
        names = task_names()
        start = int(hashlib.sha256(self.client_id.encode()).hexdigest(), 16) % len(names)
        return [names[start], names[(start + 1) % len(names)]]
