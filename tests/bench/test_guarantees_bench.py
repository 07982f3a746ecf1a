"""The guarantees benchmark runs end to end on tiny shapes: a Redis primary and replica of its own, ingestion
with and without WAIT, and nothing left behind on the shared services."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.services
@pytest.mark.slow
def test_benchmark_reports_ingestion_with_and_without_wait_beside_raw_pika() -> None:
    command = [sys.executable, str(ROOT / "bench" / "guarantees.py"), "--messages", "20", "--layers", "1"]
    command += ["--repeats", "1", "--timeout", "60", "--broker-url", AMQP_URL]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=180, cwd=ROOT)
    report = json.loads(out.stdout)
    assert report["raw_baseline"]["messages"] == 20 and report["raw_baseline"]["messages_per_s"] > 0
    assert set(report["ingestion"]) == {"replica, acked at once", "replica, acked after WAIT"}
    for runs in report["ingestion"].values():
        [run] = runs
        assert run["messages"] == 20 and run["updates_per_s"] > 0
    cost = report["wait_cost"]
    assert cost["after_wait_to_at_once"] > 0
    assert cost["slowdown_pct"] == pytest.approx(100 * (1 - cost["after_wait_to_at_once"]))
