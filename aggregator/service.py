"""The aggregator process: consume updates into rounds, finalise a round under a fenced lease, publish adapters."""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from aggregator.config import AggregatorConfig, build_aggregation, guard, limits
from aggregator.culprits import REASON as REFUSED_AGGREGATION
from aggregator.culprits import drop_culprits
from aggregator.flexlora import ClientAdapter
from aggregator.folding import Folded, RoundFolder
from aggregator.held import HeldUpdates
from aggregator.ingest import Ingest, Lookahead
from aggregator.joining import global_adapter
from aggregator.metrics import AggregatorMetrics
from aggregator.participants import client_adapters, participant_means, round_participants
from aggregator.planning import Private, RoundInput, aggregate_round, fold_coefficients, round_weights
from aggregator.privacy import BudgetExhausted, epsilon
from aggregator.publishing import Publisher, committed_releases
from aggregator.releasing import build_releases, release_template
from aggregator.rounds import (
    Lease,
    RecordedUpdate,
    RoundRecord,
    RoundStore,
    StoredRelease,
    record_id,
)
from aggregator.strategies import FlexLoRA
from aggregator.transfers import ChunkIntake
from broker.errors import BrokerError
from broker.topology import Topology
from broker.transport import Delivery, Subscription, Transport
from schemas.errors import Reason
from schemas.lora import LoraFactors
from schemas.messages import LoraUpdate, PrivacySpent

log = logging.getLogger(__name__)
# How often `step` reads the open round's status while the updates this process recorded cannot have filled it:
# a round that others' updates (or a deadline) close closes at most this much later.
STATUS_EVERY_S = 0.05


