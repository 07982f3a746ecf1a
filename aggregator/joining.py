"""Answer a join request: the newest global adapter, cut at the joining client's rank."""

from __future__ import annotations

from aggregator.flexlora import RankRequest, recut
from aggregator.rounds import GLOBAL_RELEASE, RoundStore, StoredRelease
from aggregator.validation import PIN_FINGERPRINT, Limits, check_rank_bounds
from schemas.errors import Reason, SchemaError
from schemas.lora import LoraFactors, join_lora, split_lora
from schemas.messages import AdapterRelease, JoinRequest
from schemas.tensors import decode_tensors, encode_tensors


def global_adapter(store: RoundStore, version: int) -> tuple[RankRequest, dict[str, LoraFactors]] | None:
    """The global adapter committed at `version` (its rank and alpha, and its factors); None when that version
    has none (a strategy without nested cuts) or is gone (pruned)."""
    source = store.releases(version).get(GLOBAL_RELEASE) if version >= 1 else None
    if source is None:
        return None
    h = source.header
    factors = split_lora(
        decode_tensors(store.payload(source), h.payload), rank=h.request, target_modules=h.target_modules
    )
    return h.request, factors


def join_release(store: RoundStore, request: JoinRequest, limits: Limits | None = None) -> StoredRelease | None:
    """None when there is nothing newer than what the client holds (or no global adapter yet). A join never
    pins anything (only accepted updates do), and asks for no rank outside the federation's bounds or above
    the stored global cut's: a 277-byte request must not make the aggregator build a huge adapter."""
    limits = limits or Limits()
    wanted = request.request
    check_rank_bounds(wanted, limits, "join at ")
    pinned = store.pinned(PIN_FINGERPRINT)
    if pinned is not None and pinned != request.base_model_fingerprint:
        raise SchemaError("join request for another base model than the federation's", reason=Reason.BASE_MODEL)
    version = store.version()
    if version < 1 or version <= request.have_version:
        return None
    releases = store.releases(version)
    source = releases.get(GLOBAL_RELEASE)
    if source is None:
        # Strategies without a global SVD cut (fedit, hetlora): hand out a participant's release of the
        # same rank and alpha when there is one.
        source = next(
            (r for r in releases.values() if r.header.request == wanted),
            None,
        )
        if source is None:
            return None
    h = source.header
    if set(h.target_modules) != set(request.target_modules):
        raise SchemaError(
            f"join request adapts {request.target_modules}, the federation {h.target_modules}", reason=Reason.MODULES
        )
    factors = split_lora(
        decode_tensors(store.payload(source), h.payload), rank=h.request, target_modules=h.target_modules
    )
    held = h.request.ranks(factors)
    above = sorted(m for m, r in wanted.ranks(factors).items() if r > held[m])
    if above:
        what = f"rank {request.rank}" if wanted.uniform else f"{wanted.describe()} (on {above[:3]})"
        raise SchemaError(
            f"join at {what} is above the federation's global adapter's rank {h.rank}", reason=Reason.RANK
        )
    cut = recut(factors, h.request, wanted)
    data, info = encode_tensors(join_lora(cut))
    header = AdapterRelease(
        federation=h.federation,
        version=version,
        client_id=request.client_id,
        rank=request.rank,
        lora_alpha=request.lora_alpha,
        rank_pattern=request.rank_pattern,
        alpha_pattern=request.alpha_pattern,
        target_modules=h.target_modules,
        base_model_fingerprint=h.base_model_fingerprint,
        strategy=h.strategy,
        num_updates=h.num_updates,
        payload=info,
        recipe=h.recipe,
    )
    return StoredRelease(header, data)
