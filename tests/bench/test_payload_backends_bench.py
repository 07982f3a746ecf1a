"""The payload-backend benchmark runs end to end on tiny sizes against the real services, and cleans up after itself."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pika
import pytest
import redis
from pika.exceptions import ChannelClosedByBroker

from tests.conftest import AMQP_URL, REDIS_URL

ROOT = Path(__file__).resolve().parents[2]


def load_main() -> Any:
    """The script's main(); bench/ is a folder of scripts, not a package, so it is loaded from its path."""
    spec = importlib.util.spec_from_file_location("payload_backends", ROOT / "bench" / "payload_backends.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.services
@pytest.mark.slow
def test_benchmark_reports_every_backend_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    # Payloads of 1 MiB in chunks of 0.5 MiB: the Redis hash and the multi-message stream paths both run.
    argv = ["-n", "3", "--size-mib", "1", "--chunk-mib", "0.5", "--timeout", "30", "--dir", str(tmp_path)]
    returned = load_main()([*argv, "--json", str(out), "--broker-url", AMQP_URL, "--redis-url", REDIS_URL])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))

    rows = {row["backend"]: row for row in report["results"]}
    assert set(rows) == {"redis", "files", "files+fsync", "stream"}
    for row in rows.values():
        for key in ("write_mb_per_s", "read_all_mb_per_s", "write_latency_ms_median", "read_one_ms"):
            assert row[key] > 0, (row["backend"], key)
        assert row["write_latency_ms_p95"] >= row["write_latency_ms_median"]
    assert rows["stream"]["read_one_from_first_ms"] > 0 and "offset" in rows["stream"]["note"]
    assert rows["redis"]["redis_used_memory_growth_mb"] > 0
    assert report["fastest"]["backend"] in rows
    assert report["fastest"]["seconds"] == min(r["write_plus_read_one_seconds"] for r in rows.values())

    r = redis.Redis.from_url(REDIS_URL)
    try:
        assert not list(r.scan_iter(match=report["redis_prefix"] + "*"))
    finally:
        r.close()
    assert not Path(report["settings"]["temp_dir"]).exists()
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        with pytest.raises(ChannelClosedByBroker) as closed:
            conn.channel().queue_declare(report["stream_queue"], passive=True)
        assert closed.value.reply_code == 404
    finally:
        conn.close()
