"""FlexLoRA as pure functions: tensors in, tensors out; no broker, no Redis, no files.

For one module, client k contributes B_k (d_out × r_k), A_k (r_k × d_in), alpha_k and a weight p_k.
The global update is ΔW = Σ_k p_k (alpha_k / r_k) B_k A_k; its SVD ΔW = U Σ Vᵀ is cut at each
requested rank r with B = U_r Σ_r / (alpha / r), A = V_rᵀ, so (alpha / r) B A is the best rank-r
approximation of ΔW (Eckart–Young). All singular values go into B, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

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


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD with a fixed sign convention, so the same ΔW always yields the same factors."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    # Singular vectors are defined up to sign; make each U column's largest-magnitude entry positive.
    pivots = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivots, torch.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, s, vh * signs[:, None]


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


def flexlora(
    clients: Sequence[ClientAdapter],
    weights: Sequence[float],
    requests: Sequence[RankRequest],
    dtype: torch.dtype = torch.float32,
) -> dict[RankRequest, dict[str, LoraFactors]]:
    """Aggregate every module and cut it at every requested rank; weights need not be normalised."""
    if len(clients) != len(weights):
        raise ValueError(f"{len(clients)} clients but {len(weights)} weights")
    if not clients:
        raise ValueError("no clients to aggregate")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    modules = set(clients[0].factors)
    for client in clients[1:]:
        if set(client.factors) != modules:
            raise ValueError("clients adapt different module sets; they cannot be aggregated together")
    unique = sorted(set(requests))
    out: dict[RankRequest, dict[str, LoraFactors]] = {req: {} for req in unique}
    for module in sorted(modules):
        delta = full_update([(c.factors[module], c.scale, w / total) for c, w in zip(clients, weights, strict=True)])
        u, s, vh = svd(delta)
        for req in unique:
            out[req][module] = cut(u, s, vh, req, dtype)
    return out
