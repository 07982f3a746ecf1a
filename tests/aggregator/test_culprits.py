"""Finding the update a round cannot aggregate: tried alone, at the cuts the round makes of it."""

from __future__ import annotations

import torch

from aggregator.culprits import find_culprits
from aggregator.rounds import RecordResult
from aggregator.stores.memory import MemoryRoundStore
from aggregator.strategies import FlexLoRA
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.lora import LoraFactors, join_lora
from schemas.recipe import Recipe
from schemas.tensors import encode_tensors

SHAPE = SyntheticShape(layers=1, projections=(("self_attn.q_proj", 64, 64),))
MODULE = "model.layers.0.self_attn.q_proj"
FIXED = Recipe(scaling="fixed")  # alpha 16 at every rank: the scale 16 / r falls as the rank grows


def test_an_update_finite_at_its_own_cut_that_overflows_the_global_one_is_the_culprit() -> None:
    """Rank 8 at alpha 16 (scale 2), every value 1.25e18: its own cut's B is about 1e38, under float32's 3.4e38;
    the round's global cut at rank 64 (scale 0.25) makes it 8e38, inf. Tried at its own cut only, no update was
    to blame, and the round was tried again and again, forever."""
    store = MemoryRoundStore()
    honest, payload = synthetic_update("f", "honest", 64, 0, shape=SHAPE, seed=1)
    honest = honest.model_copy(update={"lora_alpha": 16.0})
    big = LoraFactors(A=torch.full((8, 64), 1.25e18), B=torch.full((64, 8), 1.25e18))
    body, info = encode_tensors(join_lora({MODULE: big}))
    mallory, _ = synthetic_update("f", "mallory", 8, 0, shape=SHAPE, seed=2)
    mallory = mallory.model_copy(update={"lora_alpha": 16.0, "payload": info})
    assert store.record(honest, payload, now=1.0) is RecordResult.RECORDED
    assert store.record(mallory, body, now=1.0) is RecordResult.RECORDED
    recorded = store.round_updates(0)
    [(culprit, detail)] = find_culprits(store, FlexLoRA(), recorded, global_rank=0, recipe=FIXED)
    assert culprit.client_id == "mallory" and "NaN or infinite" in detail
    assert find_culprits(store, FlexLoRA(), recorded[:1], global_rank=0, recipe=FIXED) == []


def test_an_update_that_overflows_only_once_scaled_by_the_server_step_is_the_culprit() -> None:
    """Rank 64 at alpha 16 (scale 0.25), every value 6.25e17: its cut's B is about 2e38, finite; the round
    multiplies the cut by server_lr 2, to inf. Tried without that scale, no update was to blame."""
    store = MemoryRoundStore()
    big = LoraFactors(A=torch.full((64, 64), 6.25e17), B=torch.full((64, 64), 6.25e17))
    body, info = encode_tensors(join_lora({MODULE: big}))
    mallory, _ = synthetic_update("f", "mallory", 64, 0, shape=SHAPE, seed=2)
    mallory = mallory.model_copy(update={"lora_alpha": 16.0, "payload": info})
    assert store.record(mallory, body, now=1.0) is RecordResult.RECORDED
    recorded = store.round_updates(0)
    assert find_culprits(store, FlexLoRA(), recorded, recipe=FIXED) == []
    [(culprit, _)] = find_culprits(store, FlexLoRA(), recorded, recipe=FIXED, server_lr=2.0)
    assert culprit.client_id == "mallory"
