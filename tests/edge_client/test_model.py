"""Model loading helpers: the shared model cache, the tiny model, the adapter round trip through PEFT."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from edge_client.model import adapter_state, cached_directory, load_adapter_state, tiny_model, wrap_lora
from schemas.lora import split_lora


def test_concurrent_cache_fills_all_succeed_and_leave_one_complete_copy(tmp_path: Path) -> None:
    # Three clients sharing one cache volume start at once; each must end with a usable directory.
    target = tmp_path / "model"
    calls, errors = [], []

    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough that every builder overlaps
        (out / "weights.bin").write_bytes(b"w" * 1000)
        (out / "config.json").write_text("{}")

    def load() -> None:
        try:
            assert (cached_directory(target, build) / "config.json").is_file()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no scratch directories left behind"
    assert cached_directory(target, build) == target and len(calls) == 3, "a filled cache is not rebuilt"


def test_a_failed_build_leaves_no_partial_cache(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cached_directory(tmp_path / "model", build)
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_is_identical_across_loads_and_seeds_differ() -> None:
    assert tiny_model(0).fingerprint == tiny_model(0).fingerprint
    assert tiny_model(0).fingerprint != tiny_model(1).fingerprint


def test_adapter_round_trip_through_peft_keys() -> None:
    base = tiny_model()
    model = wrap_lora(base.model, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"], seed=0)
    state = adapter_state(model)
    factors = split_lora(state, rank=4, target_modules=("q_proj", "v_proj"))
    assert len(factors) == 4  # 2 layers × (q_proj, v_proj)
    assert all(torch.count_nonzero(f.B) == 0 for f in factors.values()), "a fresh adapter starts at B = 0"
    changed = {k: torch.full_like(v, 0.5) for k, v in state.items()}
    load_adapter_state(model, changed)
    assert all(torch.equal(v, changed[k]) for k, v in adapter_state(model).items())
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state(model, dict(list(changed.items())[:2]))
