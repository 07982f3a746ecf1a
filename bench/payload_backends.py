"""Benchmark: where an aggregator keeps update payloads between receiving them and the round commit, same run.

    python bench/payload_backends.py [--payloads 80] [--size-mib 16] [--chunk-mib 8] [--json PATH]

Every backend gets the same N random payloads of S MiB, one after another:
  redis        SET per payload; one over a chunk goes as HSETs of its chunks into a hash (today's design)
  files        a directory: write a temp name in it, os.replace to the final name; read back with a plain read
  files+fsync  the same, with os.fsync of the file before the rename and of the directory after it
  stream       a RabbitMQ stream queue, one message per chunk (message_id "key/i"), each publish confirmed;
               read back by consuming (manual ack, prefetch) from an offset until every wanted id is seen
Per backend: write MB/s and per-payload write latency (median, p95), read-all MB/s, the latency of reading one
payload from the middle back (the recovery case; median of a few tries) and Redis `used_memory` growth over the
writes (server-wide: other clients show in it too). MB is 10^6 bytes; every read is checked against what was
written. Prints a table, progress to stderr; `--json PATH` writes the figures. Removes its Redis keys, temp dir
and stream queue.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pika
import redis
from rich.console import Console
from rich.table import Column, Table

from aggregator.settings import AggregatorSettings

MIB = 1 << 20
READ_ONE_TRIES = 3
IDLE_S = 0.2  # a stream consumer that got nothing for this long has had every delivery the broker sends it
BACKENDS = ["redis", "files", "files+fsync", "stream"]
COLUMNS = {
    "write MB/s": "write_mb_per_s",
    "write p50 ms": "write_latency_ms_median",
    "write p95 ms": "write_latency_ms_p95",
    "read-all MB/s": "read_all_mb_per_s",
    "read-one ms": "read_one_ms",
    "Redis mem +MB": "redis_used_memory_growth_mb",
}
STREAM_NOTE = (
    "AMQP 0-9-1 publisher confirms do not return the stream offset a message got, so reading one payload back "
    "means consuming from an offset or a timestamp (second resolution) and skipping until its chunks are seen."
)


def log(message: str) -> None:
    print(f"[payload-backends] {message}", file=sys.stderr, flush=True)


def pieces(payload: bytes, chunk: int) -> Iterator[memoryview]:
    view = memoryview(payload)
    for start in range(0, max(len(payload), 1), chunk):
        yield view[start : start + chunk]


class Backend:
    name = ""

    def write(self, key: str, payload: bytes) -> None:
        raise NotImplementedError

    def read_one(self, key: str) -> bytes:
        raise NotImplementedError

    def read(self, keys: Sequence[str]) -> tuple[dict[str, bytes], float]:
        """The payloads of `keys`, and the seconds until all of them were in hand."""
        started = time.perf_counter()
        got = {key: self.read_one(key) for key in keys}
        return got, time.perf_counter() - started

    def extra(self, key: str) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Remove everything the backend created."""


class RedisBackend(Backend):
    name = "redis"

    def __init__(self, url: str, prefix: str, chunk: int) -> None:
        self.r = redis.Redis.from_url(url)
        self.prefix, self.chunk = prefix, chunk
        self.chunks: dict[str, int] = {}  # 0: a plain string; n: a hash of n chunks (the round knows its sizes)

    def write(self, key: str, payload: bytes) -> None:
        if len(payload) <= self.chunk:
            self.r.set(self.prefix + key, payload)
            self.chunks[key] = 0
            return
        pipe = self.r.pipeline(transaction=False)
        for i, piece in enumerate(pieces(payload, self.chunk)):
            pipe.hset(self.prefix + key, str(i), piece)  # redis-py sends a memoryview as it is
            self.chunks[key] = i + 1
        pipe.execute()

    def read_one(self, key: str) -> bytes:
        pipe = self.r.pipeline(transaction=False)
        if not self.chunks[key]:
            pipe.get(self.prefix + key)
        for i in range(self.chunks[key]):
            pipe.hget(self.prefix + key, str(i))
        return b"".join(pipe.execute())

    def extra(self, key: str) -> dict[str, Any]:
        own = sum(self.r.memory_usage(self.prefix + k, samples=0) or 0 for k in self.chunks)
        return {"redis_memory_usage_of_its_keys_mb": own / 1e6}

    def close(self) -> None:
        for name in self.r.scan_iter(match=self.prefix + "*", count=1000):
            self.r.delete(name)
        self.r.close()


