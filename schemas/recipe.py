"""How a device trains: the LoRA scaling convention (alpha for a rank) and the learning-rate schedule of a local
run, in one place shared by the edge client, the aggregator (which sends its federation's recipe with every
release), the demo and the experiments."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from schemas.settings import FlexloraSettings

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


class Recipe(BaseModel):
    """Everything about local training that a federation's clients should agree on. The defaults are the recipe
    chosen by experiment (docs/experiments.md): rsLoRA scaling, a linear decay of the learning rate inside every
    local run, peak 5e-4; the 2·rank convention with a constant 3e-3 made a rank-56 client's local change
    ~√28 times a rank-2 client's and the global model oscillate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scaling: Scaling = "rslora"
    alpha_factor: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False)  # None: DEFAULT_FACTOR
    learning_rate: float = Field(default=5e-4, gt=0, le=1.0, allow_inf_nan=False)
    schedule: Schedule = "linear"
    warmup_steps: int = Field(default=0, ge=0, le=100_000)

    def alpha(self, rank: int) -> float:
        return lora_alpha(rank, self.scaling, self.alpha_factor)


DEFAULT_RECIPE = Recipe()


RECIPE_FIELDS: tuple[str, ...] = tuple(Recipe.model_fields)


class RecipeSettings(FlexloraSettings):
    """The recipe as settings (flags and FLEXLORA_* variables) of every role: the aggregator sends its own with
    every release, and a client follows it for whatever of it the client was not given itself."""

    scaling: Scaling = DEFAULT_RECIPE.scaling
    alpha_factor: float | None = Field(default=None, gt=0, le=1e6, description="alpha = factor · rank^exponent")
    learning_rate: float = Field(default=DEFAULT_RECIPE.learning_rate, gt=0, le=1.0, description="peak local rate")
    schedule: Schedule = DEFAULT_RECIPE.schedule
    warmup_steps: int = Field(default=DEFAULT_RECIPE.warmup_steps, ge=0, le=100_000)

    def recipe(self) -> Recipe:
        return Recipe(**{name: getattr(self, name) for name in RECIPE_FIELDS})

    def recipe_given(self) -> frozenset[str]:
        """The recipe's fields set by a flag or a variable, not left at their defaults."""
        return frozenset(self.model_fields_set & set(RECIPE_FIELDS))
