"""FlexLoRA as pure functions: tensors in, tensors out; no broker, no Redis, no files.

For one module, client k contributes B_k (d_out × r_k), A_k (r_k × d_in), alpha_k and a weight p_k.
The global update is ΔW = Σ_k p_k (alpha_k / r_k) B_k A_k; its SVD ΔW = U Σ Vᵀ is cut at each
requested rank r with B = U_r Σ_r / (alpha / r), A = V_rᵀ, so (alpha / r) B A is the best rank-r
approximation of ΔW (Eckart–Young). All singular values go into B, as in the authors' code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from aggregator.lowrank import SvdMode, top_svd
from schemas.lora import LoraFactors


@dataclass(frozen=True)
class ClientAdapter:
    """One client's LoRA factors for every module, with the rank and alpha it trained them at."""

    factors: Mapping[str, LoraFactors]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, order=True)
class RankRequest:
    """A rank and alpha some client needs its adapter cut at."""

    rank: int
    alpha: float


def data_size_weights(num_samples: Sequence[int]) -> list[float]:
    """p_k = n_k / Σ n: FlexLoRA's default weighting."""
    if not num_samples or any(n <= 0 for n in num_samples):
        raise ValueError(f"sample counts must be positive, got {list(num_samples)}")
    total = float(sum(num_samples))
    return [n / total for n in num_samples]


def full_update(contributions: Sequence[tuple[LoraFactors, float, float]]) -> torch.Tensor:
    """ΔW = Σ weight · scale · B A in float64, from (factors, scale = alpha/rank, weight) triples."""
    if not contributions:
        raise ValueError("no contributions to aggregate")
    delta: torch.Tensor | None = None
    for factors, scale, weight in contributions:
        term = (weight * scale) * (factors.B.to(torch.float64) @ factors.A.to(torch.float64))
        if delta is not None and term.shape != delta.shape:
            raise ValueError(f"module shapes differ between clients: {tuple(term.shape)} vs {tuple(delta.shape)}")
        delta = term if delta is None else delta + term
    assert delta is not None
    return delta


def cut(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, request: RankRequest, dtype: torch.dtype = torch.float32
) -> LoraFactors:
    """B = U_r Σ_r / (alpha / r), A = V_rᵀ; zero-padded when ΔW has fewer than r singular values."""
    r = request.rank
    k = min(r, s.shape[0])
    scale = request.alpha / r
    b = torch.zeros((u.shape[0], r), dtype=torch.float64)
    a = torch.zeros((r, vh.shape[1]), dtype=torch.float64)
    b[:, :k] = u[:, :k] * (s[:k] / scale)
    a[:k, :] = vh[:k, :]
    return LoraFactors(A=a.to(dtype), B=b.to(dtype))


@dataclass(frozen=True)
class ModuleReport:
    """How one module's SVD was computed (see aggregator.lowrank) and, in fast mode, how far its worst
    released rank-r error is above the optimal rank-r error (relative; 0.0 when computed exactly)."""

    module: str
    path: str
    total_rank: int
    excess: float


def validate_clients(clients: Sequence[ClientAdapter], weights: Sequence[float]) -> list[str]:
    """Common input checks; returns the sorted module names. Errors name the client index and module."""
    if not clients:
        raise ValueError("no clients to aggregate")
    if len(clients) != len(weights):
        raise ValueError(f"{len(clients)} clients but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite and non-negative with a positive sum, got {list(weights)}")
    modules = sorted(clients[0].factors)
    for index, client in enumerate(clients):
        if client.rank < 1 or not client.alpha > 0:
            raise ValueError(f"client {index}: rank {client.rank} and alpha {client.alpha} must be positive")
        if sorted(client.factors) != modules:
            diff = sorted(set(client.factors) ^ set(modules))
            raise ValueError(f"client {index} adapts a different module set (differs on {diff[:3]})")
        for module in modules:
            a, b = client.factors[module]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != client.rank or b.shape[1] != client.rank:
                raise ValueError(
                    f"client {index}, module {module}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                    f"do not match its declared rank {client.rank}"
                )
            ref = clients[0].factors[module]
            if (b.shape[0], a.shape[1]) != (ref.B.shape[0], ref.A.shape[1]):
                raise ValueError(
                    f"client {index}, module {module}: shape {(b.shape[0], a.shape[1])} differs from "
                    f"client 0's {(ref.B.shape[0], ref.A.shape[1])}"
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"client {index}, module {module}: NaN or infinite values")
    return modules


def flexlora(
    clients: Sequence[ClientAdapter],
    weights: Sequence[float],
    requests: Sequence[RankRequest],
    dtype: torch.dtype = torch.float32,
    *,
    mode: SvdMode = "exact",
    tolerance: float = 1e-3,
    reports: list[ModuleReport] | None = None,
    batch_bytes: int = 512 * 2**20,
) -> dict[RankRequest, dict[str, LoraFactors]]:
    """Aggregate every module and cut it at every requested rank; weights need not be normalised.

    Modules of one shape are batched together (up to `batch_bytes` of stacked factors at a time), and
    only the top max-rank triplets are ever used, so ΔW is never formed unless R ≥ min(d_out, d_in).
    """
    modules = validate_clients(clients, weights)
    if not requests or any(req.rank < 1 or not req.alpha > 0 for req in requests):
        raise ValueError(f"every requested rank and alpha must be positive, got {list(requests)}")
    total = float(sum(weights))
    coeffs = [w / total * c.scale for c, w in zip(clients, weights, strict=True)]
    unique = sorted(set(requests))
    k = max(req.rank for req in unique)
    total_rank = sum(c.rank for c in clients)
    out: dict[RankRequest, dict[str, LoraFactors]] = {req: {} for req in unique}
    groups: dict[tuple[int, int], list[str]] = {}
    for module in modules:
        ref = clients[0].factors[module]
        groups.setdefault((int(ref.B.shape[0]), int(ref.A.shape[1])), []).append(module)
    for (d_out, d_in), names in groups.items():
        per_batch = max(1, batch_bytes // (8 * total_rank * (d_out + d_in)))
        for start in range(0, len(names), per_batch):
            chunk = names[start : start + per_batch]
            # Fast mode stacks in float32 (the clients' own precision) so its big products run at float32 speed.
            work = torch.float32 if mode == "fast" else torch.float64
            p = torch.empty((len(chunk), d_out, total_rank), dtype=work)
            q = torch.empty((len(chunk), total_rank, d_in), dtype=work)
            for m, module in enumerate(chunk):
                offset = 0
                for client, coeff in zip(clients, coeffs, strict=True):
                    a, b = client.factors[module]
                    p[m, :, offset : offset + client.rank] = b.to(torch.float64) * coeff
                    q[m, offset : offset + client.rank] = a
                    offset += client.rank
            result = top_svd(p, q, k, mode=mode, certify_ranks=[r.rank for r in unique], tolerance=tolerance)
            for m, module in enumerate(chunk):
                for req in unique:
                    out[req][module] = cut(result.U[m], result.S[m], result.Vh[m], req, dtype)
                if reports is not None:
                    reports.append(ModuleReport(module, result.paths[m], total_rank, result.excess[m]))
    return out
