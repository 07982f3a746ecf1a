"""The RabbitMQ transport over pika: one I/O thread owns the connection, work runs on the callers' threads."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils import io_services_utils
from pika.spec import Basic, BasicProperties

from broker.errors import BrokerError, ConnectionLost, DeliveryGone, PublishRefused
from broker.tls import TlsFiles
from broker.topology import BindingSpec, ExchangeSpec, QueueSpec, Spec
from broker.transport import Delivery, Message, Subscription, Transport, dead_letter_headers
from schemas.messages import REASON_KEY

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_names = itertools.count(1)

# pika 1.4 reads a socket 4 KiB at a time and appends each read to its frame buffer, an immutable bytes that is
# copied whole on every append: a 128 KiB frame costs 32 reads and ~2 MB of copying, under the GIL. Reading 256
# KiB at a time (a whole frame, or two) takes about a third of the CPU for the same bytes (bench/pika_reads.py),
# which an aggregator sharing its process with other threads needs. Set on pika's transport class, once, for
# every connection of this process; a pika without these attributes is left as it is.
PIKA_READ_BYTES = 256 * 1024
PIKA_READS_PER_EVENT = 4


def read_in_large_pieces() -> bool:
    """Make pika read PIKA_READ_BYTES per socket read (up to PIKA_READS_PER_EVENT reads each time the socket is
    readable); False where this pika has no such setting."""
    base = getattr(io_services_utils, "_AsyncTransportBase", None)
    if base is None or not hasattr(base, "_MAX_RECV_BYTES") or not hasattr(base, "_MAX_CONSUME_BYTES"):
        return False
    base._MAX_RECV_BYTES = max(base._MAX_RECV_BYTES, PIKA_READ_BYTES)
    base._MAX_CONSUME_BYTES = max(base._MAX_CONSUME_BYTES, PIKA_READ_BYTES * PIKA_READS_PER_EVENT)
    return True


read_in_large_pieces()


def _header_text(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """Keep the string headers; RabbitMQ's own tables (x-death) are summarised, not passed on raw."""
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, bytes):
            out[key] = value.decode("utf-8", "replace")
    # The broker's own dead-lettering (delivery limit, expiry) names its reason here; surface it the same way.
    first_death = out.get("x-first-death-reason")
    if first_death is not None:
        out.setdefault(REASON_KEY, first_death)
    return out


def _parameters(
    url: str, heartbeat: int, connection_name: str, tls: TlsFiles | None
) -> tuple[pika.URLParameters, str | None]:
    """pika's parameters for one broker address, and the user its messages say they come from."""
    parts = urllib.parse.urlsplit(url)
    external = tls is not None and tls.cert_file is not None and parts.password is None
    if external:
        # No password: the device logs in by its certificate (EXTERNAL). A user name in the URL (which must be
        # the certificate's common name) is still what its messages say they come from; pika cannot parse a user
        # without a password, so it is taken out of the URL here.
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    params = pika.URLParameters(url)
    if url.startswith("amqps://"):
        # Verified against the given CA (or the system's), host name included; pika's own default for amqps://
        # does not check the host name.
        params.ssl_options = pika.SSLOptions((tls or TlsFiles()).context(), server_hostname=params.host)
    elif tls is not None:
        raise BrokerError("TLS files were given but the broker URL is amqp://; use amqps:// to encrypt")
    user_id: str | None = params.credentials.username or None
    if external:
        user_id = urllib.parse.unquote(parts.username) if parts.username else None
        params.credentials = pika.credentials.ExternalCredentials()
    params.heartbeat = heartbeat
    params.client_properties = {"connection_name": connection_name}
    return params, user_id


