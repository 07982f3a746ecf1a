"""Client-level differential privacy for FlexLoRA rounds: DP-FedAvg (McMahan et al., "Learning Differentially
Private Recurrent Language Models", ICLR 2018) adapted to heterogeneous ranks. Pure: tensors in, tensors out.

Each counted client's contribution is its full-size change from the adapter it started from,
Δ_k = (α_k/r_k) B_k A_k − cut_{r_k}(G_start), over every module at once. It is clipped to Frobenius norm C,
weighted by w_k = min(n_k / weight_cap, 1) (every weight ≤ 1: one client moves the weighted sum by at most C),
and the round's sum gets Gaussian noise of standard deviation z·C on every entry of every module. The sum is
divided by a fixed denominator, the expected number of clients in a round (q·N), not by the round's own count
or weights, so the noise's scale relative to one client's influence does not depend on who took part (the
"fixed denominator" estimator of the paper). The new global is G + η · (Σ_k w_k clip(Δ_k) + noise) / (q·N),
cut at every requested rank by a randomized SVD (noise makes it full rank, so the factored path of
aggregator.lowrank does not apply).

Trusted aggregator: clipping and noise happen on the aggregator, which sees every raw update. ε is what the
released adapters (every release, the global, the history's norms) reveal about whether one client took part,
accounted by opacus's RDP accountant for the subsampled Gaussian mechanism, one step per round, with sampling
rate q = (clients per round) / (clients in the federation); the sampling is assumed uniform, which a
federation whose devices choose when to send does not guarantee: ε is then an estimate, not a proof.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from aggregator.flexlora import ClientAdapter, cut
from schemas.lora import LoraFactors, RankRequest, recut


class BudgetExhausted(RuntimeError):
    """Committing the round would spend more privacy than the federation's budget allows."""


