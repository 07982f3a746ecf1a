"""Rank distributions: exact tier shares, model-scaled tiers, and client sampling shared by every strategy."""

from __future__ import annotations

import pytest

from experiments.ranks import DISTRIBUTIONS, assign_ranks, sample_clients, scaled_ranks


def test_tiers_scale_with_the_hidden_size() -> None:
    assert scaled_ranks(2048) == (8, 30, 200)
    assert scaled_ranks(576) == (2, 8, 56)
    assert min(scaled_ranks(16)) >= 1


@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_ranks_follow_the_distribution_exactly(distribution: str) -> None:
    ranks = assign_ranks(20, distribution, (2, 8, 56), seed=3)
    shares = DISTRIBUTIONS[distribution]
    assert len(ranks) == 20
    for tier, share in zip((2, 8, 56), shares, strict=True):
        assert abs(ranks.count(tier) - share * 20) < 1
    assert ranks == assign_ranks(20, distribution, (2, 8, 56), seed=3)


def test_heavy_tails_put_most_clients_at_one_end() -> None:
    assert abs(assign_ranks(1613, "heavy-tail-strong", (2, 8, 56)).count(56) - 0.8 * 1613) < 1
    assert assign_ranks(10, "heavy-tail-light", (2, 8, 56)).count(2) == 8


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown rank distribution"):
        assign_ranks(5, "zipf", (1, 2, 3))
    with pytest.raises(ValueError, match="tiers"):
        assign_ranks(5, "uniform", (1, 2))
    with pytest.raises(ValueError, match="clients per round"):
        sample_clients(5, 6, 0)


def test_each_round_samples_distinct_clients_reproducibly() -> None:
    rounds = [sample_clients(100, 10, t, seed=1) for t in range(5)]
    assert all(len(set(r)) == 10 and all(0 <= c < 100 for c in r) for r in rounds)
    assert rounds == [sample_clients(100, 10, t, seed=1) for t in range(5)]
    assert len({tuple(r) for r in rounds}) > 1
