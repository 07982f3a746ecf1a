"""Adapter releases as payloads: encoded into the store (in chunks when large) and sent to clients.

A release of hundreds of MB is never held as one `bytes`: its tensors are written piece by piece into
chunks in the store (a Blob), which the commit adopts, and publishing streams those chunks to the broker.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import torch

from aggregator.flexlora import RankRequest
from aggregator.rounds import Blob, RoundStore, StoredRelease
from aggregator.validation import PIN_FINGERPRINT
from broker.chunked import publish_chunks, publish_payload
from broker.topology import Topology
from broker.transport import Transport
from schemas.lora import LoraFactors, join_lora
from schemas.messages import SHARED_RELEASE, AdapterRelease, LoraUpdate, PayloadInfo, PrivacySpent
from schemas.recipe import Recipe
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


def release_template(store: RoundStore, accepted: LoraUpdate) -> LoraUpdate:
    """What every release of a round names: the federation's pinned base model, and the target modules of an
    accepted update (their set is the pinned modules', checked on acceptance), never a refused message's."""
    fingerprint = store.pinned(PIN_FINGERPRINT)
    if fingerprint is None or fingerprint == accepted.base_model_fingerprint:
        return accepted
    return accepted.model_copy(update={"base_model_fingerprint": fingerprint})


def build_releases(
    store: RoundStore,
    wanted: Mapping[str, RankRequest],
    cuts: dict[RankRequest, dict[str, LoraFactors]],
    *,
    version: int,
    template: LoraUpdate,
    num_updates: int,
    strategy: str,
    chunk_bytes: int,
    ttl_s: float,
    recipe: Recipe | None = None,
    privacy: PrivacySpent | None = None,
) -> list[StoredRelease]:
    """Every wanted client's release of `version`: one payload per distinct cut, shared by the clients that
    asked for it. `cuts` is emptied as they are encoded, so a large release is held once, in the store."""
    payloads = {}
    for req in list(cuts):
        payloads[req] = encode_release(store, join_lora(cuts.pop(req)), chunk_bytes=chunk_bytes, ttl_s=ttl_s)
    releases = []
    for client_id, req in sorted(wanted.items()):
        data, info = payloads[req]
        header = AdapterRelease(
            federation=template.federation,
            version=version,
            client_id=client_id,
            rank=req.rank,
            lora_alpha=req.alpha,
            rank_pattern=dict(req.rank_pattern),
            alpha_pattern=dict(req.alpha_pattern),
            target_modules=template.target_modules,
            base_model_fingerprint=template.base_model_fingerprint,
            num_updates=num_updates,
            strategy=strategy,
            payload=info,
            recipe=recipe,
            privacy=privacy,
        )
        releases.append(StoredRelease(header, data))
    return releases


def send_release(
    transport: Transport,
    topology: Topology,
    store: RoundStore,
    release: StoredRelease,
    *,
    chunk_bytes: int,
    recipients: Sequence[str] = (),
) -> None:
    """Publish an adapter to its client's mailbox, chunked if it is large (message ids name the version). With
    `recipients`, the one release goes to every one of their mailboxes (the broker shares the body) under a
    header that names none of them."""
    h = release.header
    if recipients:
        h = h.model_copy(update={"client_id": SHARED_RELEASE})
        message_id = f"{h.federation}:{h.version}:cut-{h.payload.sha256[:32]}"
        first, *others = recipients
    else:
        message_id = f"{h.federation}:{h.version}:{h.client_id}"
        first, others = h.client_id, []
    header_json = h.model_dump_json()
    if isinstance(release.payload, Blob):
        publish_chunks(
            transport,
            topology.adapters_exchange,
            first,
            header_json,
            store.iter_blob(release.payload),
            h.payload,
            message_id,
            bcc=others,
        )
        return
    publish_payload(
        transport,
        topology.adapters_exchange,
        first,
        header_json,
        release.payload,
        h.payload,
        message_id=message_id,
        chunk_bytes=chunk_bytes,
        bcc=others,
    )


def shared_cuts(releases: Mapping[str, StoredRelease]) -> list[tuple[StoredRelease, list[str]]]:
    """The releases of one version grouped by what they carry (the same cut, the same header but for the client):
    each group is published once, to all of its clients' mailboxes. FlexLoRA's cuts nest, so a round has as many
    groups as distinct ranks, however many clients it had."""
    groups: dict[str, tuple[StoredRelease, list[str]]] = {}
    for client_id, release in sorted(releases.items()):
        key = release.header.model_dump_json(exclude={"client_id", "created_at"})
        groups.setdefault(key, (release, []))[1].append(client_id)
    return list(groups.values())
