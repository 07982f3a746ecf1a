"""Ranks per module (peft's rank_pattern / alpha_pattern): resolution as peft does it, FlexLoRA against the
dense reference module by module, the server step, every strategy, validation, messages and the client's flag."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.utils.other import get_pattern_key

from aggregator.flexlora import ClientAdapter, RankRequest, flexlora, recut
from aggregator.planning import RoundInput, ServerStep, aggregate_round
from aggregator.registry import STRATEGIES
from aggregator.rounds import GLOBAL_RELEASE
from aggregator.stores.memory import MemoryRoundStore
from aggregator.strategies import DataSize, StrategyError, get_strategy
from aggregator.validation import Limits, validate_update
from broker.transport import Message
from edge_client.model import tiny_model, wrap_lora
from edge_client.settings import ClientSettings
from schemas.errors import HeaderError, Reason, SchemaError
from schemas.lora import PEFT_PREFIX, LoraFactors, join_lora
from schemas.messages import HEADER_KEY, LoraUpdate, parse_update
from schemas.ranks import RANK_PATTERNS, parse_rank_pattern
from schemas.recipe import DEFAULT_RECIPE
from schemas.tensors import encode_tensors

SHAPES = {
    "self_attn.q_proj": (24, 16),
    "self_attn.v_proj": (8, 16),
    "mlp.gate_proj": (40, 16),
    "mlp.down_proj": (16, 40),
}
MODULES = [f"model.layers.{i}.{name}" for i in range(2) for name in SHAPES]
# The paper's tiers in small: 3 on the attention projection q_proj, 10 on the MLP (alpha 16 there); v_proj takes
# the default rank 4.
TIERED = RankRequest.of(4, 8.0, {"q_proj": 3, "gate_proj": 10, "down_proj": 10}, {"mlp.gate_proj": 16.0})
UNIFORM = (RankRequest(2, 4.0), RankRequest(6, 3.0))


def _client(request: RankRequest, seed: int) -> ClientAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for module in MODULES:
        d_out, d_in = SHAPES[module.split(".", 3)[3]]
        r = request.at(module).rank
        factors[module] = LoraFactors(A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g) * 0.1)
    return ClientAdapter.of(factors, request)


def _dense(clients: Sequence[ClientAdapter], p: Sequence[float], module: str) -> np.ndarray:
    """GUIDE §1 by hand: ΔW_m = Σ p_k (α_k,m / r_k,m) B_k,m A_k,m, each client at its rank on this module."""
    total = np.zeros(clients[0].factors[module].B.shape[0:1] + clients[0].factors[module].A.shape[1:2])
    for c, w in zip(clients, p, strict=True):
        rank, alpha = c.at(module).rank, c.at(module).alpha
        f = c.factors[module]
        total += w * (alpha / rank) * (f.B.double().numpy() @ f.A.double().numpy())
    return total


def _best(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    out: np.ndarray = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return out


def _assert_cut(got: LoraFactors, request: RankRequest, dense: np.ndarray, rel_tol: float = 1e-4) -> None:
    rank, alpha = request.rank, request.alpha
    assert got.A.shape == (rank, dense.shape[1]) and got.B.shape == (dense.shape[0], rank)
    product = (alpha / rank) * (got.B.double().numpy() @ got.A.double().numpy())
    best = _best(dense, rank)
    assert float(np.linalg.norm(product - best)) <= rel_tol * max(float(np.linalg.norm(best)), 1e-12)


def test_patterns_resolve_as_peft_resolves_them() -> None:
    keys = ["layers.0.self_attn.q_proj", "q_proj", "mlp.gate_proj", "proj"]
    request = RankRequest.of(4, 8.0, {k: i + 1 for i, k in enumerate(keys)})
    names = [*MODULES, "model.layers.10.self_attn.q_proj", "model.layers.0.self_attn.xq_proj"]
    for name in names:
        key = get_pattern_key(keys, name)
        assert request.at(name).rank == (dict(request.rank_pattern).get(key, 4)), name
    # and a real peft model built with the pattern has those ranks on its layers
    pattern = RankRequest.of(4, 8.0, {"q_proj": 3, "gate_proj": 12}, {"gate_proj": 24.0})
    model = wrap_lora(tiny_model().model, 4, 8.0, ["q_proj", "v_proj", "gate_proj"], seed=0, pattern=pattern)
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLinear):
            module = name.removeprefix(PEFT_PREFIX)
            assert layer.r["default"] == pattern.at(module).rank, module
            assert layer.scaling["default"] == pytest.approx(pattern.at(module).alpha / pattern.at(module).rank)


@pytest.mark.parametrize("batch_bytes", [None, 1])
def test_a_tiered_client_and_uniform_ones_get_the_dense_references_best_cut_per_module(batch_bytes: int | None) -> None:
    clients = [_client(TIERED, 1), *(_client(r, 2 + i) for i, r in enumerate(UNIFORM))]
    samples = [30.0, 50.0, 20.0]
    p = [n / sum(samples) for n in samples]
    requests = [c.request for c in clients]
    out = flexlora(clients, samples, requests, batch_bytes=batch_bytes)
    assert set(out) == set(requests)
    for module in MODULES:
        dense = _dense(clients, p, module)
        for req in requests:
            _assert_cut(out[req][module], req.at(module), dense)
    # the tiered client's own cut has its ranks: 3 on q_proj, 4 (default) on v_proj, 10 on the MLP
    ranks = {m.split(".", 3)[3]: f.A.shape[0] for m, f in out[TIERED].items()}
    assert ranks == {"self_attn.q_proj": 3, "self_attn.v_proj": 4, "mlp.gate_proj": 10, "mlp.down_proj": 10}
    # cuts nest per module: the uniform top cut recut to the tiered ranks is the tiered cut
    top = RankRequest(12, 12.0)
    nested = recut(flexlora(clients, samples, [top])[top], top, TIERED)
    for module in MODULES:
        torch.testing.assert_close(
            nested[module].B @ nested[module].A, out[TIERED][module].B @ out[TIERED][module].A, rtol=1e-4, atol=1e-6
        )


def test_the_server_step_carries_each_modules_residual_at_the_clients_rank_there() -> None:
    # The global the clients started from: a FlexLoRA cut (singular directions in order), uniform as globals are.
    top = RankRequest(12, 12.0)
    g = ClientAdapter.of(flexlora([_client(RankRequest(14, 7.0), 9)], [1.0], [top])[top], top)
    clients = [_client(TIERED, 1), _client(UNIFORM[0], 2)]
    inputs = [RoundInput(f"c{k}", n, 1, c) for k, (c, n) in enumerate(zip(clients, (30, 70), strict=True))]
    plan = aggregate_round(
        get_strategy("flexlora"),
        DataSize(),
        inputs,
        1,
        global_rank=12,
        recipe=DEFAULT_RECIPE,
        step=ServerStep(carry_residual=True),
        global_at=lambda version: (g.request, g.factors) if version == 1 else None,
    )
    assert plan.info["carried_versions"] == 1.0
    for module in MODULES:
        start = _dense([g], [1.0], module)
        dense = _dense(clients, [0.3, 0.7], module)
        for c, w in zip(clients, (0.3, 0.7), strict=True):
            dense += w * (start - _best(start, c.at(module).rank))
        for req in plan.wanted.values():
            _assert_cut(plan.result.adapters[req][module], req.at(module), dense)
    assert plan.wanted["c0"] == TIERED and plan.wanted[GLOBAL_RELEASE].uniform


def test_fedit_averages_one_shared_pattern_and_refuses_mixed_ones() -> None:
    same = [_client(TIERED, 1), _client(TIERED, 2)]
    result = get_strategy("fedit").aggregate(same, [1.0, 3.0], [TIERED])
    for module in MODULES:
        a = 0.25 * same[0].factors[module].A + 0.75 * same[1].factors[module].A
        torch.testing.assert_close(result.adapters[TIERED][module].A, a)
    with pytest.raises(StrategyError, match=r"module 'model.layers.0.mlp.down_proj' has ranks \[2, 10\]"):
        get_strategy("fedit").aggregate([same[0], _client(UNIFORM[0], 3)], [1.0, 1.0], [TIERED, UNIFORM[0]])


def test_hetlora_pads_each_module_to_its_own_largest_rank() -> None:
    clients = [_client(TIERED, 1), _client(UNIFORM[0], 2)]
    result = get_strategy("hetlora").aggregate(clients, [1.0, 1.0], [TIERED, UNIFORM[0]])
    assert result.info["max_rank"] == 10.0
    for req in (TIERED, UNIFORM[0]):
        for module, f in result.adapters[req].items():
            assert f.A.shape[0] == f.B.shape[1] == req.at(module).rank


def test_flora_stacks_each_module_to_the_sum_of_its_ranks_exactly() -> None:
    clients = [_client(TIERED, 1), *(_client(r, 2 + i) for i, r in enumerate(UNIFORM))]
    result = get_strategy("flora").aggregate(clients, [1.0, 1.0, 2.0], [c.request for c in clients])
    [(request, stacked)] = result.adapters.items()
    for module in MODULES:
        at = request.at(module)
        assert at.rank == sum(c.at(module).rank for c in clients) and at.alpha == at.rank
        got = stacked[module].B.double().numpy() @ stacked[module].A.double().numpy()
        np.testing.assert_allclose(got, _dense(clients, [0.25, 0.25, 0.5], module), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_cuts_at_the_ranks_per_module_or_refuses_clearly(name: str) -> None:
    clients = [_client(TIERED, 1), _client(UNIFORM[1], 2)]
    requests = [c.request for c in clients]
    try:
        result = get_strategy(name).aggregate(clients, [1.0, 1.0], requests)
    except StrategyError as exc:
        assert "module" in str(exc) and "rank" in str(exc)
        return
    for req, factors in result.adapters.items():
        assert sorted(factors) == sorted(MODULES)
        for module, f in factors.items():
            assert f.A.shape[0] == f.B.shape[1] == req.at(module).rank, (name, module)
    if not result.merge_into_base:
        assert set(result.adapters) == set(requests)


def _message(request: RankRequest, tensors_at: RankRequest, **header: object) -> Message:
    factors = {
        m: LoraFactors(A=torch.ones(tensors_at.at(m).rank, 16), B=torch.ones(8, tensors_at.at(m).rank))
        for m in [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")]
    }
    data, info = encode_tensors(join_lora(factors))
    update = LoraUpdate(
        federation="f",
        client_id="c1",
        base_version=0,
        rank=request.rank,
        lora_alpha=request.alpha,
        rank_pattern=dict(request.rank_pattern),
        alpha_pattern=dict(request.alpha_pattern),
        num_samples=10,
        target_modules=("q_proj", "v_proj"),
        base_model_fingerprint="0" * 64,
        payload=info,
        **header,  # type: ignore[arg-type]
    )
    return Message(body=data, headers={HEADER_KEY: update.model_dump_json()})


def test_validation_checks_every_modules_factors_against_its_stated_rank() -> None:
    store = MemoryRoundStore()
    pattern = RankRequest.of(4, 8.0, {"q_proj": 2})
    valid = validate_update(_message(pattern, pattern), "f", store)
    assert {m: f.A.shape[0] for m, f in valid.factors.items()} == pattern.ranks(valid.factors)
    assert valid.header.request == pattern
    # the header says 2 on q_proj, the tensors hold 4 there: refused, naming the module and the pattern
    with pytest.raises(SchemaError, match=r"q_proj.*declared rank 2 \(the module's rank by the rank pattern\)") as e:
        validate_update(_message(pattern, RankRequest(4, 8.0)), "f", store)
    assert e.value.reason == Reason.LAYOUT
    # the federation's bounds hold on every module
    with pytest.raises(SchemaError, match=r"ranks \[4, 20\] is outside the federation's bounds") as e:
        big = RankRequest.of(4, 8.0, {"q_proj": 20})
        validate_update(_message(big, big), "f", store, limits=Limits(max_rank=16))
    assert e.value.reason == Reason.RANK


def test_headers_without_patterns_stay_valid_and_patterns_are_strict() -> None:
    plain = json.loads(_message(RankRequest(4, 8.0), RankRequest(4, 8.0)).headers[HEADER_KEY])
    assert "rank_pattern" not in plain and "alpha_pattern" not in plain  # written as before patterns existed
    old = parse_update(json.dumps(plain))
    assert old.request == RankRequest(4, 8.0) and old.request.uniform
    for bad in ({"q_proj|v_proj": 3}, {"q_proj": 0}, {"(.*)+": 3}, {f"m{i}": 2 for i in range(300)}):
        with pytest.raises(HeaderError):
            parse_update(json.dumps({**plain, "rank_pattern": bad}))
    with pytest.raises(HeaderError, match="for some module, by the patterns"):
        parse_update(json.dumps({**plain, "rank_pattern": {"q_proj": 4096}, "lora_alpha": 0.1}))


def test_the_clients_flag_and_the_paper_preset() -> None:
    assert parse_rank_pattern("paper-type2") == RANK_PATTERNS["paper-type2"]
    assert RANK_PATTERNS["paper-type2"]["q_proj"] == 30 and RANK_PATTERNS["paper-type2"]["down_proj"] == 200
    assert parse_rank_pattern("q_proj=30, gate_proj=200") == {"q_proj": 30, "gate_proj": 200}
    for bad in ("q_proj", "q_proj=x", "q_proj=3,q_proj=4"):
        with pytest.raises(ValueError):
            parse_rank_pattern(bad)
    settings = ClientSettings(client_id="c", rank=8, rank_pattern="paper-type2")  # type: ignore[arg-type]
    request = settings.rank_request(8)
    assert request.at("model.layers.0.self_attn.k_proj").rank == 30
    assert request.at("model.layers.0.mlp.up_proj") == RankRequest(200, DEFAULT_RECIPE.alpha(200))
    fixed = ClientSettings(client_id="c", rank=8, rank_pattern="q_proj=30", lora_alpha=16)  # type: ignore[arg-type]
    assert fixed.rank_request(8).at("x.q_proj") == RankRequest(30, 16.0)  # the authors' one alpha for all
    for other in ({"rank": "auto"}, {"rank_schedule": (4, 8)}):
        with pytest.raises(ValueError, match="rank pattern fixes the ranks"):
            ClientSettings(client_id="c", rank_pattern="q_proj=30", **other)  # type: ignore[arg-type]


def test_exact_patterns_say_each_modules_rank() -> None:
    per_module = {m: RankRequest(5 if "q_proj" in m else 7, 1.0) for m in MODULES}
    per_module["model.layers.1.mlp.down_proj"] = RankRequest(9, 9.0)
    request = RankRequest.exact(per_module)
    assert all(request.at(m) == r for m, r in per_module.items())
    assert request.rank == 7 and dict(request.rank_pattern)["q_proj"] == 5
