"""The zero-step round trip at SmolLM2-135M's shapes, for every strategy and every LoRA scaling convention:
aggregate → cut at each rank → load into a PEFT model of that rank and alpha → read the adapter back →
aggregate again. What PEFT applies must be exactly the ΔW the strategy meant, and a round in which no client
trains must give back the ΔW it was given (up to each client's cut). A scaling bug anywhere between the
strategies, the wire layout and PEFT's alpha/r would show here as a ΔW off by a factor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from transformers import LlamaConfig, LlamaForCausalLM

from aggregator.flexlora import ClientAdapter, RankRequest
from aggregator.registry import STRATEGIES
from aggregator.strategies import AggregationResult, get_strategy
from edge_client.model import adapter_state, load_adapter_state, wrap_lora
from experiments.ranks import scaled_ranks
from schemas.lora import PEFT_PREFIX, LoraFactors, join_lora, split_lora
from schemas.recipe import SCALINGS, lora_alpha

HIDDEN = 576  # SmolLM2-135M: hidden 576, 9 query heads and 3 key/value heads of 64, MLP 1536
TARGETS = ("q_proj", "v_proj")
TIERS = scaled_ranks(HIDDEN)  # (2, 8, 56), the experiments' tiers
LAYERS = 2  # every layer is alike; two show the per-module keys are kept apart


def smollm2_shaped() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=1536,
        num_hidden_layers=LAYERS,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def module_names() -> list[str]:
    return [f"model.layers.{i}.self_attn.{t}" for i in range(LAYERS) for t in TARGETS]


SHAPES = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (192, HIDDEN)}


def trained_client(rank: int, alpha: float, seed: int) -> ClientAdapter:
    """A client after local training: both factors non-zero, with a spread of singular values."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name in module_names():
        d_out, d_in = SHAPES[name.rsplit(".", 1)[-1]]
        factors[name] = LoraFactors(
            A=torch.randn(rank, d_in, generator=g) / d_in**0.5, B=torch.randn(d_out, rank, generator=g) * 0.05
        )
    return ClientAdapter(factors, rank, alpha)


def delta(adapter: ClientAdapter) -> dict[str, torch.Tensor]:
    return {m: adapter.scale * (f.B.double() @ f.A.double()) for m, f in adapter.factors.items()}


def through_peft(
    factors: Mapping[str, LoraFactors], rank: int, alpha: float
) -> tuple[ClientAdapter, dict[str, torch.Tensor]]:
    """Load a released adapter into a PEFT model of that rank and alpha, as a client does; return what the
    client reads back (its next update, after zero steps) and the ΔW PEFT itself applies to each module."""
    model = wrap_lora(smollm2_shaped(), rank=rank, alpha=alpha, target_modules=list(TARGETS), seed=1)
    load_adapter_state(model, join_lora(factors))
    applied = {
        name.removeprefix(PEFT_PREFIX): layer.get_delta_weight("default").detach().double()
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLinear)
    }
    back = split_lora(adapter_state(model), rank=rank, target_modules=TARGETS)
    return ClientAdapter(back, rank, alpha), applied


