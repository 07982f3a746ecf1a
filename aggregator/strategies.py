"""Aggregation strategies behind one interface, and pluggable client weighting; pure tensors in, tensors out."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from aggregator.flexlora import AggregationError, ClientAdapter, ModuleReport, RankRequest, flexlora, flexlora_dense
from aggregator.flexlora import validate_inputs as check_inputs
from aggregator.lowrank import SvdMode
from aggregator.registry import STRATEGIES
from schemas.lora import LoraFactors


@dataclass(frozen=True)
class ClientMeta:
    """What weighting schemes may look at: a client's data size and how stale its update is."""

    num_samples: int
    staleness: int = 0


class Weighting(Protocol):
    """Turns client metadata into non-negative weights (normalised by the caller)."""

    name: str

    def __call__(self, clients: Sequence[ClientMeta]) -> list[float]: ...


@dataclass(frozen=True)
class AggregationResult:
    """One adapter per requested (rank, alpha). `merge_into_base` tells clients to merge it into their base
    weights and start a fresh LoRA (FLoRA) instead of continuing from it."""

    adapters: dict[RankRequest, dict[str, LoraFactors]]
    merge_into_base: bool = False
    info: Mapping[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    """`carried`: adapters added to the weighted sum as they are (the server step, aggregator.planning); only
    strategies registered with `sums_products` take any, the rest refuse them."""

    name: str

    def aggregate(
        self,
        clients: Sequence[ClientAdapter],
        weights: Sequence[float],
        requests: Sequence[RankRequest],
        carried: Sequence[ClientAdapter] = (),
    ) -> AggregationResult: ...


StrategyFactory = Callable[..., Strategy]


class StrategyError(AggregationError):
    """Inputs a strategy cannot aggregate; the message names the offending client, module or request."""


def finite_result(result: AggregationResult) -> AggregationResult:
    """`result`, if every factor of every adapter is finite; else StrategyError naming the first that is not.
    Finite inputs can still overflow: values near float32's range (5e18 is enough) sum, cut and cast to inf, and
    a release of inf would reach every participant and the global that every later round starts from."""
    for request, adapter in result.adapters.items():
        for module, factors in adapter.items():
            if not (bool(torch.isfinite(factors.A).all()) and bool(torch.isfinite(factors.B).all())):
                raise StrategyError(f"the {request.describe()} cut of module {module!r} holds NaN or infinite values")
    return result


# --- weighting -------------------------------------------------------------------------------------------------
# Every scheme returns un-normalised weights: strategies normalise anyway, and raw values (sample counts) are
# easier to log and to check than fractions.


def _checked_weights(weights: list[float], scheme: str) -> list[float]:
    if not weights:
        raise ValueError(f"{scheme} weighting needs at least one client")
    for k, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{scheme} weighting gave client {k} the weight {w}; weights must be finite and >= 0")
    if sum(weights) <= 0:
        raise ValueError(f"{scheme} weighting gave every client weight 0; at least one must be positive")
    return weights


@dataclass(frozen=True)
class DataSize:
    """w_k = n_k, FlexLoRA's default: clients count in proportion to their training samples."""

    name = "data_size"

    def __call__(self, clients: Sequence[ClientMeta]) -> list[float]:
        return _checked_weights([float(c.num_samples) for c in clients], self.name)


@dataclass(frozen=True)
class Uniform:
    """w_k = 1: every client counts the same, whatever its data size."""

    name = "uniform"

    def __call__(self, clients: Sequence[ClientMeta]) -> list[float]:
        return _checked_weights([1.0 for _ in clients], self.name)


@dataclass(frozen=True)
class StalenessDiscount:
    """w_k = base_k · (1 + staleness_k)^(-exponent): updates trained on older global adapters count less."""

    base: Weighting = field(default_factory=DataSize)
    exponent: float = 0.5
    name = "staleness"

    def __post_init__(self) -> None:
        if not math.isfinite(self.exponent) or self.exponent < 0:
            raise ValueError(f"staleness exponent must be finite and >= 0, got {self.exponent}")

    def __call__(self, clients: Sequence[ClientMeta]) -> list[float]:
        for k, c in enumerate(clients):
            if c.staleness < 0:
                raise ValueError(f"client {k} has negative staleness {c.staleness}")
        base = self.base(clients)
        return _checked_weights(
            [b * (1.0 + c.staleness) ** (-self.exponent) for b, c in zip(base, clients, strict=True)], self.name
        )


def shares(weights: Sequence[float], cap: float | None = None) -> list[float]:
    """Weights normalised to sum to 1 without overflow (scaled by the largest first), each then capped at
    `cap` with the excess spread over the others in proportion (water-filling), so no client's claimed data
    size can take over a round. A cap below 1/n cannot hold for n clients: they then share equally."""
    top = max(weights)
    if not math.isfinite(top) or top <= 0:
        raise ValueError(f"weights {list(weights)[:4]}… cannot be normalised")
    scaled = [w / top for w in weights]
    total = math.fsum(scaled)
    out = [w / total for w in scaled]
    if cap is None or cap >= 1.0:
        return out
    if cap * len(out) <= 1.0:
        return [1.0 / len(out)] * len(out)
    capped: set[int] = set()
    while True:
        free = [k for k in range(len(out)) if k not in capped]
        room = 1.0 - cap * len(capped)
        mass = math.fsum(out[k] for k in free)
        if mass <= 0:  # only zero weights left uncapped: they share what the cap leaves equally
            return [cap if k in capped else room / len(free) for k in range(len(out))]
        over = {k for k in free if out[k] / mass * room > cap}
        if not over:
            return [cap if k in capped else out[k] / mass * room for k in range(len(out))]
        capped |= over


WEIGHTINGS: Mapping[str, Callable[..., Weighting]] = {
    "data_size": DataSize,
    "uniform": Uniform,
    "staleness": StalenessDiscount,
}


def _build(registry: Mapping[str, Callable[..., Any]], kind: str, name: str, options: dict[str, Any]) -> Any:
    """Look `name` up case-insensitively and build it, turning unknown names and options into ValueErrors."""
    key = name.strip().lower()
    if key not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}")
    try:
        return registry[key](**options)
    except TypeError as exc:
        raise ValueError(f"bad options {sorted(options)} for {kind} {key!r}: {exc}") from exc


