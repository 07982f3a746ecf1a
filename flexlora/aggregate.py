"""Offline adapter tools: `flexlora aggregate` (PEFT directories in, out) and `flexlora export` (a global version)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from aggregator.adapters import AdapterFileError, PeftAdapter, read_adapter, write_adapter
from aggregator.flexlora import ClientAdapter, RankRequest, data_size_weights
from aggregator.rounds import RoundStore
from aggregator.strategies import get_strategy
from schemas.lora import LoraFactors, module_shapes, split_lora
from schemas.messages import AdapterRelease
from schemas.tensors import decode_tensors

SUMMARY_FILE = "aggregation.json"
README_FILE = "README.md"


def aggregate_dirs(
    inputs: Sequence[Path],
    ranks: Sequence[int],
    out: Path,
    *,
    strategy: str = "flexlora",
    weights: Sequence[float] | None = None,
    samples: Sequence[int] | None = None,
    alpha: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
) -> list[Path]:
    """Aggregate the adapters in `inputs` and write the results under `out`; returns the adapter directories.

    Inputs may carry rank patterns (ranks per module); `rank_pattern` gives the outputs one, the same for every
    requested rank (the pattern's modules at its ranks, at alpha 2·rank or `alpha`; the others at each rank).

    FLoRA's result is one stacked adapter (`stacked-rank-<R>`) that clients merge into their base weights;
    every other strategy writes `rank-<r>` for each requested rank, which clients continue training from.
    """
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    if not inputs:
        raise ValueError("give at least one adapter directory")
    if not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    chosen = get_strategy(strategy)  # an unknown name fails before any file is read
    adapters = [read_adapter(p) for p in inputs]
    _check_compatible(inputs, adapters)
    p = _weights(len(inputs), weights, samples)

    def alpha_of(r: int) -> float:
        return alpha if alpha is not None else 2.0 * r

    pattern = dict(rank_pattern or {})
    if any(r < 1 for r in pattern.values()):
        raise ValueError(f"rank pattern ranks must be positive integers, got {pattern}")
    alphas = {k: alpha_of(r) for k, r in pattern.items()} if alpha is None else {}
    requests = sorted({RankRequest.of(r, alpha_of(r), pattern, alphas) for r in ranks})
    clients = [ClientAdapter.of(a.factors, a.request) for a in adapters]
    result = chosen.aggregate(clients, p, requests)

    first = adapters[0]
    base = next((a.base_model_name_or_path for a in adapters if a.base_model_name_or_path), None)
    target: Sequence[str] | str = (
        first.config["target_modules"] if isinstance(first.config.get("target_modules"), str) else first.target_modules
    )
    written: list[Path] = []
    for req in sorted(result.adapters):
        factors = {
            m: LoraFactors(f.A.to(torch.float32), f.B.to(torch.float32)) for m, f in result.adapters[req].items()
        }
        directory = out / (f"stacked-rank-{req.rank}" if result.merge_into_base else f"rank-{req.rank}")
        write_adapter(
            directory,
            factors,
            req.rank,
            req.alpha,
            target,
            base_model_name_or_path=base,
            template_config=first.config,
            pattern=req,
        )
        written.append(directory)

    summary: dict[str, Any] = {
        "strategy": chosen.name,
        "inputs": [
            {
                "path": str(path),
                "rank": a.rank,
                "lora_alpha": a.alpha,
                "rank_pattern": a.rank_pattern,
                "alpha_pattern": a.alpha_pattern,
                "base_model_name_or_path": a.base_model_name_or_path,
            }
            for path, a in zip(inputs, adapters, strict=True)
        ],
        "weights": p,
        "weighting": "explicit" if weights is not None else "samples" if samples is not None else "equal",
        "ranks": sorted(set(ranks)),
        "alpha": alpha,
        "merge_into_base": result.merge_into_base,
        "outputs": [
            {
                "path": str(d),
                "rank": r.rank,
                "lora_alpha": r.alpha,
                "rank_pattern": dict(r.rank_pattern),
                "alpha_pattern": dict(r.alpha_pattern),
            }
            for d, r in zip(written, sorted(result.adapters), strict=True)
        ],
        "info": dict(result.info),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / README_FILE).write_text(_readme(chosen.name, written, result.merge_into_base))
    return written


def _check_compatible(inputs: Sequence[Path], adapters: Sequence[PeftAdapter]) -> None:
    """Every adapter must adapt the same modules with the same shapes, or the sum ΔW is meaningless."""
    first, reference = inputs[0], adapters[0]
    shapes = module_shapes(reference.factors)
    for path, adapter in zip(inputs[1:], adapters[1:], strict=True):
        if adapter.target_modules != reference.target_modules:
            raise AdapterFileError(
                f"{path}: target_modules {list(adapter.target_modules)} differ from "
                f"{list(reference.target_modules)} in {first}"
            )
        other = module_shapes(adapter.factors)
        if set(other) != set(shapes):
            missing, extra = sorted(set(shapes) - set(other)), sorted(set(other) - set(shapes))
            raise AdapterFileError(
                f"{path}: adapts different modules than {first} (missing {missing[:3]}, extra {extra[:3]})"
            )
        for module, shape in other.items():
            if shape != shapes[module]:
                raise AdapterFileError(
                    f"{path}: module {module!r} is {shape[0]}×{shape[1]} (d_out×d_in) but "
                    f"{shapes[module][0]}×{shapes[module][1]} in {first}; the adapters are for different base models"
                )


def _weights(count: int, weights: Sequence[float] | None, samples: Sequence[int] | None) -> list[float]:
    """Explicit weights (normalised), data-size weights from sample counts, or equal weights."""
    if weights is not None and samples is not None:
        raise ValueError("give either weights or sample counts, not both")
    if weights is not None:
        if len(weights) != count:
            raise ValueError(f"{len(weights)} weights for {count} adapters; give one weight per adapter")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
        total = float(sum(weights))
        return [w / total for w in weights]
    if samples is not None:
        if len(samples) != count:
            raise ValueError(f"{len(samples)} sample counts for {count} adapters; give one count per adapter")
        return data_size_weights(samples)
    return [1.0 / count] * count


def _readme(strategy: str, written: Sequence[Path], merge_into_base: bool) -> str:
    lines = [f"# Aggregated LoRA adapters ({strategy})", ""]
    if merge_into_base:
        lines += [
            "FLoRA stacks every client's factors into one adapter whose product is the weighted sum of the updates.",
            "Clients merge it into their base weights (`PeftModel.from_pretrained(base, dir).merge_and_unload()`)",
            "and start a fresh LoRA at their own rank; they do not continue training from it.",
            "",
        ]
    else:
        lines += ["Each directory is a PEFT adapter at one rank; a client loads the one at its rank and trains on.", ""]
    lines += [f"- `{d.name}/`" for d in written]
    lines += ["", f"Inputs, weights and strategy details are in `{SUMMARY_FILE}`.", ""]
    return "\n".join(lines)


def export_release(
    store: RoundStore,
    out: Path,
    *,
    version: int | None = None,
    client_id: str | None = None,
    rank: int | None = None,
) -> tuple[Path, AdapterRelease]:
    """Write a committed global version's adapter (one client's, or the first released at `rank`) as an
    ordinary PEFT directory, so any version can be loaded into transformers with PeftModel.from_pretrained."""
    version = store.version() if version is None else version
    if version < 1:
        raise ValueError("no global version has been committed yet")
    releases = store.releases(version)
    if not releases:
        raise ValueError(f"version {version} has no stored releases")
    if client_id is not None:
        if client_id not in releases:
            raise ValueError(f"version {version} has no release for {client_id!r}; it has {sorted(releases)}")
        chosen = releases[client_id]
    else:
        candidates = sorted(
            (r for r in releases.values() if rank is None or r.header.rank == rank), key=lambda r: -r.header.rank
        )
        if not candidates:
            ranks = sorted({r.header.rank for r in releases.values()})
            raise ValueError(f"version {version} was released at ranks {ranks}, not {rank}")
        chosen = candidates[0]  # without a rank: the largest, the closest cut of ΔW
    h = chosen.header
    payload = store.payload(chosen)
    factors = split_lora(decode_tensors(payload, h.payload), rank=h.request, target_modules=h.target_modules)
    write_adapter(out, factors, h.rank, h.lora_alpha, h.target_modules, pattern=h.request)
    return out, h
