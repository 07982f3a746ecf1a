"""The LoRA layout an update's tensors must have, and peft's rank-pattern resolution, against hostile shapes and
names: refused with a reason, in time linear in the header."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

from aggregator.validation import Limits, check_payload, update_norm
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.errors import LoraLayoutError, Reason, SchemaError
from schemas.lora import LoraFactors, join_lora, lora_key, split_lora
from schemas.ranks import pattern_key
from schemas.tensors import encode_tensors

MODULE = "model.layers.0.self_attn.q_proj"


def test_a_module_with_an_empty_side_is_refused() -> None:
    """A first update of 8 x 0 and 0 x 8 factors once pinned shapes [0, 0], and every honest update after it was
    refused for its shapes."""
    empty = join_lora({MODULE: LoraFactors(A=torch.zeros(8, 0), B=torch.zeros(0, 8))})
    with pytest.raises(LoraLayoutError, match="empty side"):
        split_lora(empty, rank=8)
    half = join_lora({MODULE: LoraFactors(A=torch.zeros(8, 4), B=torch.zeros(0, 8))})
    with pytest.raises(LoraLayoutError, match="empty side"):
        split_lora(half, rank=8)


def test_a_module_name_past_the_headers_bound_is_refused() -> None:
    a, b = torch.zeros(8, 4), torch.zeros(4, 8)
    fits = "m" * 249 + ".q_proj"
    assert len(fits) == 256 and set(split_lora({lora_key(fits, "A"): a, lora_key(fits, "B"): b}, rank=8)) == {fits}
    long = "." * 1000 + "q_proj"
    with pytest.raises(LoraLayoutError, match="unexpected tensor key"):
        split_lora({lora_key(long, "A"): a, lora_key(long, "B"): b}, rank=8)


def test_an_update_whose_norm_overflows_is_refused_by_the_norm_bound() -> None:
    """float64 factors of 1e200: BᵀB overflows to inf, and inf·0 is NaN in the sum; max(0, NaN) once made the
    norm 0, so the update passed any bound and committed releases of inf under FedIT."""
    factors = {
        MODULE: LoraFactors(A=torch.eye(8, 16, dtype=torch.float64), B=torch.full((16, 8), 1e200, dtype=torch.float64))
    }
    assert update_norm(factors, 2.0) == math.inf
    header, _ = synthetic_update(
        "f", "mallory", 8, 0, shape=SyntheticShape(layers=1, projections=(("self_attn.q_proj", 16, 16),))
    )
    body, info = encode_tensors(join_lora(factors))
    with pytest.raises(SchemaError) as refused:
        check_payload(header.model_copy(update={"payload": info}), body, Limits(max_norm=10.0))
    assert refused.value.reason == Reason.NORM


def peft_key(keys: list[str], module: str) -> str | None:
    """peft's answer, with its "no key matched" (the module's own name) as None."""
    found = get_pattern_key(keys, module)
    return found if found in keys else None


WIRE = st.text(alphabet="ab_.", min_size=1, max_size=12)


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(WIRE, min_size=1, max_size=5, unique=True), module=WIRE)
def test_pattern_keys_resolve_as_peft_resolves_them(keys: list[str], module: str) -> None:
    assert pattern_key(tuple(keys), module) == peft_key(keys, module)


def test_pattern_keys_that_are_not_wire_keys_keep_peft_s_search() -> None:
    keys = ["layers\\.[0-3]\\.q_proj", "q_proj"]
    for module in ("model.layers.2.q_proj", "model.layers.7.q_proj", "model.layers.2.v_proj"):
        assert pattern_key(tuple(keys), module) == peft_key(keys, module)


@pytest.mark.parametrize(("rank", "d_out", "d_in"), [(8, 64, 48), (4096, 1, 1), (100, 20, 30)])
def test_the_norm_is_the_products_whichever_way_it_is_computed(rank: int, d_out: int, d_in: int) -> None:
    """By Gram matrices where the rank is below the module's sides, by the product where it is above (a rank-4096
    update of 1 x 1 modules once cost two 4096² Grams a module)."""
    gen = torch.Generator().manual_seed(rank)
    a = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
    assert update_norm({MODULE: LoraFactors(a, b)}, 0.5) == pytest.approx(0.5 * float(torch.linalg.norm(b @ a)))
