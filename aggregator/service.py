"""The aggregator process: consume updates into rounds, finalise a round under a fenced lease, publish adapters."""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from aggregator.config import AggregatorConfig, build_aggregation, guard, limits
from aggregator.flexlora import RankRequest
from aggregator.joining import join_release
from aggregator.metrics import AggregatorMetrics
from aggregator.participants import client_adapters, participant_means, round_participants
from aggregator.releasing import build_releases, send_release
from aggregator.rounds import (
    GLOBAL_RELEASE,
    Lease,
    RecordResult,
    RoundRecord,
    RoundStore,
    StoredRelease,
)
from aggregator.strategies import ClientMeta
from aggregator.transfers import ChunkIntake
from aggregator.validation import ValidUpdate, validate_update
from broker.errors import BrokerError
from broker.topology import JOIN_ROUTING_KEY, Topology
from broker.transport import Delivery, Subscription, Transport
from schemas.errors import SchemaError
from schemas.messages import HEADER_KEY, parse_join

log = logging.getLogger(__name__)


_T = TypeVar("_T")
OnCommit = Callable[[RoundRecord, dict[str, StoredRelease]], None]


class AggregatorService:
    """Joins a transport and a round store. Any number of these may consume the same federation."""

    def __init__(
        self,
        transport: Transport,
        store: RoundStore,
        config: AggregatorConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_commit: OnCommit | None = None,
        metrics: AggregatorMetrics | None = None,
    ) -> None:
        self.transport = transport
        self.store = store
        self.config = config
        self.topology = Topology(config.federation)
        self.clock = clock
        self.on_commit = on_commit
        self.counters: collections.Counter[str] = collections.Counter()
        self.metrics = metrics or AggregatorMetrics(config.federation)
        self._declared_clients: set[str] = set()
        self._last_republish = 0.0
        self.strategy, self.weighting = build_aggregation(config)
        self._last_step = self.clock()
        self._pins: dict[str, str] = {}
        self.limits, self.guard = limits(config), guard(config)
        self.intake = ChunkIntake(
            store,
            config.federation,
            expiry_s=config.transfer_expiry_s,
            limits=self.limits,
            guard=self.guard,
            pins=self._pins,
        )
        self._last_expiry_check = 0.0

    # --- lifecycle ------------------------------------------------------------------------------
    def setup(self) -> None:
        self.transport.declare(self.topology.core())
        self.publish_pending()

    def subscribe(self) -> Subscription:
        return self.transport.subscribe(
            self.topology.updates_queue,
            prefetch=self.config.prefetch,
            dead_letter_exchange=self.topology.dead_letter_exchange,
        )

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set. Broker errors propagate so the caller can reconnect."""
        self.setup()
        subscription = self.subscribe()
        done = threading.Event()
        # Health goes from its own thread: a long SVD must not make a live aggregator look dead.
        beat = threading.Thread(target=self._health_loop, args=(done,), name="health", daemon=True)
        beat.start()
        try:
            while not stop.is_set():
                self.step(subscription)
                self._last_step = self.clock()
        finally:
            done.set()
            beat.join(timeout=5)
            try:  # leaving on purpose: say so now rather than let the key run out
                self.store.record_health(self.config.owner, self.health_info(), ttl_s=0.001)
            except Exception:
                log.debug("could not clear the health key; it expires by itself", exc_info=True)
            subscription.close()

    def health_info(self) -> str:
        return json.dumps(
            {
                "owner": self.config.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "at": self.clock(),
                "last_step": self._last_step,
                "counters": dict(self.counters),
                # For `flexlora status`: how full the open round is and when its deadline falls.
                "policy": {
                    "max_updates": self.config.policy.max_updates,
                    "min_updates": self.config.policy.min_updates,
                    "deadline_s": self.config.policy.deadline_s,
                },
            },
            sort_keys=True,
        )

    def _health_loop(self, done: threading.Event) -> None:
        while not done.is_set():
            try:
                self.store.record_health(self.config.owner, self.health_info(), ttl_s=3 * self.config.health_every_s)
            except Exception:  # Redis away: the key simply expires, which is the truth
                log.warning("could not record health", exc_info=True)
            done.wait(self.config.health_every_s)

    def step(self, subscription: Subscription) -> None:
        delivery = subscription.get(self.config.poll_s)
        if delivery is not None:
            self.handle(delivery)
        try:
            self.maybe_finalise()
            if self.clock() - self._last_republish >= self.config.republish_every_s:
                self.publish_pending()
            if self.clock() - self._last_expiry_check >= min(5.0, self.config.transfer_expiry_s / 4):
                self._last_expiry_check = self.clock()
                for _ in self.intake.expire(self.clock()):
                    self._refused("incomplete")
        except BrokerError:
            raise  # the caller reconnects
        except Exception:
            # A failed round (Redis away, a bug) must not take the process down: nothing was committed,
            # the lease runs out, and this or another aggregator tries the round again.
            self.counters["round_errors"] += 1
            self.metrics.round_error()
            log.exception("finalising or publishing failed; will retry")
            if self.config.fail_fast:
                raise
            time.sleep(min(5.0, self.config.poll_s * 10))

    # --- ingest ---------------------------------------------------------------------------------
    def handle(self, delivery: Delivery) -> None:
        """Validate, record (idempotently), then ack; refusals go to the dead-letter queue with a reason."""
        if delivery.message.routing_key == JOIN_ROUTING_KEY:
            self.handle_join(delivery)
            return
        try:
            taken = self._retrying(lambda: self._take(delivery))
            if taken is None:
                return
            valid, result = taken
        except SchemaError as exc:
            log.warning("dead-lettering update (%s): %s", exc.reason, exc.detail)
            delivery.dead_letter(exc.reason, exc.detail)
            self._refused(exc.reason)
            return
        except Exception:
            # Not the message's fault (e.g. Redis is away): give it back for a later try. A message that
            # crashes every consumer reaches the queue's delivery limit and is dead-lettered by the broker.
            self.counters["requeued"] += 1
            self.metrics.update("requeued")
            log.exception("could not record an update; requeueing it")
            delivery.requeue()
            if self.config.fail_fast:
                raise
            time.sleep(min(1.0, self.config.poll_s * 5))
            return
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

    def _take(self, delivery: Delivery) -> tuple[ValidUpdate, RecordResult] | None:
        """Validate and record one update (None: a chunk kept, nothing more to do); SchemaError refuses it."""
        if ChunkIntake.is_chunk(delivery.message):
            now = self.clock()
            chunk = self.intake.take(delivery.message, now, self.config.max_staleness, self._check_outlier)
            if chunk.valid is None or chunk.result is None:
                delivery.ack()  # kept in the store (or counted already): the chunk's work is done
                self.metrics.chunk(chunk.state)
                return None
            valid, result = chunk.valid, chunk.result
        else:
            valid = validate_update(
                delivery.message, self.config.federation, self.store, self._pins, self.limits, self.guard
            )
            self._check_outlier(valid)
            result = self.store.record(valid.header, delivery.message.body, self.clock(), self.config.max_staleness)
        if result is RecordResult.RECORDED and self.config.norm_outlier_factor is not None:
            self.store.note_norm(self.store.status().round_id, valid.norm)
        if result is RecordResult.STALE:
            raise SchemaError(
                f"trained from version {valid.header.base_version}, more than {self.config.max_staleness} "
                "versions behind the open round",
                reason="stale",
            )
        if result is RecordResult.REPLAY:
            raise SchemaError(
                f"update id {valid.header.update_id} was counted already with another payload", reason="replay"
            )
        if result is RecordResult.FUTURE:
            raise SchemaError(
                f"claims base version {valid.header.base_version}, which has not been released", reason="version"
            )
        return valid, result

    def _retrying(self, work: Callable[[], _T]) -> _T:
        """Run `work`, retrying while the store is unreachable (a Redis restart) for up to `store_retry_s`,
        holding the message meanwhile: requeueing it would count towards the queue's delivery limit and
        dead-letter sound updates during an outage of a few seconds."""
        deadline = time.monotonic() + self.config.store_retry_s
        wait = 0.1
        while True:
            try:
                return work()
            except self.store.transient_errors as exc:
                if self.config.fail_fast or time.monotonic() + wait > deadline:
                    raise
                self.counters["store_retries"] += 1
                log.warning("round store unreachable (%s); retrying in %.1fs", exc, wait)
                time.sleep(wait)
                wait = min(5.0, wait * 2)

    def _check_outlier(self, valid: ValidUpdate) -> None:
        """Refuse ("norm-outlier") an update whose ‖ΔW‖ is far above the open round's median."""
        factor = self.config.norm_outlier_factor
        if factor is None:
            return
        norms = sorted(self.store.norms(self.store.status().round_id))
        if len(norms) >= 3 and valid.norm > factor * norms[len(norms) // 2]:
            raise SchemaError(
                f"‖ΔW‖ = {valid.norm:.4g} is over {factor:g}× the round's median {norms[len(norms) // 2]:.4g}",
                reason="norm-outlier",
            )

    def handle_join(self, delivery: Delivery) -> None:
        """Send a joining client the newest global adapter at its rank, at once."""
        try:
            request = parse_join(delivery.message.headers.get(HEADER_KEY))
            if request.federation != self.config.federation:
                raise SchemaError(f"join request for federation {request.federation!r}", reason="federation")
            if self.guard is not None:
                self.guard.check(delivery.message, request.client_id)
            release = join_release(self.store, request)
        except SchemaError as exc:
            log.warning("dead-lettering join request (%s): %s", exc.reason, exc.detail)
            delivery.dead_letter(exc.reason, exc.detail)
            self._refused(exc.reason)
            return
        if release is not None:
            self.send_adapter(release)
            log.info(
                "sent %s version %d at rank %d on joining", request.client_id, release.header.version, request.rank
            )
        delivery.ack()
        self.counters["joins"] += 1
        self.metrics.joined()

    def _refused(self, reason: str) -> None:
        """Count a dead-lettered message here and, for `flexlora status`, in the store."""
        self.counters[f"refused:{reason}"] += 1
        self.metrics.refused(reason)
        try:
            self.store.count_refusal(reason)
        except Exception:  # the message is dead-lettered already; a missed count must not stop the service
            log.warning("could not count a refusal in the store", exc_info=True)

    # --- rounds ---------------------------------------------------------------------------------
    def maybe_finalise(self) -> RoundRecord | None:
        status = self.store.status()
        self.metrics.open_round(status.round_id, status.count)
        if not self.config.policy.should_close(status, self.clock()):
            return None
        lease = self.store.acquire(status.round_id, self.config.owner, self.config.lease_s)
        if lease is None:
            return None  # another aggregator is finalising it
        try:
            return self.finalise(lease)
        finally:
            self.store.release_lease(lease)

    def finalise(self, lease: Lease) -> RoundRecord | None:
        started = self.clock()
        recorded = self.store.round_updates(lease.round_id)
        if not recorded:
            return None
        clients = client_adapters(self.store, recorded)
        raw = self.weighting(
            [ClientMeta(i.header.num_samples, lease.round_id - i.header.base_version) for i in recorded]
        )
        weights = [w / sum(raw) for w in raw]
        # A client that sent twice in one round gets its adapter at the rank of its newest update.
        wanted = {item.header.client_id: RankRequest(item.header.rank, item.header.lora_alpha) for item in recorded}
        if self.strategy.name == "flexlora":
            top = max(self.config.global_rank, *(r.rank for r in wanted.values()))
            wanted[GLOBAL_RELEASE] = RankRequest(top, 2.0 * top)
        svd_started = time.perf_counter()
        result = self.strategy.aggregate(clients, weights, list(wanted.values()))
        svd_seconds = time.perf_counter() - svd_started
        version = lease.round_id + 1
        releases = build_releases(
            self.store,
            wanted,
            result.adapters,
            version=version,
            template=recorded[0].header,
            num_updates=len(recorded),
            strategy=self.strategy.name,
            chunk_bytes=self.config.chunk_bytes,
            ttl_s=4 * self.config.lease_s,
        )
        participants = round_participants(recorded, weights, lease.round_id)
        status = self.store.status()
        now = self.clock()
        record = RoundRecord(
            version=version,
            strategy=self.strategy.name,
            participants=participants,
            opened_at=status.opened_at if status.round_id == lease.round_id else None,
            closed_at=now,
            aggregate_seconds=now - started,
            finalised_by=self.config.owner,
            metrics={**result.info, **participant_means(recorded, weights)},
        )
        if not self.store.commit(lease, len(recorded), releases, record, now):
            log.warning("round %d: lease lost before commit; another aggregator owns it now", lease.round_id)
            return None
        log.info(
            "round %d committed: version %d from %d updates in %.2fs",
            lease.round_id,
            version,
            len(recorded),
            record.aggregate_seconds,
        )
        self.counters["rounds"] += 1
        self.metrics.round_committed(
            record.aggregate_seconds, svd_seconds, [p.staleness for p in participants], version
        )
        self.publish_version(version)
        if self.config.keep_versions is not None:
            self.store.prune(before_version=version - self.config.keep_versions + 1)
        if self.on_commit is not None:
            self.on_commit(record, {r.header.client_id: r for r in releases})
        return record

    # --- release --------------------------------------------------------------------------------
    def publish_version(self, version: int) -> None:
        """Publish a committed version's adapters, unless another aggregator holds the claim to do it."""
        if not self.store.claim_publish(version, self.config.owner, self.config.lease_s):
            return
        for client_id, release in sorted(self.store.releases(version).items()):
            if client_id != GLOBAL_RELEASE:
                self.send_adapter(release)
                self.metrics.published()
        self.store.mark_published(version)

    def send_adapter(self, release: StoredRelease) -> None:
        client_id = release.header.client_id
        if client_id not in self._declared_clients:
            self.transport.declare(self.topology.client(client_id))
            self._declared_clients.add(client_id)
        send_release(self.transport, self.topology, self.store, release, chunk_bytes=self.config.chunk_bytes)

    def publish_pending(self) -> None:
        """Publish committed versions whose adapters may not have gone out (their finaliser died)."""
        self._last_republish = self.clock()
        current = self.store.version()
        for version in self.store.unpublished():
            # Only the newest matters to clients; older unpublished versions are superseded.
            if version == current:
                self.publish_version(version)
            else:
                self.store.mark_published(version)