def get_weighting(name: str, **options: Any) -> Weighting:
    """The weighting scheme called `name`; a string `base` option (for staleness) is resolved by name too."""
    if isinstance(options.get("base"), str):
        options["base"] = get_weighting(options["base"])
    weighting: Weighting = _build(WEIGHTINGS, "weighting", name, options)
    return weighting


# --- shared validation -------------------------------------------------------------------------------------------


def validate_inputs(
    clients: Sequence[ClientAdapter],
    weights: Sequence[float],
    requests: Sequence[RankRequest],
    carried: Sequence[ClientAdapter] = (),
) -> tuple[list[float], list[str]]:
    """aggregator.flexlora.validate_inputs, raising StrategyError: the normalised weights and module names.
    For strategies that average factors: anything `carried` is refused (it is a sum of products)."""
    if carried:
        raise StrategyError("this strategy averages factors; it cannot add carried products (server step)")
    try:
        return check_inputs(clients, weights, requests)
    except AggregationError as exc:
        raise StrategyError(str(exc)) from exc


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _weighted_sum(weights: Sequence[float], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return (w[:, None, None] * torch.stack(list(tensors))).sum(dim=0)


# --- strategies --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlexLoRA:
    """ΔW = Σ p_k s_k B_k A_k, cut by SVD at every requested rank (aggregator.flexlora); the base stays untouched."""

    mode: SvdMode = "exact"
    tolerance: float = 1e-3
    dtype: torch.dtype = torch.float32
    name = "flexlora"

    def aggregate(
        self,
        clients: Sequence[ClientAdapter],
        weights: Sequence[float],
        requests: Sequence[RankRequest],
        carried: Sequence[ClientAdapter] = (),
    ) -> AggregationResult:
        reports: list[ModuleReport] = []
        try:  # flexlora() validates its inputs itself; once is enough for gigabytes of factors
            adapters = flexlora(
                clients,
                [float(w) for w in weights],
                requests,
                self.dtype,
                mode=self.mode,
                tolerance=self.tolerance,
                reports=reports,
                carried=carried,
            )
        except AggregationError as exc:
            raise StrategyError(str(exc)) from exc
        fallbacks = sum(1 for r in reports if "→" in r.path or r.path == "factored-qr")
        info = {
            "max_certified_excess": max((r.excess for r in reports), default=0.0),
            "svd_fallbacks": float(fallbacks),
        }
        return AggregationResult(adapters=adapters, info=info)

    @property
    def work_dtype(self) -> torch.dtype:
        """The precision of the dense ΔW this strategy's SVD works on: float32 in fast mode, float64 otherwise."""
        return torch.float32 if self.mode == "fast" else torch.float64

    def aggregate_dense(self, dense: Mapping[str, torch.Tensor], requests: Sequence[RankRequest]) -> AggregationResult:
        """The round from its dense ΔW per module, summed already (aggregator.folding)."""
        reports: list[ModuleReport] = []
        try:
            adapters = flexlora_dense(dense, requests, self.dtype, mode=self.mode, reports=reports)
        except AggregationError as exc:
            raise StrategyError(str(exc)) from exc
        return AggregationResult(adapters=adapters, info={"max_certified_excess": 0.0, "svd_fallbacks": 0.0})


@dataclass(frozen=True)
class FedIT:
    """FedAvg of A and of s·B separately; only meaningful when every client trains at one rank."""

    dtype: torch.dtype = torch.float32
    name = "fedit"

    def aggregate(
        self,
        clients: Sequence[ClientAdapter],
        weights: Sequence[float],
        requests: Sequence[RankRequest],
        carried: Sequence[ClientAdapter] = (),
    ) -> AggregationResult:
        p, modules = validate_inputs(clients, weights, requests, carried)
        unique = sorted(set(requests))
        for module in modules:
            ranks = sorted({c.at(module).rank for c in clients} | {r.at(module).rank for r in unique})
            if len(ranks) > 1:
                raise StrategyError(
                    f"FedIT averages A and B entrywise, so every client and request needs one rank on each module; "
                    f"module {module!r} has ranks {ranks}. Rank patterns work where every client has the same one. "
                    "The bucket-effect baseline is every client trained at the smallest rank."
                )
        adapters: dict[RankRequest, dict[str, LoraFactors]] = {req: {} for req in unique}
        for module in modules:
            a = _weighted_sum(p, [_f64(c.factors[module].A) for c in clients])
            # Folding each client's alpha/rank into B lets clients with different alphas share one average.
            sb = _weighted_sum(p, [c.scale_at(module) * _f64(c.factors[module].B) for c in clients])
            for req in adapters:
                at = req.at(module)
                adapters[req][module] = LoraFactors(A=a.to(self.dtype), B=(sb / (at.alpha / at.rank)).to(self.dtype))
        return AggregationResult(adapters=adapters)


def _frobenius_of_product(b: torch.Tensor, a: torch.Tensor) -> float:
    # ‖BA‖²_F = tr((BᵀB)(AAᵀ)): rank × rank work instead of forming the d_out × d_in product.
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


@dataclass(frozen=True)
class HetLoRA:
    """Zero-pad to the largest rank, average weighted by p_k·‖s_k B_k A_k‖_F, truncate to each requested rank."""

    dtype: torch.dtype = torch.float32
    name = "hetlora"

    def aggregate(
        self,
        clients: Sequence[ClientAdapter],
        weights: Sequence[float],
        requests: Sequence[RankRequest],
        carried: Sequence[ClientAdapter] = (),
    ) -> AggregationResult:
        p, modules = validate_inputs(clients, weights, requests, carried)
        adapters: dict[RankRequest, dict[str, LoraFactors]] = {req: {} for req in sorted(set(requests))}
        largest = 0
        for module in modules:
            # Padded to the largest rank on this module: with rank patterns each module has its own.
            r_max = max(c.at(module).rank for c in clients)
            largest = max(largest, r_max)
            a_k = [_f64(c.factors[module].A) for c in clients]
            sb_k = [c.scale_at(module) * _f64(c.factors[module].B) for c in clients]
            norms = [pk * _frobenius_of_product(b, a) for pk, a, b in zip(p, a_k, sb_k, strict=True)]
            # All-zero products (e.g. round 0, where PEFT initialises B to 0) carry no norm signal; use p alone.
            total = math.fsum(norms)
            q = [n / total for n in norms] if total > 0 else p
            d_out, d_in = sb_k[0].shape[0], a_k[0].shape[1]
            a = torch.zeros((r_max, d_in), dtype=torch.float64)
            sb = torch.zeros((d_out, r_max), dtype=torch.float64)
            for qk, ak, bk in zip(q, a_k, sb_k, strict=True):
                r = ak.shape[0]
                a[:r] += qk * ak
                sb[:, :r] += qk * bk
            for req in adapters:
                at = req.at(module)
                keep = min(at.rank, r_max)
                a_out = torch.zeros((at.rank, d_in), dtype=torch.float64)
                b_out = torch.zeros((d_out, at.rank), dtype=torch.float64)
                a_out[:keep] = a[:keep]
                b_out[:, :keep] = sb[:, :keep] / (at.alpha / at.rank)
                adapters[req][module] = LoraFactors(A=a_out.to(self.dtype), B=b_out.to(self.dtype))
        return AggregationResult(adapters=adapters, info={"max_rank": float(largest)})


@dataclass(frozen=True)
class FLoRA:
    """Stack the factors so B_s A_s = Σ p_k s_k B_k A_k exactly, at rank R = Σ r_k.

    The result is one adapter under RankRequest(R, R), whatever ranks were requested: alpha = R makes PEFT's
    scale alpha/r equal 1, so B_s is stored as is. With rank patterns, R_m = Σ r_k,m differs per module and the
    request carries patterns saying so. `merge_into_base` is True: each client merges this adapter
    into its base weights and starts a fresh LoRA at its own rank. Clients with weight 0 add only zero
    columns, so they are left out of the stack.
    """

    dtype: torch.dtype = torch.float32
    name = "flora"

    def aggregate(
        self,
        clients: Sequence[ClientAdapter],
        weights: Sequence[float],
        requests: Sequence[RankRequest],
        carried: Sequence[ClientAdapter] = (),
    ) -> AggregationResult:
        p, modules = validate_inputs(clients, weights, requests, carried)
        kept = [(pk, c) for pk, c in zip(p, clients, strict=True) if pk > 0]
        stacked: dict[str, LoraFactors] = {}
        ranks: dict[str, RankRequest] = {}
        for module in modules:
            b = torch.cat([(pk * c.scale_at(module)) * _f64(c.factors[module].B) for pk, c in kept], dim=1)
            a = torch.cat([_f64(c.factors[module].A) for _, c in kept], dim=0)
            stacked[module] = LoraFactors(A=a.to(self.dtype), B=b.to(self.dtype))
            # With rank patterns each module stacks to its own rank R_m (alpha R_m: scale 1 there too).
            ranks[module] = RankRequest(int(a.shape[0]), float(a.shape[0]))
        request = RankRequest.exact(ranks)
        return AggregationResult(
            adapters={request: stacked},
            merge_into_base=True,
            info={"stacked_rank": float(max(r.rank for r in ranks.values()))},
        )


def get_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called `name` (case-insensitive), built with `options`."""
    factories = {n: s.load() for n, s in STRATEGIES.items()}
    strategy: Strategy = _build(factories, "strategy", name, options)
    return strategy
