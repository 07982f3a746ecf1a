"""The aggregation benchmark runs end to end on small shapes, so the script cannot silently rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_prints_every_path_with_errors_and_speedups() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "aggregate.py"),
            *(
                "--shapes",
                "smoke",
                "--clients",
                "4",
                "--dp-shapes",
                "300x200",
                "--dp-ranks",
                "4",
                "20",
                "--dp-noise",
                "0.05",
            ),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    [result] = json.loads(out.stdout)["results"]
    assert result["shapes"] == "smoke"
    assert result["exact"]["paths"] == {"factored": result["modules"]}
    assert set(result["fast"]["paths"]) <= {"fast", "fast-truncated", "fast→factored", "fast→factored-qr"}
    assert result["exact"]["max_relative_error_vs_dense_on_sample"] <= 1e-10
    assert result["fast"]["max_relative_error_vs_dense_on_sample"] <= 1e-4
    assert result["fast"]["max_rank_r_error_excess_over_optimal_on_sample"] <= 1e-3
    for mode in ("dense", "exact", "fast"):
        assert result[mode]["seconds"] > 0
        assert result[mode]["peak_rss_growth_mib"] >= 0
    [private] = json.loads(out.stdout)["private_cut"]
    assert (
        private["shape"] == "300x200"
        and private["noise_std"] == 0.05
        and private["dense_svd_seconds"] > 0
        and private["randomized_seconds"] > 0
    )
    assert set(private["rank_r_error_excess_over_optimal"]) == {"4", "20"}
    assert all(0 <= e <= 1e-3 for e in private["rank_r_error_excess_over_optimal"].values())
