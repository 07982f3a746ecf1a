"""Payloads larger than one message travel as chunks: each message carries the whole message header
(update or adapter release, with the whole payload's size and sha256) and a chunk header of its own.

RabbitMQ 4.x refuses messages over 16 MiB by default (`max_message_size`), so an update of a 7B-class
model at a high rank cannot travel as one message. Chunks are fixed-size except the last, so a receiver
knows every chunk's place from its index alone, and each carries its own sha256 so a corrupted chunk is
caught on arrival, not after the whole update has been reassembled.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from schemas.errors import PayloadIntegrityError, Reason, SchemaError
from schemas.messages import PayloadInfo, Sha256, _parse, _Strict

CHUNK_KEY = "x-flexlora-chunk"
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
MIN_CHUNK_BYTES = 64 * 1024  # so a header cannot announce a billion one-byte chunks

TransferId = Annotated[str, StringConstraints(min_length=1, max_length=300, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class ChunkInfo(_Strict):
    """Where one chunk sits in its payload: chunk `index` of `count`, each `chunk_bytes` long but the last."""

    schema_version: Literal[1] = 1
    transfer_id: TransferId
    index: int = Field(ge=0, le=2**32)
    count: int = Field(ge=2, le=2**32)
    chunk_bytes: int = Field(ge=MIN_CHUNK_BYTES, le=2**31)
    sha256: Sha256


def chunk_count(size: int, chunk_bytes: int) -> int:
    return max(1, -(-size // chunk_bytes))


def parse_chunk(raw: str | bytes | None) -> ChunkInfo:
    return _parse(ChunkInfo, raw, CHUNK_KEY)


def check_chunk(chunk: ChunkInfo, body: bytes, payload: PayloadInfo) -> None:
    """Refuse a chunk that does not fit its payload's declared size, or whose bytes fail its own sha256."""
    expected_count = chunk_count(payload.size, chunk.chunk_bytes)
    if chunk.count != expected_count or chunk.index >= chunk.count:
        raise SchemaError(
            f"chunk {chunk.index} of {chunk.count} does not fit a {payload.size}-byte payload in "
            f"{chunk.chunk_bytes}-byte chunks ({expected_count} chunks)",
            reason=Reason.CHUNK,
        )
    last = payload.size - (chunk.count - 1) * chunk.chunk_bytes
    want = last if chunk.index == chunk.count - 1 else chunk.chunk_bytes
    if len(body) != want:
        raise PayloadIntegrityError(f"chunk {chunk.index} is {len(body)} bytes, its place holds {want}")
    digest = hashlib.sha256(body).hexdigest()
    if digest != chunk.sha256:
        raise PayloadIntegrityError(
            f"chunk {chunk.index} sha256 {digest[:12]}… differs from the declared {chunk.sha256[:12]}…"
        )
