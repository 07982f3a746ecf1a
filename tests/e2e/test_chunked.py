"""Chunked updates and adapters over the real RabbitMQ and Redis, with aggregators as real processes: a
300 MB update aggregated correctly; chunks twice, out of order and across two processes counted once; a
missing chunk expires and is reported; a corrupted chunk is caught by its hash; oversize is refused."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from aggregator.rounds import GLOBAL_RELEASE
from aggregator.stores.redis import RedisRoundStore
from broker.chunked import ChunkAssembler
from broker.connect import connect
from broker.topology import UPDATE_ROUTING_KEY, Topology
from broker.transport import Transport
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.chunks import CHUNK_KEY, ChunkInfo, chunk_count, parse_chunk
from schemas.lora import split_lora
from schemas.messages import HEADER_KEY, REASON_KEY, LoraUpdate, parse_release
from schemas.safetensors_stream import iter_chunks
from schemas.tensors import decode_tensors
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.procs import aggregators, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]
CHUNK = 64 * 1024  # the smallest chunk a header may declare: many chunks from a small update
SMALL = SyntheticShape(layers=16, projections=(("self_attn.q_proj", 256, 256),))  # rank 8: 257 KiB, 5 chunks


@pytest.fixture
def store(federation: str) -> Iterator[RedisRoundStore]:
    s = RedisRoundStore.from_url(REDIS_URL, federation)
    yield s
    s.wipe()


@pytest.fixture
def transport(federation: str, amqp_cleanup: list[str]) -> Iterator[Transport]:
    t = connect(AMQP_URL)
    t.declare(Topology(federation).core())
    yield t
    t.close()


def _chunks(header: LoraUpdate, data: bytes, chunk_bytes: int = CHUNK) -> list[tuple[dict[str, str], bytes]]:
    """The messages a client sends for one update: (headers, body) per chunk, in order."""
    count = chunk_count(len(data), chunk_bytes)
    out = []
    for index, body in enumerate(iter_chunks([memoryview(data)], chunk_bytes)):
        info = ChunkInfo(
            transfer_id=header.update_id,
            index=index,
            count=count,
            chunk_bytes=chunk_bytes,
            sha256=hashlib.sha256(body).hexdigest(),
        )
        out.append(({HEADER_KEY: header.model_dump_json(), CHUNK_KEY: info.model_dump_json()}, body))
    return out


def _send(transport: Transport, federation: str, messages: list[tuple[dict[str, str], bytes]]) -> None:
    topology = Topology(federation)
    for headers, body in messages:
        transport.publish(topology.updates_exchange, UPDATE_ROUTING_KEY, body, headers)


def _counted(store: RedisRoundStore) -> list[str]:
    return [i for r in range(store.version() + 1) for i in store.round_update_ids(r)]


def _dead_letters(transport: Transport, federation: str, want: int) -> list[str]:
    topology = Topology(federation)
    sub = transport.subscribe(topology.dead_letter_queue, prefetch=50, dead_letter_exchange="")
    reasons: list[str] = []
    try:
        while len(reasons) < want and (d := sub.get(10.0)) is not None:
            reasons.append(d.message.headers.get(REASON_KEY, ""))
            d.ack()
    finally:
        sub.close()
    return reasons


def test_a_300_mb_update_goes_through_in_chunks_and_aggregates_correctly(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, transport: Transport, tmp_path: Path
) -> None:
    client = "big"
    amqp_cleanup.append(Topology(federation).adapter_queue(client))
    big = SyntheticShape(layers=144, projections=(("self_attn.q_proj", 4096, 4096),))  # 2 MiB per module
    header, data = synthetic_update(federation, client, rank=64, base_version=0, shape=big, seed=3)
    assert len(data) > 300_000_000
    from edge_client.worker import EdgeConfig, EdgeWorker

    class _NoTraining:
        def load(self, tensors: dict[str, torch.Tensor]) -> None:
            self.loaded = tensors

    worker = EdgeWorker(
        transport,
        _NoTraining(),  # type: ignore[arg-type]
        EdgeConfig(
            federation=federation,
            client_id=client,
            rank=64,
            lora_alpha=header.lora_alpha,
            target_modules=header.target_modules,
            base_model_fingerprint=header.base_model_fingerprint,
            adapter_timeout_s=240,
        ),
    )
    worker.setup()
    with aggregators(federation, tmp_path, "--max-updates", "1", "--quiet") as group:
        group.start(1)
        worker.send(header, data)  # 38 chunks of 8 MiB
        release = worker.wait_for_adapter()
    assert release is not None and release.version == 1 and release.rank == 64
    assert _counted(store) == [header.update_id]
    # One client at rank r: the rank-r cut of its own ΔW is ΔW itself (GUIDE §1), up to float32 rounding.
    sent = split_lora(decode_tensors(data), rank=64)
    got = split_lora(worker.trainer.loaded, rank=64)  # type: ignore[attr-defined]
    for module in list(sent)[:: len(sent) // 8]:
        a, b = sent[module]
        a2, b2 = got[module]
        want = (b.double() @ a.double()) * (header.lora_alpha / 64)
        have = (b2.double() @ a2.double()) * (release.lora_alpha / 64)
        assert torch.linalg.norm(have - want) <= 1e-4 * torch.linalg.norm(want), module
    worker.close()


def test_chunks_twice_out_of_order_and_across_two_processes_count_once(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, transport: Transport, tmp_path: Path
) -> None:
    updates = [synthetic_update(federation, f"c{i}", rank=8, base_version=0, shape=SMALL, seed=i) for i in range(3)]
    for c in ("c0", "c1", "c2"):
        amqp_cleanup.append(Topology(federation).adapter_queue(c))
    messages = [_chunks(h, d) for h, d in updates]
    assert all(len(m) >= 4 for m in messages)
    with aggregators(federation, tmp_path, "--max-updates", "3", "--quiet") as group:
        first = group.start(1)[0]
        wait_for(lambda: len(store.health()) == 1, timeout=60, what="the first aggregator serving")
        # The first halves (one chunk twice) go to the first process, which is then killed outright...
        _send(transport, federation, [m[1] for m in messages] + [m[0] for m in messages] + [messages[0][1]])
        wait_for(lambda: store.r.zcard(store.keys.transfers_open) == 3, 60, "first halves kept in Redis")
        first.send_signal(signal.SIGKILL)
        first.wait()
        # ...and the rest, reversed and with duplicates, to a second process that never saw the first halves.
        group.start(1)
        rest = [msg for m in messages for msg in reversed(m[2:])]
        _send(transport, federation, rest + rest[:3])
        wait_for(lambda: store.version() == 1, timeout=60, what="the round of the three chunked updates")
        wait_for(lambda: transport.queue_depth(Topology(federation).updates_queue) == 0, 60, "every chunk taken")
    assert sorted(_counted(store)) == sorted(h.update_id for h, _ in updates)
    record = store.history()[0]
    assert sorted(p.update_id for p in record.participants) == sorted(h.update_id for h, _ in updates)
    # The recorded payloads are the clients' bytes, reassembled from chunks that reached two processes.
    recorded = {u.header.update_id: bytes(store.payload(u)) for u in store.round_updates(0)}
    assert recorded == {h.update_id: d for h, d in updates}
    assert GLOBAL_RELEASE in store.releases(1)


def test_a_missing_chunk_expires_is_reported_and_is_never_counted(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, transport: Transport, tmp_path: Path
) -> None:
    h1, d1 = synthetic_update(federation, "lossy", rank=8, base_version=0, shape=SMALL, seed=1)
    h2, d2 = synthetic_update(federation, "whole", rank=8, base_version=0, shape=SMALL, seed=2)
    amqp_cleanup.extend(Topology(federation).adapter_queue(c) for c in ("lossy", "whole"))
    lossy = _chunks(h1, d1)
    with aggregators(federation, tmp_path, "--max-updates", "1", "--transfer-expiry-s", "2", "--quiet") as group:
        group.start(1)
        _send(transport, federation, lossy[:1] + lossy[2:])  # chunk 1 never arrives
        wait_for(lambda: store.refusals().get("incomplete") == 1, timeout=60, what="the incomplete update reported")
        wait_for(lambda: "expired incomplete" in group.log(0), timeout=10, what="the log line")
        assert f"{len(lossy) - 1} of {len(lossy)} chunks" in group.log(0)
        assert store.version() == 0 and not _counted(store)
        # Its missing chunk, arriving late, starts nothing that could count: it expires alone too.
        _send(transport, federation, lossy[1:2])
        _send(transport, federation, _chunks(h2, d2))
        wait_for(lambda: store.version() == 1, timeout=60, what="a normal chunked round after it")
        wait_for(lambda: store.refusals().get("incomplete") == 2, timeout=60, what="the late chunk expired")
    assert _counted(store) == [h2.update_id]


def test_a_corrupted_chunk_is_caught_by_its_hash_and_oversize_is_refused_from_the_header(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, transport: Transport, tmp_path: Path
) -> None:
    header, data = synthetic_update(federation, "flaky", rank=8, base_version=0, shape=SMALL, seed=5)
    double = SyntheticShape(layers=32, projections=SMALL.projections)
    huge, huge_data = synthetic_update(federation, "huge", rank=8, base_version=0, shape=double, seed=6)
    amqp_cleanup.extend(Topology(federation).adapter_queue(c) for c in ("flaky", "huge"))
    chunks = _chunks(header, data)
    headers, body = chunks[2]
    corrupted = bytearray(body)
    corrupted[100] ^= 0xFF
    limit = str(len(huge_data) - 1)
    with aggregators(federation, tmp_path, "--max-updates", "1", "--max-update-bytes", limit, "--quiet") as group:
        group.start(1)
        # The oversize update: refused on its header alone; the shrunken header lies about nothing else.
        _send(transport, federation, _chunks(huge, huge_data)[:1])
        _send(transport, federation, [*chunks[:2], (headers, bytes(corrupted))])
        assert sorted(_dead_letters(transport, federation, 2)) == ["integrity", "too-large"]
        _send(transport, federation, chunks[2:])  # the sender retries the chunk whole
        wait_for(lambda: store.version() == 1, timeout=60, what="the retried update counted")
    assert _counted(store) == [header.update_id]
    assert store.refusals() == {"integrity": 1, "too-large": 1}


def test_a_large_adapter_reaches_its_client_in_chunks_through_its_mailbox(
    federation: str, amqp_cleanup: list[str], store: RedisRoundStore, transport: Transport, tmp_path: Path
) -> None:
    header, data = synthetic_update(federation, "mid", rank=8, base_version=0, shape=SMALL, seed=9)
    topology = Topology(federation)
    amqp_cleanup.append(topology.adapter_queue("mid"))
    transport.declare(topology.client("mid"))
    with aggregators(federation, tmp_path, "--max-updates", "1", "--chunk-bytes", str(CHUNK), "--quiet") as group:
        group.start(1)
        _send(transport, federation, _chunks(header, data))
        wait_for(lambda: transport.queue_depth(topology.adapter_queue("mid")) >= 2, 60, "the adapter's chunks")
    sub = transport.subscribe(topology.adapter_queue("mid"), prefetch=10, dead_letter_exchange="")
    assembler, whole = ChunkAssembler(), None
    try:
        while whole is None and (d := sub.get(10.0)) is not None:
            release = parse_release(d.message.headers[HEADER_KEY])
            whole = assembler.add(parse_chunk(d.message.headers[CHUNK_KEY]), d.message.body, release.payload)
            d.ack()
    finally:
        sub.close()
    assert whole is not None and len(whole) == release.payload.size
    assert set(split_lora(decode_tensors(whole, release.payload), rank=8)) == set(
        split_lora(decode_tensors(data), rank=8)
    )
