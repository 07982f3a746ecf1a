"""Client-level differential privacy (aggregator.privacy): the clip bounds every client's contribution, the noise
has the standard deviation the mechanism promises, ε is opacus's for the same steps, the randomized cut is the
dense one, and the service refuses a round past the budget without losing its updates."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from aggregator.config import AggregatorConfig
from aggregator.flexlora import ClientAdapter
from aggregator.history_plot import plot_history
from aggregator.lowrank import randomized_top
from aggregator.planning import Private, RoundInput, aggregate_round
from aggregator.privacy import PrivacyConfig, change, clip_factor, dense_global, epsilon, frobenius, noisy_round
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from aggregator.status import collect, render
from aggregator.stores.memory import MemoryRoundStore
from aggregator.strategies import get_strategy, get_weighting
from broker.connect import connect
from broker.topology import Topology
from broker.transports.memory import MemoryBroker
from schemas.lora import LoraFactors, RankRequest
from schemas.messages import HEADER_KEY, parse_release
from schemas.recipe import DEFAULT_RECIPE
from tests.aggregator.test_service import Rig, _serve_until, _valid

MODULES = ("m.q_proj", "m.v_proj")


def _adapter(rank: int, seed: int, d: int = 12, scale: float = 1.0) -> ClientAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {
        m: LoraFactors(A=torch.randn(rank, d, generator=g), B=torch.randn(d, rank, generator=g) * scale)
        for m in MODULES
    }
    return ClientAdapter(factors, rank, 2.0 * rank)


def _start(rank: int, seed: int) -> tuple[RankRequest, dict[str, LoraFactors]]:
    a = _adapter(rank, seed)
    return a.request, dict(a.factors)


def _dense_change(
    adapter: ClientAdapter, start: tuple[RankRequest, dict[str, LoraFactors]] | None
) -> list[torch.Tensor]:
    from schemas.lora import recut

    begun = None if start is None else recut(start[1], start[0], adapter.request)
    out = []
    for m, f in adapter.factors.items():
        s = adapter.scale_at(m)
        d = s * f.B.double() @ f.A.double()
        if begun is not None:
            d -= s * begun[m].B.double() @ begun[m].A.double()
        out.append(d)
    return out


@settings(max_examples=30, deadline=None)
@given(
    rank=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.01, 100.0),
    clip=st.floats(0.01, 50.0),
    started=st.booleans(),
)
def test_a_clipped_change_never_counts_for_more_than_the_clip_norm(
    rank: int, seed: int, scale: float, clip: float, started: bool
) -> None:
    adapter = _adapter(rank, seed, scale=scale)
    start = _start(8, seed + 1) if started else None
    delta = change(adapter, start)
    dense = _dense_change(adapter, start)
    exact = math.sqrt(sum(float(d.pow(2).sum()) for d in dense))
    assert frobenius(delta) == pytest.approx(exact, rel=1e-6, abs=1e-9)  # the factored norm is the dense one
    assert frobenius(delta) * clip_factor(frobenius(delta), clip) <= clip * (1 + 1e-9)


def test_one_client_moves_the_round_by_at_most_the_clip_norm_over_the_denominator() -> None:
    config = PrivacyConfig(clip_norm=0.5, noise_multiplier=1.0, population=100)
    changes = [change(_adapter(r, s, scale=10.0), None) for r, s in ((2, 1), (4, 2), (3, 3))]
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    with_all = noisy_round(changes, [5, 5, 5], {}, config, expected_clients=10, server_lr=1.0, generator=g1)
    without = noisy_round(changes[:2], [5, 5], {}, config, expected_clients=10, server_lr=1.0, generator=g2)
    moved = math.sqrt(sum(float((with_all.dense[m] - without.dense[m]).pow(2).sum()) for m in MODULES))
    assert moved == pytest.approx(0.5 / 10, rel=1e-6)  # clipped to C exactly (its change is far larger), over D


def test_the_noise_has_standard_deviation_z_times_the_clip_norm() -> None:
    config = PrivacyConfig(clip_norm=0.3, noise_multiplier=1.7, population=10)
    zero = {m: (torch.zeros(256, 1, dtype=torch.float64), torch.zeros(1, 256, dtype=torch.float64)) for m in MODULES}
    out = noisy_round(
        [zero], [1], {}, config, expected_clients=1, server_lr=1.0, generator=torch.Generator().manual_seed(0)
    )
    noise = torch.cat([out.dense[m].flatten() for m in MODULES])
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(noise.std()) == pytest.approx(1.7 * 0.3, rel=0.01)  # 131,072 draws: s.e. of the std ≈ 0.2 %
    assert out.info["dp_noise_std"] == pytest.approx(0.51)


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.0, 0.01, 100), (0.7, 0.05, 20), (2.0, 0.1, 500)])
def test_epsilon_is_opacuss_for_the_same_steps(z: float, q: float, rounds: int) -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    expected, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders), delta=1e-5
    )
    assert epsilon([(z, q)] * rounds, 1e-5) == pytest.approx(float(expected), rel=1e-9)
    assert epsilon([(z, q)] * rounds, 1e-5) > epsilon([(z, q)] * (rounds // 2), 1e-5)  # spending adds up


def test_the_randomized_cut_matches_the_dense_svd_on_a_noisy_low_rank_matrix() -> None:
    g = torch.Generator().manual_seed(3)
    signal = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 200, generator=g, dtype=torch.float64
    )
    matrix = signal * 5 + 0.1 * torch.randn(300, 200, generator=g, dtype=torch.float64)
    u, s, vh = randomized_top(matrix, 8)
    du, ds, dvh = torch.linalg.svd(matrix, full_matrices=False)
    assert torch.allclose(s[:6], ds[:6], rtol=1e-6)  # the signal's directions, exactly
    for r in (2, 6, 8):  # every cut within 0.1 % of the best rank-r error (Eckart–Young), in the noise too
        err = torch.linalg.norm(matrix - u[:, :r] @ torch.diag(s[:r]) @ vh[:r])
        best = torch.linalg.norm(matrix - du[:, :r] @ torch.diag(ds[:r]) @ dvh[:r])
        assert float(err) <= float(best) * (1 + 1e-3)


def test_a_private_round_is_the_clipped_average_change_added_to_the_global_then_cut() -> None:
    """With vanishing noise the round is G + η Σ clip(Δ_k) / D, cut at each client's rank; the cuts nest."""
    config = PrivacyConfig(clip_norm=3.0, noise_multiplier=1e-12, population=8, seed=1)
    current = _start(6, 99)
    starts = {1: current}
    inputs = [
        RoundInput("a", 10, 1, _adapter(2, 1)),
        RoundInput("b", 10, 1, _adapter(4, 2, scale=0.01)),  # small: not clipped
        RoundInput("c", 10, 1, _adapter(6, 3)),
    ]
    plan = aggregate_round(
        get_strategy("flexlora"),
        get_weighting("data_size"),
        inputs,
        1,
        global_rank=6,
        recipe=DEFAULT_RECIPE,
        global_at=starts.get,
        privacy=Private(config, expected_clients=4),
    )
    expected = dense_global(current)
    clipped = 0
    for item in inputs:
        dense = _dense_change(item.adapter, current)
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in dense))
        clipped += norm > 3.0
        for m, d in zip(MODULES, dense, strict=True):
            expected[m] = expected[m] + d * clip_factor(norm, 3.0) / 4
    assert plan.info["dp_clients"] == 3 and plan.info["dp_clipped"] == clipped >= 1
    for item in inputs:
        request = plan.wanted[item.client_id]
        released = plan.result.adapters[request]
        for m in MODULES:
            u, s, vh = torch.linalg.svd(expected[m])
            r = request.rank
            best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
            got = (request.alpha / r) * released[m].B.double() @ released[m].A.double()
            assert torch.allclose(got, best, atol=1e-4)


