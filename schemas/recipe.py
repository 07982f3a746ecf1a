"""How a device trains: the LoRA scaling convention (alpha for a rank) and the learning-rate schedule of a local
run, in one place shared by the edge client, the demo and the experiments."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

Scaling = Literal["rslora", "rank", "fixed"]
Schedule = Literal["linear", "constant", "cosine"]

SCALINGS: tuple[str, ...] = get_args(Scaling)
SCHEDULES: tuple[str, ...] = get_args(Schedule)

# alpha = factor · rank ** exponent, so the LoRA scale alpha / rank is factor · rank ** (exponent − 1):
#   rslora: factor / √rank (Kalajdzievski 2023): a rank-r update's size does not grow with r;
#   rank:   a scale of `factor` at every rank (this project's convention before the recipe was measured);
#   fixed:  alpha = factor whatever the rank (the FlexLoRA authors' code: 16), scale 16 / rank.
_EXPONENT: dict[str, float] = {"rslora": 0.5, "rank": 1.0, "fixed": 0.0}
DEFAULT_FACTOR: dict[str, float] = {"rslora": 4.0, "rank": 2.0, "fixed": 16.0}


def lora_alpha(rank: int, scaling: Scaling = "rslora", factor: float | None = None) -> float:
    """LoRA alpha for `rank` under a scaling convention (the update a client sends is (alpha/rank)·B·A)."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if scaling not in _EXPONENT:
        raise ValueError(f"unknown scaling {scaling!r}; choose from {', '.join(SCALINGS)}")
    f = DEFAULT_FACTOR[scaling] if factor is None else factor
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"the alpha factor must be a positive number, got {f}")
    return float(f * math.pow(rank, _EXPONENT[scaling]))


def lr_multiplier(schedule: Schedule, steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning rate of step `i` of a local run, as a fraction of the peak: a linear warm-up over
    `warmup_steps`, then constant, linear decay to 0 or a cosine to 0 at the end of the run (as the HF
    Trainer's schedules, which the FlexLoRA authors trained with: every local run starts the schedule afresh)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if steps < 1 or not 0 <= warmup_steps < steps:
        raise ValueError(f"need 0 ≤ warm-up steps < steps, got {warmup_steps} of {steps}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        # Decay over the steps after warm-up; the last step keeps a small positive rate, so none is wasted.
        progress = (step - warmup_steps) / (steps - warmup_steps)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


@dataclass(frozen=True)
class Recipe:
    """Everything about local training that a federation's clients should agree on."""

    scaling: Scaling = "rslora"
    alpha_factor: float | None = None  # None: the convention's default (DEFAULT_FACTOR)
    learning_rate: float = 3e-3
    schedule: Schedule = "linear"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        lora_alpha(1, self.scaling, self.alpha_factor)  # validates scaling and factor
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warm-up steps must be ≥ 0, got {self.warmup_steps}")

    def alpha(self, rank: int) -> float:
        return lora_alpha(rank, self.scaling, self.alpha_factor)
