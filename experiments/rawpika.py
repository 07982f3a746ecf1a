"""The floor a federation's byte path is measured against: plain pika moving the same messages through one quorum
queue, with publisher confirms, and a consumer in another process that acks them. No validation, no store, no
aggregation: what the broker alone costs on this machine.

- `move`: publish while the consumer acks, timed from the first publish to the last ack (`flexlora sim load`,
  whose rounds also publish and consume). One publisher waiting for each confirm bounds it.
- `drain`: publish first, then time the consumer emptying the full queue, paused and resumed exactly as
  bench/throughput.py times an aggregator's ingestion: the floor for an ingestion rate.
- `drain` with `keep`: the same, but the consumer does the least an aggregator must do before it acks an update:
  hash the body (sha256, which names the payload) and keep it where the round store would (Redis, or a payload
  store), on two threads beside pika's, so hashing and keeping overlap the socket reads. No parsing, no checks,
  no bookkeeping, no aggregation: the floor for an ingestion rate that keeps what it acks.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pika
import redis
from pika.adapters.blocking_connection import BlockingChannel

from aggregator.payloads import open_payloads
from broker.transports.rabbitmq import read_in_large_pieces
from schemas.messages import HEADER_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawMove:
    queue: str
    messages: int
    bytes: int
    seconds: float  # move: first publish until the last ack; drain: the consumer's resumption until its last ack
    acked_before: int = 0  # drain: acked in the moment between consuming and pausing, not timed

    @property
    def mb_per_s(self) -> float:
        return self.bytes * (self.messages - self.acked_before) / self.messages / 1e6 / self.seconds

    @property
    def messages_per_s(self) -> float:
        return (self.messages - self.acked_before) / self.seconds


@dataclass(frozen=True)
class Keep:
    """Where a keeping consumer keeps each body: `payload_store` "redis" (a key in `redis_url`, as the round store
    keeps a payload by default) or a payload store's URL (aggregator.payloads)."""

    redis_url: str
    payload_store: str = "redis"
    threads: int = 2

    def keeper(self, queue: str) -> Callable[[str, bytes], object]:
        """A function keeping one body under a name; in the consumer's process."""
        payloads = open_payloads(self.payload_store, queue)
        if payloads is None:
            client = redis.Redis.from_url(self.redis_url)
            return lambda name, body: client.set(f"{queue}:{name}", body, ex=600)
        return lambda name, body: payloads.put(f"raw/{name}", body)

    def wipe(self, queue: str) -> None:
        """Delete what a consumer of `queue` kept."""
        payloads = open_payloads(self.payload_store, queue)
        if payloads is not None:
            payloads.wipe()
            return
        with redis.Redis.from_url(self.redis_url) as client:
            keys = list(client.scan_iter(f"{queue}:*", count=1000))
            if keys:
                client.delete(*keys)  # one round trip, not one a key


def _consume(
    url: str, queue: str, count: int, prefetch: int, ready: Any, done: Any, acked: Any, keep: Keep | None = None
) -> None:
    """Child process: ack `count` messages one by one (counting them in `acked`), then report when the last ack went
    out. It reads the socket as the transport does (read_in_large_pieces), so the floor is the broker's, not pika's
    4 KiB reads'. With `keep`, each body is hashed and kept on `keep.threads` threads first, and acked after."""
    read_in_large_pieces()
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=prefetch)

    def settle(tag: int) -> None:  # on pika's thread
        channel.basic_ack(tag)
        acked.value += 1
        if acked.value == count:
            channel.stop_consuming()

    if keep is None:

        def on_message(_ch: Any, method: Any, _properties: Any, body: bytes) -> None:
            settle(method.delivery_tag)

    else:
        keeper, workers = keep.keeper(queue), ThreadPoolExecutor(keep.threads)

        def kept(tag: int, body: bytes) -> None:
            try:
                keeper(f"{tag}-{hashlib.sha256(body).hexdigest()}", body)
            except Exception as exc:  # said to the parent at once, not after its whole timeout
                done.put(f"keeping a body failed: {type(exc).__name__}: {exc}")
                conn.add_callback_threadsafe(channel.stop_consuming)
                return
            conn.add_callback_threadsafe(lambda: settle(tag))

        def on_message(_ch: Any, method: Any, _properties: Any, body: bytes) -> None:
            workers.submit(kept, method.delivery_tag, body)

    channel.basic_consume(queue, on_message, auto_ack=False)
    ready.set()
    channel.start_consuming()
    # CLOCK_MONOTONIC is system-wide on Linux, so the parent can subtract its own reading from this one.
    done.put(time.monotonic())
    conn.close()


