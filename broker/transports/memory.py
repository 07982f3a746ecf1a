"""An in-memory broker with RabbitMQ's semantics that matter here: the embedded default and unit tests."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from broker.errors import BrokerError, DeliveryGone, PublishRefused
from broker.topology import BindingSpec, ExchangeSpec, ExchangeType, QueueSpec, Spec
from broker.transport import Delivery, Message, Subscription, Transport, dead_letter_headers
from schemas.messages import REASON_KEY


@dataclass
class _Queue:
    spec: QueueSpec
    ready: deque[tuple[Message, int]] = field(default_factory=deque)  # (message, times delivered)

    @property
    def max_length(self) -> int | None:
        value = self.spec.arguments.get("x-max-length")
        return int(value) if value is not None else None

    @property
    def max_bytes(self) -> int | None:
        value = self.spec.arguments.get("x-max-length-bytes")
        return int(value) if value is not None else None

    def over_limit(self) -> bool:
        """RabbitMQ's x-max-length and x-max-length-bytes (bodies of ready messages)."""
        if self.max_length is not None and len(self.ready) > self.max_length:
            return True
        return self.max_bytes is not None and sum(len(m.body) for m, _ in self.ready) > self.max_bytes


class MemoryBroker:
    """The 'server': exchanges, queues and bindings shared by every MemoryTransport connected to it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.exchanges: dict[str, ExchangeType] = {}
        self.queues: dict[str, _Queue] = {}
        self.bindings: set[tuple[str, str, str]] = set()  # (exchange, routing key, queue)

    def declare(self, spec: Spec) -> None:
        with self.cond:
            if isinstance(spec, ExchangeSpec):
                known = self.exchanges.setdefault(spec.name, spec.type)
                if known != spec.type:
                    raise BrokerError(f"exchange {spec.name!r} exists with type {known}, not {spec.type}")
            elif isinstance(spec, QueueSpec):
                queue = self.queues.setdefault(spec.name, _Queue(spec))
                if queue.spec.arguments != spec.arguments:
                    # RabbitMQ answers PRECONDITION_FAILED here; so do we, to catch the same bugs.
                    raise BrokerError(f"queue {spec.name!r} exists with other arguments {queue.spec.arguments}")
            else:
                if spec.exchange not in self.exchanges or spec.queue not in self.queues:
                    raise BrokerError(f"binding {spec} names an undeclared exchange or queue")
                self.bindings.add((spec.exchange, spec.routing_key, spec.queue))

    def route(self, exchange: str, message: Message, also: Sequence[str] = ()) -> int:
        """Enqueue to every bound queue (bound by the message's routing key or one of `also`, as RabbitMQ's BCC);
        returns how many queues took it (0 = unroutable). Each queue gets the message once."""
        keys = {message.routing_key, *also}
        with self.cond:
            kind = self.exchanges.get(exchange)
            if kind is None:
                raise PublishRefused(f"no exchange {exchange!r}")
            targets = sorted(
                {q for (ex, key, q) in self.bindings if ex == exchange and (kind == "fanout" or key in keys)}
            )
            for name in targets:
                self._enqueue(self.queues[name], message, 0)
            self.cond.notify_all()
            return len(targets)

    def _enqueue(self, queue: _Queue, message: Message, delivered: int) -> None:
        queue.ready.append((message, delivered))
        while queue.ready and queue.over_limit():
            queue.ready.popleft()  # x-overflow drop-head

    def requeue(self, queue_name: str, message: Message, delivered: int) -> None:
        with self.cond:
            queue = self.queues[queue_name]
            args = queue.spec.arguments
            limit = args.get("x-delivery-limit")
            if limit is not None and delivered > int(limit):
                dlx = args.get("x-dead-letter-exchange")
                if dlx is not None:
                    headers = {**message.headers, REASON_KEY: "delivery_limit"}
                    self.route(str(dlx), replace(message, headers=headers, redelivered=False))
                return
            # RabbitMQ puts a returned message back near the head; order is not promised either way.
            queue.ready.appendleft((replace(message, redelivered=True), delivered))
            self.cond.notify_all()

    def delete(self, spec: Spec) -> None:
        with self.cond:
            if isinstance(spec, ExchangeSpec):
                self.exchanges.pop(spec.name, None)
                self.bindings = {b for b in self.bindings if b[0] != spec.name}
            elif isinstance(spec, QueueSpec):
                self.queues.pop(spec.name, None)
                self.bindings = {b for b in self.bindings if b[2] != spec.name}
            self.cond.notify_all()

    def depth(self, queue: str) -> int:
        with self.cond:
            if queue not in self.queues:
                raise BrokerError(f"no queue {queue!r}")
            return len(self.queues[queue].ready)


class _MemoryDelivery(Delivery):
    def __init__(self, sub: _MemorySubscription, tag: int, message: Message, delivered: int) -> None:
        self.message = message
        self._sub = sub
        self._tag = tag
        self._delivered = delivered

    def ack(self) -> None:
        self._sub.settle(self._tag)

    def dead_letter(self, reason: str, detail: str = "") -> None:
        headers = dead_letter_headers(self.message.headers, reason, detail)
        self._sub.broker.route(self._sub.dead_letter_exchange, replace(self.message, headers=headers))
        self._sub.settle(self._tag)

    def requeue(self) -> None:
        self._sub.settle(self._tag)
        self._sub.broker.requeue(self._sub.queue, self.message, self._delivered)


class _MemorySubscription(Subscription):
    _tags = itertools.count(1)

    def __init__(self, broker: MemoryBroker, queue: str, prefetch: int, dead_letter_exchange: str) -> None:
        if queue not in broker.queues:
            raise BrokerError(f"no queue {queue!r}")
        self.broker = broker
        self.queue = queue
        self.prefetch = max(1, prefetch)
        self.dead_letter_exchange = dead_letter_exchange
        self.unacked: dict[int, tuple[Message, int]] = {}
        self.closed = False

    def get(self, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + timeout
        with self.broker.cond:
            while True:
                if self.closed:
                    return None
                ready = self.broker.queues[self.queue].ready
                if ready and len(self.unacked) < self.prefetch:
                    message, delivered = ready.popleft()
                    tag = next(self._tags)
                    self.unacked[tag] = (message, delivered + 1)
                    return _MemoryDelivery(self, tag, message, delivered + 1)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.broker.cond.wait(remaining)

    def settle(self, tag: int) -> None:
        with self.broker.cond:
            if self.unacked.pop(tag, None) is None:
                raise DeliveryGone(f"delivery {tag} was already settled or its subscription closed")
            self.broker.cond.notify_all()

    def close(self) -> None:
        with self.broker.cond:
            if self.closed:
                return
            self.closed = True
            pending, self.unacked = self.unacked, {}
            for message, delivered in pending.values():
                self.broker.requeue(self.queue, message, delivered)
            self.broker.cond.notify_all()


class MemoryTransport(Transport):
    """A connection to a MemoryBroker; pass the same broker to every role that should talk."""

    def __init__(self, broker: MemoryBroker, *, user_id: str | None = None) -> None:
        self.broker = broker
        self.user_id = user_id
        self._subs: list[_MemorySubscription] = []

    def declare(self, specs: Sequence[Spec]) -> None:
        for spec in specs:
            self.broker.declare(spec)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        message_id: str | None = None,
        bcc: Sequence[str] = (),
    ) -> None:
        message = Message(
            body=bytes(body),
            headers=dict(headers),
            message_id=message_id,
            routing_key=routing_key,
            user_id=self.user_id,
        )
        if self.broker.route(exchange, message, also=bcc) == 0:
            raise PublishRefused(f"unroutable: no queue bound to {exchange!r} with key {routing_key!r}")

    def subscribe(self, queue: str, *, prefetch: int, dead_letter_exchange: str) -> Subscription:
        sub = _MemorySubscription(self.broker, queue, prefetch, dead_letter_exchange)
        self._subs.append(sub)
        return sub

    def delete(self, specs: Sequence[Spec]) -> None:
        for spec in specs:
            self.broker.delete(spec)

    def queue_depth(self, queue: str) -> int:
        return self.broker.depth(queue)

    def close(self) -> None:
        for sub in self._subs:
            sub.close()
        self._subs.clear()


__all__ = ["BindingSpec", "MemoryBroker", "MemoryTransport"]
