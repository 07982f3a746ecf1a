"""The floor a federation's byte path is measured against: plain pika moving the same messages through one quorum
queue, with publisher confirms, while a consumer in another process acks them. No validation, no store, no
aggregation: what the broker alone costs on this machine (bench/throughput.py, `flexlora sim load`)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pika

from broker.transports.rabbitmq import read_in_large_pieces
from schemas.messages import HEADER_KEY


@dataclass(frozen=True)
class RawMove:
    queue: str
    messages: int
    bytes: int
    seconds: float  # first publish until the last ack

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds


def _consume(url: str, queue: str, count: int, prefetch: int, ready: Any, done: Any) -> None:
    """Child process: ack `count` messages one by one, then report when the last ack went out. It reads the socket
    as the transport does (read_in_large_pieces), so the floor is the broker's, not pika's 4 KiB reads'."""
    read_in_large_pieces()
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=prefetch)
    acked = 0

    def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
        nonlocal acked
        ch.basic_ack(method.delivery_tag)
        acked += 1
        if acked == count:
            ch.stop_consuming()

    channel.basic_consume(queue, on_message, auto_ack=False)
    ready.set()
    channel.start_consuming()
    # CLOCK_MONOTONIC is system-wide on Linux, so the parent can subtract its own reading from this one.
    done.put(time.monotonic())
    conn.close()


def move(
    url: str, sizes: Sequence[int], *, header_json: str = "{}", prefetch: int = 8, timeout_s: float = 600.0
) -> RawMove:
    """Publish one persistent message of each size (random bytes, a header of `header_json`) and time it until a
    consumer has acked them all. The queue is deleted afterwards, however the run ends."""
    if not sizes:
        raise ValueError("nothing to move")
    queue = f"flexlora.raw-{uuid.uuid4().hex[:8]}"
    params = pika.URLParameters(url)
    noise = os.urandom(max(sizes))
    bodies = {size: noise[:size] for size in set(sizes)}  # made before the clock starts
    # A process, not a thread: publisher and consumer would otherwise share one GIL, flattering the floor.
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=_consume, args=(url, queue, len(sizes), prefetch, ready, done))
    conn = pika.BlockingConnection(params)
    try:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        consumer.start()
        if not ready.wait(60):
            raise TimeoutError("the raw consumer did not start")
        properties = [
            pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type="application/vnd.safetensors",
                headers={HEADER_KEY: header_json},
                message_id=str(uuid.uuid4()),
                user_id=params.credentials.username,
            )
            for _ in sizes
        ]
        started = time.monotonic()
        for size, props in zip(sizes, properties, strict=True):
            channel.basic_publish("", queue, bodies[size], props, mandatory=True)
        finished: float = done.get(timeout=timeout_s)
        consumer.join(10)
    finally:
        if consumer.is_alive():
            consumer.kill()
        if consumer.pid is not None:
            consumer.join()
        if conn.is_open:
            conn.close()
        cleanup = pika.BlockingConnection(params)  # fresh: the publishing one may be what failed
        cleanup.channel().queue_delete(queue)
        cleanup.close()
    return RawMove(queue, len(sizes), sum(sizes), finished - started)
