"""Benchmark: the CPU a pika consumer spends taking large messages, with pika's own 4 KiB socket reads and with the
reads the RabbitMQ transport sets (broker.transports.rabbitmq.read_in_large_pieces), same run, same broker.

    python bench/pika_reads.py [--messages 40] [--mb 10] [--repeats 3]

Publishes `--messages` bodies of `--mb` MB to a fresh classic queue, then a consumer process (one per setting,
alternating, `--repeats` times each) drains them with plain pika; prints its CPU seconds and wall seconds per
setting as JSON. Needs the local RabbitMQ.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
import uuid
from typing import Any

import pika

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _drain(queue: str, count: int, large: bool, out: Any) -> None:
    """Child process: consume `count` messages (auto-ack) and report (cpu seconds, wall seconds)."""
    if large:
        from broker.transports.rabbitmq import read_in_large_pieces

        assert read_in_large_pieces(), "this pika has no read-size setting"
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=8)
    wall, cpu = time.perf_counter(), time.process_time()
    for got, _ in enumerate(channel.consume(queue, auto_ack=True), start=1):
        if got == count:
            break
    out.put((time.process_time() - cpu, time.perf_counter() - wall))
    channel.cancel()
    conn.close()


def _fill(queue: str, count: int, body: bytes) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    channel = conn.channel()
    channel.queue_declare(queue, arguments={"x-queue-type": "classic"})
    for _ in range(count):
        channel.basic_publish("", queue, body)
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--mb", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    body = os.urandom(int(args.mb * 1e6))
    ctx = mp.get_context("spawn")
    runs: dict[str, list[tuple[float, float]]] = {"pika 4 KiB reads": [], "transport's reads": []}
    queue = f"flexlora.bench-reads-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(args.repeats):
            for name, large in (("pika 4 KiB reads", False), ("transport's reads", True)):
                _fill(queue, args.messages, body)
                out = ctx.Queue()
                child = ctx.Process(target=_drain, args=(queue, args.messages, large, out))
                child.start()
                runs[name].append(out.get(timeout=300))
                child.join(30)
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        conn.channel().queue_delete(queue)
        conn.close()
    mb = args.messages * len(body) / 1e6
    report: dict[str, Any] = {"mb": mb, "messages": args.messages, "pika": pika.__version__}
    for name, got in runs.items():
        cpu = [c for c, _ in got]
        report[name] = {
            "cpu_s": [round(c, 3) for c in cpu],
            "wall_s": [round(w, 3) for _, w in got],
            "cpu_s_median": round(statistics.median(cpu), 3),
            "mb_per_cpu_s": round(mb / statistics.median(cpu)),
        }
    base, tuned = report["pika 4 KiB reads"]["cpu_s_median"], report["transport's reads"]["cpu_s_median"]
    report["cpu_ratio"] = round(tuned / base, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
