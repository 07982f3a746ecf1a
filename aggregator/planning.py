"""One round's aggregation as a pure step, shared by the aggregator service and the experiments' direct backend:
the clients' weights, the ranks to cut, the server step, and the strategy's result. No broker, no store: the
global adapters the clients started from come in through a callable.

The server step. FlexLoRA (Bai et al. 2024) sums the clients' full-size products Σ_k w_k P_k. A client that
started from the global cut G at rank r_k returns P_k = cut_{r_k}(G) + Δ_k, so every direction of G beyond
a client's rank is dropped from its product, and the sum shrinks G towards the small clients' ranks round
after round (measured in docs/experiments.md). With `carry_residual` the round averages the clients' changes
instead, ΔW = Σ_k w_k (G_k + η Δ_k) where G_k is the global its client started from and η the server learning
rate (FedOpt's server step, Reddi et al. 2020, without momentum): the same factored sum plus one adapter per
base version, so the fast SVD path still applies.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from aggregator import privacy
from aggregator.flexlora import ClientAdapter, RankRequest, carried_residual
from aggregator.folding import Folded
from aggregator.privacy import PrivacyConfig
from aggregator.registry import strategy_spec
from aggregator.rounds import GLOBAL_RELEASE
from aggregator.strategies import (
    AggregationResult,
    ClientMeta,
    FlexLoRA,
    Strategy,
    Weighting,
    finite_result,
    shares,
)
from schemas.lora import LoraFactors
from schemas.recipe import Recipe

# The global adapter committed at a version, as (its rank and alpha, its factors); None when it is gone.
GlobalAt = Callable[[int], tuple[RankRequest, Mapping[str, LoraFactors]] | None]


@dataclass(frozen=True)
class ServerStep:
    """How a round's result relates to the globals its clients started from (see the module's docstring)."""

    carry_residual: bool = False
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.server_lr) or self.server_lr <= 0:
            raise ValueError(f"server_lr must be finite and > 0, got {self.server_lr}")
        if self.server_lr != 1.0 and not self.carry_residual:
            raise ValueError("server_lr scales the clients' changes: it needs carry_residual")


PLAIN_STEP = ServerStep()  # the paper's: the round's result is the weighted sum of the clients' products


@dataclass(frozen=True)
class RoundInput:
    """One counted update as aggregation sees it."""

    client_id: str
    num_samples: int
    base_version: int
    adapter: ClientAdapter  # with no factors when the round's fold holds the update (aggregator.folding)
    key: str = ""  # its record id (aggregator.rounds.record_id), by which a fold names it

    @property
    def request(self) -> RankRequest:
        """The ranks (per module, with patterns) this client trained at, so its release is cut at."""
        return self.adapter.request


@dataclass(frozen=True)
class RoundPlan:
    """What a round computed: each input's share, the (rank, alpha) each client's release is cut at (and the
    global's, under GLOBAL_RELEASE, for strategies whose cuts nest), and the strategy's result."""

    weights: list[float]
    wanted: dict[str, RankRequest]
    result: AggregationResult
    info: dict[str, float] = field(default_factory=dict)


def aggregate_round(
    strategy: Strategy,
    weighting: Weighting,
    inputs: Sequence[RoundInput],
    round_id: int,
    *,
    global_rank: int,
    recipe: Recipe,
    max_weight_share: float | None = None,
    step: ServerStep = PLAIN_STEP,
    global_at: GlobalAt = lambda version: None,
    privacy: Private | None = None,
    folded: Folded | None = None,
) -> RoundPlan:
    """Aggregate one round. A client that sent twice gets its release at the rank of its newest update (the
    last in `inputs`). Under `step.carry_residual`, an input whose starting global is gone (pruned) counts
    as in plain FlexLoRA; `info["starts_missing"]` counts them. With `privacy` the round is the differentially
    private one of aggregator.privacy, whatever the strategy: it averages the clients' clipped changes (the
    server step, η = step.server_lr) with noise, and cuts the dense result. With `folded` (the round's sums,
    aggregator.folding; the caller checked it holds only updates of `inputs`, each with its payload) the dense
    ΔW starts from them, when `fold_coefficients` says they apply; `info["folded_updates"]` says how many."""
    weights = round_weights(weighting, inputs, round_id, max_weight_share)
    wanted = {i.client_id: i.request for i in inputs}
    spec = strategy_spec(strategy.name)
    if spec.nested_cuts or privacy is not None:
        wanted[GLOBAL_RELEASE] = global_request(wanted.values(), _modules(inputs, folded), global_rank, recipe)
    if privacy is not None:
        return _private_round(inputs, round_id, wanted, step.server_lr, global_at, privacy)
    carried: list[ClientAdapter] = []
    info: dict[str, float] = {}
    eta = step.server_lr
    if step.carry_residual and spec.sums_products:
        starts: dict[int, list[tuple[RankRequest, float]]] = {}
        for item, w in zip(inputs, weights, strict=True):
            if item.base_version >= 1:  # version 0 is the untrained start: its product is 0, nothing to carry
                # Divided by η: the whole sum is multiplied by η after the strategy (it normalises the weights).
                starts.setdefault(item.base_version, []).append((item.request, w / eta))
        missing = 0
        for version, entries in sorted(starts.items()):
            found = global_at(version)
            if found is None:
                missing += len(entries)
                continue
            extra = carried_residual(found[1], found[0], entries, eta)
            if extra is not None:
                carried.append(extra)
        info = {"carried_versions": float(len(carried)), "starts_missing": float(missing)}
    coefficients = None if folded is None else fold_coefficients(strategy, folded, inputs, weights)
    if folded is not None and coefficients is not None and isinstance(strategy, FlexLoRA):
        dense = _dense_round(folded, coefficients, inputs, weights, carried, strategy.work_dtype)
        result = strategy.aggregate_dense(dense, list(wanted.values()))
        info["folded_updates"] = float(len(folded.updates))
    else:
        result = strategy.aggregate([i.adapter for i in inputs], weights, list(wanted.values()), carried)
    if eta != 1.0:
        result = scaled(result, eta)
    return RoundPlan(weights, wanted, finite_result(result), {**result.info, **info})


def global_request(
    requests: Iterable[RankRequest], modules: Sequence[str], global_rank: int, recipe: Recipe
) -> RankRequest:
    """The global release's cut: uniform, at the largest rank any module of any client is cut at (and at least
    `global_rank`), at the recipe's alpha for that rank."""
    top = max(global_rank, *(r.max_rank(modules) for r in requests))
    return RankRequest(top, recipe.alpha(top))


