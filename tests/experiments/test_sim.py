"""`flexlora sim`: the linear, LM and load experiments end to end, embedded and over RabbitMQ and Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.topology import Topology
from experiments.load import LoadConfig, LoadReport, markdown, run_load
from flexlora.cli import app
from tests.conftest import AMQP_URL, REDIS_URL


def test_sim_linear_writes_json_table_and_plot(tmp_path: Path) -> None:
    args = ["sim", "linear", "--clients", "12", "--per-round", "4", "--rounds", "2", "--out", str(tmp_path)]
    args += ["--distribution", "uniform", "--strategy", "flexlora", "--strategy", "fedit"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "linear.json").read_text())
    assert document["command"].startswith("flexlora ") and document["metrics"] == ["unseen", "seen"]
    runs = {r["strategy"]: r for r in document["runs"]}
    assert set(runs) == {"flexlora", "fedit"}
    assert all(len(r["scores"]) == 3 for r in runs.values())  # the base model, then two rounds
    assert runs["fedit"]["ranks"] == {"2": 12}
    table = (tmp_path / "linear.md").read_text()
    assert "| uniform | flexlora |" in table and "| uniform | fedit |" in table
    assert (tmp_path / "linear.png").read_bytes()[:4] == b"\x89PNG"


def test_sim_refuses_unknown_strategies_and_bad_ranks(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sim", "linear", "--strategy", "fedavg", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "fedavg" in result.output
    result = CliRunner().invoke(app, ["sim", "linear", "--ranks", "4,8", "--out", str(tmp_path)])
    assert result.exit_code == 2


@pytest.mark.slow
def test_sim_lm_trains_a_real_model_and_scores_unseen_and_seen_tasks(tmp_path: Path) -> None:
    args = ["sim", "lm", "--model", "tiny", "--clients", "3", "--unseen-tasks", "2", "--tasks-per-client", "2"]
    args += ["--per-round", "2"]
    args += ["--rounds", "1", "--local-steps", "1", "--eval-unseen", "1", "--eval-seen", "1", "--ranks", "1,2,4"]
    args += ["--distribution", "uniform", "--strategy", "flexlora", "--strategy", "flora", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "smollm2.json").read_text())
    assert len(document["settings"]["unseen"]) == 2
    assert not set(document["settings"]["unseen"]) & set(document["settings"]["seen"])
    assert document["settings"]["tasks_per_client"] == 2
    for run in document["runs"]:
        assert len(run["scores"]) == 2
        assert all(0.0 <= s[m] <= 1.0 for s in run["scores"] for m in ("unseen", "seen"))
    backends = {r["strategy"]: r["backend"] for r in document["runs"]}
    assert backends == {"flexlora": "ServiceFederation", "flora": "DirectFederation"}


@pytest.mark.slow
def test_sim_lm_can_keep_generation_for_the_base_and_the_last_round(tmp_path: Path) -> None:
    args = ["sim", "lm", "--model", "tiny", "--clients", "2", "--unseen-tasks", "1", "--per-round", "2"]
    args += ["--rounds", "3", "--local-steps", "1", "--eval-unseen", "1", "--eval-seen", "1", "--ranks", "1,2,4"]
    args += ["--distribution", "uniform", "--strategy", "flexlora", "--generate-every", "5", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run,) = json.loads((tmp_path / "smollm2.json").read_text())["runs"]
    assert ["unseen" in s for s in run["scores"]] == [True, False, False, True]
    assert all("unseen_nll" in s for s in run["scores"])


def test_load_mode_embedded_delivers_every_participant_its_adapter() -> None:
    report = run_load(LoadConfig(clients=12, per_round=4, rounds=3, layers=1, tiers=(2, 4, 8)))
    assert [r.version for r in report.rounds] == [1, 2, 3]
    assert all(sum(r.ranks.values()) == 4 and r.turnaround_s >= r.commit_s > 0 for r in report.rounds)
    assert report.summary()["updates"] == 12


def _load_over_services(federation: str, amqp_cleanup: list[str], **changes: Any) -> LoadReport:
    """Two rounds of 3 of 10 clients over RabbitMQ and Redis; each participant gets its adapter, and the run
    cleans up after itself: no keys of the federation are left in Redis."""
    import redis

    amqp_cleanup.extend(Topology(federation).adapter_queue(f"client-{c}") for c in range(10))
    config = LoadConfig(
        clients=10,
        per_round=3,
        rounds=2,
        layers=2,
        broker_url=AMQP_URL,
        redis_url=REDIS_URL,
        federation=federation,
        **changes,
    )
    report = run_load(config)
    assert [r.version for r in report.rounds] == [1, 2]
    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(f"*{federation}*", count=1000))
    return report


@pytest.mark.services
def test_load_mode_over_rabbitmq_and_redis(federation: str, amqp_cleanup: list[str]) -> None:
    report = _load_over_services(federation, amqp_cleanup)
    assert all(r.payload_mb > 0 and r.aggregate_s > 0 and r.adapters_mb > 0 for r in report.rounds)
    # Memory per round, and the raw-pika floor on the first round (raw_every 10), extrapolated to the run.
    assert all((r.redis_used_peak_mb or 0) > 0 and r.rss_peak_mb > 0 for r in report.rounds)
    assert report.rounds[0].raw_s is not None and report.rounds[0].raw_s > 0 and report.rounds[1].raw_s is None
    summary = report.summary()
    assert 0 < summary["raw_total_s"] < summary["wall_s"] and summary["wall_to_raw"] > 1
    # The wall holds the federation's rounds, the clients' stand-in training and the floor's own measurement.
    assert 0 < summary["federation_s"] < summary["wall_s"] and summary["measuring_s"] >= report.rounds[0].raw_s
    assert all(r.generate_s > 0 for r in report.rounds)
    assert summary["federation_s"] + summary["generate_s"] + summary["measuring_s"] <= summary["wall_s"]
    assert "raw pika" in markdown(report) and "MB" in markdown(report)


@pytest.mark.services
def test_load_mode_with_aggregator_processes_reports_their_memory(federation: str, amqp_cleanup: list[str]) -> None:
    report = _load_over_services(federation, amqp_cleanup, raw_every=0, aggregators=1)
    assert all(r.aggregator_rss_peak_mb is not None and r.aggregator_rss_peak_mb > 0 for r in report.rounds)
    assert "largest aggregator process" in markdown(report)


def test_sim_merge_combines_runs_of_separate_commands_and_refuses_other_settings(tmp_path: Path) -> None:
    for seed in (0, 1):
        args = ["sim", "linear", "--clients", "6", "--per-round", "3", "--rounds", "2", "--strategy", "flexlora"]
        args += ["--distribution", "uniform", "--seed", str(seed), "--out", str(tmp_path), "--name", f"s{seed}"]
        assert CliRunner().invoke(app, args).exit_code == 0
    inputs = [str(tmp_path / "s0.json"), str(tmp_path / "s1.json")]
    result = CliRunner().invoke(app, ["sim", "merge", *inputs, "--out", str(tmp_path), "--name", "both"])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "both.json").read_text())
    assert sorted(r["seed"] for r in document["runs"]) == [0, 1] and document["settings"]["seeds"] == [0, 1]
    assert " ± " in document["table"] and len(document["command"].splitlines()) == 3
    args = ["sim", "linear", "--clients", "7", "--per-round", "3", "--rounds", "2", "--strategy", "flexlora"]
    assert CliRunner().invoke(app, [*args, "--seed", "2", "--out", str(tmp_path), "--name", "s2"]).exit_code == 0
    result = CliRunner().invoke(app, ["sim", "merge", inputs[0], str(tmp_path / "s2.json"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "other settings" in result.output
