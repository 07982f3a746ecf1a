"""Every consumed message (an update, a chunk of one, a join request) is handled inside one guard: whatever
goes wrong with one message is that message's failure, never the process's.

A refusal (SchemaError) dead-letters the message with its reason; a bug anywhere below becomes reason
`internal`, with the traceback logged, so a poison message is settled on its first delivery instead of being
redelivered into one aggregator after another. An unreachable round store holds a message (retried until the
store answers), and gives it back only when the process stops (or after `store_retry_s`, if set); only broker
errors leave the guard, for the caller to reconnect.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from aggregator.config import AggregatorConfig
from aggregator.joining import join_release
from aggregator.metrics import AggregatorMetrics
from aggregator.rounds import RecordResult, RoundStore, StoredRelease
from aggregator.security import Guard
from aggregator.transfers import ChunkIntake
from aggregator.validation import (
    Limits,
    ValidUpdate,
    check_message,
    check_pins,
    pin_accepted,
    refuse_conflict,
    validate_update,
)
from broker.errors import BrokerError, PublishRefused
from broker.topology import JOIN_ROUTING_KEY
from broker.transport import Delivery, Message, Subscription, headers_size
from schemas.errors import Reason, SchemaError
from schemas.lora import LoraFactors
from schemas.messages import HEADER_KEY, MAX_HEADERS_BYTES, LoraUpdate, parse_join

log = logging.getLogger(__name__)
_T = TypeVar("_T")
CHECK_AHEAD_THREADS = 2


class Lookahead:
    """The deliveries an aggregator takes ahead of the one it records: what the broker has delivered (up to the
    prefetch) is taken as soon as it is there, and a whole update's store-free checks (sha256, safetensors parsing,
    `Ingest.check_ahead`, which then prepares its bytes in the store) start on threads of their own, so they run
    while the service waits on the store and the broker for the one before. There are CHECK_AHEAD_THREADS: one
    update's bytes are written (and synced) to the payload store while the next is checked. A delivery waiting here
    is unsettled like any other in flight, and goes back to the queue when its subscription closes."""

    def __init__(self, ingest: Ingest, depth: int) -> None:
        self.ingest, self.depth = ingest, max(1, depth)
        self._checking = ThreadPoolExecutor(CHECK_AHEAD_THREADS, thread_name_prefix="check-ahead")
        self._ahead: collections.deque[tuple[Delivery, Future[ValidUpdate] | None]] = collections.deque()
        self._of: Subscription | None = None

    def next(self, subscription: Subscription, timeout: float) -> tuple[Delivery | None, Future[ValidUpdate] | None]:
        """The next delivery to handle (None after `timeout` seconds without one), with its checks started."""
        if self._of is not subscription:  # those of a closed subscription went back to the queue with it
            self._ahead.clear()
            self._of = subscription
        if not self._ahead:
            first = subscription.get(timeout)
            if first is None:
                return None, None
            self._ahead.append(self._start(first))
        while len(self._ahead) < self.depth and (more := subscription.get(0)) is not None:
            self._ahead.append(self._start(more))
        return self._ahead.popleft()

    def close(self) -> None:
        """Forget what waits here (its subscription closes, handing it back) and stop checking."""
        self._ahead.clear()
        self._checking.shutdown(wait=False, cancel_futures=True)

    def _start(self, delivery: Delivery) -> tuple[Delivery, Future[ValidUpdate] | None]:
        if not self.ingest.checks_ahead(delivery.message):
            return delivery, None
        return delivery, self._checking.submit(self.ingest.check_ahead, delivery.message)


class Ingest:
    """Validates and records what the updates queue delivers; `counters` is the service's own."""

    def __init__(
        self,
        store: RoundStore,
        config: AggregatorConfig,
        *,
        limits: Limits,
        guard: Guard | None,
        intake: ChunkIntake,
        pins: dict[str, str],
        counters: collections.Counter[str],
        metrics: AggregatorMetrics,
        clock: Callable[[], float],
        answer_join: Callable[[StoredRelease], None],
        tell_refused: Callable[[Message, str, str], None] = lambda message, reason, detail: None,
        recorded: Callable[[LoraUpdate, Mapping[str, LoraFactors]], None] = lambda header, factors: None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.config = config
        self.limits = limits
        self.guard = guard
        self.intake = intake
        self.pins = pins
        self.counters = counters
        self.metrics = metrics
        self.clock = clock
        self.answer_join = answer_join
        self.tell_refused = tell_refused  # a notice in the sender's mailbox for each update dead-lettered
        self.recorded = recorded  # told of every update this process recorded, with its validated factors
        self.stopping = stopping  # the process is asked to stop: give back what the store cannot take now

    def checks_ahead(self, message: Message) -> bool:
        """Whether `check_ahead` applies to this message: a whole update (not a join, nor a chunk of one)."""
        return message.routing_key != JOIN_ROUTING_KEY and not ChunkIntake.is_chunk(message)

    def check_ahead(self, message: Message) -> ValidUpdate:
        """The checks of a whole update that need no store (aggregator.validation.check_message), on any thread: the
        service runs them for the deliveries waiting behind the one it records. `handle` then takes the result (or
        the refusal this raises) and finishes with the federation's pins. A sound update is then prepared in the
        store (RoundStore.prepare: its bytes written where `record` will name them), off the service's thread."""
        _check_headers_size(message)
        valid = check_message(message, self.config.federation, self.limits, self.guard)
        # valid.pins makes (and caches) the module shapes here, not on the service's thread. Facts that differ from
        # those this process knows pinned are refused there (check_pins): none of such an update's bytes are kept.
        if any(self.pins.get(name, value) != value for name, value in valid.pins.items()):
            return valid
        try:
            self.store.prepare(valid.header, message.body)
        except self.store.transient_errors:  # `record` writes what was not prepared (and retries while it must)
            log.info("could not prepare update %s ahead; recording writes it", valid.header.update_id[:8])
        return valid

    def handle(self, delivery: Delivery, checked: Future[ValidUpdate] | None = None) -> None:
        """Settle one delivery: ack it once its effect is recorded, dead-letter it with a reason, or (the store
        being unreachable) give it back. Never raises but for broker errors (and, with fail_fast, bugs).
        `checked`: `check_ahead` of this delivery's message, run already (or running) on another thread."""
        kind = "join request" if delivery.message.routing_key == JOIN_ROUTING_KEY else "update"
        try:
            _check_headers_size(delivery.message)
            if kind == "update":
                self._update(delivery, checked)
            else:
                self._join(delivery)
        except BrokerError:
            raise  # the caller reconnects; an unsettled delivery comes back to some consumer
        except SchemaError as exc:
            log.warning("dead-lettering %s (%s): %s", kind, exc.reason, exc.detail)
            self._dead_letter(delivery, exc.reason, exc.detail, kind == "update")
        except self.store.transient_errors:
            # Not the message's fault, and held while the process could: give it back for a later try.
            self.counters["requeued"] += 1
            self.metrics.update("requeued")
            log.exception("could not record a %s; requeueing it", kind)
            delivery.requeue()
            if self.config.fail_fast:
                raise
            time.sleep(min(1.0, self.config.poll_s * 5))
        except Exception as exc:
            log.exception("handling a %s failed; dead-lettering it as internal", kind)
            self._dead_letter(delivery, Reason.INTERNAL, f"{type(exc).__name__}: {exc}", kind == "update")
            if self.config.fail_fast:
                raise

    def _dead_letter(self, delivery: Delivery, reason: str, detail: str, tell: bool = False) -> None:
        delivery.dead_letter(reason, detail)
        self.refused(reason)
        if tell:
            try:
                self.tell_refused(delivery.message, reason, detail)
            except Exception:  # a notice is best effort: the dead letter is the record
                log.warning("could not tell the sender of a refused update", exc_info=True)

    def refused(self, reason: str) -> None:
        """Count a dead-lettered message here and, for `flexlora status`, in the store."""
        self.counters[f"refused:{reason}"] += 1
        self.metrics.refused(reason)
        try:
            self.store.count_refusal(reason)
        except Exception:  # the message is dead-lettered already; a missed count must not stop the service
            log.warning("could not count a refusal in the store", exc_info=True)

    # --- updates --------------------------------------------------------------------------------------------
    def _update(self, delivery: Delivery, checked: Future[ValidUpdate] | None) -> None:
        taken = self._retrying(lambda: self._take(delivery, checked))
        if taken is None:
            return
        valid, result = taken
        delivery.ack()
        outcome = "accepted" if result is RecordResult.RECORDED else "duplicate"
        self.counters[outcome] += 1
        self.metrics.update(outcome)
        if result is RecordResult.RECORDED:
            self.metrics.queue_lag(self.clock() - valid.header.created_at.timestamp())
        log.info(
            "%s update %s from %s (rank %d, base v%d)",
            result.value,
            valid.header.update_id[:8],
            valid.header.client_id,
            valid.header.rank,
            valid.header.base_version,
        )

    def _take(
        self, delivery: Delivery, checked: Future[ValidUpdate] | None = None
    ) -> tuple[ValidUpdate, RecordResult] | None:
        """Validate and record one update (None: a chunk kept, nothing more to do); SchemaError refuses it."""
        if ChunkIntake.is_chunk(delivery.message):
            chunk = self.intake.take(delivery.message, self.clock(), self.config.max_staleness, self.check_outlier)
            if chunk.valid is None or chunk.result is None:
                delivery.ack()  # kept in the store (or counted already): the chunk's work is done
                self.metrics.chunk(chunk.state)
                return None
            valid, result = chunk.valid, chunk.result
        else:
            if checked is None:
                valid = validate_update(
                    delivery.message, self.config.federation, self.store, self.pins, self.limits, self.guard
                )
            else:
                valid = checked.result()  # raises its refusal (or error) here, as validate_update would
                check_pins(self.store, valid, self.pins)
            self.check_outlier(valid)
            result = self.store.record(
                valid.header, delivery.message.body, self.clock(), self.config.max_staleness, valid.pins
            )
        if result is RecordResult.RECORDED:
            self.recorded(valid.header, valid.factors)
            pin_accepted(valid, self.pins)
            if self.config.norm_outlier_factor is not None:
                self.store.note_norm(self.store.status().round_id, valid.norm)
        if result is RecordResult.STALE:
            raise SchemaError(
                f"trained from version {valid.header.base_version}, more than {self.config.max_staleness} "
                "versions behind the open round",
                reason=Reason.STALE,
            )
        if result is RecordResult.REPLAY:
            raise SchemaError(
                f"update id {valid.header.update_id} was counted already with another payload", reason=Reason.REPLAY
            )
        if result is RecordResult.CONFLICT:
            raise refuse_conflict(self.store, valid, self.pins)
        if result is RecordResult.FUTURE:
            raise SchemaError(
                f"claims base version {valid.header.base_version}, which has not been released", reason=Reason.VERSION
            )
        return valid, result

    def _retrying(self, work: Callable[[], _T]) -> _T:
        """Run `work`, retrying while the store is unreachable (a Redis restart, a failover), holding the message
        meanwhile: for as long as the outage lasts (`store_retry_s` None), or up to `store_retry_s`. Giving it
        back counts towards the updates queue's delivery limit, so an outage longer than five give-backs would
        dead-letter sound updates: a device's work lost to a Redis outage. A process asked to stop gives it back
        at once (another aggregator, or this one restarted, records it)."""
        limit = self.config.store_retry_s
        deadline = math.inf if limit is None else time.monotonic() + limit
        wait = 0.1
        while True:
            try:
                return work()
            except self.store.transient_errors as exc:
                if self.config.fail_fast or self.stopping() or time.monotonic() + wait > deadline:
                    raise
                self.counters["store_retries"] += 1
                log.warning("round store unreachable (%s); retrying in %.1fs", exc, wait)
                time.sleep(wait)
                wait = min(5.0, wait * 2)

    def check_outlier(self, valid: ValidUpdate) -> None:
        """Refuse ("norm-outlier") an update whose ‖ΔW‖ is far above the open round's median."""
        factor = self.config.norm_outlier_factor
        if factor is None:
            return
        norms = sorted(self.store.norms(self.store.status().round_id))
        if len(norms) >= 3 and valid.norm > factor * norms[len(norms) // 2]:
            if self.store.counted(valid.header.client_id, valid.header.update_id):
                return  # a redelivery of an update counted already: recording it finds it a duplicate, whatever
                # the round's median has become since (refused here, its client was told a counted one was refused)
            raise SchemaError(
                f"‖ΔW‖ = {valid.norm:.4g} is over {factor:g}× the round's median {norms[len(norms) // 2]:.4g}",
                reason=Reason.NORM_OUTLIER,
            )

    # --- joins ----------------------------------------------------------------------------------------------
    def _join(self, delivery: Delivery) -> None:
        """Send a joining client the newest global adapter at its rank, at once, into the mailbox it has: a join
        never creates one (`answer_join` only publishes), so joins for invented client ids leave no queues
        behind. A client declares its own mailbox before it joins, or `flexlora provision` did; the aggregators
        declare one only for a client whose update a round counted."""
        request = parse_join(delivery.message.headers.get(HEADER_KEY))
        if request.federation != self.config.federation:
            raise SchemaError(f"join request for federation {request.federation!r}", reason=Reason.FEDERATION)
        if self.guard is not None:
            self.guard.check(delivery.message, request.client_id)
        release = self._retrying(lambda: join_release(self.store, request, self.limits))
        if release is not None:
            try:
                self.answer_join(release)
            except PublishRefused as exc:  # unroutable: no queue is bound for this client id
                raise SchemaError(
                    f"client {request.client_id!r} has no mailbox to answer into (joins never create one): {exc}",
                    reason=Reason.NO_MAILBOX,
                ) from exc
            log.info(
                "sent %s version %d at rank %d on joining", request.client_id, release.header.version, request.rank
            )
        delivery.ack()
        self.counters["joins"] += 1
        self.metrics.joined()


def _check_headers_size(message: Message) -> None:
    size = headers_size(message.headers)
    if size > MAX_HEADERS_BYTES:
        reason = Reason.HEADER_SIZE
        raise SchemaError(f"headers take {size} bytes, over the limit of {MAX_HEADERS_BYTES}", reason=reason)