def round_weights(
    weighting: Weighting, inputs: Sequence[RoundInput], round_id: int, max_weight_share: float | None = None
) -> list[float]:
    """Each input's share of the round: the weighting's raw weights (data size, staleness) normalised and capped."""
    raw = weighting([ClientMeta(i.num_samples, round_id - i.base_version) for i in inputs])
    return shares(raw, max_weight_share)


def _modules(inputs: Sequence[RoundInput], folded: Folded | None) -> list[str]:
    for item in inputs:
        if item.adapter.factors:
            return list(item.adapter.factors)
    return sorted(next(iter(folded.sums.values()))) if folded is not None and folded.sums else []


def fold_coefficients(
    strategy: Strategy, folded: Folded, inputs: Sequence[RoundInput], weights: Sequence[float]
) -> dict[int, float] | None:
    """The factor each base version's folded sum is multiplied by so that the round comes out as if summed
    from the factors (None when it cannot: see aggregator.folding). A folded update's share is its raw weight
    at fold time times one factor common to its base version, or the sums do not apply (a share cap bound, or
    the weighting depends on more than data size and staleness); and every module must be one the strategy
    sums densely (total rank ≥ min(d_out, d_in)), or the factored path it would take instead is not this."""
    if not isinstance(strategy, FlexLoRA) or not folded.sums:
        return None
    coefficients: dict[int, float] = {}
    for item, w in zip(inputs, weights, strict=True):
        entry = folded.updates.get(item.key)
        if entry is None:
            continue
        if entry.base_version != item.base_version:
            return None
        if entry.raw_weight <= 0:
            if w != 0:
                return None
            continue
        c = w / entry.raw_weight
        known = coefficients.setdefault(item.base_version, c)
        if not math.isclose(known, c, rel_tol=1e-9, abs_tol=0.0):
            return None
    sums = next(iter(folded.sums.values()))
    for module, dense in sums.items():
        total_rank = sum(i.request.at(module).rank for i in inputs)
        if total_rank < min(dense.shape[0], dense.shape[1]):
            return None
    return coefficients