def close(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for m in a:
        err = float(torch.linalg.matrix_norm(a[m] - b[m]))
        assert err <= rtol * max(float(torch.linalg.matrix_norm(b[m])), 1e-12), f"{m}: ‖error‖ {err:.3g}"


def weighted(weights: Sequence[float], deltas: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {m: sum(w * d[m] for w, d in zip(weights, deltas, strict=True)) for m in deltas[0]}  # type: ignore[misc]


def best_rank(dw: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    out: torch.Tensor = (u[:, :r] * s[:r]) @ vh[:r]
    return out


def one_round(
    strategy: str, clients: Sequence[ClientAdapter], weights: Sequence[float], requests: Sequence[RankRequest]
) -> AggregationResult:
    return get_strategy(strategy).aggregate(clients, weights, requests)


def check_applied(result: AggregationResult) -> dict[RankRequest, ClientAdapter]:
    """Every release, through PEFT: PEFT applies exactly (alpha/r)·B·A of what was released, and reads back
    the same factors."""
    back = {}
    for request, factors in result.adapters.items():
        released = ClientAdapter(factors, request.rank, request.alpha)
        client, applied = through_peft(factors, request.rank, request.alpha)
        close(applied, delta(released))
        close(delta(client), delta(released))
        back[request] = client
    return back


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_flexlora_round_trip_through_peft_at_every_tier(scaling: str, mode: str) -> None:
    ranks = [TIERS[0], TIERS[1], TIERS[2], TIERS[2]]
    clients = [trained_client(r, lora_alpha(r, scaling), seed=i) for i, r in enumerate(ranks)]  # type: ignore[arg-type]
    weights = [0.1, 0.2, 0.3, 0.4]
    requests = [RankRequest(r, lora_alpha(r, scaling)) for r in TIERS]  # type: ignore[arg-type]
    result = get_strategy("flexlora", mode=mode).aggregate(clients, weights, requests)
    # Round 1: each rank's release is the best rank-r approximation of the weighted sum of full-size products.
    global_dw = weighted(weights, [delta(c) for c in clients])
    for req, factors in result.adapters.items():
        expected = {m: best_rank(dw, req.rank) for m, dw in global_dw.items()}
        close(delta(ClientAdapter(factors, req.rank, req.alpha)), expected, rtol=1e-4)
    back = check_applied(result)
    # The top tier holds the global exactly: Σ r_k = 122 > 56 here, so it is the global's top-56 cut.
    # Round 2, zero local steps: every client sends back the adapter it loaded, at its own rank.
    returned = [back[RankRequest(c.rank, c.alpha)] for c in clients]
    again = get_strategy("flexlora", mode=mode).aggregate(returned, weights, requests)
    cut_sum = weighted(weights, [{m: best_rank(dw, c.rank) for m, dw in global_dw.items()} for c in clients])
    for req, factors in again.adapters.items():
        expected = {m: best_rank(dw, req.rank) for m, dw in cut_sum.items()}
        close(delta(ClientAdapter(factors, req.rank, req.alpha)), expected, rtol=1e-4)


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_round_without_training_is_a_fixed_point(strategy: str, scaling: str) -> None:
    # Every client at the top tier holding the same adapter (what each loads after a release) and training
    # zero steps: the next global is the one they started from, for every strategy.
    top = TIERS[-1]
    alpha = lora_alpha(top, scaling)  # type: ignore[arg-type]
    request = RankRequest(top, alpha)
    first = one_round(strategy, [trained_client(top, alpha, seed=s) for s in range(3)], [0.5, 0.3, 0.2], [request])
    ((released_request, released),) = first.adapters.items()
    loaded = check_applied(first)[released_request]
    if first.merge_into_base:
        # FLoRA: the stacked adapter is merged into the base and clients restart from B = 0; what the merge
        # adds to the base weights is exactly the released ΔW.
        model = wrap_lora(smollm2_shaped(), released_request.rank, released_request.alpha, list(TARGETS), seed=1)
        before = {n: p.detach().clone().double() for n, p in smollm2_shaped().named_parameters()}
        load_adapter_state(model, join_lora(released))
        merged = model.merge_and_unload()
        moved = {m: merged.get_parameter(f"{m}.weight").detach().double() - before[f"{m}.weight"] for m in released}
        close(moved, delta(loaded), rtol=1e-4)
        return
    again = one_round(strategy, [loaded, loaded, loaded], [0.5, 0.3, 0.2], [request])
    close(delta(ClientAdapter(again.adapters[request], top, alpha)), delta(loaded), rtol=1e-4)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_hetlora_round_trip_through_peft_at_every_tier(scaling: str) -> None:
    # HetLoRA pads to the largest rank, averages, and truncates: each release holds the first r rows of A
    # and columns of B of that average; PEFT must apply exactly that at every tier's alpha.
    ranks = [TIERS[0], TIERS[1], TIERS[2]]
    clients = [trained_client(r, lora_alpha(r, scaling), seed=i) for i, r in enumerate(ranks)]  # type: ignore[arg-type]
    requests = [RankRequest(r, lora_alpha(r, scaling)) for r in TIERS]  # type: ignore[arg-type]
    result = one_round("hetlora", clients, [0.2, 0.3, 0.5], requests)
    back = check_applied(result)
    top = back[requests[-1]]
    for req in requests[:-1]:
        for m, f in back[req].factors.items():
            # A lower tier's release is the top release's leading block, in its own alpha.
            torch.testing.assert_close(f.A, top.factors[m].A[: req.rank])
            torch.testing.assert_close(f.B * back[req].scale, top.factors[m].B[:, : req.rank] * top.scale)
