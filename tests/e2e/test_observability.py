"""Metrics, `flexlora status` and the history picture, against a federation running over RabbitMQ and Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import UPDATE_ROUTING_KEY, Topology
from edge_client.synthetic import SyntheticShape, publish_update, synthetic_update
from flexlora.cli import app
from schemas.messages import HEADER_KEY
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.procs import aggregators, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]

SMALL = SyntheticShape(layers=2)


@pytest.fixture
def store(federation: str) -> Iterator[RedisRoundStore]:
    s = RedisRoundStore.from_url(REDIS_URL, federation)
    yield s
    s.wipe()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """Every sample of the endpoint, keyed like `name{label="value",...}` with labels sorted."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = float(sample.value)
    return samples


def _serving(port: int) -> bool:
    try:
        _scrape(port)
    except OSError:
        return False
    return True


def _at_version(store: RedisRoundStore, version: int) -> Callable[[], bool]:
    return lambda: store.version() == version


def test_metrics_status_and_history_of_a_running_federation(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, tmp_path: Path
) -> None:
    port = _free_port()
    fed = f'federation="{federation}"'
    topology = Topology(federation)
    amqp_cleanup.extend(topology.adapter_queue(f"c{i}") for i in range(2))
    runner = CliRunner()
    where = ["--federation", federation, "--broker-url", AMQP_URL, "--redis-url", REDIS_URL]
    with aggregators(federation, tmp_path, "--max-updates", "2", "--metrics-port", str(port)) as group:
        group.start(1)
        wait_for(lambda: _serving(port), timeout=60, what="the aggregator's metrics endpoint")
        before = _scrape(port)
        assert before.get(f'flexlora_updates_total{{{fed},outcome="accepted"}}', 0.0) == 0.0
        with connect(AMQP_URL) as transport:
            transport.declare(topology.core())
            for round_id, ranks in enumerate([(4, 8), (8, 16)]):
                for i, rank in enumerate(ranks):
                    header, payload = synthetic_update(
                        federation, f"c{i}", rank, store.version(), shape=SMALL, seed=10 * round_id + i
                    )
                    header = header.model_copy(
                        update={"train_loss": 2.0 - round_id, "eval_score": 0.2 + 0.4 * round_id}
                    )
                    publish_update(transport, topology, header, payload)
                wait_for(_at_version(store, round_id + 1), timeout=60, what=f"version {round_id + 1}")
            # Not a header at all: dead-lettered with reason "schema", and the aggregator carries on.
            transport.publish(topology.updates_exchange, UPDATE_ROUTING_KEY, b"junk", {HEADER_KEY: "not json"})
            wait_for(lambda: store.refusals() == {"schema": 1}, timeout=30, what="the refusal counted")

        after = _scrape(port)
        assert after[f'flexlora_updates_total{{{fed},outcome="accepted"}}'] == 4
        assert after[f'flexlora_refused_total{{{fed},reason="schema"}}'] == 1
        assert after[f"flexlora_rounds_total{{{fed}}}"] == 2
        assert after[f"flexlora_global_version{{{fed}}}"] == 2
        assert after[f"flexlora_svd_seconds_count{{{fed}}}"] == 2
        assert after[f"flexlora_update_staleness_versions_count{{{fed}}}"] == 4
        assert after[f"flexlora_adapters_published_total{{{fed}}}"] == 4

        result = runner.invoke(app, ["status", *where, "--json"])
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout)
        assert status["version"] == 2
        assert status["open_round"] == {
            "round_id": 2,
            "updates": 0,
            "max_updates": 2,
            "opened_at": None,
            "deadline_at": None,
        }
        assert [a["pid"] for a in status["aggregators"]] == [group.procs[0].pid]
        assert status["queues"] == {"updates": 0, "dead-letter": 1}
        assert status["refusals"] == {"schema": 1}
        assert [(r["version"], r["participants"], r["rank_mix"]) for r in status["rounds"]] == [
            (1, 2, {"4": 1, "8": 1}),
            (2, 2, {"8": 1, "16": 1}),
        ]
        assert [r["train_loss"] for r in status["rounds"]] == pytest.approx([2.0, 1.0])
        assert [r["eval_score"] for r in status["rounds"]] == pytest.approx([0.2, 0.6])

        tables = runner.invoke(app, ["status", *where])
        assert tables.exit_code == 0, tables.output
        assert "global version 2" in tables.stdout
        assert "schema 1" in tables.stdout

    picture = tmp_path / "history.png"
    result = runner.invoke(
        app, ["history", "--out", str(picture), "--federation", federation, "--redis-url", REDIS_URL]
    )
    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_metrics_move_while_it_federates(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, tmp_path: Path
) -> None:
    amqp_cleanup.append(Topology(federation).adapter_queue("dev1"))
    port = _free_port()
    labels = f'client="dev1",federation="{federation}"'
    env = {**os.environ, "FLEXLORA_BROKER_URL": AMQP_URL}
    cmd = [sys.executable, "-m", "flexlora.cli", "client", "--federation", federation, "--client-id", "dev1"]
    cmd += ["--model", "tiny", "--rank", "4", "--local-steps", "3", "--batch-size", "4", "--samples-per-task", "8"]
    cmd += ["--state-dir", str(tmp_path / "state"), "--metrics-port", str(port), "--log-format", "json"]
    cmd += ["--eval-examples", "2"]
    with aggregators(federation, tmp_path, "--max-updates", "1") as group:
        group.start(1)
        with (tmp_path / "client.log").open("wb") as log:
            client = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: _serving(port), timeout=60, what="the client's metrics endpoint")
                assert _scrape(port)[f"flexlora_client_rank{{{labels}}}"] == 4

                def rounds_done() -> float:
                    return _scrape(port).get(f"flexlora_client_rounds_total{{{labels}}}", 0.0)

                wait_for(lambda: rounds_done() >= 2, timeout=120, what="two rounds on the client")
                metrics = _scrape(port)
                assert metrics[f"flexlora_client_global_version{{{labels}}}"] >= 2
                assert metrics[f"flexlora_client_train_step_seconds_count{{{labels}}}"] >= 4  # 2 timed steps a round
                assert metrics[f"flexlora_client_train_loss{{{labels}}}"] > 0
                assert 0.0 <= metrics[f"flexlora_client_eval_score{{{labels}}}"] <= 1.0
            finally:
                client.terminate()
                client.wait(timeout=30)
    assert store.version() >= 2
    assert all(0.0 <= r.metrics["eval_score"] <= 1.0 for r in store.history()), (
        "the client's scores reached the history"
    )
