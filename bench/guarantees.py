"""Benchmark: what a replicated Redis costs ingestion, with and without acking only after a replica holds the
record (Redis WAIT, `--min-replicas 1`), in one run and against the same raw-pika baseline.

    python bench/guarantees.py [--messages 300] [--layers 30] [--rank 8]

Starts a Redis primary and a replica of its own on loopback (the shared Redis on 6379 is not touched) and uses
the local RabbitMQ. Each setting is measured as bench/throughput.py measures ingestion: the same messages are
queued first, then one `flexlora aggregator` process records them; timed from when it consumes until the open
round holds every one. Prints one JSON document; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from throughput import ingestion, log, new_federation, raw_baseline  # noqa: E402

from broker.connect import connect  # noqa: E402
from edge_client.synthetic import SyntheticShape, synthetic_update  # noqa: E402
from tests.e2e.procs import wait_for  # noqa: E402
from tests.faults.servers import OwnRedis  # noqa: E402

SETTINGS = {  # name: the aggregator's flags
    "replica, acked at once": ["--min-replicas", "0"],
    "replica, acked after WAIT": ["--min-replicas", "1", "--replica-timeout-s", "5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300, help="updates per measurement")
    parser.add_argument("--layers", type=int, default=SyntheticShape().layers, help="SmolLM2 q/v layers per update")
    parser.add_argument("--rank", type=int, default=8, help="rank of the updates")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each setting, interleaved")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds any one wait may take")
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = parser.parse_args()
    template, payload = synthetic_update(new_federation(), "c00000", args.rank, 0, shape=SyntheticShape(args.layers))
    with tempfile.TemporaryDirectory(prefix="flexlora-bench-") as tmp:
        primary = OwnRedis(Path(tmp) / "primary", appendonly=False)
        primary.start()
        replica = OwnRedis(Path(tmp) / "replica", appendonly=False, replica_of=primary.port)
        try:
            replica.start()
            wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up", 30, "the replica")
            args.redis_url = primary.url
            log(f"raw baseline: {args.messages} messages of {len(payload) / 1e6:.2f} MB")
            raw = raw_baseline(args, template.model_dump_json(), payload)  # keeping into the primary, replicated
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
            with connect(args.broker_url, connection_name="flexlora-bench") as transport:
                for repeat in range(args.repeats):
                    for name, flags in SETTINGS.items():
                        log(f"ingestion, {name} ({repeat + 1}/{args.repeats})")
                        args.aggregator_flags = flags
                        runs[name].append(ingestion(args, transport, 1, template, payload))
        finally:
            replica.close()
            primary.close()
    best = {name: max(r["updates_per_s"] for r in rs) for name, rs in runs.items()}
    at_once, after_wait = best["replica, acked at once"], best["replica, acked after WAIT"]
    report = {
        "settings": {"messages": args.messages, "rank": args.rank, "layers": args.layers, "repeats": args.repeats}
        | {"payload_bytes": len(payload)},
        "raw_baseline": raw,
        "ingestion": runs,
        "best_updates_per_s": best,
        "wait_cost": {"after_wait_to_at_once": after_wait / at_once, "slowdown_pct": 100 * (1 - after_wait / at_once)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
