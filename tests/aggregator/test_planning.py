"""The round step shared by the service and the experiments, and the server step: with carry_residual a round
averages the clients' changes from the global they started from, so what a small-rank client could not hold
is not lost."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.flexlora import ClientAdapter, RankRequest, recut
from aggregator.planning import PLAIN_STEP, RoundInput, RoundPlan, ServerStep, aggregate_round
from aggregator.rounds import GLOBAL_RELEASE
from aggregator.strategies import get_strategy, get_weighting
from experiments.federation import DirectFederation, RoundOutput, ServiceFederation
from schemas.lora import LoraFactors, join_lora
from schemas.messages import LoraUpdate
from schemas.recipe import DEFAULT_RECIPE
from schemas.tensors import encode_tensors
from tests.conftest import AMQP_URL, REDIS_URL

D_OUT, D_IN, TOP = 24, 20, 12
MODULES = ("q", "v")
Factors = Mapping[str, LoraFactors]
Start = tuple[RankRequest, Factors]  # a global adapter: its rank and alpha, its factors


def _dense(factors: Factors, request: RankRequest) -> dict[str, torch.Tensor]:
    scale = request.alpha / request.rank
    return {m: scale * f.B.double() @ f.A.double() for m, f in factors.items()}


def _random_adapter(rank: int, seed: int) -> ClientAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {
        m: LoraFactors(A=torch.randn(rank, D_IN, generator=g), B=torch.randn(D_OUT, rank, generator=g)) for m in MODULES
    }
    return ClientAdapter(factors, rank, DEFAULT_RECIPE.alpha(rank))


def _round(inputs: list[RoundInput], step: ServerStep, globals_: dict[int, Start], round_id: int) -> RoundPlan:
    return aggregate_round(
        get_strategy("flexlora"),
        get_weighting("data_size"),
        inputs,
        round_id,
        global_rank=TOP,
        recipe=DEFAULT_RECIPE,
        step=step,
        global_at=globals_.get,
    )


@pytest.fixture
def first_global() -> Start:
    """Version 1: the global cut at TOP of three random rank-4 clients (ΔW of rank 12)."""
    inputs = [RoundInput(f"c{k}", 10 + k, 0, _random_adapter(4, seed=k)) for k in range(3)]
    plan = _round(inputs, PLAIN_STEP, {}, 0)
    request = plan.wanted[GLOBAL_RELEASE]
    return request, plan.result.adapters[request]


def _starting_from(top: Start, ranks: list[int], change: float = 0.0) -> list[RoundInput]:
    """Clients that start from the global's cut at their rank and change it by `change` × a random adapter."""
    request, factors = top
    inputs = []
    for k, r in enumerate(ranks):
        alpha = DEFAULT_RECIPE.alpha(r)
        start = recut(factors, request, RankRequest(r, alpha))
        g = torch.Generator().manual_seed(100 + k)
        moved = {
            m: LoraFactors(
                A=f.A + change * torch.randn(f.A.shape, generator=g),
                B=f.B + change * torch.randn(f.B.shape, generator=g),
            )
            for m, f in start.items()
        }
        inputs.append(RoundInput(f"c{k}", 10 * (k + 1), 1, ClientAdapter(moved, r, alpha)))
    return inputs


def _global(plan: RoundPlan) -> dict[str, torch.Tensor]:
    request = plan.wanted[GLOBAL_RELEASE]
    return _dense(plan.result.adapters[request], request)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[m] - b[m]).norm() / b[m].norm()) for m in b)


def test_a_zero_step_round_at_mixed_ranks_keeps_the_global_only_when_carrying(first_global: Start) -> None:
    """Clients at ranks 2, 4 and 12 that do not train send back their cuts of G. The paper's sum shrinks every
    direction of G the small clients cannot hold; carrying the residual gives G back."""
    request, factors = first_global
    g = _dense(factors, request)
    inputs = _starting_from(first_global, [2, 4, 12])
    plain = _global(_round(inputs, PLAIN_STEP, {1: first_global}, 1))
    carried = _round(inputs, ServerStep(carry_residual=True), {1: first_global}, 1)
    assert _close(_global(carried), g) < 1e-5
    assert carried.info["carried_versions"] == 1 and carried.info["starts_missing"] == 0
    lost = 1 - max(float(plain[m].norm() / g[m].norm()) for m in g)
    assert lost > 0.1, f"the plain sum kept {1 - lost:.3f} of ‖G‖: the test lost its point"


