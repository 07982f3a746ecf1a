"""Benchmark: FlexLoRA's factored and fast SVD paths against the dense path, same inputs, same run.

    python bench/aggregate.py [--shapes smollm2 llama7b] [--clients 20] [--dense-sample 2] [--dp-shapes 4096x4096]

Each path runs in its own child process on identical inputs (same seed), so its peak RSS growth is
its own. Dense SVD of a 4096×4096 update takes tens of seconds per module, so at LLaMA-7B shapes the
dense path runs on `--dense-sample` modules and its time is scaled to the whole set (reported as
such); errors are measured on those sampled modules. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.flexlora import ClientAdapter, ModuleReport, RankRequest, flexlora
from schemas.lora import LoraFactors, join_lora, split_lora
from schemas.tensors import decode_tensors, encode_tensors

RANK_CHOICES = (8, 16, 32, 64)
SHAPES: dict[str, list[tuple[str, int, int]]] = {
    # (module, d_out, d_in): SmolLM2-135M (30 layers, all seven projections) and LLaMA-7B attention.
    "smollm2": [
        (f"model.layers.{i}.{name}", d_out, d_in)
        for i in range(30)
        for name, d_out, d_in in (
            ("self_attn.q_proj", 576, 576),
            ("self_attn.k_proj", 192, 576),
            ("self_attn.v_proj", 192, 576),
            ("self_attn.o_proj", 576, 576),
            ("mlp.gate_proj", 1536, 576),
            ("mlp.up_proj", 1536, 576),
            ("mlp.down_proj", 576, 1536),
        )
    ],
    # A few seconds in all: the test suite runs the benchmark on it so the script cannot rot.
    "smoke": [(f"model.layers.{i}.self_attn.q_proj", 320, 288) for i in range(3)],
    "llama7b": [
        (f"model.layers.{i}.self_attn.{name}_proj", 4096, 4096) for i in range(32) for name in ("q", "k", "v", "o")
    ],
}


def make_clients(shape_set: str, num_clients: int, seed: int) -> tuple[list[ClientAdapter], list[int]]:
    """Synthetic updates of real shapes: Gaussian factors at ranks drawn from {8, 16, 32, 64}."""
    rng = np.random.default_rng(seed)
    ranks = [int(r) for r in rng.choice(RANK_CHOICES, size=num_clients)]
    samples = [int(n) for n in rng.integers(50, 2000, size=num_clients)]
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for rank in ranks:
        factors = {
            m: LoraFactors(
                A=torch.randn(rank, d_in, generator=gen) / d_in**0.5,
                B=torch.randn(d_out, rank, generator=gen) * 0.01,
            )
            for m, d_out, d_in in SHAPES[shape_set]
        }
        clients.append(ClientAdapter(factors, rank, 2.0 * rank))
    return clients, samples


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux ≥ 4.0), so the peak is this path's alone.
    Path("/proc/self/clear_refs").write_text("5")


def _run_path(args: dict[str, Any], out: Any) -> None:
    """Child process: build the inputs, aggregate with one path, save the sampled modules' outputs."""
    torch.set_num_threads(args["threads"])
    clients, samples = make_clients(args["shapes"], args["clients"], args["seed"])
    modules = args["modules"]
    if modules is not None:  # the dense path only aggregates the sample
        clients = [ClientAdapter({m: c.factors[m] for m in modules}, c.rank, c.alpha) for c in clients]
    requests = [RankRequest(r, 2.0 * r) for r in sorted({c.rank for c in clients})]
    before = _status_mib("VmRSS")
    _reset_peak_rss()
    reports: list[ModuleReport] = []
    started = time.perf_counter()
    result = flexlora(clients, samples, requests, torch.float64, mode=args["mode"], reports=reports)
    seconds = time.perf_counter() - started
    peak = _status_mib("VmHWM") - before
    saved = {}
    for req in requests:
        for key, tensor in join_lora({m: result[req][m] for m in args["sample"]}).items():
            saved[f"r{req.rank}/{key}"] = tensor
    (Path(args["dir"]) / f"{args['mode']}.safetensors").write_bytes(encode_tensors(saved)[0])
    paths: dict[str, int] = {}
    for rep in reports:
        paths[rep.path] = paths.get(rep.path, 0) + 1
    out.put(
        {
            "seconds": seconds,
            "modules": len(reports),
            "peak_rss_growth_mib": round(peak, 1),
            "paths": paths,
            "max_certified_excess": max((r.excess for r in reports), default=0.0),
            "total_rank": reports[0].total_rank if reports else 0,
        }
    )


