"""Benchmark: aggregator ingestion against raw pika on the same broker, and round turnaround, same run.

    python bench/throughput.py [--messages 500] [--aggregators 1 2 3] [--clients 50] [--layers 30] [--rank 8]

Needs the local RabbitMQ and Redis. Ingestion: synthetic updates are queued first, then `flexlora aggregator`
processes record them in Redis; each is paused once it consumes, and the clock runs from their resumption
until the open round holds every one. Raw (the floor for ingestion): plain pika queues the same bodies in a
fresh quorum queue with confirms, then a consumer process acks them, paused and resumed the same way
(experiments/rawpika.drain). Beside it, the same drain by a consumer that hashes and keeps each body (in Redis, or
the `--payload-store`) before acking it: the least work an aggregator must do for an update, and so the most an
aggregator could ingest on this machine (`keeping`; ratio `ingestion_ratio_1_aggregator_to_keeping`). Also
reported, not compared: the same bodies published while the consumer acks, first publish to last ack
(rawpika.move), which one publisher waiting for each confirm bounds.
`--ingestion-fold-bytes 1073741824 0` adds runs without folding: the byte path alone, without FlexLoRA's sums.
Turnaround: `--clients` clients, one aggregator closing the round at the last update; from publishing that update
(as soon as the others are recorded, or `--settle-s` later) until every mailbox holds its adapter, per SVD mode.
Prints one JSON document; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pika

from aggregator.payloads import open_payloads
from aggregator.settings import AggregatorSettings
from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import QueueSpec, Topology
from broker.transport import Transport
from edge_client.synthetic import SyntheticShape, publish_update, rank_mix, synthetic_update
from experiments import rawpika
from schemas.messages import LoraUpdate

PREFETCH = int(AggregatorSettings.model_fields["prefetch"].default)
FOLD_BYTES = int(AggregatorSettings.model_fields["fold_bytes"].default)
INGESTION_TARGET = 0.9
# Issue 16: a 50-client round turns around in at most 1 s in fast mode and 2 s in exact mode.
TURNAROUND_TARGET_S = {"fast": 1.0, "exact": 2.0}
Procs = Sequence[subprocess.Popen[bytes]]


def log(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


def new_federation() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


def wait_for(what: str, done: Callable[[], bool], timeout: float, procs: Procs = (), poll_s: float = 0.005) -> float:
    """Poll until `done`; returns the monotonic time it first held. Fails fast if an aggregator died."""
    deadline = time.monotonic() + timeout
    while not done():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"an aggregator exited with code {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic()


def raw_baseline(args: argparse.Namespace, header_json: str, payload: bytes) -> dict[str, Any]:
    """The floor for ingestion: raw pika's consumer emptying a full queue of the same messages, timed as
    `ingestion` times an aggregator (rawpika.drain); the same drain keeping each body first; and, for reference,
    the same messages published and consumed at once (rawpika.move: what one publisher waiting for confirms lets
    through)."""
    sizes = [len(payload)] * args.messages
    options: dict[str, Any] = {"header_json": header_json, "prefetch": PREFETCH, "timeout_s": args.timeout}
    drained = rawpika.drain(args.broker_url, sizes, **options)
    keep = rawpika.Keep(args.redis_url, getattr(args, "payload_store", "redis"))
    kept = rawpika.drain(args.broker_url, sizes, keep=keep, **options)
    moved = rawpika.move(args.broker_url, sizes, **options)
    return {
        "queue": drained.queue,
        "messages": drained.messages,
        "acked_before_timing": drained.acked_before,
        "seconds": drained.seconds,
        "messages_per_s": drained.messages_per_s,
        "payload_mb_per_s": drained.mb_per_s,
        "keeping": {
            "queue": kept.queue,
            "payload_store": keep.payload_store,
            "threads": keep.threads,
            "acked_before_timing": kept.acked_before,
            "seconds": kept.seconds,
            "messages_per_s": kept.messages_per_s,
            "payload_mb_per_s": kept.mb_per_s,
        },
        "publish_and_consume": {
            "queue": moved.queue,
            "seconds": moved.seconds,
            "messages_per_s": moved.messages_per_s,
            "payload_mb_per_s": moved.mb_per_s,
        },
    }


@contextmanager
def federation(
    args: argparse.Namespace, transport: Transport, clients: Sequence[str] = ()
) -> Iterator[tuple[Topology, RedisRoundStore]]:
    """A fresh federation with its queues declared; deleted, with its Redis keys, however the body ends."""
    topology = Topology(new_federation())
    # Opened here too, so that wiping the store deletes the payloads (another benchmark's args may not name one).
    payloads = open_payloads(getattr(args, "payload_store", "redis"), topology.federation)
    store = RedisRoundStore.from_url(args.redis_url, topology.federation, payloads=payloads)
    mailboxes = [spec for c in clients for spec in topology.client(c)]
    try:
        transport.declare([*topology.core(), *mailboxes])
        yield topology, store
    finally:
        # The adapters exchange is in core(); deleting it once per mailbox would only repeat the work.
        transport.delete([*topology.core(), *(s for s in mailboxes if isinstance(s, QueueSpec))])
        store.wipe()
        store.r.close()


@contextmanager
def aggregators(
    args: argparse.Namespace,
    count: int,
    fed: str,
    max_updates: int,
    svd_mode: str,
    on_start: Callable[[subprocess.Popen[bytes], int], None] | None = None,
    extra: Sequence[str] = (),
) -> Iterator[Procs]:
    """`count` aggregator processes, started one by one (`on_start` sees each), always stopped on the way out."""
    command = [sys.executable, "-m", "flexlora.cli", "aggregator", "--quiet", "--federation", fed]
    command += ["--max-updates", str(max_updates), "--svd-mode", svd_mode]
    command += ["--broker-url", args.broker_url, "--redis-url", args.redis_url]
    command += ["--payload-store", getattr(args, "payload_store", "redis")]
    command += getattr(args, "aggregator_flags", [])  # what another benchmark adds (bench/guarantees.py)
    command += list(extra)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            # Their stdout goes to our stderr: our stdout carries only the JSON.
            procs.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sys.stderr))
            if on_start is not None:
                on_start(procs[-1], len(procs))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
                proc.terminate()  # SIGTERM: the aggregator stops between steps and hands back what it holds
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ingestion(
    args: argparse.Namespace,
    transport: Transport,
    count: int,
    template: LoraUpdate,
    payload: bytes,
    fold_bytes: int = FOLD_BYTES,
) -> dict[str, Any]:
    n = args.messages
    with federation(args, transport) as (topology, store):
        fed = topology.federation
        for i in range(n):
            header = template.model_copy(
                update={"federation": fed, "client_id": f"c{i:05d}", "update_id": str(uuid.uuid4())}
            )
            publish_update(transport, topology, header, payload)
        probe = pika.BlockingConnection(pika.URLParameters(args.broker_url))
        try:
            channel = probe.channel()

            def consumers() -> int:
                return int(channel.queue_declare(topology.updates_queue, passive=True).method.consumer_count)

            def pause_once_consuming(proc: subprocess.Popen[bytes], started: int) -> None:
                wait_for(f"aggregator {started} to consume", lambda: consumers() >= started, args.timeout, [proc])
                proc.send_signal(signal.SIGSTOP)

            # Start-up (importing torch) is not ingestion, and an early aggregator must not drain the queue
            # while a later one starts: each is paused once it consumes, and all resume together.
            extra = ("--fold-bytes", str(fold_bytes))
            with aggregators(args, count, fed, n + 1, "exact", pause_once_consuming, extra) as procs:
                recorded_before = store.status().count
                started = time.monotonic()
                for proc in procs:
                    proc.send_signal(signal.SIGCONT)
                finished = wait_for(
                    f"{n} recorded updates", lambda: store.status().count >= n, args.timeout, procs, 0.01
                )
        finally:
            probe.close()
    seconds = finished - started
    rate = (n - recorded_before) / seconds
    return {
        "aggregators": count,
        "fold_bytes": fold_bytes,
        "federation": fed,
        "messages": n,
        "recorded_before_all_consuming": recorded_before,  # in the moment between consuming and pausing
        "seconds": seconds,
        "updates_per_s": rate,
        "payload_mb_per_s": rate * len(payload) / 1e6,
    }


def turnaround(
    args: argparse.Namespace,
    transport: Transport,
    shape: SyntheticShape,
    svd_mode: str,
    hold_bytes: int,
    fold_bytes: int,
) -> dict[str, Any]:
    clients = [f"c{i:04d}" for i in range(args.clients)]
    with federation(args, transport, clients) as (topology, store):
        fed = topology.federation
        updates = [
            synthetic_update(fed, c, rank, 0, shape=shape, seed=i)
            for i, (c, rank) in enumerate(zip(clients, rank_mix(args.clients), strict=True))
        ]
        extra = ("--hold-bytes", str(hold_bytes), "--fold-bytes", str(fold_bytes))
        with aggregators(args, 1, fed, len(clients), svd_mode, extra=extra) as procs:
            for header, payload in updates[:-1]:
                publish_update(transport, topology, header, payload)
            wait_for("all but one update", lambda: store.status().count == len(clients) - 1, args.timeout, procs)
            time.sleep(args.settle_s)  # 0: the last update comes in the same burst; more: after a pause
            last = topology.adapter_queue(clients[-1])
            started = time.monotonic()
            publish_update(transport, topology, *updates[-1])
            # The aggregator publishes in sorted client order, so the last mailbox fills last; the
            # others are then checked, and the clock runs on if any is still empty.
            finished = wait_for("the last adapter", lambda: transport.queue_depth(last) == 1, args.timeout, procs)
            every = [topology.adapter_queue(c) for c in clients]
            if not all(transport.queue_depth(q) == 1 for q in every):
                finished = wait_for(
                    "every adapter", lambda: all(transport.queue_depth(q) == 1 for q in every), args.timeout, procs
                )
        [record] = store.history()
    return {
        "svd_mode": svd_mode,
        "settle_s": args.settle_s,
        "hold_bytes": hold_bytes,
        "fold_bytes": fold_bytes,
        "federation": fed,
        "clients": len(clients),
        "participants": len(record.participants),
        "ranks": sorted({h.rank for h, _ in updates}),
        "round_payload_mb": sum(len(p) for _, p in updates) / 1e6,
        "turnaround_seconds": finished - started,
        "aggregate_seconds": record.aggregate_seconds,
        "target_seconds": TURNAROUND_TARGET_S[svd_mode],
        "meets_target": finished - started <= TURNAROUND_TARGET_S[svd_mode],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=500, help="updates per throughput measurement")
    parser.add_argument("--aggregators", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--clients", type=int, default=50, help="clients in the turnaround round")
    parser.add_argument("--svd-modes", nargs="+", default=["exact", "fast"], choices=["exact", "fast"])
    parser.add_argument("--layers", type=int, default=SyntheticShape().layers, help="SmolLM2 q/v layers per update")
    parser.add_argument("--rank", type=int, default=8, help="rank of the throughput updates")
    parser.add_argument(
        "--hold-bytes",
        type=int,
        nargs="+",
        default=[AggregatorSettings.model_fields["hold_bytes"].default],
        help="the aggregator's hold_bytes in the turnaround round; several: one round each (0: read every update back)",
    )
    parser.add_argument(
        "--fold-bytes",
        type=int,
        nargs="+",
        default=[FOLD_BYTES],
        help="the aggregator's fold_bytes in the turnaround round; several: one round each (0: no folding)",
    )
    parser.add_argument(
        "--ingestion-fold-bytes",
        type=int,
        nargs="+",
        default=[FOLD_BYTES],
        help="the aggregators' fold_bytes in the ingestion runs; several: a run each (0: no folding, the byte path "
        "alone); the ratios take the first",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=0.0,
        help="seconds between the turnaround round's last-but-one update being recorded and the last being published",
    )
    parser.add_argument(
        "--payload-store",
        default=AggregatorSettings.model_fields["payload_store"].default,
        help="the aggregators' payload store (redis, or file:///dir: a directory this machine may fill and empty)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds any one wait may take")
    parser.add_argument("--broker-url", default=AggregatorSettings.model_fields["broker_url"].default)
    parser.add_argument("--redis-url", default=AggregatorSettings.model_fields["redis_url"].default)
    args = parser.parse_args()
    shape = SyntheticShape(layers=args.layers)
    # One body for every throughput message; the federation name has the length of the real ones.
    template, payload = synthetic_update(new_federation(), "c00000", args.rank, 0, shape=shape)
    header_json = template.model_dump_json()
    log(f"raw baseline: {args.messages} messages of {len(payload) / 1e6:.2f} MB")
    raw = raw_baseline(args, header_json, payload)
    runs = []
    with connect(args.broker_url, connection_name="flexlora-bench") as transport:
        for count in args.aggregators:
            for fold in args.ingestion_fold_bytes:
                log(f"ingestion with {count} aggregator(s), fold_bytes {fold}")
                runs.append(ingestion(args, transport, count, template, payload, fold))
        rounds = []
        for mode in args.svd_modes:
            for hold in args.hold_bytes:
                for fold in args.fold_bytes:
                    log(f"turnaround of {args.clients} clients, svd mode {mode}, hold_bytes {hold}, fold_bytes {fold}")
                    rounds.append(turnaround(args, transport, shape, mode, hold, fold))
    one = next((r["updates_per_s"] for r in runs if r["aggregators"] == 1), None)  # at the first fold_bytes
    ratio = None if one is None else one / raw["messages_per_s"]
    to_keeping = None if one is None else one / raw["keeping"]["messages_per_s"]
    report = {
        "settings": {k: getattr(args, k) for k in ("messages", "rank", "layers", "clients", "payload_store")}
        | {"payload_bytes": len(payload), "header_bytes": len(header_json), "prefetch": PREFETCH},
        "raw_baseline": raw,
        "ingestion": runs,
        "ingestion_ratio_1_aggregator_to_raw": ratio,
        "ingestion_ratio_target": INGESTION_TARGET,
        "ingestion_ratio_1_aggregator_to_keeping": to_keeping,
        "turnaround": rounds,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
