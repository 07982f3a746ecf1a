"""Publishing payloads of any size and reassembling chunks in memory (the edge client's side)."""

from __future__ import annotations

import random

import pytest

from broker.chunked import ChunkAssembler, publish_payload
from broker.topology import UPDATE_ROUTING_KEY, Topology
from broker.transport import Message
from broker.transports.memory import MemoryBroker, MemoryTransport
from schemas.chunks import CHUNK_KEY, parse_chunk
from schemas.errors import PayloadIntegrityError
from schemas.messages import HEADER_KEY, PayloadInfo
from schemas.tensors import sha256_hex

CHUNK = 64 * 1024


def _sent(payload: bytes, chunk_bytes: int = CHUNK) -> list[Message]:
    topology = Topology("f")
    transport = MemoryTransport(MemoryBroker())
    transport.declare(topology.core())
    info = PayloadInfo(size=len(payload), sha256=sha256_hex(payload))
    sent = publish_payload(
        transport,
        topology.updates_exchange,
        UPDATE_ROUTING_KEY,
        '{"kind": "update"}',
        payload,
        info,
        message_id="update-0001",
        chunk_bytes=chunk_bytes,
    )
    sub = transport.subscribe(topology.updates_queue, prefetch=1000, dead_letter_exchange="")
    out = []
    while (d := sub.get(0.05)) is not None:
        out.append(d.message)
        d.ack()
    assert len(out) == sent
    return out


def test_a_payload_that_fits_goes_as_one_plain_message() -> None:
    [message] = _sent(b"x" * CHUNK)
    assert message.body == b"x" * CHUNK and CHUNK_KEY not in message.headers
    assert message.message_id == "update-0001"


def test_chunks_arrive_in_any_order_and_twice_and_reassemble_once() -> None:
    payload = random.Random(1).randbytes(3 * CHUNK + 123)
    messages = _sent(payload)
    assert len(messages) == 4 and {m.headers[HEADER_KEY] for m in messages} == {'{"kind": "update"}'}
    assert [m.message_id for m in messages] == [f"update-0001:{i}" for i in range(4)]
    info = PayloadInfo(size=len(payload), sha256=sha256_hex(payload))
    shuffled = messages[::-1] + messages[:2]
    assembler = ChunkAssembler()
    results = [assembler.add(parse_chunk(m.headers[CHUNK_KEY]), m.body, info) for m in shuffled]
    whole = [r for r in results if r is not None]
    assert len(whole) == 1 and bytes(whole[0]) == payload
    assert results.index(whole[0]) == 3, "whole once its last missing chunk is in"


def test_a_corrupted_chunk_or_a_lying_payload_hash_is_refused() -> None:
    payload = random.Random(2).randbytes(2 * CHUNK + 1)
    messages = _sent(payload)
    info = PayloadInfo(size=len(payload), sha256=sha256_hex(payload))
    with pytest.raises(PayloadIntegrityError, match="chunk 1"):
        ChunkAssembler().add(parse_chunk(messages[1].headers[CHUNK_KEY]), b"\0" + messages[1].body[1:], info)
    lying = PayloadInfo(size=len(payload), sha256="0" * 64)  # every chunk sound, the whole not what was declared
    assembler = ChunkAssembler()
    with pytest.raises(PayloadIntegrityError, match="reassembled"):
        for m in messages:
            assembler.add(parse_chunk(m.headers[CHUNK_KEY]), m.body, lying)


def test_at_most_max_open_partial_payloads_are_kept() -> None:
    assembler = ChunkAssembler(max_open=2)
    payloads = [random.Random(i).randbytes(2 * CHUNK) for i in range(3)]
    for p in payloads:
        first = _sent(p)[0]
        chunk = parse_chunk(first.headers[CHUNK_KEY]).model_copy(update={"transfer_id": f"t-{p[:4].hex()}"})
        assembler.add(chunk, first.body, PayloadInfo(size=len(p), sha256=sha256_hex(p)))
    assert assembler.open_transfers == 2
