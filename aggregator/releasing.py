"""Adapter releases as payloads: encoded into the store (in chunks when large) and sent to clients.

A release of hundreds of MB is never held as one `bytes`: its tensors are written piece by piece into
chunks in the store (a Blob), which the commit adopts, and publishing streams those chunks to the broker.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import torch

from aggregator.rounds import Blob, RoundStore, StoredRelease
from broker.chunked import publish_chunks, publish_payload
from broker.topology import Topology
from broker.transport import Transport
from schemas.messages import PayloadInfo
from schemas.safetensors_stream import describe, encode_pieces, iter_chunks


def encode_release(
    store: RoundStore, tensors: Mapping[str, torch.Tensor], *, chunk_bytes: int, ttl_s: float
) -> tuple[bytes | Blob, PayloadInfo]:
    """A release payload: bytes when it fits one message, else chunks staged in the store for `ttl_s`."""
    size, pieces = encode_pieces(tensors)
    info = describe(pieces, size)
    if size <= chunk_bytes:
        return b"".join(pieces), info
    return store.put_blob(uuid.uuid4().hex, iter_chunks(pieces, chunk_bytes), ttl_s), info


def send_release(
    transport: Transport, topology: Topology, store: RoundStore, release: StoredRelease, *, chunk_bytes: int
) -> None:
    """Publish one client's adapter to its mailbox, chunked if it is large (message ids name the version)."""
    h = release.header
    message_id = f"{h.federation}:{h.version}:{h.client_id}"
    header_json = h.model_dump_json()
    if isinstance(release.payload, Blob):
        publish_chunks(
            transport,
            topology.adapters_exchange,
            h.client_id,
            header_json,
            store.iter_blob(release.payload),
            h.payload,
            message_id,
        )
        return
    publish_payload(
        transport,
        topology.adapters_exchange,
        h.client_id,
        header_json,
        release.payload,
        h.payload,
        message_id=message_id,
        chunk_bytes=chunk_bytes,
    )
