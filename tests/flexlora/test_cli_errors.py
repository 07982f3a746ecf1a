"""What a user sees when a service is unreachable or a setting is wrong: one line and a clean exit, never a
traceback per retry, and a process that stops when asked even while it waits for a broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _flexlora(*args: str) -> list[str]:
    return [sys.executable, "-c", "from flexlora.entry import main; main()", *args]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def test_an_unreachable_redis_is_one_line_and_exit_2() -> None:
    out = subprocess.run(
        _flexlora("status", "--federation", "nowhere", "--redis-url", f"redis://127.0.0.1:{_closed_port()}/0"),
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("flexlora: cannot reach Redis:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flag", "value"), [("--broker-url", "http://127.0.0.1:5672/"), ("--redis-url", "redis:/127.0.0.1:6379")]
)
def test_a_malformed_service_url_is_refused_at_start(flag: str, value: str) -> None:
    out = subprocess.run(
        _flexlora("aggregator", "--federation", "nowhere", flag, value),
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2 and "invalid setting" in out.stderr and "Traceback" not in out.stderr


def test_an_aggregator_waiting_for_a_broker_logs_a_line_a_retry_and_stops_when_asked() -> None:
    """It once printed seventy lines and two tracebacks a retry, and ignored SIGINT and SIGTERM for good."""
    url = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/%2F"
    command = _flexlora("aggregator", "--federation", "nowhere", "--broker-url", url)
    env = {**os.environ, "FLEXLORA_LOG_FORMAT": "json"}  # as compose sets it
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        time.sleep(8)  # imports, then retries at 0, 1, 2, 4 s
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    retries = [e for e in entries if "trying again" in e["message"]]
    assert len(retries) >= 2 and all("cannot connect to the broker at 127.0.0.1" in e["message"] for e in retries)
    assert all(e["level"] == "warning" and "error" not in e for e in entries), "one line each, no traceback"
    assert "Traceback" not in out


@pytest.mark.services
def test_the_status_of_a_federation_nothing_has_used_says_so() -> None:
    """A misspelt --federation showed an empty version 0 and exited 0, so the typo went unnoticed."""
    from typer.testing import CliRunner

    from flexlora.cli import app
    from tests.conftest import AMQP_URL, REDIS_URL

    where = ["--federation", "never-used-by-anyone", "--redis-url", REDIS_URL, "--broker-url", AMQP_URL]
    result = CliRunner().invoke(app, ["status", *where])
    assert result.exit_code == 0
    assert "nothing of federation 'never-used-by-anyone' is in this store" in result.output
