"""Publishing a payload of any size through a transport, and reassembling chunked payloads in memory.

A payload up to `chunk_bytes` goes as one message, as always. A larger one goes as chunks (see
schemas.chunks), each confirmed by the broker before the next is cut, so a sender holds the payload once
plus one chunk. The aggregators reassemble updates in Redis (chunks may reach different processes); an
edge client reassembles its own adapters here, in memory.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from broker.transport import Transport
from schemas.chunks import CHUNK_KEY, ChunkInfo, check_chunk, chunk_count
from schemas.errors import PayloadIntegrityError
from schemas.messages import HEADER_KEY, PayloadInfo
from schemas.safetensors_stream import iter_chunks


def publish_payload(
    transport: Transport,
    exchange: str,
    routing_key: str,
    header_json: str,
    payload: bytes | bytearray | Sequence[memoryview],
    info: PayloadInfo,
    *,
    message_id: str,
    chunk_bytes: int,
    extra_headers: Mapping[str, str] | None = None,
    bcc: Sequence[str] = (),
) -> int:
    """Publish a message header with its payload, as one message or as chunks; returns the messages sent.
    Chunk `i` gets the message id `<message_id>:<i>`, so a re-send is recognisably the same chunk. `bcc`: more
    routing keys every message also goes to (Transport.publish)."""
    if info.size <= chunk_bytes:
        body = payload if isinstance(payload, bytes) else b"".join(_pieces(payload))
        headers = {HEADER_KEY: header_json, **(extra_headers or {})}
        transport.publish(exchange, routing_key, body, headers, message_id=message_id, bcc=bcc)
        return 1
    chunks = iter_chunks(_pieces(payload), chunk_bytes)
    return publish_chunks(transport, exchange, routing_key, header_json, chunks, info, message_id, extra_headers, bcc)


def _pieces(payload: bytes | bytearray | Sequence[memoryview]) -> list[memoryview]:
    return [memoryview(payload)] if isinstance(payload, (bytes, bytearray)) else list(payload)


def publish_chunks(
    transport: Transport,
    exchange: str,
    routing_key: str,
    header_json: str,
    chunks: Iterable[bytes],
    info: PayloadInfo,
    message_id: str,
    extra_headers: Mapping[str, str] | None = None,
    bcc: Sequence[str] = (),
) -> int:
    """Publish a payload already cut into chunks of one size (the first chunk's; the last may be shorter),
    one chunk in memory at a time; returns the chunks sent."""
    stream = iter(chunks)
    first = next(stream, None)
    if first is None:
        raise ValueError("a chunked payload needs at least one chunk")
    chunk_bytes = len(first)
    count = chunk_count(info.size, chunk_bytes)
    for index, chunk in enumerate(itertools.chain([first], stream)):
        chunk_header = ChunkInfo(
            transfer_id=message_id,
            index=index,
            count=count,
            chunk_bytes=chunk_bytes,
            sha256=hashlib.sha256(chunk).hexdigest(),
        )
        headers = {HEADER_KEY: header_json, CHUNK_KEY: chunk_header.model_dump_json(), **(extra_headers or {})}
        transport.publish(exchange, routing_key, chunk, headers, message_id=f"{message_id}:{index}", bcc=bcc)
    return count


@dataclass
class _Partial:
    info: PayloadInfo
    count: int
    chunk_bytes: int
    buffer: bytearray
    received: set[int] = field(default_factory=set)


class ChunkAssembler:
    """Reassembles chunked payloads in place, keyed by transfer id. At most `max_open` incomplete payloads
    are kept: starting one more drops the oldest, whose missing chunks will not come (its mailbox dropped
    them for a newer adapter)."""

    def __init__(self, max_open: int = 2) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, _Partial] = OrderedDict()

    def add(self, chunk: ChunkInfo, body: bytes, info: PayloadInfo) -> bytearray | None:
        """Take one chunk (checked against its own hash); the whole payload once its last chunk is in,
        after checking the whole payload's size and sha256. Duplicates are ignored."""
        check_chunk(chunk, body, info)
        partial = self._open.get(chunk.transfer_id)
        if partial is not None and (partial.info != info or partial.chunk_bytes != chunk.chunk_bytes):
            raise PayloadIntegrityError(f"chunks of transfer {chunk.transfer_id} disagree on the payload")
        if partial is None:
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)
            partial = _Partial(info, chunk.count, chunk.chunk_bytes, bytearray(info.size))
            self._open[chunk.transfer_id] = partial
        if chunk.index in partial.received:
            return None
        start = chunk.index * chunk.chunk_bytes
        partial.buffer[start : start + len(body)] = body
        partial.received.add(chunk.index)
        if len(partial.received) < partial.count:
            return None
        del self._open[chunk.transfer_id]
        digest = hashlib.sha256(partial.buffer).hexdigest()
        if digest != info.sha256:
            raise PayloadIntegrityError(f"reassembled payload sha256 {digest[:12]}… differs from {info.sha256[:12]}…")
        return partial.buffer

    @property
    def open_transfers(self) -> int:
        return len(self._open)