@dataclass(frozen=True)
class PrivacyConfig:
    clip_norm: float  # C: the most one client's change may count for (Frobenius norm over all its modules)
    noise_multiplier: float  # z: noise of standard deviation z·C on the round's sum
    population: int  # N: clients in the federation; the sampling rate is (clients per round) / N
    delta: float = 1e-5  # the δ ε is reported at
    epsilon_budget: float | None = None  # refuse to commit a round past this ε (None: report only)
    weight_cap: int | None = None  # a client weighs min(n_k / cap, 1); None: every client weighs 1
    seed: int | None = None  # of the noise (tests and experiments); None: fresh randomness every round

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be finite and > 0, got {self.noise_multiplier}")
        if self.population < 1:
            raise ValueError(f"population must be ≥ 1, got {self.population}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise ValueError(f"epsilon_budget must be > 0, got {self.epsilon_budget}")
        if self.weight_cap is not None and self.weight_cap < 1:
            raise ValueError(f"weight_cap must be ≥ 1, got {self.weight_cap}")

    def sampling_rate(self, per_round: int) -> float:
        return min(1.0, per_round / self.population)

    def weight(self, num_samples: int) -> float:
        return 1.0 if self.weight_cap is None else min(1.0, num_samples / self.weight_cap)


def epsilon(steps: Sequence[tuple[float, float]], delta: float) -> float:
    """ε at `delta` after rounds of (noise multiplier, sampling rate), by opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for noise_multiplier, sampling_rate in steps:
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sampling_rate)
    return float(accountant.get_epsilon(delta)) if steps else 0.0


# A change in factored form, per module: (X, Y) with Δ = X @ Y (X: d_out × k, Y: k × d_in).
Factored = dict[str, tuple[torch.Tensor, torch.Tensor]]


def change(adapter: ClientAdapter, start: tuple[RankRequest, Mapping[str, LoraFactors]] | None) -> Factored:
    """The client's change from the cut of the global it started from (None: the untrained start, zero)."""
    out: Factored = {}
    own = adapter.request
    begun = None if start is None else recut(start[1], start[0], own)
    for module, f in adapter.factors.items():
        s = adapter.scale_at(module)
        x, y = f.B.to(torch.float64) * s, f.A.to(torch.float64)
        if begun is not None:
            g = begun[module]
            x = torch.cat([x, -g.B.to(torch.float64) * s], dim=1)
            y = torch.cat([y, g.A.to(torch.float64)], dim=0)
        out[module] = (x, y)
    return out


def frobenius(delta: Factored) -> float:
    """‖Δ‖_F over every module, from the factors: ‖XY‖² = tr((XᵀX)(YYᵀ)), never forming XY."""
    total = 0.0
    for x, y in delta.values():
        total += float(torch.sum((x.T @ x) * (y @ y.T)))
    return math.sqrt(max(total, 0.0))


def clip_factor(norm: float, clip_norm: float) -> float:
    return 1.0 if norm <= clip_norm else clip_norm / norm


@dataclass(frozen=True)
class NoisyRound:
    """The dense new global per module, and what the round did (for the history)."""

    dense: dict[str, torch.Tensor]
    info: dict[str, float]


def noisy_round(
    changes: Sequence[Factored],
    samples: Sequence[int],
    current: Mapping[str, torch.Tensor],
    config: PrivacyConfig,
    *,
    expected_clients: int,
    server_lr: float,
    generator: torch.Generator,
) -> NoisyRound:
    """G + η (Σ_k w_k clip(Δ_k) + N(0, (zC)²)) / (q·N) per module; `current` is the dense G (absent modules: 0)."""
    if not changes:
        raise ValueError("a round needs at least one change")
    norms = [frobenius(c) for c in changes]
    scales = [config.weight(n) * clip_factor(norm, config.clip_norm) for n, norm in zip(samples, norms, strict=True)]
    denominator = float(expected_clients)
    std = config.noise_multiplier * config.clip_norm
    dense: dict[str, torch.Tensor] = {}
    for module in changes[0]:
        x = torch.cat([c[module][0] * k for c, k in zip(changes, scales, strict=True)], dim=1)
        y = torch.cat([c[module][1] for c in changes], dim=0)
        total = torch.randn((x.shape[0], y.shape[1]), generator=generator, dtype=torch.float64).mul_(std)
        total.addmm_(x, y)
        total.mul_(server_lr / denominator)
        if module in current:
            total.add_(current[module].to(torch.float64))
        dense[module] = total
    info = {
        "dp_clients": float(len(changes)),
        "dp_clipped": float(sum(1 for norm in norms if norm > config.clip_norm)),
        "dp_change_norm_median": sorted(norms)[len(norms) // 2],
        "dp_noise_std": std,
        "dp_denominator": denominator,
    }
    return NoisyRound(dense, info)


def dense_global(start: tuple[RankRequest, Mapping[str, LoraFactors]] | None) -> dict[str, torch.Tensor]:
    """The global adapter as full-size matrices, (α/r) B A per module (empty for the untrained start)."""
    if start is None:
        return {}
    request, factors = start
    out = {}
    for module, f in factors.items():
        r = request.at(module)
        out[module] = (f.B.to(torch.float64) * (r.alpha / r.rank)) @ f.A.to(torch.float64)
    return out


def top_cuts(
    dense: Mapping[str, torch.Tensor],
    requests: Sequence[RankRequest],
    *,
    oversample: int = 10,
    power_iterations: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[RankRequest, dict[str, LoraFactors]]:
    """Every requested cut of every module from one randomized SVD per module (torch.svd_lowrank: Halko,
    Martinsson and Tropp's range finder with power iterations) at the largest rank asked of it; the cuts nest."""
    from aggregator.lowrank import randomized_top

    out: dict[RankRequest, dict[str, LoraFactors]] = {req: {} for req in set(requests)}
    for module, matrix in dense.items():
        top = max(req.at(module).rank for req in out)
        u, s, vh = randomized_top(matrix, top, oversample=oversample, power_iterations=power_iterations, seed=seed)
        for req in out:
            out[req][module] = cut(u, s, vh, req.at(module), dtype)
    return out
