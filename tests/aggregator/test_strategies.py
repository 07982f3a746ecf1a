"""Aggregation strategies and weighting schemes against independent numpy computations."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import strategies
from aggregator.flexlora import ClientAdapter, RankRequest, flexlora
from aggregator.registry import SERVICE_STRATEGIES, STRATEGIES, strategy_spec
from aggregator.strategies import (
    ClientMeta,
    DataSize,
    FedIT,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    StalenessDiscount,
    StrategyError,
    Uniform,
    get_strategy,
    get_weighting,
)
from schemas.lora import LoraFactors

MODULES = ("layers.0.q_proj", "layers.0.v_proj")
SHAPES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 7)}


def _client(rng: np.random.Generator, rank: int, alpha: float) -> ClientAdapter:
    factors = {
        m: LoraFactors(
            A=torch.from_numpy(rng.standard_normal((rank, d_in))),
            B=torch.from_numpy(rng.standard_normal((d_out, rank))),
        )
        for m, (d_out, d_in) in SHAPES.items()
    }
    return ClientAdapter(factors, rank=rank, alpha=alpha)


def _np(c: ClientAdapter, module: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = c.factors[module]
    return a.double().numpy(), b.double().numpy()


def _product(f: LoraFactors, req: RankRequest) -> np.ndarray:
    out: np.ndarray = (req.alpha / req.rank) * (f.B.double().numpy() @ f.A.double().numpy())
    return out


# --- weighting ---------------------------------------------------------------------------------------------------


def test_data_size_and_uniform_weights() -> None:
    metas = [ClientMeta(10), ClientMeta(30, staleness=2), ClientMeta(60)]
    assert DataSize()(metas) == [10.0, 30.0, 60.0]
    assert Uniform()(metas) == [1.0, 1.0, 1.0]
    assert get_weighting("data_size")(metas) == [10.0, 30.0, 60.0]
    assert get_weighting("uniform")(metas) == [1.0, 1.0, 1.0]


def test_staleness_discount_numbers() -> None:
    metas = [ClientMeta(100, staleness=0), ClientMeta(100, staleness=3), ClientMeta(50, staleness=8)]
    assert StalenessDiscount()(metas) == pytest.approx([100.0, 50.0, 50.0 / 3.0])
    assert StalenessDiscount(Uniform(), exponent=1.0)(metas) == pytest.approx([1.0, 0.25, 1.0 / 9.0])
    assert StalenessDiscount(exponent=0.0)(metas) == pytest.approx([100.0, 100.0, 50.0])
    assert get_weighting("staleness", base="uniform", exponent=2.0)(metas) == pytest.approx([1.0, 1 / 16, 1 / 81])


def test_invalid_weightings_are_refused() -> None:
    with pytest.raises(ValueError, match="data_size, staleness, uniform"):
        get_weighting("by_loss")
    with pytest.raises(ValueError, match="exponent"):
        StalenessDiscount(exponent=-0.5)
    with pytest.raises(ValueError, match="exponent"):
        get_weighting("staleness", exponent=float("nan"))
    with pytest.raises(ValueError, match="bad options"):
        get_weighting("uniform", exponent=1.0)
    with pytest.raises(ValueError, match="client 1"):
        DataSize()([ClientMeta(5), ClientMeta(-1)])
    with pytest.raises(ValueError, match="weight 0"):
        DataSize()([ClientMeta(0), ClientMeta(0)])
    with pytest.raises(ValueError, match="at least one client"):
        Uniform()([])
    with pytest.raises(ValueError, match="negative staleness"):
        StalenessDiscount()([ClientMeta(5, staleness=-1)])


# --- FedIT -------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    rank=st.sampled_from([1, 2, 4]),
    alphas=st.lists(st.sampled_from([1.0, 4.0, 16.0]), min_size=1, max_size=4),
    out_alpha=st.sampled_from([2.0, 8.0]),
    seed=st.integers(0, 2**31),
)
def test_fedit_is_the_weighted_mean_of_a_and_scaled_b(rank, alphas, out_alpha, seed) -> None:
    rng = np.random.default_rng(seed)
    clients = [_client(rng, rank, a) for a in alphas]
    w = [float(x) for x in rng.integers(1, 50, size=len(clients))]
    req = RankRequest(rank, out_alpha)
    result = FedIT(dtype=torch.float64).aggregate(clients, w, [req])
    p = np.asarray(w) / sum(w)
    assert not result.merge_into_base
    for m in MODULES:
        want_a = sum(pk * _np(c, m)[0] for pk, c in zip(p, clients, strict=True))
        want_b = sum(pk * (c.alpha / c.rank) * _np(c, m)[1] for pk, c in zip(p, clients, strict=True))
        got = result.adapters[req][m]
        np.testing.assert_allclose(got.A.numpy(), want_a, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.B.numpy() * (out_alpha / rank), want_b, rtol=1e-12, atol=1e-12)


def test_fedit_with_one_client_returns_its_adapter() -> None:
    client = _client(np.random.default_rng(1), 4, 8.0)
    req = RankRequest(4, 8.0)
    result = FedIT().aggregate([client], [3.0], [req])
    assert result.adapters[req]["layers.0.q_proj"].A.dtype == torch.float32
    for m in MODULES:
        a, b = _np(client, m)
        np.testing.assert_allclose(result.adapters[req][m].A.double().numpy(), a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(result.adapters[req][m].B.double().numpy(), b, rtol=1e-6, atol=1e-6)


def test_fedit_refuses_mixed_ranks_with_the_bucket_effect_hint() -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(StrategyError, match=r"one rank.*smallest rank"):
        FedIT().aggregate([_client(rng, 2, 4.0), _client(rng, 4, 8.0)], [1.0, 1.0], [RankRequest(2, 4.0)])
    with pytest.raises(StrategyError, match=r"\[2, 8\]"):
        FedIT().aggregate([_client(rng, 2, 4.0)], [1.0], [RankRequest(8, 16.0)])


# --- HetLoRA -----------------------------------------------------------------------------------------------------


def test_hetlora_pads_weights_by_norm_and_truncates() -> None:
    rng = np.random.default_rng(3)
    clients = [_client(rng, 2, 4.0), _client(rng, 4, 4.0), _client(rng, 8, 16.0)]
    w = [1.0, 2.0, 5.0]
    requests = [RankRequest(2, 4.0), RankRequest(8, 8.0), RankRequest(12, 24.0)]
    result = HetLoRA(dtype=torch.float64).aggregate(clients, w, requests)
    assert result.info["max_rank"] == 8
    for m, (d_out, d_in) in SHAPES.items():
        scaled = [(c.alpha / c.rank) * _np(c, m)[1] for c in clients]
        norms = np.array([wk * np.linalg.norm(sb @ _np(c, m)[0]) for wk, sb, c in zip(w, scaled, clients, strict=True)])
        q = norms / norms.sum()
        pad_a = np.zeros((8, d_in))
        pad_sb = np.zeros((d_out, 8))
        for qk, sb, c in zip(q, scaled, clients, strict=True):
            pad_a[: c.rank] += qk * _np(c, m)[0]
            pad_sb[:, : c.rank] += qk * sb
        for req in requests:
            got = result.adapters[req][m]
            assert got.A.shape == (req.rank, d_in)
            assert got.B.shape == (d_out, req.rank)
            keep = min(req.rank, 8)
            np.testing.assert_allclose(got.A.numpy()[:keep], pad_a[:keep], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(
                got.B.numpy()[:, :keep] * (req.alpha / req.rank), pad_sb[:, :keep], rtol=1e-12, atol=1e-12
            )
            assert not got.A.numpy()[keep:].any() and not got.B.numpy()[:, keep:].any()


def test_hetlora_with_one_client_reproduces_its_product() -> None:
    client = _client(np.random.default_rng(4), 4, 8.0)
    req = RankRequest(4, 16.0)
    result = HetLoRA(dtype=torch.float64).aggregate([client], [7.0], [req])
    for m in MODULES:
        a, b = _np(client, m)
        np.testing.assert_allclose(_product(result.adapters[req][m], req), 2.0 * b @ a, rtol=1e-12, atol=1e-12)


def test_hetlora_falls_back_to_given_weights_when_every_product_is_zero() -> None:
    rng = np.random.default_rng(5)
    clients = [_client(rng, 2, 4.0), _client(rng, 2, 4.0)]
    zeroed = [
        ClientAdapter({m: LoraFactors(f.A, torch.zeros_like(f.B)) for m, f in c.factors.items()}, c.rank, c.alpha)
        for c in clients
    ]
    req = RankRequest(2, 4.0)
    result = HetLoRA(dtype=torch.float64).aggregate(zeroed, [1.0, 3.0], [req])
    for m in MODULES:
        want = 0.25 * _np(clients[0], m)[0] + 0.75 * _np(clients[1], m)[0]
        np.testing.assert_allclose(result.adapters[req][m].A.numpy(), want, rtol=1e-12, atol=1e-12)


# --- FLoRA -------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=5),
    seed=st.integers(0, 2**31),
)
def test_flora_stack_is_the_exact_weighted_sum(ranks, seed) -> None:
    rng = np.random.default_rng(seed)
    clients = [_client(rng, r, float(rng.choice([1, 8, 16]))) for r in ranks]
    w = [float(x) for x in rng.integers(1, 50, size=len(clients))]
    result = FLoRA(dtype=torch.float64).aggregate(clients, w, [RankRequest(2, 4.0), RankRequest(8, 16.0)])
    total = sum(ranks)
    assert result.merge_into_base
    assert list(result.adapters) == [RankRequest(total, float(total))]
    stacked = result.adapters[RankRequest(total, float(total))]
    p = np.asarray(w) / sum(w)
    for m, (d_out, d_in) in SHAPES.items():
        want = sum(pk * (c.alpha / c.rank) * (_np(c, m)[1] @ _np(c, m)[0]) for pk, c in zip(p, clients, strict=True))
        assert stacked[m].A.shape == (total, d_in) and stacked[m].B.shape == (d_out, total)
        got = stacked[m].B.numpy() @ stacked[m].A.numpy()
        assert np.abs(got - want).max() <= 1e-10


def test_flora_leaves_out_clients_of_weight_zero() -> None:
    rng = np.random.default_rng(6)
    clients = [_client(rng, 2, 4.0), _client(rng, 4, 8.0)]
    result = FLoRA().aggregate(clients, [0.0, 1.0], [RankRequest(4, 8.0)])
    assert list(result.adapters) == [RankRequest(4, 4.0)]


# --- FlexLoRA ----------------------------------------------------------------------------------------------------


def test_flexlora_strategy_matches_the_function() -> None:
    rng = np.random.default_rng(7)
    clients = [_client(rng, 2, 4.0), _client(rng, 4, 8.0), _client(rng, 8, 16.0)]
    w = [10.0, 30.0, 5.0]
    requests = [RankRequest(2, 4.0), RankRequest(8, 16.0)]
    result = FlexLoRA().aggregate(clients, w, requests)
    want = flexlora(clients, w, requests)
    assert not result.merge_into_base
    assert set(result.adapters) == set(want)
    for req in want:
        for m in MODULES:
            assert torch.equal(result.adapters[req][m].A, want[req][m].A)
            assert torch.equal(result.adapters[req][m].B, want[req][m].B)


def test_flexlora_strategy_forwards_mode_and_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []

    @functools.wraps(flexlora)
    def spy(*args: Any, **kwargs: Any) -> dict[RankRequest, dict[str, LoraFactors]]:
        seen.append(kwargs)
        return flexlora(*args, **kwargs)

    monkeypatch.setattr(strategies, "flexlora", spy)
    rng = np.random.default_rng(10)
    clients = [_client(rng, 2, 4.0), _client(rng, 4, 8.0)]
    result = FlexLoRA(mode="fast", tolerance=0.05, dtype=torch.float64).aggregate(
        clients, [1.0, 2.0], [RankRequest(2, 4.0)]
    )
    assert [{k: v for k, v in kw.items() if k != "reports"} for kw in seen] == [
        {"mode": "fast", "tolerance": 0.05, "carried": ()}
    ]
    assert "max_certified_excess" in result.info
    assert result.adapters[RankRequest(2, 4.0)]["layers.0.q_proj"].A.dtype == torch.float64


# --- registry and validation -------------------------------------------------------------------------------------


def test_get_strategy_builds_each_and_refuses_unknown_names() -> None:
    assert set(STRATEGIES) == {"flexlora", "fedit", "hetlora", "flora"}
    for name in STRATEGIES:
        assert get_strategy(name).name == name
    assert get_strategy("FlexLoRA", tolerance=1e-2) == FlexLoRA(tolerance=1e-2)
    with pytest.raises(ValueError, match="fedit, flexlora, flora, hetlora"):
        get_strategy("fedprox")
    with pytest.raises(ValueError, match="bad options"):
        get_strategy("fedit", mode="exact")


def test_the_registry_is_the_one_place_that_names_strategies_and_their_capabilities() -> None:
    from aggregator.settings import AggregatorSettings
    from experiments.runner import SINGLE_RANK
    from experiments.runner import STRATEGIES as EXPERIMENTS

    for name in STRATEGIES:
        assert strategy_spec(name).load() is type(get_strategy(name))
    # What an aggregator serves, what a setting accepts, what experiments compare: all read from the registry.
    assert SERVICE_STRATEGIES == ("flexlora", "fedit", "hetlora")
    assert {AggregatorSettings(strategy=n).strategy for n in SERVICE_STRATEGIES} == set(SERVICE_STRATEGIES)
    with pytest.raises(ValueError, match="an aggregator serves flexlora, fedit, hetlora"):
        AggregatorSettings(strategy="flora")
    assert set(EXPERIMENTS) == set(STRATEGIES) | {"fedit-top", "flexlora-carry"}
    assert EXPERIMENTS["fedit-top"] == "fedit" and EXPERIMENTS["flexlora-carry"] == "flexlora"
    assert {"fedit": min, "fedit-top": max} == SINGLE_RANK


def _replace(c: ClientAdapter, module: str, a: torch.Tensor | None = None, b: torch.Tensor | None = None):
    f = c.factors[module]
    factors = dict(c.factors)
    factors[module] = LoraFactors(A=f.A if a is None else a, B=f.B if b is None else b)
    return ClientAdapter(factors, c.rank, c.alpha)


def _broken(kind: str) -> list[ClientAdapter]:
    rng = np.random.default_rng(8)
    good, other = _client(rng, 2, 4.0), _client(rng, 2, 4.0)
    m = "layers.0.v_proj"
    if kind == "module set":
        bad = ClientAdapter({k: v for k, v in other.factors.items() if k != m}, 2, 4.0)
    elif kind == "shape":
        bad = _replace(other, m, a=torch.ones(2, 9))
    elif kind == "declared rank":
        bad = _replace(other, m, a=torch.ones(3, 7), b=torch.ones(4, 3))
    elif kind == "nan":
        b = other.factors[m].B.clone()
        b[1, 1] = float("nan")
        bad = _replace(other, m, b=b)
    else:
        a = other.factors[m].A.clone()
        a[0, 3] = float("-inf")
        bad = _replace(other, m, a=a)
    return [good, bad]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize(
    ("kind", "hint"),
    [
        ("module set", "different module set"),
        ("shape", r"\(d_out, d_in\)"),
        ("declared rank", "declared rank 2"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
    ],
)
def test_each_strategy_names_the_client_and_module_it_refuses(strategy, kind, hint) -> None:
    with pytest.raises(StrategyError, match=hint) as info:
        get_strategy(strategy).aggregate(_broken(kind), [1.0, 1.0], [RankRequest(2, 4.0)])
    assert "client 1" in str(info.value)
    assert "layers.0.v_proj" in str(info.value)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_refuses_bad_requests_weights_and_empty_input(strategy) -> None:
    s = get_strategy(strategy)
    clients = [_client(np.random.default_rng(9), 2, 4.0)]
    with pytest.raises(StrategyError, match="request 1 asks for rank 0"):
        s.aggregate(clients, [1.0], [RankRequest(2, 4.0), RankRequest(0, 1.0)])
    with pytest.raises(StrategyError, match="no clients"):
        s.aggregate([], [], [RankRequest(2, 4.0)])
    with pytest.raises(StrategyError, match="1 clients but 2 weights"):
        s.aggregate(clients, [1.0, 1.0], [RankRequest(2, 4.0)])
    with pytest.raises(StrategyError, match="client 0 has weight -1"):
        s.aggregate(clients, [-1.0], [RankRequest(2, 4.0)])
    with pytest.raises(StrategyError, match="weight 0"):
        s.aggregate(clients, [0.0], [RankRequest(2, 4.0)])


def test_adding_a_strategy_is_one_class_and_one_registry_line(federation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A toy strategy (every client's product summed, unweighted, and cut like FlexLoRA) registered by one
    entry: settings accept it, the service runs a round with it and stores its global cut (its cuts nest)."""
    import threading

    from aggregator import registry
    from aggregator.config import AggregatorConfig
    from aggregator.rounds import RoundPolicy
    from aggregator.service import AggregatorService
    from aggregator.settings import AggregatorSettings
    from aggregator.stores.memory import MemoryRoundStore
    from broker.connect import connect
    from broker.topology import UPDATE_ROUTING_KEY, Topology
    from broker.transports.memory import MemoryBroker
    from edge_client.synthetic import SyntheticShape, synthetic_update
    from schemas.messages import HEADER_KEY

    spec = registry.StrategySpec(f"{__name__}:UnweightedFlexLoRA", "FlexLoRA, every client alike", nested_cuts=True)
    monkeypatch.setitem(registry.STRATEGIES, "toy", spec)
    assert AggregatorSettings(strategy="toy").strategy == "toy"
    transport = connect("memory://", memory=MemoryBroker())
    store = MemoryRoundStore()
    config = AggregatorConfig(federation=federation, strategy="toy", policy=RoundPolicy(max_updates=2), poll_s=0.01)
    service = AggregatorService(transport, store, config)
    service.setup()
    shape = SyntheticShape(layers=1, projections=(("self_attn.q_proj", 16, 16),))
    for n in range(2):
        header, data = synthetic_update(federation, f"c{n}", 4, 0, shape=shape, num_samples=10 ** (n + 1), seed=n)
        transport.publish(
            Topology(federation).updates_exchange, UPDATE_ROUTING_KEY, data, {HEADER_KEY: header.model_dump_json()}
        )
    sub = service.subscribe()
    done = threading.Event()
    for _ in range(20):
        service.step(sub)
        if store.version() == 1:
            done.set()
            break
    sub.close()
    assert done.is_set()
    assert {r.header.strategy for r in store.releases(1).values()} == {"toy"}
    assert "_global" in store.releases(1), "a strategy whose cuts nest gets the global cut stored for joins"


class UnweightedFlexLoRA(FlexLoRA):
    name = "toy"

    def aggregate(self, clients: Any, weights: Any, requests: Any, carried: Any = ()) -> Any:
        return super().aggregate(clients, [1.0] * len(clients), requests, carried)
