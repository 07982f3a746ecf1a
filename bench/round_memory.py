"""Benchmark: Redis memory through one round of large updates, bytes in Redis against a payload store, same run.

    python bench/round_memory.py [--updates 80] [--layers 2] [--payload-dir /var/tmp] [--json PATH]

Needs the local RabbitMQ and Redis. The updates have the module shapes of the FlexLoRA paper's model
(DataJuicer-LLaMA-1.3B: hidden 2048, MLP 5504, all seven projections of a layer) and its ranks 8/30/200 in the
heavy-tail-strong mix (80% of the clients at 200), but only `--layers` of its 24 layers: each update is
layers/24 of its full size (a rank-200 update is 750 MB at 24 layers, 62.5 MB at 2), so a round of 80 fits this
machine. Every update goes through RabbitMQ in 8 MiB chunks, as an edge worker sends it, to one aggregator
(AggregatorService on a thread) that closes the round at the last one. For each payload store — `redis` (the
bytes in Redis, the baseline) and `file://` (Redis keeps a marker; aggregator.payloads) — it records Redis
`used_memory` after each update is recorded and its peak through the round (sampled every 20 ms), and prints
the growth per update: what decides how many clients a round can hold before Redis runs out of memory. A third
round repeats the payload store's with folding off (fold_bytes 0): the finaliser then sums every product after
the last update, the baseline of aggregator.folding's time at close.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.settings import AggregatorSettings  # noqa: E402
from broker.chunked import publish_payload  # noqa: E402
from broker.connect import connect  # noqa: E402
from broker.topology import UPDATE_ROUTING_KEY  # noqa: E402
from edge_client.synthetic import SyntheticShape, synthetic_update  # noqa: E402
from experiments.federation import ServiceFederation  # noqa: E402
from experiments.ranks import assign_ranks  # noqa: E402
from schemas.chunks import DEFAULT_CHUNK_BYTES  # noqa: E402

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
REDIS_URL = "redis://127.0.0.1:6379/0"
# (name, d_out, d_in) of one LLaMA-1.3B layer's seven projections (hidden 2048, intermediate 5504).
LLAMA_1B3 = (
    ("self_attn.q_proj", 2048, 2048),
    ("self_attn.k_proj", 2048, 2048),
    ("self_attn.v_proj", 2048, 2048),
    ("self_attn.o_proj", 2048, 2048),
    ("mlp.gate_proj", 5504, 2048),
    ("mlp.up_proj", 5504, 2048),
    ("mlp.down_proj", 2048, 5504),
)
FULL_LAYERS = 24
FOLD = AggregatorSettings.model_fields["fold_bytes"].default
TIERS = (8, 30, 200)


def log(message: str) -> None:
    print(f"[round_memory] {message}", file=sys.stderr, flush=True)


class UsedMemory:
    """Redis used_memory, sampled on a thread; `peak()` is the most seen since the last call."""

    def __init__(self, url: str, every_s: float = 0.02) -> None:
        self.r = redis.Redis.from_url(url)
        self._peak = self.now()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.every_s = every_s

    def now(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            used = self.now()
            with self._lock:
                self._peak = max(self._peak, used)

    def peak(self) -> int:
        with self._lock:
            most, self._peak = self._peak, self.now()
        return most

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.r.close()


def one_round(
    store_url: str, fold_bytes: int, args: argparse.Namespace, ranks: list[int], memory: UsedMemory
) -> dict[str, Any]:
    shape = SyntheticShape(layers=args.layers, projections=LLAMA_1B3)
    fed = ServiceFederation(
        "flexlora", len(ranks), max(TIERS), broker_url=AMQP_URL, redis_url=REDIS_URL, svd_mode="fast",
        prefix="bench-mem", payload_store=store_url, fold_bytes=fold_bytes,
    )  # fmt: skip
    transport = connect(AMQP_URL, connection_name=f"{fed.name}-sender")
    try:
        before = memory.now()
        memory.peak()
        after_each: list[int] = []
        sizes: list[int] = []
        started = time.monotonic()
        for i, rank in enumerate(ranks):
            header, payload = synthetic_update(fed.name, f"client-{i}", rank, 0, shape=shape, seed=i)
            fed.expect(header.client_id)
            publish_payload(
                transport, fed.topology.updates_exchange, UPDATE_ROUTING_KEY, header.model_dump_json(), payload,
                header.payload, message_id=header.update_id, chunk_bytes=DEFAULT_CHUNK_BYTES,
            )  # fmt: skip
            sizes.append(len(payload))
            del payload
            if i == len(ranks) - 1:
                break  # the last one closes the round: its record and the commit are one step
            while fed.store.status().count < i + 1:
                time.sleep(0.01)
            after_each.append(memory.now() - before)
        record, _ = fed.wait_commit(timeout_s=1800)
        seconds = time.monotonic() - started
        peak = memory.peak() - before
        growth = [b - a for a, b in zip([0, *after_each], after_each, strict=False)]
        per_mb = [g / s for g, s in zip(growth, sizes, strict=False)]
        return {
            "payload_store": store_url.split("://")[0] if "://" in store_url else store_url,
            "fold_bytes": fold_bytes,
            "updates": len(ranks),
            "update_mb_median": statistics.median(sizes) / 1e6,
            "round_mb": sum(sizes) / 1e6,
            "redis_growth_per_update_kb_median": statistics.median(growth) / 1e3,
            "redis_growth_per_update_kb_max": max(growth) / 1e3,
            "redis_growth_per_update_mb_per_mb": statistics.median(per_mb),
            "redis_used_after_last_recorded_mb": after_each[-1] / 1e6,
            "redis_used_peak_growth_mb": peak / 1e6,
            "round_s": seconds,
            "aggregate_s": record.aggregate_seconds,
        }
    finally:
        transport.close()
        fed.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=80)
    parser.add_argument("--layers", type=int, default=2, help=f"of the model's {FULL_LAYERS}")
    parser.add_argument("--payload-dir", type=Path, default=None, help="where the file:// store goes (a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    ranks = assign_ranks(args.updates, "heavy-tail-strong", TIERS, seed=0)
    memory = UsedMemory(REDIS_URL)
    rows = []
    try:
        with tempfile.TemporaryDirectory(dir=args.payload_dir, prefix="flexlora-payloads-") as folder:
            # Bytes in Redis against a payload store (folding on, the default); then folding off, the baseline
            # of the finaliser summing every product after the last update.
            for url, fold in (("redis", FOLD), (f"file://{folder}", FOLD), (f"file://{folder}", 0)):
                what = f"payload store {url}, fold_bytes {fold}"
                log(f"{args.updates} updates at {args.layers}/{FULL_LAYERS} of LLaMA-1.3B, {what}")
                rows.append(one_round(url, fold, args, ranks, memory))
                log(json.dumps(rows[-1]))
    finally:
        memory.close()
    baseline, spilled, unfolded = rows
    result = {
        "shape": f"LLaMA-1.3B layer (hidden 2048, MLP 5504, 7 projections) x {args.layers} of {FULL_LAYERS} layers",
        "ranks": {r: ranks.count(r) for r in TIERS},
        "rows": rows,
        "per_update_growth_ratio": baseline["redis_growth_per_update_kb_median"]
        / max(spilled["redis_growth_per_update_kb_median"], 1e-9),
        "full_size_update_mb_median": baseline["update_mb_median"] * FULL_LAYERS / args.layers,
        "aggregate_s_folded_vs_not": [spilled["aggregate_s"], unfolded["aggregate_s"]],
        "round_s_folded_vs_not": [spilled["round_s"], unfolded["round_s"]],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