def read_outputs(path: Path) -> dict[int, dict[str, LoraFactors]]:
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in decode_tensors(path.read_bytes()).items():
        rank, key = name.split("/", 1)
        grouped.setdefault(int(rank[1:]), {})[key] = tensor
    return {rank: split_lora(tensors, rank=rank) for rank, tensors in grouped.items()}


def _spawn(args: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_path, args=(args, queue))
    proc.start()
    while True:
        try:
            result: dict[str, Any] = queue.get(timeout=1.0)
            break
        except Exception:  # queue.Empty; the child may have died without answering
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child for {args['mode']} exited with code {proc.exitcode}") from None
    proc.join()
    return result


def _product(f: LoraFactors) -> np.ndarray:
    return 2.0 * (f.B.double() @ f.A.double()).numpy()  # every release here has alpha = 2·rank


def _dense_updates(shape_set: str, clients: int, seed: int, sample: list[str]) -> dict[str, np.ndarray]:
    """ΔW of the sampled modules, formed densely here (independently of the code under test)."""
    adapters, samples = make_clients(shape_set, clients, seed)
    p = np.asarray(samples, dtype=np.float64) / sum(samples)
    return {
        m: sum(
            pk * c.scale * (c.factors[m].B.double() @ c.factors[m].A.double()).numpy()
            for pk, c in zip(p, adapters, strict=True)
        )
        for m in sample
    }


def bench_shape_set(shape_set: str, clients: int, dense_sample: int, seed: int, threads: int) -> dict[str, Any]:
    names = [m for m, _, _ in SHAPES[shape_set]]
    # Sample modules of every distinct shape, so each shape's error is measured.
    by_shape: dict[tuple[int, int], list[str]] = {}
    for m, d_out, d_in in SHAPES[shape_set]:
        by_shape.setdefault((d_out, d_in), []).append(m)
    sample = [m for ms in by_shape.values() for m in (ms if dense_sample == 0 else ms[:dense_sample])]
    dense_all = len(sample) == len(names)
    with tempfile.TemporaryDirectory() as tmp:
        base = {"shapes": shape_set, "clients": clients, "seed": seed, "threads": threads, "dir": tmp, "sample": sample}
        runs = {
            "dense": _spawn({**base, "mode": "dense", "modules": None if dense_all else sample}),
            "exact": _spawn({**base, "mode": "exact", "modules": None}),
            "fast": _spawn({**base, "mode": "fast", "modules": None}),
        }
        outputs = {mode: read_outputs(Path(tmp) / f"{mode}.safetensors") for mode in runs}
    deltas = _dense_updates(shape_set, clients, seed, sample)
    # All modules of a shape set that is sampled share one shape, so scaling by count is fair there.
    dense_per_module = runs["dense"]["seconds"] / runs["dense"]["modules"]
    dense_total = runs["dense"]["seconds"] if dense_all else dense_per_module * len(names)
    report: dict[str, Any] = {
        "shapes": shape_set,
        "modules": len(names),
        "clients": clients,
        "total_rank_R": runs["exact"]["total_rank"],
        "dense": {
            **runs["dense"],
            "seconds_per_module": dense_per_module,
            "seconds_whole_set": dense_total,
            "whole_set_is_extrapolated": not dense_all,
        },
    }
    for mode in ("exact", "fast"):
        rel_err = 0.0
        excess = 0.0
        for rank, modules in outputs["dense"].items():
            for m, f_dense in modules.items():
                ref = _product(f_dense)
                got = _product(outputs[mode][rank][m])
                rel_err = max(rel_err, float(np.linalg.norm(got - ref)) / max(float(np.linalg.norm(ref)), 1e-30))
                # err_r / err_opt − 1 against the true ΔW: the dense cut is the optimal rank-r one.
                opt = float(np.linalg.norm(deltas[m] - ref))
                excess = max(excess, float(np.linalg.norm(deltas[m] - got)) / max(opt, 1e-30) - 1.0)
        report[mode] = {
            **runs[mode],
            "speedup_vs_dense": dense_total / runs[mode]["seconds"],
            "max_relative_error_vs_dense_on_sample": rel_err,
            "max_rank_r_error_excess_over_optimal_on_sample": excess,
        }
    return report