class RabbitMQTransport(Transport):
    """A pika BlockingConnection driven by its own thread, so heartbeats flow while callers train or run SVDs.

    pika connections are not thread-safe; every channel operation is handed to the I/O thread with
    `add_callback_threadsafe` and its result (or error) comes back through a Future.
    """

    def __init__(
        self,
        url: str,
        *,
        heartbeat: int = 30,
        connection_name: str = "flexlora",
        call_timeout: float = 60.0,
        tls: TlsFiles | None = None,
    ) -> None:
        # Several addresses (of one cluster), separated by commas or spaces: tried in turn, on every (re)connect.
        urls = [u for u in url.replace(",", " ").split() if u]
        if not urls:
            raise BrokerError("no broker URL given")
        self.candidates = [_parameters(u, heartbeat, connection_name, tls) for u in urls]
        self.params, self.user_id = self.candidates[0][0], self.candidates[0][1]
        self.call_timeout = call_timeout
        self._conn: pika.BlockingConnection | None = None
        self._publish_channel: BlockingChannel | None = None
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name=f"amqp-io-{next(_names)}", daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout=call_timeout)
        except FutureTimeout as exc:
            self._stopping.set()
            where = ", ".join(f"{p.host}:{p.port}" for p, _ in self.candidates)
            raise ConnectionLost(f"timed out connecting to {where}") from exc

    # --- the I/O thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._conn = pika.BlockingConnection([p for p, _ in self.candidates])
            # Which address answered (pika keeps it on the connection it wraps): its user is who messages come from.
            connected = getattr(getattr(self._conn, "_impl", None), "params", None)
            self.user_id = next((u for p, u in self.candidates if p is connected), self.user_id)
            self._publish_channel = self._conn.channel()
            self._publish_channel.confirm_delivery()
        except Exception as exc:
            converted = _convert(exc)
            if isinstance(converted, ConnectionLost):  # say where, and why (pika's own str() is often empty)
                where = ", ".join(f"{p.host}:{p.port}" for p, _ in self.candidates)
                converted = ConnectionLost(f"cannot connect to the broker at {where}: {_reason(exc)}")
            self._ready.set_exception(converted)
            return
        self._ready.set_result(None)
        try:
            while not self._stopping.is_set():
                self._conn.process_data_events(time_limit=0.2)
        except Exception as exc:
            self._error = _convert(exc)
            log.warning("AMQP connection lost: %s", exc)
        finally:
            if self._conn.is_open:
                try:
                    self._conn.close()
                except Exception:  # closing a half-dead connection can fail in many ways; it is gone either way
                    log.debug("error while closing the AMQP connection", exc_info=True)

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the I/O thread and return its result, re-raising its error as a BrokerError."""
        if threading.current_thread() is self._thread:
            return fn()
        self._check()
        assert self._conn is not None
        future: Future[_T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(_convert(exc))

        try:
            self._conn.add_callback_threadsafe(run)
        except Exception as exc:
            raise _convert(exc) from exc
        remaining = self.call_timeout
        while True:
            try:
                return future.result(timeout=min(remaining, 0.5))
            except FutureTimeout:
                remaining -= 0.5
                self._check()
                if remaining <= 0:
                    future.cancel()
                    raise ConnectionLost("the AMQP I/O thread did not answer in time") from None

    def _post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the I/O thread, after everything asked of it before, without waiting for it."""
        if threading.current_thread() is self._thread:
            fn()
            return
        self._check()
        assert self._conn is not None
        try:
            self._conn.add_callback_threadsafe(fn)
        except Exception as exc:
            raise _convert(exc) from exc

    def _check(self) -> None:
        if self._error is not None:
            raise ConnectionLost(str(self._error)) from self._error
        if not self._thread.is_alive():
            raise ConnectionLost("the AMQP connection is closed")

    @property
    def is_open(self) -> bool:
        return self._error is None and self._thread.is_alive()

    # --- the contract ---------------------------------------------------------------------------
    def declare(self, specs: Sequence[Spec]) -> None:
        def run() -> None:
            assert self._conn is not None
            # A failed declare closes its channel, so declarations get a channel of their own.
            channel = self._conn.channel()
            try:
                for spec in specs:
                    if isinstance(spec, ExchangeSpec):
                        channel.exchange_declare(spec.name, exchange_type=spec.type, durable=True)
                    elif isinstance(spec, QueueSpec):
                        channel.queue_declare(spec.name, durable=True, arguments=dict(spec.arguments))
                    elif isinstance(spec, BindingSpec):
                        channel.queue_bind(spec.queue, spec.exchange, routing_key=spec.routing_key)
            finally:
                if channel.is_open:
                    channel.close()

        self._call(run)

    def _properties(
        self, headers: Mapping[str, str], message_id: str | None, bcc: Sequence[str] = ()
    ) -> BasicProperties:
        # BCC: RabbitMQ routes the message by these keys too and strips the header before delivering it.
        routing: dict[str, Any] = {"BCC": list(bcc)} if bcc else {}
        return BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/vnd.safetensors",
            headers={**headers, **routing},
            message_id=message_id,
            # RabbitMQ refuses a user_id that differs from the connection's user, so it is trustworthy.
            user_id=self.user_id,
        )

    def _publish_now(self, exchange: str, routing_key: str, body: bytes, properties: BasicProperties) -> None:
        assert self._conn is not None
        if self._publish_channel is None or not self._publish_channel.is_open:
            self._publish_channel = self._conn.channel()
            self._publish_channel.confirm_delivery()
        self._publish_channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)

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
        properties = self._properties(headers, message_id, bcc)
        self._call(lambda: self._publish_now(exchange, routing_key, body, properties))

    def subscribe(self, queue: str, *, prefetch: int, dead_letter_exchange: str) -> Subscription:
        return _RabbitSubscription(self, queue, prefetch, dead_letter_exchange)

    def delete(self, specs: Sequence[Spec]) -> None:
        def run() -> None:
            assert self._conn is not None
            channel = self._conn.channel()
            try:
                for spec in specs:
                    if isinstance(spec, QueueSpec):
                        channel.queue_delete(spec.name)
                    elif isinstance(spec, ExchangeSpec):
                        channel.exchange_delete(spec.name)
            finally:
                if channel.is_open:
                    channel.close()

        self._call(run)

    def queue_depth(self, queue: str) -> int:
        def run() -> int:
            assert self._conn is not None
            channel = self._conn.channel()
            try:
                result = channel.queue_declare(queue, passive=True)
                return int(result.method.message_count)
            finally:
                if channel.is_open:
                    channel.close()

        return self._call(run)

    def close(self) -> None:
        if self._conn is not None and self._thread.is_alive() and threading.current_thread() is not self._thread:
            # What was handed to the I/O thread without waiting (acks) goes out before the connection closes; a
            # wedged thread is not waited for longer than the join below would.
            flushed = threading.Event()
            try:
                self._post(flushed.set)
            except BrokerError:
                log.debug("the connection was gone before closing", exc_info=True)
            else:
                flushed.wait(timeout=10)
        self._stopping.set()
        if self._conn is not None and self._thread.is_alive():
            try:
                self._conn.add_callback_threadsafe(lambda: None)  # wake the loop so it sees the flag
            except Exception:
                log.debug("connection already closed", exc_info=True)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)


