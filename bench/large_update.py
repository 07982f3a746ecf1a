"""Benchmark: one 1 GiB update end to end through RabbitMQ and Redis in chunks, against raw pika, same run.

    python bench/large_update.py [--rank 256] [--modules 128] [--dim 4096] [--chunk-mib 8] [--svd-mode fast]

Needs the local RabbitMQ and Redis. The defaults are LLaMA-7B's 32 layers × {q,k,v,o} (4096²) at rank 256:
1 GiB of float32 factors. Three processes:
- the sender, an EdgeWorker whose "trainer" holds the factors: it encodes and publishes the update in
  chunks, then waits for its adapter (chunks again) and loads it; wall time is from publishing to loaded;
- an aggregator (the real AggregatorService), driven step by step so the two phases are measured apart:
  taking the chunks in until the update is recorded, then the round (SVD, staging the release in Redis,
  publishing it);
- the baseline: the same number of bytes as 8 MiB messages published by raw pika with confirms to a
  quorum queue, and consumed by this process, first publish to last ack.
Peak RSS growth is VmHWM minus the RSS before the phase, the peak reset between phases through
/proc/self/clear_refs; the target is ≤2× the update's size in each process. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.config import AggregatorConfig  # noqa: E402
from aggregator.rounds import RoundPolicy  # noqa: E402
from aggregator.service import AggregatorService  # noqa: E402
from aggregator.stores.redis import RedisRoundStore  # noqa: E402
from broker.connect import connect  # noqa: E402
from broker.topology import Topology  # noqa: E402
from edge_client.synthetic import SYNTHETIC_FINGERPRINT  # noqa: E402
from edge_client.trainer import TrainResult  # noqa: E402
from edge_client.worker import EdgeConfig, EdgeWorker  # noqa: E402
from schemas.lora import LoraFactors, join_lora  # noqa: E402

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
REDIS_URL = "redis://127.0.0.1:6379/0"
TARGET_X = 2.0


def log(message: str) -> None:
    print(f"[large_update] {message}", file=sys.stderr, flush=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Peak:
    """Peak RSS growth of this process over a phase: VmHWM after it minus VmRSS before it."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux ≥ 4.0)
            self.reset = True
        except OSError:
            self.reset = False
        self.before = _status_kib("VmRSS") * 1024

    def growth(self) -> int:
        return _status_kib("VmHWM") * 1024 - self.before