@dataclass(frozen=True)
class _StatusRead:
    at: float  # time.monotonic() of the read
    count: int  # the open round's updates then
    accepted: int  # this process's updates accepted until then


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
        self.publisher = Publisher(
            transport,
            store,
            self.topology,
            self.metrics,
            owner=config.owner,
            chunk_bytes=config.chunk_bytes,
            claim_s=config.lease_s,
            require_identity=config.require_identity,
        )
        self._last_republish = 0.0
        self._privacy_refused: str | None = None  # why the open round may not commit (its ε would pass the budget)
        self._privacy_refused_round: int | None = None
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
            max_open=(config.max_transfers_per_client, config.max_transfers),
        )
        self._last_expiry_check = 0.0
        # What this process recorded, kept decoded so that finalising a round reads back only the others'.
        self.held = HeldUpdates(config.hold_bytes)
        # …and folded into the open round's dense sum, so that closing it is an SVD (aggregator.folding).
        dense = isinstance(self.strategy, FlexLoRA) and config.privacy is None
        self.folder = RoundFolder(
            config.fold_bytes if dense else 0,
            self.weighting,
            self.strategy.work_dtype if isinstance(self.strategy, FlexLoRA) else torch.float64,
            config.policy.max_updates,
        )
        self._open_round_id = 0
        self._status_read = _StatusRead(time.monotonic() - STATUS_EVERY_S, 0, 0)
        self._stop = threading.Event()  # run()'s: set when the process is asked to stop
        self.ingest = Ingest(
            store,
            config,
            limits=self.limits,
            guard=self.guard,
            intake=self.intake,
            pins=self._pins,
            counters=self.counters,
            metrics=self.metrics,
            clock=clock,
            answer_join=self.publisher.answer_join,
            tell_refused=self.publisher.tell_refused,
            recorded=self._recorded,
            stopping=lambda: self._stop.is_set(),
        )
        self.lookahead = Lookahead(self.ingest, config.prefetch)

    def _recorded(self, header: LoraUpdate, factors: Mapping[str, LoraFactors]) -> None:
        self.held.hold(header, factors, self._open_round_id)
        self.folder.add(header, factors, self._open_round_id)

    # --- lifecycle ------------------------------------------------------------------------------
    def setup(self) -> None:
        self.store.check_payload_store()  # PayloadStoreMismatch: this process must not serve the federation
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
        self._stop = stop
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
            subscription.close()  # hands back every unsettled delivery, those waiting in the lookahead too
            self.lookahead.close()
            self.folder.close()  # its sums go with it (a reconnect builds a new service)
            self.publisher.close()

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
                # Why the open round is not committed, when privacy forbids it (`flexlora status` says so).
                "privacy_refused": self._privacy_refused,
                # The round sum this process is folding (aggregator.folding): lost, not wrong, if it dies.
                "fold": self.folder.holding(),
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
        delivery, checked = self.lookahead.next(subscription, self.config.poll_s)
        if delivery is not None:
            self.ingest.handle(delivery, checked)
        try:
            if self._status_due():
                self.maybe_finalise()
            if self.clock() - self._last_republish >= self.config.republish_every_s:
                self.publish_pending()
            if self.clock() - self._last_expiry_check >= min(5.0, self.config.transfer_expiry_s / 4):
                self._last_expiry_check = self.clock()
                for _ in self.intake.expire(self.clock()):
                    self._refused(Reason.INCOMPLETE)
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
        self.ingest.handle(delivery)

    def _refused(self, reason: str) -> None:
        self.ingest.refused(reason)

    # --- rounds ---------------------------------------------------------------------------------
    def _status_due(self) -> bool:
        """Whether `step` reads the open round's status now: when the round was full at the last read, or the
        updates this process recorded since may have filled it (so one aggregator closes its round at the update
        that fills it), and otherwise every STATUS_EVERY_S (others' updates, deadlines). Reading it after every
        update was a quarter of an ingesting aggregator's time (a Redis round trip each)."""
        last = self._status_read
        if last.count + self.counters["accepted"] - last.accepted >= self.config.policy.max_updates:
            return True
        return time.monotonic() - last.at >= STATUS_EVERY_S

    def maybe_finalise(self) -> RoundRecord | None:
        status = self.store.status()
        self._status_read = _StatusRead(time.monotonic(), status.count, self.counters["accepted"])
        self.metrics.open_round(status.round_id, status.count)
        if status.round_id != self._open_round_id:
            self._open_round_id = status.round_id
            self.held.forget_before(status.round_id)
        if not self.config.policy.should_close(status, self.clock()):
            return None
        if self._privacy_refused_round == status.round_id:
            return None  # the budget and the history it was judged on cannot change in this process's life
        lease = self.store.acquire(status.round_id, self.config.owner, self.config.lease_s)
        if lease is None:
            return None  # another aggregator is finalising it
        try:
            spent = self.privacy_after_round()
        except BudgetExhausted as exc:
            # Not committed, nothing dropped: the round's updates stay recorded; the federation waits for a
            # larger budget (a restart with another --dp-epsilon-budget) or stops here.
            self.store.release_lease(lease)
            self._privacy_refused, self._privacy_refused_round = str(exc), status.round_id
            self.counters["privacy_refusals"] += 1
            self.metrics.privacy_refused()
            log.error("round %d not committed: %s", status.round_id, exc)
            return None
        not_the_round: tuple[type[BaseException], ...] = (BrokerError, OSError, *self.store.transient_errors)
        try:
            return self.finalise(lease, spent)
        except not_the_round:
            raise
        except Exception:
            # Not Redis, not the broker: an update the round cannot aggregate. Drop it (refused, "aggregation")
            # rather than fail the round every few seconds forever; with none to blame, retry as before.
            c = self.config
            dropped = drop_culprits(
                self.store,
                self.transport,
                self.topology,
                self.strategy,
                lease,
                c.global_rank,
                c.recipe,
                c.server_lr,
            )
            for _ in dropped:
                self._refused(REFUSED_AGGREGATION)
            if not dropped:
                raise
            log.exception("round %d failed; dropped %d update(s) it cannot aggregate", lease.round_id, len(dropped))
            return None
        finally:
            self.store.release_lease(lease)

    def _round_inputs(
        self, round_id: int, folded: Folded | None
    ) -> tuple[list[RecordedUpdate], list[RoundInput], Folded | None, int]:
        """The round's updates as aggregation takes them, the fold if it applies, and how many were read back
        from the store. Held updates are not read, nor folded ones (their factors are not needed) unless the
        fold turns out not to apply; what is held or folded stands only for the update id and sha256 recorded."""
        skip = self.held.ids() | (set(folded.updates) if folded is not None else set())
        recorded = self.store.round_updates(round_id, held=skip)
        held: dict[str, Mapping[str, LoraFactors]] = {}
        unread: set[str] = set()
        for item in recorded:
            if item.payload is None:
                rid = record_id(item.header.client_id, item.header.update_id)
                if (factors := self.held.take(item.header)) is not None:
                    held[rid] = factors
                else:
                    unread.add(rid)
        if folded is not None:
            named = {record_id(i.header.client_id, i.header.update_id): i.header.payload.sha256 for i in recorded}
            if any(named.get(rid) != entry.sha256 for rid, entry in folded.updates.items()):
                folded = None  # it holds an update this round does not count (or another payload under its id)
        if folded is not None and not unread <= set(folded.updates):
            folded = None
        inputs = None
        if folded is not None:
            inputs = self._inputs(recorded, held, folded)
            weights = round_weights(self.weighting, inputs, round_id, self.config.max_weight_share)
            if fold_coefficients(self.strategy, folded, inputs, weights) is None:
                folded = None
        if folded is None and unread:
            # An update neither held nor usefully folded (or held with another payload's sha256): read them.
            recorded, inputs = self.store.round_updates(round_id, held=set(held)), None
        if inputs is None:
            inputs = self._inputs(recorded, held, folded)
        read_back = sum(i.payload is not None for i in recorded)
        return recorded, inputs, folded, read_back

    def _inputs(
        self, recorded: list[RecordedUpdate], held: Mapping[str, Mapping[str, LoraFactors]], folded: Folded | None
    ) -> list[RoundInput]:
        """One RoundInput per recorded update; one the fold holds and nobody read has no factors (none needed)."""
        inputs = []
        readable = [i for i in recorded if i.payload is not None or self._key(i) in held]
        adapters = dict(zip(map(self._key, readable), client_adapters(self.store, readable, held), strict=True))
        for item in recorded:
            h, key = item.header, self._key(item)
            adapter = adapters.get(key)
            if adapter is None:
                assert folded is not None and key in folded.updates, f"update {key} neither read, held nor folded"
                adapter = ClientAdapter.of({}, h.request)
            inputs.append(RoundInput(h.client_id, h.num_samples, h.base_version, adapter, key))
        return inputs

    @staticmethod
    def _key(item: RecordedUpdate) -> str:
        return record_id(item.header.client_id, item.header.update_id)

    def privacy_after_round(self) -> PrivacySpent | None:
        """What the federation will have spent once the open round commits (None without privacy); raises
        BudgetExhausted when that passes the budget."""
        config = self.config.privacy
        if config is None:
            return None
        rate = config.sampling_rate(self.config.policy.max_updates)
        history = [r.privacy for r in self.store.history() if r.privacy is not None]
        steps = [*((p.noise_multiplier, p.sampling_rate) for p in history), (config.noise_multiplier, rate)]
        spent = epsilon(steps, config.delta)
        if config.epsilon_budget is not None and spent > config.epsilon_budget:
            raise BudgetExhausted(
                f"privacy budget exhausted: ε would be {spent:.3g} > budget {config.epsilon_budget:g} "
                f"(δ = {config.delta:g}) after {len(steps)} private rounds"
            )
        self._privacy_refused = None
        return PrivacySpent(
            epsilon=spent,
            delta=config.delta,
            rounds=len(steps),
            noise_multiplier=config.noise_multiplier,
            sampling_rate=rate,
            clip_norm=config.clip_norm,
            epsilon_budget=config.epsilon_budget,
        )

    def finalise(self, lease: Lease, spent: PrivacySpent | None = None) -> RoundRecord | None:
        started = self.clock()
        folded = self.folder.take(lease.round_id)
        recorded, inputs, folded, read_back = self._round_inputs(lease.round_id, folded)
        if not recorded:
            return None
        # The participants' mailboxes are declared while the round is aggregated, not after: on an aggregator that
        # had not seen its clients, one declaration after another took a fifth of a 50-client round's turnaround.
        self.publisher.declare_ahead(sorted({i.header.client_id for i in recorded}))
        self.counters["round_updates_read_back"] += read_back
        self.counters["round_updates_held"] += len(recorded) - read_back  # in the health info: what was saved
        self.counters["round_updates_folded"] += len(folded.updates) if folded is not None else 0
        privacy = self.config.privacy
        if privacy is not None and spent is None:
            spent = self.privacy_after_round()
        svd_started = time.perf_counter()
        plan = aggregate_round(
            self.strategy,
            self.weighting,
            inputs,
            lease.round_id,
            global_rank=self.config.global_rank,
            recipe=self.config.recipe,
            max_weight_share=self.config.max_weight_share,
            step=self.config.server_step,
            global_at=lambda v: global_adapter(self.store, v),
            privacy=None if privacy is None else Private(privacy, self.config.policy.max_updates),
            folded=folded,
        )
        svd_seconds = time.perf_counter() - svd_started
        weights, wanted, result = plan.weights, plan.wanted, plan.result
        version = lease.round_id + 1
        releases = build_releases(
            self.store,
            wanted,
            result.adapters,
            version=version,
            template=release_template(self.store, recorded[0].header),
            num_updates=len(recorded),
            strategy=self.strategy.name,
            chunk_bytes=self.config.chunk_bytes,
            ttl_s=4 * self.config.lease_s,
            recipe=self.config.recipe,
            privacy=spent,
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
            metrics={**plan.info, **participant_means(recorded, weights)},
            privacy=spent,
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
        if spent is not None:
            self.metrics.privacy(spent.epsilon, spent.epsilon_budget)
        self.publish_version(version, committed=committed_releases(releases))
        if self.config.keep_versions is not None:
            self.store.prune(before_version=version - self.config.keep_versions + 1)
        if self.on_commit is not None:
            self.on_commit(record, {r.header.client_id: r for r in releases})
        return record

    # --- release --------------------------------------------------------------------------------
    def publish_version(self, version: int, committed: Mapping[str, StoredRelease] | None = None) -> None:
        """Publish a committed version's adapters (aggregator.publishing), unless another aggregator claimed it."""
        self.publisher.publish(version, committed)

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
