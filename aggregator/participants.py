"""What a round is made of: the clients' factors as the strategies take them, and who took part with what
weight; pure bookkeeping between the round store and the aggregation math."""

from __future__ import annotations

import math
from collections.abc import Mapping

from aggregator.blobs import LazyFactors
from aggregator.flexlora import ClientAdapter
from aggregator.rounds import Blob, Participant, RecordedUpdate, RoundStore, record_id
from schemas.lora import LoraFactors, split_lora
from schemas.tensors import decode_tensors


def client_adapters(
    store: RoundStore,
    recorded: list[RecordedUpdate],
    held: Mapping[str, Mapping[str, LoraFactors]] | None = None,
) -> list[ClientAdapter]:
    """Each recorded update's factors. Checked in full (sha256, values) when it was accepted; the strategy
    checks values again. A chunked payload is read from the store a module at a time, never whole; one not
    read (payload None) is in `held`, by record id (aggregator.held)."""
    clients = []
    for item in recorded:
        h = item.header
        factors: Mapping[str, LoraFactors]
        if item.payload is None:
            rid = record_id(h.client_id, h.update_id)
            if held is None or rid not in held:
                raise ValueError(f"update {h.update_id} of {h.client_id} was not read from the store and is not held")
            factors = held[rid]
        elif isinstance(item.payload, Blob):
            factors = LazyFactors(store, item.payload)
        else:
            tensors = decode_tensors(item.payload)
            factors = split_lora(tensors, rank=h.request, target_modules=h.target_modules, check_values=False)
        clients.append(ClientAdapter.of(factors, h.request))
    return clients


def round_participants(recorded: list[RecordedUpdate], weights: list[float], round_id: int) -> list[Participant]:
    return [
        Participant(
            update_id=u.header.update_id,
            client_id=u.header.client_id,
            rank=u.header.rank,
            lora_alpha=u.header.lora_alpha,
            num_samples=u.header.num_samples,
            base_version=u.header.base_version,
            staleness=round_id - u.header.base_version,
            weight=weight,
        )
        for u, weight in zip(recorded, weights, strict=True)
    ]


def participant_means(recorded: list[RecordedUpdate], weights: list[float]) -> dict[str, float]:
    """What the participants reported, averaged with the round's own weights: their local training loss and
    their held-out ROUGE-L of the version they trained from (the scores `flexlora status` and the history
    picture show). A figure no participant reported is left out."""
    out = {}
    for name in ("train_loss", "eval_score"):
        known = [(w, getattr(u.header, name)) for u, w in zip(recorded, weights, strict=True)]
        known = [(w, v) for w, v in known if v is not None]
        total = sum(w for w, _ in known)
        mean = math.fsum(w * v for w, v in known) / total if known and total > 0 else math.nan
        if math.isfinite(mean):  # a stored inf would break `flexlora status` and `history` for good
            out[name] = mean
    return out
