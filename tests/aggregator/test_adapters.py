"""PEFT adapter directories in and out, and `flexlora aggregate`, checked against real peft and numpy."""

from __future__ import annotations

import json
import os
import pickle  # hostile: builds a malicious legacy adapter to prove it is never unpickled
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file
from typer.testing import CliRunner

from aggregator.adapters import AdapterFileError, read_adapter, write_adapter
from edge_client.model import tiny_model
from flexlora.aggregate import aggregate_dirs
from flexlora.cli import app

TARGETS = ["q_proj", "v_proj"]
# (rank, alpha, seed) of the two clients: different ranks and different alpha/rank scales.
CLIENTS = [(4, 16, 1), (8, 8, 2)]
INPUT_IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])


def save_peft_adapter(directory: Path, rank: int, alpha: int, seed: int, targets: list[str] = TARGETS) -> None:
    """A real peft adapter on the tiny model, with non-zero random A and B (peft starts B at 0)."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(tiny_model().model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(directory))


def numpy_factors(directory: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """module → (A, B) in float64 and the scale alpha/r, read without any project code."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_numpy(str(directory / "adapter_model.safetensors"))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, value in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        a, b = out.get(module, (np.empty(0), np.empty(0)))
        if ".lora_A." in key:
            a = value.astype(np.float64)
        else:
            b = value.astype(np.float64)
        out[module] = (a, b)
    return out, float(config["lora_alpha"]) / int(config["r"])


def reference_delta(dirs: list[Path], p: list[float]) -> dict[str, np.ndarray]:
    """ΔW = Σ p_k (α_k/r_k) B_k A_k per module, in numpy."""
    total: dict[str, np.ndarray] = {}
    for directory, pk in zip(dirs, p, strict=True):
        factors, scale = numpy_factors(directory)
        for module, (a, b) in factors.items():
            total[module] = total.get(module, 0.0) + pk * scale * (b @ a)
    return total


def best_rank(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return np.asarray((u[:, :rank] * s[:rank]) @ vt[:rank])


def loaded_deltas(directory: Path) -> tuple[PeftModel, dict[str, np.ndarray]]:
    """Load with peft itself and read (alpha/r)·B·A of every LoRA layer back from the model."""
    model = PeftModel.from_pretrained(tiny_model().model, str(directory))
    deltas = {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").detach().double().numpy()
        for name, module in model.named_modules()
        if isinstance(module, LoraLinear)
    }
    return model, deltas


def rel_err(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("clients")
    dirs = []
    for rank, alpha, seed in CLIENTS:
        directory = root / f"client-r{rank}"
        save_peft_adapter(directory, rank, alpha, seed)
        dirs.append(directory)
    return dirs


def test_read_adapter_matches_peft_save(inputs: list[Path]) -> None:
    adapter = read_adapter(inputs[0])
    assert (adapter.rank, adapter.alpha, adapter.target_modules) == (4, 16.0, ("q_proj", "v_proj"))
    assert len(adapter.factors) == 4  # 2 layers × q_proj, v_proj
    factors, _ = numpy_factors(inputs[0])
    for module, (a, b) in factors.items():
        np.testing.assert_array_equal(adapter.factors[module].A.numpy(), a)
        np.testing.assert_array_equal(adapter.factors[module].B.numpy(), b)


def test_flexlora_outputs_are_best_rank_approximations(inputs: list[Path], tmp_path: Path) -> None:
    written = aggregate_dirs(inputs, [4, 8, 12], tmp_path / "out", samples=[30, 10])
    assert written == [tmp_path / "out" / f"rank-{r}" for r in (4, 8, 12)]
    delta = reference_delta(inputs, [0.75, 0.25])
    for directory, rank in zip(written, (4, 8, 12), strict=True):
        config = json.loads((directory / "adapter_config.json").read_text())
        assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
            "LORA",
            "CAUSAL_LM",
            rank,
            2 * rank,
        )
        _, loaded = loaded_deltas(directory)
        assert set(loaded) == set(delta)
        for module, full in delta.items():
            assert rel_err(loaded[module], best_rank(full, rank)) <= 1e-4, (rank, module)
    summary = json.loads((tmp_path / "out" / "aggregation.json").read_text())
    assert summary["strategy"] == "flexlora"
    assert summary["weights"] == pytest.approx([0.75, 0.25])
    assert summary["ranks"] == [4, 8, 12]


def test_full_rank_output_changes_logits_as_the_aggregate_says(inputs: list[Path], tmp_path: Path) -> None:
    [directory] = aggregate_dirs(inputs, [12], tmp_path / "out")  # 12 = 4 + 8: the SVD cut is exact
    delta = reference_delta(inputs, [0.5, 0.5])
    base = tiny_model().model
    with torch.no_grad():
        before = base(INPUT_IDS).logits
        for module, full in delta.items():
            layer = base.get_submodule(module)
            assert isinstance(layer, torch.nn.Linear)
            layer.weight += torch.from_numpy(full).float()
        merged = base(INPUT_IDS).logits
        model, _ = loaded_deltas(directory)
        adapted = model(INPUT_IDS).logits
    assert (merged - before).abs().max() > 1e-2  # the update is large enough to matter
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)