def _dense_round(
    folded: Folded,
    coefficients: Mapping[int, float],
    inputs: Sequence[RoundInput],
    weights: Sequence[float],
    carried: Sequence[ClientAdapter],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """ΔW per module: the folded sums scaled, plus the products of the inputs the fold does not hold and of
    the carried adapters (weight 1, as flexlora() adds them)."""
    dense: dict[str, torch.Tensor] = {}
    for version, sums in folded.sums.items():
        c = coefficients.get(version, 0.0)
        for module, t in sums.items():
            part = t.to(dtype).mul_(c) if t.dtype != dtype else t.mul_(c)
            dense[module] = part if module not in dense else dense[module].add_(part)
    rest = [(i.adapter, w) for i, w in zip(inputs, weights, strict=True) if i.key not in folded.updates]
    for adapter, w in [*rest, *((c, 1.0) for c in carried)]:
        for module, out in dense.items():
            f = adapter.factors[module]
            out.addmm_(f.B.to(dtype), f.A.to(dtype), alpha=w * adapter.scale_at(module))
    return dense


@dataclass(frozen=True)
class Private:
    """A differentially private round's settings: the mechanism's, and the expected clients per round (the
    fixed denominator, and with the population the sampling rate)."""

    config: PrivacyConfig
    expected_clients: int


def _private_round(
    inputs: Sequence[RoundInput],
    round_id: int,
    wanted: dict[str, RankRequest],
    server_lr: float,
    global_at: GlobalAt,
    private: Private,
) -> RoundPlan:
    """aggregator.privacy's round: clipped changes from each client's start, noise, the dense cut. An input
    whose starting global is gone (pruned) cannot say what it changed and is left out (`starts_missing`)."""
    config = private.config
    changes, samples, used = [], [], []
    for item in inputs:
        start = None if item.base_version == 0 else global_at(item.base_version)
        if item.base_version != 0 and start is None:
            continue
        changes.append(privacy.change(item.adapter, start))
        samples.append(item.num_samples)
        used.append(item)
    if not changes:
        raise ValueError("every update's starting global is gone: nothing to aggregate privately")
    seed = secrets.randbits(63) if config.seed is None else config.seed * 1_000_003 + round_id
    generator = torch.Generator().manual_seed(seed)
    current = privacy.dense_global(global_at(round_id) if round_id >= 1 else None)
    noisy = privacy.noisy_round(
        changes,
        samples,
        current,
        config,
        expected_clients=private.expected_clients,
        server_lr=server_lr,
        generator=generator,
    )
    adapters = privacy.top_cuts(noisy.dense, list(wanted.values()), seed=seed)
    counted = {id(i) for i in used}
    weights = [config.weight(i.num_samples) / private.expected_clients if id(i) in counted else 0.0 for i in inputs]
    info = {**noisy.info, "starts_missing": float(len(inputs) - len(used))}
    return RoundPlan(weights, wanted, finite_result(AggregationResult(adapters=adapters, info=info)), info)


def scaled(result: AggregationResult, factor: float) -> AggregationResult:
    """Every released adapter times `factor` (B scaled: the SVD of cX is c times the SVD of X)."""
    adapters = {
        request: {m: LoraFactors(A=f.A, B=f.B * factor) for m, f in modules.items()}
        for request, modules in result.adapters.items()
    }
    return AggregationResult(adapters, result.merge_into_base, result.info)