def _dp_rig(federation: str, budget: float) -> Rig:
    transport = connect("memory://", memory=MemoryBroker())
    store = MemoryRoundStore()
    privacy = PrivacyConfig(clip_norm=1.0, noise_multiplier=1.0, population=2, epsilon_budget=budget, seed=0)
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=2), poll_s=0.01, privacy=privacy)
    service = AggregatorService(transport, store, config)
    service.setup()
    return Rig(transport, store, service, Topology(federation))


def test_a_round_past_the_budget_is_refused_and_its_updates_are_kept(federation: str, tmp_path: Path) -> None:
    one_round = epsilon([(1.0, 1.0)], 1e-5)
    rig = _dp_rig(federation, budget=one_round * 1.01)  # room for one private round, not two
    _valid(rig, "c1", 4, seed=1)
    _valid(rig, "c2", 4, seed=2)
    _serve_until(rig, threading.Event())
    [record] = rig.store.history()
    assert record.privacy is not None and record.privacy.epsilon == pytest.approx(one_round)
    assert record.privacy.rounds == 1 and record.privacy.epsilon_budget == pytest.approx(one_round * 1.01)
    sub = rig.transport.subscribe(rig.topo.adapter_queue("c1"), prefetch=1, dead_letter_exchange="")
    delivery = sub.get(5)
    assert delivery is not None
    release = parse_release(delivery.message.headers[HEADER_KEY])
    assert release.privacy is not None and release.privacy.epsilon == pytest.approx(one_round)  # every release says
    sub.close()

    _valid(rig, "c1", 4, seed=3)
    _valid(rig, "c2", 4, seed=4)
    sub = rig.service.subscribe()
    for _ in range(40):
        rig.service.step(sub)
    sub.close()
    assert rig.store.version() == 1  # the second round is not committed
    assert rig.store.status().count == 2  # and both its updates are still recorded
    assert rig.service.counters["privacy_refusals"] == 1  # said once, not every step
    refused = rig.service.health_info()
    assert "privacy budget exhausted" in refused and "budget" in refused

    # What an operator sees: ε in `flexlora status` (and the refusal), and in the metrics.
    rig.store.record_health(rig.service.config.owner, refused, ttl_s=60)
    status = collect(rig.store, None, federation, now=time.time())
    assert status.privacy is not None and status.privacy.epsilon == pytest.approx(one_round)
    assert status.rounds[-1].epsilon == pytest.approx(one_round)
    assert any("privacy budget exhausted" in r for r in status.privacy.refused)
    console = Console(record=True, width=200)
    render(status, console, now=time.time())
    shown = console.export_text()
    assert f"ε = {one_round:.3g}" in shown and "open round not committed" in shown
    registry = rig.service.metrics.registry
    labels = {"federation": federation}
    assert registry.get_sample_value("flexlora_privacy_epsilon", labels) == pytest.approx(one_round)
    assert registry.get_sample_value("flexlora_privacy_epsilon_budget", labels) == pytest.approx(one_round * 1.01)
    assert registry.get_sample_value("flexlora_privacy_refusals_total", labels) == 1
    assert plot_history(rig.store.history(), tmp_path / "history.png", "dp").stat().st_size > 0  # with its ε axis


def test_privacy_settings_come_together_and_need_flexlora() -> None:
    settings = AggregatorSettings(dp_clip_norm=1.0, dp_noise_multiplier=1.1, dp_population=1000, dp_epsilon_budget=8)
    privacy = settings.privacy()
    assert privacy is not None and privacy.sampling_rate(10) == pytest.approx(0.01) and privacy.epsilon_budget == 8
    with pytest.raises(ValueError, match="missing dp_population"):
        AggregatorSettings(dp_clip_norm=1.0, dp_noise_multiplier=1.1)
    with pytest.raises(ValueError, match="strategy flexlora"):
        AggregatorSettings(dp_clip_norm=1.0, dp_noise_multiplier=1.1, dp_population=10, strategy="hetlora")
    assert AggregatorSettings().privacy() is None