class _RabbitDelivery(Delivery):
    def __init__(self, sub: _RabbitSubscription, channel: BlockingChannel, tag: int, message: Message) -> None:
        self.message = message
        self._sub = sub
        self._channel = channel
        self._tag = tag

    def _settle(self, action: Callable[[], None]) -> None:
        def run() -> None:
            if not self._channel.is_open:
                raise DeliveryGone("the channel closed; the broker will redeliver this message")
            action()

        self._sub.transport._call(run)

    def ack(self) -> None:
        """Handed to the I/O thread without waiting for it: acks go out in the order they were made, ahead of
        anything asked of the connection later (closing the subscription included), and an ack has no reply
        to wait for. Waiting for the I/O thread to take it was a fifth of an ingesting aggregator's time
        (py-spy, 800 queued updates). An ack that finds its channel closed is not sent (the broker redelivers
        the message, and recording it again is a no-op); the subscription says so at its next `get`."""
        self._sub.ack_later(self._channel, self._tag)

    def dead_letter(self, reason: str, detail: str = "") -> None:
        transport = self._sub.transport
        headers = dead_letter_headers(self.message.headers, reason, detail)
        properties = transport._properties(headers, self.message.message_id)

        def run() -> None:
            # Publish (confirmed) before the ack: a crash between the two duplicates, never loses.
            transport._publish_now(
                self._sub.dead_letter_exchange, self.message.routing_key, self.message.body, properties
            )
            self._channel.basic_ack(self._tag)

        self._settle(run)

    def requeue(self) -> None:
        self._settle(lambda: self._channel.basic_nack(self._tag, requeue=True))


