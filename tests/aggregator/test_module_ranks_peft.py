"""PEFT directories with rank patterns: `flexlora aggregate` reads them, writes its outputs with the pattern in
adapter_config.json, and `PeftModel.from_pretrained` applies exactly the best cut of the dense ΔW per module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear

from aggregator.adapters import read_adapter
from edge_client.model import tiny_model, wrap_lora
from flexlora.aggregate import aggregate_dirs
from schemas.lora import PEFT_PREFIX
from schemas.ranks import RankRequest

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
TIERED = RankRequest.of(4, 8.0, {"q_proj": 3, "gate_proj": 6, "down_proj": 6}, {"gate_proj": 12.0})
UNIFORM = RankRequest(2, 4.0)


def _saved(request: RankRequest, seed: int, path: Path) -> dict[str, np.ndarray]:
    """A trained-looking PEFT adapter saved with save_pretrained; returns the ΔW PEFT applies per module."""
    model = wrap_lora(tiny_model().model, request.rank, request.alpha, TARGETS, seed=seed, pattern=request)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLinear):
                b = layer.lora_B["default"].weight
                assert isinstance(b, torch.Tensor)
                b.copy_(torch.randn(tuple(b.shape), generator=g))
                deltas[name.removeprefix(PEFT_PREFIX)] = layer.get_delta_weight("default").double().numpy()
    model.save_pretrained(str(path))
    return deltas


def _best(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    out: np.ndarray = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return out


def test_patterned_peft_directories_aggregate_into_one_that_peft_loads(tmp_path: Path) -> None:
    tiered = _saved(TIERED, 1, tmp_path / "tiered")
    uniform = _saved(UNIFORM, 2, tmp_path / "uniform")
    read = read_adapter(tmp_path / "tiered")
    assert read.request.ranks(read.factors) == TIERED.ranks(read.factors)
    pattern = {"q_proj": 3, "gate_proj": 6, "down_proj": 6}
    [written] = aggregate_dirs(
        [tmp_path / "tiered", tmp_path / "uniform"], [4], tmp_path / "out", samples=[30, 10], rank_pattern=pattern
    )
    config = json.loads((written / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == pattern
    assert config["alpha_pattern"] == {k: 2 * r for k, r in pattern.items()}  # alpha 2·rank by default
    loaded = PeftModel.from_pretrained(tiny_model().model, str(written))
    layers = {n.removeprefix(PEFT_PREFIX): m for n, m in loaded.named_modules() if isinstance(m, LoraLinear)}
    assert sorted(layers) == sorted(tiered)
    for module, layer in layers.items():
        rank = pattern.get(module.rsplit(".", 1)[-1], 4)
        assert layer.r["default"] == rank
        dense = 0.75 * tiered[module] + 0.25 * uniform[module]  # ΔW from what PEFT itself applied
        best = _best(dense, rank)
        got = layer.get_delta_weight("default").double().numpy()
        assert np.linalg.norm(got - best) <= 1e-4 * np.linalg.norm(best), module
    summary = json.loads((tmp_path / "out" / "aggregation.json").read_text())
    assert summary["inputs"][0]["rank_pattern"] == dict(TIERED.rank_pattern)
    assert summary["outputs"][0]["rank_pattern"] == pattern
