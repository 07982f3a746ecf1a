"""Sizes of full-size LoRA updates from their factors (never forming d_out × d_in): what a run logs per round to
show what grows — the global ΔW per module and in all, and each client's ΔW_k and its change in a local run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from schemas.lora import LoraFactors

Factors = Mapping[str, LoraFactors]


def combination_norm(terms: Sequence[tuple[float, LoraFactors]]) -> float:
    """‖Σ c_i B_i A_i‖_F from the stacked factors: trace((PᵀP)(QQᵀ)) with P = [c_i B_i], Q = [A_i]."""
    p = torch.cat([c * f.B.double() for c, f in terms], dim=1)
    q = torch.cat([f.A.double() for _, f in terms], dim=0)
    value = float(((p.T @ p) * (q @ q.T)).sum())
    return math.sqrt(max(value, 0.0))


def module_norms(factors: Factors, scale: float) -> dict[str, float]:
    """‖scale · B A‖_F of every module."""
    return {m: combination_norm([(scale, f)]) for m, f in sorted(factors.items())}


def total(norms: Mapping[str, float]) -> float:
    """The Frobenius norm over all modules together."""
    return math.sqrt(sum(v * v for v in norms.values()))


def change_norm(after: Factors, after_scale: float, before: Factors | None, before_scale: float) -> float:
    """‖ΔW_after − ΔW_before‖_F over all modules (before None: from zero)."""
    out = 0.0
    for m, f in after.items():
        terms = [(after_scale, f)]
        if before is not None:
            terms.append((-before_scale, before[m]))
        out += combination_norm(terms) ** 2
    return math.sqrt(out)


@dataclass(frozen=True)
class ClientStep:
    """One client's local run: its rank, ‖ΔW_k‖ sent, ‖ΔW_k − ΔW_start‖ (what the local run changed), loss, and
    the share of the global it started from that its rank could not hold: ‖G − cut_r(G)‖_F / ‖G‖_F (what the
    paper's sum of products drops for this client, and what `carry_residual` carries; 0 at the first round)."""

    rank: int
    norm: float
    change: float
    loss: float | None
    start_tail: float = 0.0


def tail_share(global_norm: float, start_norm: float) -> float:
    """‖G − cut_r(G)‖ / ‖G‖ from ‖G‖ and ‖cut_r(G)‖: a truncated SVD is an orthogonal projection, so the
    energies subtract exactly."""
    if global_norm <= 0:
        return 0.0
    return math.sqrt(max(global_norm**2 - start_norm**2, 0.0)) / global_norm