class FilesBackend(Backend):
    def __init__(self, root: Path, fsync: bool) -> None:
        self.name = "files+fsync" if fsync else "files"
        self.root, self.fsync = root / self.name, fsync
        self.root.mkdir()

    def write(self, key: str, payload: bytes) -> None:
        temp = self.root / f".{key}.tmp"
        with temp.open("wb") as f:
            f.write(payload)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, self.root / key)
        if self.fsync:  # the rename is durable only once the directory is
            fd = os.open(self.root, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def read_one(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class StreamBackend(Backend):
    name = "stream"

    def __init__(self, url: str, queue: str, chunk: int, prefetch: int, max_bytes: int, timeout: float) -> None:
        self.params, self.queue, self.chunk = pika.URLParameters(url), queue, chunk
        self.prefetch, self.timeout = prefetch, timeout
        self.conn = pika.BlockingConnection(self.params)
        self.channel = self.conn.channel()
        arguments = {"x-queue-type": "stream", "x-max-length-bytes": max_bytes}
        self.channel.queue_declare(queue, durable=True, arguments=arguments)
        self.channel.confirm_delivery()  # each basic_publish now waits for its confirm
        self.ids: dict[str, list[str]] = {}
        self.started: dict[str, datetime] = {}  # the clock just before a payload's first publish
        self.drain_s: list[float] = []

    def write(self, key: str, payload: bytes) -> None:
        self.started[key] = datetime.now(UTC)
        chunks = list(pieces(payload, self.chunk))
        self.ids[key] = [f"{key}/{i}" for i in range(len(chunks))]
        for i, (piece, message_id) in enumerate(zip(chunks, self.ids[key], strict=True)):
            headers = {"payload": key, "chunk": i, "chunks": len(chunks)}
            properties = pika.BasicProperties(message_id=message_id, headers=headers, delivery_mode=2)
            self.channel.basic_publish("", self.queue, bytes(piece), properties, mandatory=True)

    def read(self, keys: Sequence[str], offset: str | datetime | None = None) -> tuple[dict[str, bytes], float]:
        """Consume from `offset` until every chunk of `keys` came by. By default one payload is read from the
        time before it was published (second resolution, so one second earlier), several from the first offset."""
        if offset is None:
            offset = "first" if len(keys) > 1 else self.started[keys[0]] - timedelta(seconds=1)
        missing = {message_id for key in keys for message_id in self.ids[key]}
        found: dict[str, bytes] = {}
        got: dict[str, bytes] = {}
        found_s, unacked, idle = 0.0, 0, 0.0
        channel = self.conn.channel()
        try:
            channel.basic_qos(prefetch_count=self.prefetch)
            started = time.perf_counter()
            deliveries = channel.consume(self.queue, arguments={"x-stream-offset": offset}, inactivity_timeout=IDLE_S)
            for method, properties, body in deliveries:
                if method is None:  # nothing came for IDLE_S
                    idle += IDLE_S
                    if not missing:
                        break
                    if idle > self.timeout:
                        raise TimeoutError(f"{len(missing)} chunk(s) not seen in {self.timeout:.0f}s")
                    continue
                idle = 0.0
                if missing:
                    if properties.message_id in missing:
                        missing.discard(properties.message_id)
                        found[properties.message_id] = body
                    if missing:
                        channel.basic_ack(method.delivery_tag)
                        continue
                    got = {key: b"".join(found.pop(i) for i in self.ids[key]) for key in keys}
                    found_s = time.perf_counter() - started
                # All in hand, and no more acks: the broker sends at most `prefetch` unacked deliveries (fewer at
                # the end of the stream: then until IDLE_S passes without one; offsets have gaps, so the last one
                # is not known). They are taken before cancelling, because pika basic.rejects deliveries it holds
                # at a cancel, and RabbitMQ 3.10 closes the connection on a reject from a stream consumer (540).
                unacked += 1
                if unacked >= self.prefetch:
                    break
            channel.cancel()
            self.drain_s.append(time.perf_counter() - started - found_s)
        finally:
            if channel.is_open:
                channel.close()
        return got, found_s

    def extra(self, key: str) -> dict[str, Any]:
        seconds = float(np.median([self.read([key], "first")[1] for _ in range(READ_ONE_TRIES)]))
        drain_ms = 1e3 * float(np.median(self.drain_s))
        return {"read_one_from_first_ms": 1e3 * seconds, "cancel_drain_ms_median": drain_ms, "note": STREAM_NOTE}

    def close(self) -> None:
        if self.conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self.conn.close()
        with pika.BlockingConnection(self.params) as conn:  # a fresh one: the queue goes even if the first broke
            conn.channel().queue_delete(self.queue)


def checked(read: tuple[dict[str, bytes], float], payloads: dict[str, bytes], name: str) -> float:
    """The seconds of a read, once what it read is what was written."""
    if any(payloads[key] != payload for key, payload in read[0].items()):
        raise RuntimeError(f"{name}: read back other bytes than were written")
    return read[1]


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def measure(backend: Backend, payloads: dict[str, bytes], middle: str, probe: redis.Redis) -> dict[str, Any]:
    total = sum(len(p) for p in payloads.values())
    before = used_memory(probe)
    latencies = []
    started = time.perf_counter()
    for key, payload in payloads.items():
        t = time.perf_counter()
        backend.write(key, payload)
        latencies.append(time.perf_counter() - t)
    write_s = time.perf_counter() - started
    growth = used_memory(probe) - before
    read_all_s = checked(backend.read(list(payloads)), payloads, backend.name)
    tries = [checked(backend.read([middle]), payloads, backend.name) for _ in range(READ_ONE_TRIES)]
    read_one_s = float(np.median(tries))
    return {
        "backend": backend.name,
        "write_seconds": write_s,
        "write_mb_per_s": total / 1e6 / write_s,
        "write_latency_ms_median": 1e3 * float(np.median(latencies)),
        "write_latency_ms_p95": 1e3 * float(np.percentile(latencies, 95)),
        "read_all_seconds": read_all_s,
        "read_all_mb_per_s": total / 1e6 / read_all_s,
        "read_one_ms": 1e3 * read_one_s,
        "redis_used_memory_growth_mb": growth / 1e6,
        "write_plus_read_one_seconds": write_s + read_one_s,
    } | backend.extra(middle)


def print_table(report: dict[str, Any]) -> None:
    s, rows = report["settings"], report["results"]
    title = f"{s['payloads']} payloads of {s['size_mib']} MiB, chunks of {s['chunk_mib']} MiB"
    table = Table("backend", *(Column(c, justify="right") for c in COLUMNS), title=title)
    for row in rows:
        table.add_row(row["backend"], *(f"{row[k]:.1f}" for k in COLUMNS.values()))
    console = Console(width=140)
    console.print(table)
    for row in (r for r in rows if "read_one_from_first_ms" in r):
        first = row["read_one_from_first_ms"]
        console.print(f"{row['backend']}: read-one starts at a timestamp; from the first offset: {first:.1f} ms.")
        console.print(f"{row['note']} Cancelling cleanly took {row['cancel_drain_ms_median']:.1f} ms more (untimed).")
    own = next((r["redis_memory_usage_of_its_keys_mb"] for r in rows if r["backend"] == "redis"), None)
    console.print(f"MEMORY USAGE of the Redis keys: {own} MB; Redis persistence: {report['redis_persistence']}")
    console.print("Reads are warm: files come from the page cache, Redis from memory, the stream from RabbitMQ.")
    best = report["fastest"]
    console.print(
        f"fastest for write + recovery read: {best['backend']} ({best['seconds']:.3f} s); baseline redis "
        f"{best['redis_seconds']:.3f} s, {best['redis_seconds'] / best['seconds']:.2f}x the time"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payloads", "-n", type=int, default=80, help="payloads per backend")
    parser.add_argument("--size-mib", type=float, default=16.0, help="size of each payload")
    parser.add_argument("--chunk-mib", type=float, default=8.0, help="chunk size: Redis hash fields, stream messages")
    parser.add_argument("--prefetch", type=int, default=16, help="prefetch of the stream consumer")
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument("--warmup", type=int, default=1, help="untimed write passes of the set per backend first")
    parser.add_argument("--dir", default=None, help="where the temp directory goes (default: the system temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a stream read may wait for a message")
    parser.add_argument("--broker-url", default=AggregatorSettings.model_fields["broker_url"].default)
    parser.add_argument("--redis-url", default=AggregatorSettings.model_fields["redis_url"].default)
    args = parser.parse_args(argv)
    size, chunk = int(args.size_mib * MIB), int(args.chunk_mib * MIB)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    prefix, queue = f"flexlora-bench-payloads:{run_id}:", f"flexlora.{run_id}.payload-stream"
    log(f"{args.payloads} random payloads of {size / 1e6:.1f} MB")
    rng = np.random.default_rng()
    payloads = {f"u{i:05d}": rng.bytes(size) for i in range(args.payloads)}
    middle = f"u{args.payloads // 2:05d}"
    probe = redis.Redis.from_url(args.redis_url)
    root = Path(tempfile.mkdtemp(prefix="flexlora-payloads-", dir=args.dir))
    results = []

    def make(name: str) -> Backend:
        if name == "redis":
            return RedisBackend(args.redis_url, prefix, chunk)
        if name in ("files", "files+fsync"):
            return FilesBackend(root, fsync=name == "files+fsync")
        max_bytes = 2 * args.payloads * size + MIB
        return StreamBackend(args.broker_url, queue, chunk, args.prefetch, max_bytes, args.timeout)

    try:
        for name in args.backends:
            # Untimed passes first: in a VM, memory the guest never touched (fresh page cache, a growing Redis or
            # RabbitMQ) is several times slower to fill than memory just freed, which would favour whichever
            # backend runs second.
            for i in range(args.warmup):
                log(f"backend {name}: warm-up pass {i + 1}")
                backend = make(name)
                try:
                    for key, payload in payloads.items():
                        backend.write(key, payload)
                finally:
                    backend.close()
            log(f"backend {name}")
            backend = make(name)
            try:
                results.append(measure(backend, payloads, middle, probe))
            finally:
                backend.close()
        persistence = {k: v for k, v in probe.config_get("*").items() if k in ("save", "appendonly", "appendfsync")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
        probe.close()
    best = min(results, key=lambda r: r["write_plus_read_one_seconds"])
    baseline = next((r for r in results if r["backend"] == "redis"), best)
    report = {
        "settings": {k: getattr(args, k) for k in ("payloads", "size_mib", "chunk_mib", "prefetch", "warmup")}
        | {"payload_bytes": size, "chunk_bytes": chunk, "temp_dir": str(root)},
        "redis_prefix": prefix,
        "stream_queue": queue,
        "redis_persistence": persistence,
        "results": results,
        "fastest": {"by": "write_plus_read_one_seconds", "backend": best["backend"]}
        | {"seconds": best["write_plus_read_one_seconds"], "redis_seconds": baseline["write_plus_read_one_seconds"]},
    }
    print_table(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
