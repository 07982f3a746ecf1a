"""A chunked update's intake on every round store: what is left of a transfer once its update is counted or
refused, so that the reaper never reports a counted update as expired, nor keeps a refused one's chunks."""

from __future__ import annotations

import pytest

import aggregator.transfers as transfers
from aggregator.rounds import RecordResult, RoundStore
from aggregator.transfers import ChunkIntake
from aggregator.validation import Limits
from broker.transport import Message
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.chunks import CHUNK_KEY, MIN_CHUNK_BYTES, ChunkInfo
from schemas.messages import HEADER_KEY, LoraUpdate
from schemas.tensors import sha256_hex

SHAPE = SyntheticShape(layers=2, projections=(("self_attn.q_proj", 256, 256),))  # rank 32: 131 kB, 2 chunks


def _chunks(header: LoraUpdate, data: bytes) -> list[Message]:
    size = MIN_CHUNK_BYTES
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    assert len(pieces) >= 2
    return [
        Message(
            body=piece,
            headers={
                HEADER_KEY: header.model_dump_json(),
                CHUNK_KEY: ChunkInfo(
                    transfer_id=header.update_id, index=i, count=len(pieces), chunk_bytes=size, sha256=sha256_hex(piece)
                ).model_dump_json(),
            },
        )
        for i, piece in enumerate(pieces)
    ]


def _intake(store: RoundStore, federation: str) -> ChunkIntake:
    return ChunkIntake(store, federation, expiry_s=60.0, limits=Limits())


def test_a_chunked_copy_of_an_update_counted_whole_leaves_nothing_to_expire(store: RoundStore, federation: str) -> None:
    header, data = synthetic_update(federation, "c1", 32, 0, shape=SHAPE)
    intake = _intake(store, federation)
    *first, last = _chunks(header, data)
    for message in first:  # its chunks under way when the same update, sent whole, is counted
        assert intake.take(message, now=2.0, max_staleness=None).state == "stored"
    assert store.record(header, data, now=1.0) is RecordResult.RECORDED
    assert intake.take(last, now=2.0, max_staleness=None).state == "counted"
    assert store.expire_transfers(now=1e12) == [], "a counted update reported as expired, and refused"
    assert store.status().count == 1


def test_a_transfer_whose_check_fails_for_any_reason_is_dropped(
    store: RoundStore, federation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of ours while checking the reassembled update (dead-lettered "internal") once left its chunks
    kept until expiry, counting against the client's bound on open transfers."""
    header, data = synthetic_update(federation, "c1", 32, 0, shape=SHAPE)

    def broken(*_: object, **__: object) -> None:
        raise RecursionError("a fault of ours")

    monkeypatch.setattr(transfers, "validate_payload", broken)
    intake = _intake(store, federation)
    *first, last = _chunks(header, data)
    for message in first:
        assert intake.take(message, now=2.0, max_staleness=None).state == "stored"
    with pytest.raises(RecursionError):
        intake.take(last, now=2.0, max_staleness=None)
    assert store.expire_transfers(now=1e12) == []
    assert store.transfer_payload(header.client_id, header.update_id, header.payload.size) is None
