"""The edge worker: train locally, publish the update, wait for the adapter at its own rank, go again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from broker.errors import BrokerError
from broker.topology import JOIN_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from broker.transport import Subscription, Transport
from edge_client.trainer import LocalTrainer, TrainResult
from schemas.errors import SchemaError
from schemas.lora import split_lora
from schemas.messages import HEADER_KEY, AdapterRelease, JoinRequest, LoraUpdate, parse_release
from schemas.tensors import decode_tensors, encode_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeConfig:
    federation: str
    client_id: str
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_model_fingerprint: str
    adapter_timeout_s: float = 600.0
    # On start, how long to wait for the newest global adapter before training from a fresh LoRA.
    join_wait_s: float = 3.0


class AdapterTimeout(TimeoutError):
    """No adapter newer than the one held arrived in time."""


@dataclass(frozen=True)
class RoundOutcome:
    update: LoraUpdate
    train: TrainResult
    release: AdapterRelease


class EdgeWorker:
    """One device's loop. Training runs on the caller's thread; the transport's I/O thread keeps the
    broker connection's heartbeats going meanwhile."""

    def __init__(self, transport: Transport, trainer: LocalTrainer, config: EdgeConfig) -> None:
        self.transport = transport
        self.trainer = trainer
        self.config = config
        self.topology = Topology(config.federation)
        self.version = 0  # the global version the local adapter comes from
        self._subscription: Subscription | None = None

    def setup(self) -> None:
        self.transport.declare(self.topology.client(self.config.client_id))
        self._subscription = self.transport.subscribe(
            self.topology.adapter_queue(self.config.client_id),
            prefetch=1,
            dead_letter_exchange=self.topology.dead_letter_exchange,
        )

    def join(self, stop: threading.Event | None = None) -> AdapterRelease | None:
        """Ask for the newest global adapter at this client's rank and load it if one comes in time, so a
        device joining mid-run (or back from being offline) starts from the federation, not from zero."""
        c = self.config
        request = JoinRequest(
            federation=c.federation,
            client_id=c.client_id,
            rank=c.rank,
            lora_alpha=c.lora_alpha,
            target_modules=c.target_modules,
            base_model_fingerprint=c.base_model_fingerprint,
            have_version=self.version,
        )
        self.transport.publish(
            self.topology.updates_exchange, JOIN_ROUTING_KEY, b"", {HEADER_KEY: request.model_dump_json()}
        )
        return self.wait_for_adapter(stop, timeout_s=c.join_wait_s, required=False)

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
        """Go round after round (forever when `rounds` is None); returns how many rounds completed."""
        if self._subscription is None:
            self.setup()
            self.join(stop)
        done = 0
        while (rounds is None or done < rounds) and not (stop is not None and stop.is_set()):
            outcome = self.round(stop)
            if outcome is None:
                break
            done += 1
            if on_round is not None:
                on_round(outcome)
        return done

    def round(self, stop: threading.Event | None = None) -> RoundOutcome | None:
        result = self.trainer.train()
        update = self.publish(result)
        release = self.wait_for_adapter(stop)
        return None if release is None else RoundOutcome(update, result, release)

    def publish(self, result: TrainResult) -> LoraUpdate:
        data, info = encode_tensors(self.trainer.adapter())
        update = LoraUpdate(
            federation=self.config.federation,
            client_id=self.config.client_id,
            base_version=self.version,
            rank=self.config.rank,
            lora_alpha=self.config.lora_alpha,
            num_samples=result.num_samples,
            target_modules=self.config.target_modules,
            base_model_fingerprint=self.config.base_model_fingerprint,
            payload=info,
            train_loss=result.mean_loss,
        )
        self.transport.publish(
            self.topology.updates_exchange,
            UPDATE_ROUTING_KEY,
            data,
            {HEADER_KEY: update.model_dump_json()},
            message_id=update.update_id,
        )
        log.info(
            "%s published update %s (rank %d, loss %.3f)",
            self.config.client_id,
            update.update_id[:8],
            update.rank,
            result.mean_loss,
        )
        return update

    def wait_for_adapter(
        self, stop: threading.Event | None = None, *, timeout_s: float | None = None, required: bool = True
    ) -> AdapterRelease | None:
        """Block until an adapter newer than the one held arrives, load it and ack it. On timeout, raise
        AdapterTimeout if `required`, else return None."""
        assert self._subscription is not None, "call setup() first"
        timeout_s = self.config.adapter_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return None
            delivery = self._subscription.get(0.5)
            if delivery is None:
                continue
            try:
                release = parse_release(delivery.message.headers.get(HEADER_KEY))
                if release.version <= self.version:
                    delivery.ack()  # a re-publish of what we hold already
                    continue
                self._check_release(release)
                tensors = decode_tensors(delivery.message.body, release.payload)
                split_lora(tensors, rank=self.config.rank, target_modules=self.config.target_modules)
                self.trainer.load(tensors)
            except (SchemaError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, SchemaError) else "adapter-mismatch"
                log.error("refusing an adapter (%s): %s", reason, exc)
                try:
                    delivery.dead_letter(reason, str(exc))
                except BrokerError:
                    log.exception("could not dead-letter the refused adapter")
                continue
            self.version = release.version
            delivery.ack()
            log.info("%s loaded global version %d at rank %d", self.config.client_id, release.version, release.rank)
            return release
        if not required:
            return None
        raise AdapterTimeout(f"no adapter newer than version {self.version} within {timeout_s}s")

    def _check_release(self, release: AdapterRelease) -> None:
        c = self.config
        if release.client_id != c.client_id or release.federation != c.federation:
            raise SchemaError(f"adapter addressed to {release.federation}/{release.client_id}", reason="misrouted")
        if release.rank != c.rank or release.lora_alpha != c.lora_alpha:
            raise SchemaError(
                f"adapter cut at rank {release.rank}, alpha {release.lora_alpha}; this client trains rank {c.rank}",
                reason="rank",
            )
        if release.base_model_fingerprint != c.base_model_fingerprint:
            raise SchemaError("adapter was built for another base model", reason="base-model")