def bench_private_cut(shape: str, ranks: list[int], seed: int, noise: float) -> dict[str, Any]:
    """A differentially private round's cut (aggregator.privacy): a dense matrix of a rank-max(ranks) signal
    (entries of unit variance) plus Gaussian noise of std `noise` that makes it full rank, cut at every rank by the
    randomized SVD against the dense SVD, same matrix, same run; each rank-r Frobenius error against the optimal
    (dense) one. A small `noise` leaves a wide gap under the signal; at `noise` ≈ 2 the noise's top singular
    values (≈ noise·(√d_out + √d_in)) reach the signal's, the hard case for a randomized method."""
    from aggregator.lowrank import randomized_top

    d_out, d_in = (int(x) for x in shape.split("x"))
    g = torch.Generator().manual_seed(seed)
    top = max(ranks)
    signal = torch.randn(d_out, top, generator=g, dtype=torch.float64) @ torch.randn(
        top, d_in, generator=g, dtype=torch.float64
    )
    matrix = signal / math.sqrt(top) + noise * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    del signal
    started = time.perf_counter()
    _u, ds, _vh = torch.linalg.svd(matrix, full_matrices=False)  # the dense path needs the vectors too
    dense_s = time.perf_counter() - started
    del _u, _vh
    started = time.perf_counter()
    u, s, vh = randomized_top(matrix, top, seed=seed)
    fast_s = time.perf_counter() - started
    total = float(torch.sum(ds**2))
    excess = {}
    for r in ranks:
        best = math.sqrt(max(total - float(torch.sum(ds[:r] ** 2)), 0.0))
        err = float(torch.linalg.norm(matrix - (u[:, :r] * s[:r]) @ vh[:r]))
        excess[str(r)] = err / best - 1
    return {
        "shape": shape,
        "noise_std": noise,
        "ranks": ranks,
        "dense_svd_seconds": dense_s,
        "randomized_seconds": fast_s,
        "speedup": dense_s / fast_s,
        "rank_r_error_excess_over_optimal": excess,
        "targets": {"speedup": 10.0, "error_excess": 1e-3},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "llama7b"], choices=sorted(SHAPES))
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--dense-sample",
        type=int,
        default=None,
        help="modules per shape the dense path runs (0 = all; default: all for smollm2, 2 for llama7b)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--dp-shapes",
        nargs="*",
        default=["4096x4096", "4096x11008"],
        help="d_out x d_in of the private-round cut (LLaMA-7B attention and MLP); none to skip",
    )
    parser.add_argument("--dp-ranks", type=int, nargs="+", default=[8, 30, 200])
    parser.add_argument(
        "--dp-noise",
        type=float,
        nargs="+",
        default=[0.05, 2.0],
        help="std of the noise on the unit-variance signal: a wide spectral gap, and noise as large as the signal",
    )
    args = parser.parse_args()
    results = []
    for shape_set in args.shapes:
        sample = args.dense_sample if args.dense_sample is not None else (0 if shape_set == "smollm2" else 2)
        results.append(bench_shape_set(shape_set, args.clients, sample, args.seed, args.threads))
    private = [
        bench_private_cut(shape, args.dp_ranks, args.seed, noise) for shape in args.dp_shapes for noise in args.dp_noise
    ]
    print(json.dumps({"threads": args.threads, "results": results, "private_cut": private}, indent=2))


if __name__ == "__main__":
    main()