def test_flora_writes_a_stacked_adapter_equal_to_the_weighted_sum(inputs: list[Path], tmp_path: Path) -> None:
    written = aggregate_dirs(inputs, [4], tmp_path / "out", strategy="flora", weights=[1.0, 3.0])
    assert written == [tmp_path / "out" / "stacked-rank-12"]
    assert "merge" in (tmp_path / "out" / "README.md").read_text()
    assert json.loads((tmp_path / "out" / "aggregation.json").read_text())["merge_into_base"] is True
    delta = reference_delta(inputs, [0.25, 0.75])
    _, loaded = loaded_deltas(written[0])
    for module, full in delta.items():
        assert rel_err(loaded[module], full) <= 1e-5


def test_cli_aggregates_with_explicit_weights_and_alpha(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["aggregate", *map(str, inputs), "--rank", "4", "--rank", "8", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--weights", "1,3", "--alpha", "16"])
    assert result.exit_code == 0, result.output
    assert str(out / "rank-4") in result.output and str(out / "rank-8") in result.output
    delta = reference_delta(inputs, [0.25, 0.75])
    for rank in (4, 8):
        assert json.loads((out / f"rank-{rank}" / "adapter_config.json").read_text())["lora_alpha"] == 16
        _, loaded = loaded_deltas(out / f"rank-{rank}")
        for module, full in delta.items():
            assert rel_err(loaded[module], best_rank(full, rank)) <= 1e-4


def test_write_then_read_round_trips_and_normalises_named_keys(inputs: list[Path], tmp_path: Path) -> None:
    adapter = read_adapter(inputs[1])
    write_adapter(tmp_path / "copy", adapter.factors, adapter.rank, adapter.alpha, adapter.target_modules)
    again = read_adapter(tmp_path / "copy")
    assert (again.rank, again.alpha, again.target_modules) == (8, 8.0, ("q_proj", "v_proj"))
    # Some peft code paths keep the adapter name in the key: `...lora_A.default.weight`.
    named = tmp_path / "named"
    shutil.copytree(inputs[1], named)
    tensors = load_numpy(str(named / "adapter_model.safetensors"))
    renamed = {k.replace(".weight", ".default.weight"): torch.from_numpy(v) for k, v in tensors.items()}
    save_file(renamed, str(named / "adapter_model.safetensors"))
    for module, factors in read_adapter(named).factors.items():
        torch.testing.assert_close(factors.A, adapter.factors[module].A)
        torch.testing.assert_close(factors.B, adapter.factors[module].B)


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["aggregate", *args])


def test_mismatched_target_modules_are_refused(inputs: list[Path], tmp_path: Path) -> None:
    other = tmp_path / "client-qk"
    save_peft_adapter(other, 4, 8, 3, targets=["q_proj", "k_proj"])
    with pytest.raises(AdapterFileError, match=str(other)):
        aggregate_dirs([inputs[0], other], [4], tmp_path / "out")
    result = run_cli(str(inputs[0]), str(other), "--rank", "4", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "target_modules" in result.output and str(other) in result.output
    assert not (tmp_path / "out").exists()


class _Exploit:
    """Unpickling this creates a directory: proof that the file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_pickle_adapter_is_refused_without_unpickling(inputs: list[Path], tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(inputs[0] / "adapter_config.json", legacy)
    marker = tmp_path / "unpickled"
    (legacy / "adapter_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))  # hostile
    with pytest.raises(AdapterFileError, match="pickle files are not loaded"):
        read_adapter(legacy)
    result = run_cli(str(inputs[0]), str(legacy), "--rank", "4", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "pickle files are not loaded" in result.output and str(legacy) in result.output
    assert not marker.exists()


def test_unsupported_lora_features_are_refused(inputs: list[Path], tmp_path: Path) -> None:
    dora = tmp_path / "dora"
    shutil.copytree(inputs[0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterFileError, match=r"use_dora"):
        read_adapter(dora)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "1,2,3"], "3 weights for 2 adapters"),
        (["--strategy", "fedavg-ish"], "unknown strategy"),
        (["--samples", "10,x"], "--samples must be a comma-separated list"),
    ],
)
def test_bad_options_exit_2_with_a_message(inputs: list[Path], tmp_path: Path, extra: list[str], message: str) -> None:
    result = run_cli(*map(str, inputs), "--rank", "4", "--out", str(tmp_path / "out"), *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()