def _factors(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    factors = {
        f"model.layers.{m // 4}.self_attn.{'qkvo'[m % 4]}_proj": LoraFactors(
            A=torch.randn(args.rank, args.dim, generator=gen) / args.dim**0.5,
            B=torch.randn(args.dim, args.rank, generator=gen) * 1e-2,
        )
        for m in range(args.modules)
    }
    return join_lora(factors)


class _HeldAdapter:
    """Stands in for the trainer: holds the factors as a trained model would, loads a release into them."""

    def __init__(self, tensors: dict[str, torch.Tensor], samples: int) -> None:
        self.tensors = tensors
        self.samples = samples

    def adapter(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.tensors[name].copy_(value)


def sender(args: argparse.Namespace) -> dict[str, Any]:
    tensors = _factors(args)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    transport = connect(AMQP_URL)
    held = _HeldAdapter(tensors, samples=100)
    config = EdgeConfig(
        federation=args.federation,
        client_id="big",
        rank=args.rank,
        lora_alpha=2.0 * args.rank,
        target_modules=("k_proj", "o_proj", "q_proj", "v_proj"),
        base_model_fingerprint=SYNTHETIC_FINGERPRINT,
        adapter_timeout_s=1800,
        chunk_bytes=args.chunk_mib * 2**20,
    )
    worker = EdgeWorker(transport, held, config)  # type: ignore[arg-type]
    worker.setup()
    peak = Peak()
    started = time.perf_counter()
    header, data = worker.prepare(TrainResult(0.0, 1, 100))
    worker.send(header, data)
    sent_s = time.perf_counter() - started
    del data
    send_growth = peak.growth()
    log(f"sent {header.payload.size / 2**30:.2f} GiB in {sent_s:.1f}s")
    peak = Peak()
    release = worker.wait_for_adapter()
    wall = time.perf_counter() - started
    receive_growth = peak.growth()
    assert release is not None
    worker.close()
    transport.close()
    return {
        "factor_bytes": size,
        "payload_bytes": header.payload.size,
        "send_seconds": sent_s,
        "end_to_end_seconds": wall,
        "send_rss_growth_bytes": send_growth,
        "receive_rss_growth_bytes": receive_growth,
        "peak_reset": peak.reset,
    }


def aggregator(args: argparse.Namespace) -> dict[str, Any]:
    store = RedisRoundStore.from_url(REDIS_URL, args.federation)
    transport = connect(AMQP_URL)
    config = AggregatorConfig(
        federation=args.federation,
        policy=RoundPolicy(max_updates=1),
        svd_mode=args.svd_mode,
        chunk_bytes=args.chunk_mib * 2**20,
        fail_fast=True,
    )
    service = AggregatorService(transport, store, config)
    service.setup()
    subscription = service.subscribe()
    print("ready", flush=True)
    peak = Peak()
    first = None
    while store.status().count < 1:
        delivery = subscription.get(1.0)
        if delivery is not None:
            first = first or time.perf_counter()
            service.handle(delivery)
    ingest_s = time.perf_counter() - (first or time.perf_counter())
    ingest_growth = peak.growth()
    peak = Peak()
    started = time.perf_counter()
    record = service.maybe_finalise()
    assert record is not None, "the round did not close"
    round_s = time.perf_counter() - started
    round_growth = peak.growth()
    subscription.close()
    transport.close()
    store.wipe()
    return {
        "ingest_seconds": ingest_s,
        "round_seconds": round_s,
        "ingest_rss_growth_bytes": ingest_growth,
        "round_rss_growth_bytes": round_growth,
    }


def raw_pika(total: int, chunk: int) -> dict[str, Any]:
    """The baseline: the same bytes as `chunk`-byte messages, raw pika publishing with confirms to a quorum
    queue from a child process while this one consumes and acks."""
    queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    count = -(-total // chunk)
    code = (
        "import pika, sys\n"
        f"c = pika.BlockingConnection(pika.URLParameters({AMQP_URL!r})); ch = c.channel(); ch.confirm_delivery()\n"
        f"body = bytes({chunk})\n"
        f"for _ in range({count}): ch.basic_publish('', {queue!r}, body, pika.BasicProperties(delivery_mode=2))\n"
        "c.close()\n"
    )
    channel.basic_qos(prefetch_count=4)
    done = threading.Event()
    got = [0]
    started = time.perf_counter()
    publisher = subprocess.Popen([sys.executable, "-c", code])

    def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        ch.basic_ack(method.delivery_tag)
        got[0] += 1
        if got[0] == count:
            done.set()

    channel.basic_consume(queue, on_message)
    while not done.is_set():
        conn.process_data_events(time_limit=0.5)
    seconds = time.perf_counter() - started
    publisher.wait()
    channel.queue_delete(queue)
    conn.close()
    return {"messages": count, "seconds": seconds, "mb_per_s": total / seconds / 1e6}


def _child(role: str, args: argparse.Namespace) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "--role", role, "--federation", args.federation]
    argv += ["--rank", str(args.rank), "--modules", str(args.modules), "--dim", str(args.dim)]
    argv += ["--chunk-mib", str(args.chunk_mib), "--svd-mode", args.svd_mode]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--modules", type=int, default=128)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument("--svd-mode", choices=["exact", "fast"], default="fast")
    parser.add_argument("--role", choices=["main", "sender", "aggregator"], default="main")
    parser.add_argument("--federation", default=f"bench-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()
    if args.role != "main":
        result = sender(args) if args.role == "sender" else aggregator(args)
        print(json.dumps(result), flush=True)
        return
    size = args.modules * args.rank * 2 * args.dim * 4
    log(f"update of {size / 2**30:.2f} GiB; baseline first: raw pika")
    baseline = raw_pika(size, args.chunk_mib * 2**20)
    log(f"raw pika: {baseline['seconds']:.1f}s ({baseline['mb_per_s']:.0f} MB/s)")
    agg = _child("aggregator", args)
    assert agg.stdout is not None
    if agg.stdout.readline().strip() != "ready":
        raise RuntimeError("the aggregator did not start")
    send = _child("sender", args)
    sent_out, _ = send.communicate()
    agg_out, _ = agg.communicate()
    if send.returncode or agg.returncode:
        raise RuntimeError(f"sender exited {send.returncode}, aggregator {agg.returncode}")
    s, a = json.loads(sent_out.strip().splitlines()[-1]), json.loads(agg_out.strip().splitlines()[-1])
    x = {k: v / s["payload_bytes"] for k, v in {**s, **a}.items() if k.endswith("_growth_bytes")}
    report = {
        "update_bytes": s["payload_bytes"],
        "chunk_bytes": args.chunk_mib * 2**20,
        "svd_mode": args.svd_mode,
        "sender": s,
        "aggregator": a,
        "rss_growth_x_update": x,
        "target_x": TARGET_X,
        "within_target": {k: v <= TARGET_X for k, v in x.items()},
        "baseline_raw_pika": baseline,
        "end_to_end_vs_raw_transfer": s["end_to_end_seconds"] / baseline["seconds"],
    }
    cleanup = connect(AMQP_URL)
    topology = Topology(args.federation)
    cleanup.delete([*topology.core(), *topology.client("big")])
    cleanup.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
