"""The client-overhead benchmark runs end to end on the tiny model, so the script cannot silently rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_compares_the_trainer_with_a_plain_loop_on_the_same_batches() -> None:
    command = [sys.executable, str(ROOT / "bench" / "client_overhead.py"), "--model", "tiny"]
    command += ["--steps", "3", "--repeats", "2", "--threads", "1"]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120, cwd=ROOT)
    report = json.loads(out.stdout)

    assert report["model"] == "tiny-0"
    assert (report["steps"], report["repeats"]) == (3, 2)
    # The fairness check ran on every warm-up step, and the loops ended on the same weights.
    assert report["batch_check"] == {"batches_compared": report["warmup_steps"], "all_equal": True}
    assert report["warmup_steps"] >= 1
    assert report["final_adapter_max_abs_diff"] <= 1e-6
    for side in ("baseline", "client"):
        assert report[side]["seconds_per_step"] > 0
        assert len(report[side]["per_repeat_seconds_per_step"]) == 2
        assert all(s > 0 for s in report[side]["per_repeat_seconds_per_step"])
    assert report["overhead"] == pytest.approx(
        report["client"]["seconds_per_step"] / report["baseline"]["seconds_per_step"] - 1
    )
    assert len(report["overhead_per_repeat"]) == 2
    extras = report["per_round_extras"]
    assert extras["seconds_per_round"] > 0 and extras["payload_bytes"] > 0
    assert extras["seconds_per_step_amortised"] == pytest.approx(extras["seconds_per_round"] / 3)
    assert report["overhead_with_extras"] > report["overhead"]
    assert report["target"] == 0.05
    assert report["meets_target"] is (report["overhead"] <= 0.05)
    assert report["meets_target_with_extras"] is (report["overhead_with_extras"] <= 0.05)
