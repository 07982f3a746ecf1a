"""The aggregation strategies by name, with what the rest of the system needs to know about each: adding a
strategy is its class in aggregator/strategies.py plus one entry here. Torch-free, so the command line can list
the names without loading the math."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StrategySpec:
    factory: str  # "module:attribute" of the class, imported when a strategy is first built
    summary: str
    # Its cuts nest (the rank-r cut of a larger cut is the rank-r cut of ΔW): the service also stores a global
    # cut at `global_rank`, and a joining client of any rank up to it gets an exact cut at once.
    nested_cuts: bool = False
    # Every client and every request must share one rank (experiments hold every client at one tier).
    single_rank: bool = False
    # Clients merge each release into their base weights and restart from a fresh LoRA: the service's
    # pinned-base check does not model that, so it runs offline only (`flexlora aggregate`, experiments).
    merges_into_base: bool = False
    # Takes the service's `svd_mode` setting as its `mode` option.
    takes_svd_mode: bool = False
    # Sums full-size products, so it can take the server step (aggregator.planning): the part of each
    # client's starting adapter it could not hold at its rank is carried into the sum.
    sums_products: bool = False

    def load(self) -> Callable[..., Any]:
        module, attribute = self.factory.split(":")
        factory: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
        return factory


STRATEGIES: dict[str, StrategySpec] = {
    "flexlora": StrategySpec(
        "aggregator.strategies:FlexLoRA",
        "SVD of the weighted sum of full-size products, cut at each client's rank",
        nested_cuts=True,
        takes_svd_mode=True,
        sums_products=True,
    ),
    "fedit": StrategySpec("aggregator.strategies:FedIT", "FedAvg of A and of s·B; one rank for all", single_rank=True),
    "hetlora": StrategySpec("aggregator.strategies:HetLoRA", "zero-pad, norm-weighted average, truncate"),
    "flora": StrategySpec(
        "aggregator.strategies:FLoRA", "stack the factors exactly; clients merge into the base", merges_into_base=True
    ),
}


def served() -> tuple[str, ...]:
    """What a running aggregator can serve (the rest are offline only), read from the registry when asked."""
    return tuple(n for n, s in STRATEGIES.items() if not s.merges_into_base)


SERVICE_STRATEGIES: tuple[str, ...] = served()  # as registered at import: for help texts


def strategy_spec(name: str) -> StrategySpec:
    """The registered strategy called `name` (case-insensitive); ValueError naming the valid ones."""
    key = name.strip().lower()
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[key]
