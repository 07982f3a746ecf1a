"""Chunked updates: each chunk is kept in the round store as it arrives, at whichever aggregator it reaches;
the aggregator that stores the last one reassembles, validates and records the update.

Exactly once, whatever the broker does:
- a chunk is acked only once it is in the store, and the last one only once the update is recorded, so a
  crash anywhere redelivers it and the next aggregator finds the update complete and records it;
- chunks delivered twice are kept once (by index), and chunks of an update already counted are dropped;
- chunks out of order are placed by index; two aggregators that both see the update complete race to
  record it, and the store's update-id guard lets one through;
- an update whose chunks stop coming is dropped after `expiry_s` idle seconds and reported, never counted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aggregator.rounds import ChunkResult, ExpiredTransfer, RecordResult, RoundStore, TransferGone
from aggregator.security import Guard
from aggregator.validation import Limits, ValidUpdate, check_header, validate_payload
from broker.transport import Message
from schemas.chunks import CHUNK_KEY, check_chunk, parse_chunk
from schemas.errors import Reason, SchemaError
from schemas.messages import HEADER_KEY, LoraUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkOutcome:
    """`stored`: kept, the update still incomplete (or this chunk was kept before); `counted`: the update was
    counted already; `gone`: the update expired while its last chunk was handled; `complete`: recorded now,
    with `valid` and `result` as for a single-message update."""

    state: str
    valid: ValidUpdate | None = None
    result: RecordResult | None = None


class ChunkIntake:
    def __init__(
        self,
        store: RoundStore,
        federation: str,
        *,
        expiry_s: float,
        limits: Limits,
        guard: Guard | None = None,
        pins: dict[str, str] | None = None,
        max_open: tuple[int, int] | None = None,
    ) -> None:
        self.max_open = max_open
        self.store = store
        self.federation = federation
        self.expiry_s = expiry_s
        self.limits = limits
        self.guard = guard
        self.pins = pins

    @staticmethod
    def is_chunk(message: Message) -> bool:
        return CHUNK_KEY in message.headers

    def take(
        self,
        message: Message,
        now: float,
        max_staleness: int | None,
        admit: Callable[[ValidUpdate], None] | None = None,
    ) -> ChunkOutcome:
        """Keep one chunk; on the last, validate and record the update. SchemaError refuses the chunk (and,
        when the reassembled update is what fails, drops the whole transfer)."""
        header = check_header(message, self.federation, self.limits, self.guard)
        chunk = parse_chunk(message.headers.get(CHUNK_KEY))
        if chunk.transfer_id != header.update_id:
            raise SchemaError(
                f"chunk of transfer {chunk.transfer_id} carries update {header.update_id}", reason=Reason.CHUNK
            )
        check_chunk(chunk, message.body, header.payload)
        header_json = message.headers[HEADER_KEY]
        signature = f"{hashlib.sha256(header_json.encode()).hexdigest()}:{chunk.chunk_bytes}:{chunk.count}"
        state = self.store.put_chunk(
            header.update_id,
            chunk.index,
            message.body,
            count=chunk.count,
            signature=signature,
            client_id=header.client_id,
            sha256=header.payload.sha256,
            now=now,
            expiry_s=self.expiry_s,
            max_open=self.max_open,
        )
        if state is ChunkResult.MISMATCH:
            raise SchemaError(
                f"chunk {chunk.index} of update {header.update_id} disagrees with its other chunks' header or chunking",
                reason=Reason.CHUNK,
            )
        if state is ChunkResult.BUSY:
            raise SchemaError(
                f"client {header.client_id!r} (or the federation) has as many chunked updates under way as allowed "
                f"{self.max_open}",
                reason=Reason.TRANSFERS,
            )
        if state is ChunkResult.REPLAY:
            raise SchemaError(
                f"update id {header.update_id} was counted already with another payload", reason=Reason.REPLAY
            )
        if state is ChunkResult.RECORDED:  # counted already: what is left of this transfer goes (see _record)
            self.store.drop_transfer(header.client_id, header.update_id)
            return ChunkOutcome("counted")
        if state is not ChunkResult.COMPLETE:
            return ChunkOutcome("stored")
        payload = self.store.transfer_payload(header.client_id, header.update_id, header.payload.size)
        if payload is None:  # another aggregator recorded it meanwhile, or it expired
            return self._record(header, now, max_staleness, None)
        try:
            valid = validate_payload(header, payload, self.store, self.pins, self.limits)
            if admit is not None:
                admit(valid)  # the service's own checks (the round's norm median), before it counts
        except self.store.transient_errors:
            raise
        except Exception:  # refused, or a fault of ours (dead-lettered "internal"): its chunks go with it
            self.store.drop_transfer(header.client_id, header.update_id)
            raise
        del payload  # the factors are views into it; this is only the last name of the buffer itself
        outcome = self._record(header, now, max_staleness, valid.pins)
        if outcome.state == "complete" and outcome.result is not RecordResult.RECORDED:
            # refused (stale, future, replay, conflict): its chunks go too
            self.store.drop_transfer(header.client_id, header.update_id)
        return ChunkOutcome(outcome.state, valid, outcome.result)

    def _record(
        self, header: LoraUpdate, now: float, max_staleness: int | None, pins: dict[str, str] | None
    ) -> ChunkOutcome:
        try:
            result = self.store.record_transfer(header, now, max_staleness, pins)
        except TransferGone:
            log.warning("update %s expired while its last chunk was being handled; not counted", header.update_id)
            return ChunkOutcome("gone")
        if result is RecordResult.DUPLICATE:
            # counted already (whole, or this transfer by another aggregator): whatever is left of it goes, or the
            # reaper would report a counted update as expired and refused
            self.store.drop_transfer(header.client_id, header.update_id)
            return ChunkOutcome("counted")
        return ChunkOutcome("complete", result=result)

    def expire(self, now: float) -> list[ExpiredTransfer]:
        """Drop the transfers idle past their expiry (each reported by exactly one aggregator)."""
        expired = self.store.expire_transfers(now)
        for t in expired:
            log.warning(
                "update %s from %s expired incomplete: %d of %d chunks arrived; it is not counted",
                t.update_id,
                t.client_id or "?",
                t.received,
                t.count,
            )
        return expired