class _Rig:
    """A fresh quorum queue, a confirming publisher and a consumer process (not yet started); as a context, the
    queue is declared on entry and deleted on the way out, however the run ends."""

    def __init__(
        self, url: str, sizes: Sequence[int], header_json: str, prefetch: int, keep: Keep | None = None
    ) -> None:
        if not sizes:
            raise ValueError("nothing to move")
        self.queue = f"flexlora.raw-{uuid.uuid4().hex[:8]}"
        self.params = pika.URLParameters(url)
        self.sizes = sizes
        noise = os.urandom(max(sizes))
        self.bodies = {size: noise[:size] for size in set(sizes)}  # made before any clock starts
        self.properties = [
            pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type="application/vnd.safetensors",
                headers={HEADER_KEY: header_json},
                message_id=str(uuid.uuid4()),
                user_id=self.params.credentials.username,
            )
            for _ in sizes
        ]
        # A process, not a thread: publisher and consumer would otherwise share one GIL, flattering the floor.
        ctx = mp.get_context("spawn")
        self.ready, self.done, self.acked = ctx.Event(), ctx.Queue(), ctx.Value("q", 0)
        self.consumer = ctx.Process(
            target=_consume, args=(url, self.queue, len(sizes), prefetch, self.ready, self.done, self.acked, keep)
        )
        self.keep = keep
        self.conn: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None

    def __enter__(self) -> _Rig:
        try:
            self.conn = pika.BlockingConnection(self.params)
            self.channel = self.conn.channel()
            self.channel.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
            self.channel.confirm_delivery()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.consumer.is_alive():
            self.consumer.kill()
        if self.consumer.pid is not None:
            self.consumer.join()
        if self.conn is not None and self.conn.is_open:
            self.conn.close()
        cleanup = pika.BlockingConnection(self.params)  # fresh: the publishing one may be what failed
        cleanup.channel().queue_delete(self.queue)
        cleanup.close()
        if self.keep is not None:
            try:
                self.keep.wipe(self.queue)
            except (redis.RedisError, OSError):  # not over what failed the run; Redis keys expire in 10 minutes
                log.warning("could not delete what the raw consumer of %s kept", self.queue, exc_info=True)

    def start_consumer(self) -> None:
        self.consumer.start()
        if not self.ready.wait(60):
            raise TimeoutError("the raw consumer did not start")

    def finished(self, timeout_s: float) -> float:
        """When the consumer's last ack went out (the system-wide monotonic clock); raises what it failed with."""
        said = self.done.get(timeout=timeout_s)
        if isinstance(said, str):
            raise RuntimeError(f"the raw consumer stopped: {said}")
        self.consumer.join(10)
        return float(said)

    def publish(self) -> None:
        assert self.channel is not None, "publish inside the rig's context"
        for size, props in zip(self.sizes, self.properties, strict=True):
            self.channel.basic_publish("", self.queue, self.bodies[size], props, mandatory=True)


def move(
    url: str, sizes: Sequence[int], *, header_json: str = "{}", prefetch: int = 8, timeout_s: float = 600.0
) -> RawMove:
    """Publish one persistent message of each size (random bytes, a header of `header_json`) and time it until a
    consumer has acked them all."""
    with _Rig(url, sizes, header_json, prefetch) as rig:
        rig.start_consumer()
        started = time.monotonic()
        rig.publish()
        return RawMove(rig.queue, len(sizes), sum(sizes), rig.finished(timeout_s) - started)


def drain(
    url: str,
    sizes: Sequence[int],
    *,
    header_json: str = "{}",
    prefetch: int = 8,
    timeout_s: float = 600.0,
    keep: Keep | None = None,
) -> RawMove:
    """Publish the messages first (untimed), then time a consumer emptying the queue: it starts consuming, is
    paused (SIGSTOP) as soon as it is, and the clock runs from its resumption to its last ack. What it acked in
    the moment before the pause is in `acked_before` and out of `messages_per_s`. With `keep`, the consumer hashes
    and keeps each body before acking it (what it kept is deleted on the way out)."""
    with _Rig(url, sizes, header_json, prefetch, keep) as rig:
        rig.publish()
        rig.start_consumer()
        pid = rig.consumer.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            before = int(rig.acked.value)
            started = time.monotonic()
        finally:
            os.kill(pid, signal.SIGCONT)
        return RawMove(rig.queue, len(sizes), sum(sizes), rig.finished(timeout_s) - started, acked_before=before)
