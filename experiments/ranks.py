"""The paper's client rank distributions over three resource tiers, and rank tiers scaled to a model."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType

# FlexLoRA's tiers on its 1.3B model (hidden size 2048): the low, middle and high resource clients.
PAPER_RANKS: tuple[int, int, int] = (8, 30, 200)
PAPER_HIDDEN = 2048

# Share of clients in the low, middle and high tier.
DISTRIBUTIONS: Mapping[str, tuple[float, float, float]] = MappingProxyType(
    {
        "uniform": (1 / 3, 1 / 3, 1 / 3),
        "heavy-tail-light": (0.8, 0.1, 0.1),  # most clients are weak
        "heavy-tail-strong": (0.1, 0.1, 0.8),  # most clients are strong
        "normal": (0.1, 0.45, 0.45),  # mostly the two higher tiers
    }
)


def scaled_ranks(
    hidden_size: int, tiers: Sequence[int] = PAPER_RANKS, reference: int = PAPER_HIDDEN
) -> tuple[int, ...]:
    """The paper's tiers scaled by hidden size, so each keeps its share of the model's width (at least 1).

    SmolLM2-135M (hidden 576) gets (2, 8, 56)."""
    return tuple(max(1, round(r * hidden_size / reference)) for r in tiers)


def assign_ranks(count: int, distribution: str, tiers: Sequence[int], seed: int = 0) -> list[int]:
    """Ranks for `count` clients in the distribution's exact proportions (largest remainder), shuffled by
    `seed`: with 20 clients, heavy-tail-strong puts 16 at the top tier, not 16 on average."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown rank distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")
    shares = DISTRIBUTIONS[distribution]
    if len(tiers) != len(shares):
        raise ValueError(f"{distribution} has {len(shares)} tiers, got ranks {list(tiers)}")
    if count < 1:
        raise ValueError(f"need at least one client, got {count}")
    exact = [s * count for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    ranks = [rank for rank, n in zip(tiers, counts, strict=True) for _ in range(n)]
    random.Random(f"ranks:{distribution}:{seed}").shuffle(ranks)
    return ranks


def sample_clients(count: int, per_round: int, round_index: int, seed: int = 0) -> list[int]:
    """The clients of one round: `per_round` of `count`, drawn without replacement, the same for every
    strategy (so strategies differ only in how they aggregate)."""
    if not 1 <= per_round <= count:
        raise ValueError(f"need 1 <= clients per round <= clients, got {per_round} of {count}")
    return sorted(random.Random(f"round:{seed}:{round_index}").sample(range(count), per_round))
