"""The edge worker: train locally, publish the update, wait for the adapter at its own rank, go again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from broker.chunked import ChunkAssembler, publish_payload
from broker.errors import BrokerError, ConnectionLost
from broker.topology import JOIN_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from broker.transport import Message, Subscription, Transport
from edge_client.checkpoint import CheckpointStore
from edge_client.ranks import RankPolicy
from edge_client.trainer import Interrupted, LocalTrainer, TrainConfig, TrainResult
from schemas.chunks import CHUNK_KEY, DEFAULT_CHUNK_BYTES, parse_chunk
from schemas.errors import Reason, SchemaError
from schemas.lora import RankRequest, adapter_rank, join_lora, recut, split_lora
from schemas.messages import (
    DETAIL_KEY,
    HEADER_KEY,
    REASON_KEY,
    REFUSED_KEY,
    RETRAIN_REASONS,
    SHARED_RELEASE,
    AdapterRelease,
    JoinRequest,
    LoraUpdate,
    parse_release,
)
from schemas.ranks import AlphaPattern, RankPattern
from schemas.signing import SIGNATURE_KEY, sign
from schemas.tensors import decode_tensors, encode_tensors

log = logging.getLogger(__name__)


# How long a client waits for the adapter of a round it took part in before giving up on it (a round may wait
# for slow peers or a deadline); the settings' default too.
ADAPTER_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class EdgeConfig:
    federation: str
    client_id: str
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_model_fingerprint: str
    adapter_timeout_s: float = ADAPTER_TIMEOUT_S
    # On start, how long to wait for the newest global adapter before training from a fresh LoRA.
    join_wait_s: float = 3.0
    # Updates larger than this go to the broker in chunks (RabbitMQ 4 refuses messages over 16 MiB).
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # Where the federation requires signatures: this client's HMAC key (see aggregator.security).
    signing_key: bytes | None = None
    # What of the federation's recipe (sent with every release) this client takes for its next local runs:
    # the schedule's fields it was not given itself. Its rank and alpha stay (releases are cut at them).
    follow_recipe: frozenset[str] = frozenset({"learning_rate", "schedule", "warmup_steps"})
    # Asked before every round for the rank to train it at (edge_client.ranks); None: `rank` for life. A new
    # rank trains at alpha_for(rank) (None: this config's lora_alpha at every rank).
    rank_policy: RankPolicy | None = None
    alpha_for: Callable[[int], float] | None = None
    # Ranks per module (peft's rank_pattern / alpha_pattern, schemas.ranks): fixed for life, no rank policy.
    rank_pattern: RankPattern = ()
    alpha_pattern: AlphaPattern = ()


class AdapterTimeout(TimeoutError):
    """No adapter newer than the one held arrived in time."""


class UpdateRefused(Exception):
    """An aggregator refused the update this client waits on (a notice in its mailbox): it will not be counted."""

    def __init__(self, update_id: str, reason: str, detail: str) -> None:
        super().__init__(f"the federation refused update {update_id} ({reason}): {detail}")
        self.update_id, self.reason, self.detail = update_id, reason, detail


@dataclass(frozen=True)
class RoundOutcome:
    update: LoraUpdate
    train: TrainResult
    release: AdapterRelease


class EdgeWorker:
    """One device's loop. Training runs on the caller's thread; the transport's I/O thread keeps the
    broker connection's heartbeats going meanwhile."""

    def __init__(
        self,
        transport: Transport,
        trainer: LocalTrainer,
        config: EdgeConfig,
        checkpoints: CheckpointStore | None = None,
    ) -> None:
        self.transport = transport
        self.trainer = trainer
        self.config = config
        self.topology = Topology(config.federation)
        self.checkpoints = checkpoints
        self.version = 0  # the global version the local adapter comes from
        self.rank, self.lora_alpha = config.rank, config.lora_alpha  # what the adapter held is trained at
        self.rounds_done = 0
        # An update trained but not yet answered by an adapter; kept across reconnects and restarts so
        # it is re-sent (same id, counted once) rather than lost or trained again.
        self.pending: tuple[LoraUpdate, bytes, TrainResult | None] | None = None
        self._sent = False
        self._subscription: Subscription | None = None
        self._warned_alpha = False
        self._assembler = ChunkAssembler()
        if checkpoints is not None:
            self._restore(checkpoints)

    @property
    def request(self) -> RankRequest:
        """The ranks (per module, with a pattern) the adapter held is trained at, and releases are cut at."""
        c = self.config
        return RankRequest(self.rank, self.lora_alpha, c.rank_pattern, c.alpha_pattern)

    def _restore(self, checkpoints: CheckpointStore) -> None:
        saved = checkpoints.load()
        if saved is None:
            return
        if saved.adapter is not None:
            rank = adapter_rank(saved.adapter)
            if self.request.uniform and rank != self.rank:
                self._resize(rank)
            self.trainer.load(saved.adapter)
        self.version, self.rounds_done = saved.version, saved.rounds_done
        if saved.pending is not None:
            self.pending = (*saved.pending, None)
        log.info(
            "%s resumed at version %d after %d rounds%s",
            self.config.client_id,
            self.version,
            self.rounds_done,
            " with an unanswered update to re-send" if saved.pending else "",
        )

    def attach(self, transport: Transport) -> None:
        """Continue on a new connection after the old one was lost (nothing is lost: see `pending`)."""
        self._subscription = None  # its channel died with the old connection
        self._sent = False  # unconfirmed or not, re-send: the aggregators drop a second copy by its id
        self.transport = transport

    def setup(self) -> None:
        try:
            self.transport.declare(self.topology.client(self.config.client_id))
        except ConnectionLost:
            raise
        except BrokerError as exc:
            # A provisioned client may configure nothing (`flexlora provision` declared its mailbox); if the
            # mailbox does not exist either, subscribing below says so.
            log.info("%s cannot declare its mailbox (%s); using the provisioned one", self.config.client_id, exc)
        self._subscription = self.transport.subscribe(
            self.topology.adapter_queue(self.config.client_id),
            prefetch=1,
            dead_letter_exchange=self.topology.dead_letter_exchange,
        )

    def join(self, stop: threading.Event | None = None, *, again: bool = False) -> AdapterRelease | None:
        """Ask for the newest global adapter at this client's rank and load it if one comes in time, so a
        device joining mid-run (or back from being offline) starts from the federation, not from zero.
        `again`: also the version held (at another rank: see `change_rank`)."""
        c = self.config
        have = self.version - 1 if again else self.version
        request = JoinRequest(
            federation=c.federation,
            client_id=c.client_id,
            rank=self.rank,
            lora_alpha=self.lora_alpha,
            rank_pattern=dict(c.rank_pattern),
            alpha_pattern=dict(c.alpha_pattern),
            target_modules=c.target_modules,
            base_model_fingerprint=c.base_model_fingerprint,
            have_version=have,
        )
        header_json = request.model_dump_json()
        self.transport.publish(
            self.topology.updates_exchange,
            JOIN_ROUTING_KEY,
            b"",
            {HEADER_KEY: header_json, **self._signed(header_json)},
        )
        release = self.wait_for_adapter(stop, timeout_s=c.join_wait_s, required=False, newer_than=have)
        # The mailbox may hold an older answer ahead of the join's (a round this client took part in before
        # it went away): take whatever newer adapters are queued behind it, so training starts from the newest.
        while release is not None and (newer := self.wait_for_adapter(stop, timeout_s=0.5, required=False)):
            release = newer
        return release

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def run(
        self,
        rounds: int | None,
        stop: threading.Event | None = None,
        on_round: Callable[[RoundOutcome], None] | None = None,
    ) -> int:
        """Go on until `rounds` rounds are done in all (forever when None); returns the rounds done.
        Broker errors propagate; `attach` a new transport and call again to continue where it stopped."""
        if self._subscription is None:
            self.setup()
            if self.pending is None:
                self.join(stop)
        while (rounds is None or self.rounds_done < rounds) and not (stop is not None and stop.is_set()):
            try:
                outcome = self.round(stop)
            except UpdateRefused as refused:
                if refused.reason not in RETRAIN_REASONS:
                    raise
                log.warning("%s: %s; training again from the newest version", self.config.client_id, refused)
                self.join(stop)
                continue
            if outcome is None:
                break
            if on_round is not None:
                on_round(outcome)
        return self.rounds_done

    def round(self, stop: threading.Event | None = None) -> RoundOutcome | None:
        if self.pending is None:
            if self.config.rank_policy is not None:
                choice = self.config.rank_policy(self.rounds_done)
                if choice.rank != self.rank:
                    self.change_rank(choice.rank, stop, reason=choice.reason)
            start = self.trainer.adapter()
            try:
                result = self.trainer.train(stop)
            except Interrupted as exc:  # asked to stop: nothing is published, and the part-epoch is undone
                self.trainer.load(start)
                log.info("%s: %s; nothing published", self.config.client_id, exc)
                return None
            header, data = self.prepare(result)
            self.pending = (header, data, result)
            self._sent = False
            if self.checkpoints is not None:
                self.checkpoints.save_pending(header, data)
        header, data, trained = self.pending
        if not self._sent:
            self.send(header, data)
            self._sent = True
        try:
            release = self.wait_for_adapter(stop)
        except UpdateRefused:  # never counted: a restart must not send it again
            self.pending = None
            if self.checkpoints is not None:
                self.checkpoints.clear_pending()
            raise
        if release is None:
            return None
        self.pending = None
        self.rounds_done += 1
        if self.checkpoints is not None:
            self.checkpoints.save_adapter(self.version, self.rounds_done, self.trainer.adapter())
        empty = TrainResult(float("nan"), 0, header.num_samples)
        return RoundOutcome(header, trained or empty, release)

    def change_rank(self, rank: int, stop: threading.Event | None = None, *, reason: str = "") -> None:
        """Train from now on at `rank`, starting from the global adapter held, cut exactly at the new rank: down,
        by cutting what is held (FlexLoRA's cuts nest); up, by asking the federation for the newest global at
        the new rank (a join), so the new directions are the global's next singular vectors. Where no answer
        comes (the federation refuses the rank, or has no global yet), the held directions are kept and the
        new ones start as a fresh LoRA's do (A initialised, B = 0). A client with a rank pattern keeps it."""
        if not self.request.uniform:
            raise ValueError(f"{self.config.client_id} trains ranks per module (a rank pattern); it cannot change rank")
        old = RankRequest(self.rank, self.lora_alpha)
        held = split_lora(self.trainer.adapter(), rank=old.rank, target_modules=self.config.target_modules)
        fresh = split_lora(self._resize(rank), rank=rank, target_modules=self.config.target_modules)
        log.info("%s changes rank %d -> %d: %s", self.config.client_id, old.rank, rank, reason or "asked")
        if self.version < 1:
            return  # nothing learned yet: the fresh LoRA is the start
        if rank > old.rank and self.join(stop, again=True) is not None:
            return
        start = recut(held, old, RankRequest(rank, self.lora_alpha))
        for module, f in start.items():
            f.A[old.rank :] = fresh[module].A[old.rank :]  # zero rows would get no gradient: train them from init
        self.trainer.load(join_lora(start))

    def _resize(self, rank: int) -> dict[str, torch.Tensor]:
        alpha = self.config.alpha_for(rank) if self.config.alpha_for is not None else self.lora_alpha
        resize = getattr(self.trainer, "resize", None)
        if resize is None:
            raise TypeError(f"{type(self.trainer).__name__} cannot change its rank (it has no resize)")
        fresh: dict[str, torch.Tensor] = resize(rank, alpha)
        self.rank, self.lora_alpha = rank, alpha
        return fresh

    def publish(self, result: TrainResult) -> LoraUpdate:
        """Prepare and send an update for `result` at once (no pending bookkeeping)."""
        header, data = self.prepare(result)
        self.send(header, data)
        return header

    def prepare(self, result: TrainResult) -> tuple[LoraUpdate, bytes]:
        data, info = encode_tensors(self.trainer.adapter())
        update = LoraUpdate(
            federation=self.config.federation,
            client_id=self.config.client_id,
            base_version=self.version,
            rank=self.rank,
            lora_alpha=self.lora_alpha,
            rank_pattern=dict(self.config.rank_pattern),
            alpha_pattern=dict(self.config.alpha_pattern),
            num_samples=result.num_samples,
            target_modules=self.config.target_modules,
            base_model_fingerprint=self.config.base_model_fingerprint,
            payload=info,
            train_loss=result.mean_loss,
            eval_score=result.start_score,
        )
        return update, data

    def _signed(self, header_json: str) -> dict[str, str]:
        key = self.config.signing_key
        return {} if key is None else {SIGNATURE_KEY: sign(key, header_json)}

    def send(self, update: LoraUpdate, data: bytes) -> None:
        header_json = update.model_dump_json()
        publish_payload(
            self.transport,
            self.topology.updates_exchange,
            UPDATE_ROUTING_KEY,
            header_json,
            data,
            update.payload,
            message_id=update.update_id,
            chunk_bytes=self.config.chunk_bytes,
            extra_headers=self._signed(header_json),
        )
        log.info(
            "%s published update %s (rank %d, base v%d, loss %s)",
            self.config.client_id,
            update.update_id[:8],
            update.rank,
            update.base_version,
            f"{update.train_loss:.3f}" if update.train_loss is not None else "-",
        )

    def wait_for_adapter(
        self,
        stop: threading.Event | None = None,
        *,
        timeout_s: float | None = None,
        required: bool = True,
        newer_than: int | None = None,
    ) -> AdapterRelease | None:
        """Block until an adapter newer than the one held (or than `newer_than`) arrives, load it and ack it. On
        timeout, raise AdapterTimeout if `required`, else return None."""
        newer_than = self.version if newer_than is None else newer_than
        assert self._subscription is not None, "call setup() first"
        timeout_s = self.config.adapter_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return None
            delivery = self._subscription.get(0.5)
            if delivery is None:
                continue
            refused = delivery.message.headers.get(REFUSED_KEY)
            if refused is not None:
                delivery.ack()
                if self.pending is not None and refused == self.pending[0].update_id:
                    headers = delivery.message.headers
                    raise UpdateRefused(refused, headers.get(REASON_KEY, "?"), headers.get(DETAIL_KEY, ""))
                log.info("%s: a refusal of update %s, not the one it waits on", self.config.client_id, refused)
                continue
            try:
                release = parse_release(delivery.message.headers.get(HEADER_KEY))
                if release.version <= newer_than:
                    delivery.ack()  # a re-publish of what we hold already
                    continue
                self._check_release(release)
                payload = self._payload(delivery.message, release)
                if payload is None:
                    delivery.ack()  # a chunk, kept in memory until its adapter is whole
                    continue
                tensors = decode_tensors(payload, release.payload)
                split_lora(tensors, rank=self.request, target_modules=self.config.target_modules)
                self.trainer.load(tensors)
            except (SchemaError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, SchemaError) else Reason.ADAPTER_MISMATCH
                log.error("refusing an adapter (%s): %s", reason, exc)
                try:
                    delivery.dead_letter(reason, str(exc))
                except ConnectionLost:
                    raise
                except BrokerError as refused:
                    # A provisioned client may publish only updates; the refusal is logged above, so drop it
                    # rather than leave it unacked in front of every later adapter.
                    log.warning("could not dead-letter the refused adapter (%s); dropping it", refused)
                    delivery.ack()
                continue
            self.version = release.version
            self._follow(release)
            delivery.ack()
            log.info("%s loaded global version %d at rank %d", self.config.client_id, release.version, release.rank)
            return release
        if not required:
            return None
        raise AdapterTimeout(f"no adapter newer than version {self.version} within {timeout_s}s")

    def _payload(self, message: Message, release: AdapterRelease) -> bytes | bytearray | None:
        """The adapter's payload: the message body, or, for a chunk, the reassembled payload once whole."""
        if CHUNK_KEY not in message.headers:
            return message.body
        return self._assembler.add(parse_chunk(message.headers[CHUNK_KEY]), message.body, release.payload)

    def _follow(self, release: AdapterRelease) -> None:
        """Train the next rounds by the federation's recipe, for the fields this client was not given."""
        recipe, c = release.recipe, self.config
        if recipe is None:
            return
        if recipe.alpha(self.rank) != self.lora_alpha and not self._warned_alpha:
            self._warned_alpha = True
            log.warning(
                "%s trains at alpha %g; the federation's recipe (%s) gives %g at rank %d. Adapters are cut at this "
                "client's alpha, so nothing is lost, but its steps are scaled unlike its peers'",
                c.client_id,
                self.lora_alpha,
                recipe.scaling,
                recipe.alpha(self.rank),
                self.rank,
            )
        train = getattr(self.trainer, "config", None)
        if not isinstance(train, TrainConfig):
            return  # a trainer without a local schedule (synthetic clients, benchmarks) has nothing to follow
        wanted = {name: getattr(recipe, name) for name in c.follow_recipe if hasattr(train, name)}
        if "warmup_steps" in wanted:
            wanted["warmup_steps"] = min(wanted["warmup_steps"], train.local_steps - 1)
        changed = {k: v for k, v in wanted.items() if getattr(train, k) != v}
        if changed:
            self.trainer.config = replace(train, **changed)
            log.info("%s follows the federation's recipe: %s", c.client_id, changed)

    def _check_release(self, release: AdapterRelease) -> None:
        c = self.config
        # A release shared by every participant at its cut names none of them (the broker routed it here).
        if release.client_id not in (c.client_id, SHARED_RELEASE) or release.federation != c.federation:
            raise SchemaError(f"adapter addressed to {release.federation}/{release.client_id}", reason=Reason.MISROUTED)
        if release.request != self.request:
            raise SchemaError(
                f"adapter cut at {release.request.describe()}, alpha {release.lora_alpha}; this client trains "
                f"{self.request.describe()}, alpha {self.lora_alpha}",
                reason=Reason.RANK,
            )
        if release.base_model_fingerprint != c.base_model_fingerprint:
            raise SchemaError("adapter was built for another base model", reason=Reason.BASE_MODEL)