class _RabbitSubscription(Subscription):
    def __init__(self, transport: RabbitMQTransport, queue_name: str, prefetch: int, dead_letter_exchange: str):
        self.transport = transport
        self.dead_letter_exchange = dead_letter_exchange
        self._inbox: queue.Queue[Delivery] = queue.Queue()

        def start() -> BlockingChannel:
            assert transport._conn is not None
            channel = transport._conn.channel()
            channel.basic_qos(prefetch_count=max(1, prefetch))
            channel.basic_consume(queue_name, self._on_message, auto_ack=False)
            return channel

        self._channel = transport._call(start)
        self._lost: str | None = None  # why an ack sent without waiting could not be sent (None: all were)

    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes
    ) -> None:
        message = Message(
            body=body,
            headers=_header_text(properties.headers),
            message_id=properties.message_id,
            routing_key=method.routing_key or "",
            redelivered=bool(method.redelivered),
            user_id=properties.user_id,
        )
        assert method.delivery_tag is not None
        self._inbox.put(_RabbitDelivery(self, channel, method.delivery_tag, message))

    def get(self, timeout: float) -> Delivery | None:
        self._check()
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            self.transport._check()
            self._check()
            return None

    def _check(self) -> None:
        """Raise DeliveryGone once this subscription's channel is closed (by the broker: a refused ack, say) or an
        ack could not be sent: what it held unsettled goes back to the queue, so the consumer subscribes again."""
        if self._lost is not None:
            raise DeliveryGone(self._lost)
        if not self._channel.is_open:
            raise DeliveryGone("the subscription's channel closed; the broker will redeliver its unsettled messages")

    def ack_later(self, channel: BlockingChannel, tag: int) -> None:
        """Queue `basic_ack(tag)` on the I/O thread (see _RabbitDelivery.ack); errors there are kept for `get`."""
        self._check()

        def run() -> None:
            if not channel.is_open:
                self._lost = "the channel closed before an ack was sent; the broker will redeliver that message"
                return
            try:
                channel.basic_ack(tag)
            except Exception as exc:  # never out of the I/O loop, which would take the whole connection down
                self._lost = f"an ack could not be sent: {type(exc).__name__}: {exc}"

        self.transport._post(run)

    def close(self) -> None:
        def run() -> None:
            # Closing the channel hands every unacked delivery back to the queue.
            if self._channel.is_open:
                self._channel.close()

        if self.transport.is_open:
            try:
                self.transport._call(run)
            except BrokerError:
                log.debug("subscription channel already gone", exc_info=True)


def _convert(exc: BaseException) -> BaseException:
    """Third-party errors become ours at the boundary; ours pass through."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, pika.exceptions.UnroutableError):
        return PublishRefused(f"unroutable: {exc}")
    if isinstance(exc, pika.exceptions.NackError):
        return PublishRefused(f"nacked by the broker: {exc}")
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return BrokerError(f"channel closed by the broker: {exc.reply_code} {exc.reply_text}")
    if isinstance(exc, (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionWrongStateError, OSError)):
        return ConnectionLost(_reason(exc))
    if isinstance(exc, pika.exceptions.AMQPError):
        return BrokerError(_reason(exc))
    return exc


def _reason(exc: BaseException) -> str:
    """An error in words: many of pika's say nothing in str() (a refused connection: ""), only in repr()."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