def test_carrying_averages_the_clients_changes_and_the_server_lr_scales_them(first_global: Start) -> None:
    request, factors = first_global
    g = _dense(factors, request)
    inputs = _starting_from(first_global, [2, 4, 12], change=0.05)
    total = sum(i.num_samples for i in inputs)
    changes = {m: torch.zeros_like(g[m]) for m in g}
    for item in inputs:
        sent = _dense(item.adapter.factors, item.request)
        start = _dense(recut(factors, request, item.request), item.request)
        for m in g:
            changes[m] += item.num_samples / total * (sent[m] - start[m])
    for eta in (1.0, 0.5, 2.0):
        # The sum's rank (at most 2 + 4 + 12 + 12) is above TOP: compare at the full rank (d_in = 20).
        plan = aggregate_round(
            get_strategy("flexlora"),
            get_weighting("data_size"),
            inputs,
            1,
            global_rank=D_IN,
            recipe=DEFAULT_RECIPE,
            step=ServerStep(carry_residual=True, server_lr=eta),
            global_at={1: first_global}.get,
        )
        want = {m: g[m] + eta * changes[m] for m in g}
        assert _close(_global(plan), want) < 1e-5, eta


def test_an_update_whose_starting_global_is_gone_counts_as_in_the_paper(first_global: Start) -> None:
    inputs = _starting_from(first_global, [2, 4])
    plain = _global(_round(inputs, PLAIN_STEP, {}, 1))
    missing = _round(inputs, ServerStep(carry_residual=True), {}, 1)
    assert missing.info["starts_missing"] == 2
    assert _close(_global(missing), plain) < 1e-6


def test_strategies_that_average_factors_ignore_the_server_step(first_global: Start) -> None:
    inputs = _starting_from(first_global, [4, 4])
    plain, carried = (
        aggregate_round(
            get_strategy("fedit"),
            get_weighting("data_size"),
            inputs,
            1,
            global_rank=TOP,
            recipe=DEFAULT_RECIPE,
            step=step,
            global_at={1: first_global}.get,
        )
        for step in (PLAIN_STEP, ServerStep(carry_residual=True))
    )
    assert plain.result.adapters.keys() == carried.result.adapters.keys()
    for request, modules in plain.result.adapters.items():
        for m, f in modules.items():
            assert torch.equal(f.B, carried.result.adapters[request][m].B)
    with pytest.raises(ValueError, match="carried"):
        get_strategy("fedit").aggregate(
            [i.adapter for i in inputs], [1.0, 1.0], [RankRequest(4, 8.0)], [inputs[0].adapter]
        )


def test_a_server_lr_without_carrying_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="carry_residual"):
        AggregatorConfig(federation="f", carry_residual=False, server_lr=0.5)
    with pytest.raises(ValueError, match="server_lr"):
        AggregatorConfig(federation="f", carry_residual=True, server_lr=0.0)


def _submit(fed: DirectFederation | ServiceFederation, inputs: list[RoundInput], base: int) -> RoundOutput:
    for item in inputs:
        data, info = encode_tensors(join_lora(dict(item.adapter.factors)))
        header = LoraUpdate(
            federation=fed.name,
            client_id=item.client_id,
            base_version=base,
            rank=item.adapter.rank,
            lora_alpha=item.adapter.alpha,
            num_samples=item.num_samples,
            target_modules=MODULES,
            base_model_fingerprint="a" * 64,
            payload=info,
        )
        fed.submit(header, data)
    return fed.close_round()


@pytest.mark.parametrize("backend", ["direct", "embedded", "services"])
def test_the_service_applies_the_server_step_as_the_direct_backend_does(backend: str) -> None:
    """Two rounds through a federation with carry_residual: the second, of untrained clients at ranks 2 and 4,
    leaves the global as the first committed it (the plain sum would shrink it), in the real service too."""
    step = ServerStep(carry_residual=True)
    if backend == "direct":
        fed: DirectFederation | ServiceFederation = DirectFederation("flexlora", TOP, step)
    else:
        broker, redis = (AMQP_URL, REDIS_URL) if backend == "services" else ("memory://", "memory://")
        fed = ServiceFederation("flexlora", 3, TOP, step=step, prefix="t-plan", broker_url=broker, redis_url=redis)
    try:
        first = _submit(fed, [RoundInput(f"c{k}", 10 + k, 0, _random_adapter(4, seed=k)) for k in range(3)], 0)
        start = (first.top, first.factors)
        second = _submit(fed, _starting_from(start, [2, 4, 4]), first.version)
    finally:
        fed.close()
    assert _close(_dense(second.factors, second.top), _dense(first.factors, first.top)) < 1e-5
