"""Checks an update passes before it may touch a round; each refusal names its dead-letter reason."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from aggregator.rounds import Payload, RoundStore
from aggregator.security import Guard
from aggregator.symeig import one_blas_thread
from broker.transport import Message
from schemas.errors import LoraLayoutError, Reason, SchemaError
from schemas.lora import LoraFactors, RankRequest, module_shapes, split_lora
from schemas.messages import HEADER_KEY, LoraUpdate, parse_update
from schemas.tensors import decode_payload

PIN_FINGERPRINT = "base_model_fingerprint"
PIN_MODULES = "module_shapes"


@dataclass(frozen=True)
class ValidUpdate:
    header: LoraUpdate
    factors: dict[str, LoraFactors]

    @cached_property
    def norm(self) -> float:
        """‖ΔW‖_F over every module, ΔW = (α/r)·B·A; computed only where a norm check asks for it."""
        return update_norm(self.factors, self.header.request)

    @cached_property
    def shapes(self) -> str:
        """The module shapes as the federation pins them (JSON, sorted)."""
        return json.dumps({m: list(s) for m, s in module_shapes(self.factors).items()}, sort_keys=True)

    @property
    def pins(self) -> dict[str, str]:
        """The federation facts this update carries: recording it checks them and pins those unset, atomically."""
        return {PIN_FINGERPRINT: self.header.base_model_fingerprint, PIN_MODULES: self.shapes}


@dataclass(frozen=True)
class Limits:
    """A federation's bounds on what an update may be; None means unbounded."""

    max_bytes: int | None = None
    min_rank: int = 1
    max_rank: int | None = None
    max_norm: float | None = None


def update_norm(factors: dict[str, LoraFactors], scale: float | RankRequest) -> float:
    """‖ΔW‖_F of the whole update, per module by whichever is cheaper: ‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ), r × r, or the
    product itself where it is smaller (a rank above the module's sides: a rank-4096 update of 1 × 1 modules once
    made two 4096² Grams a module, 5 s of CPU a MB); `scale` is alpha / r, or a request giving each module its
    own (rank patterns).
    numpy on one BLAS thread: torch's or OpenBLAS's idle threads spin and starve the other aggregator
    processes on a small machine (see schemas.tensors.decode_payload and aggregator.symeig)."""
    one_blas_thread()
    total = 0.0
    for module, (a, b) in factors.items():
        a64 = a.detach().cpu().to(torch.float64).numpy()
        b64 = b.detach().cpu().to(torch.float64).numpy()
        if isinstance(scale, RankRequest):
            at = scale.at(module)
            s = at.alpha / at.rank
        else:
            s = scale
        rank, (d_out, d_in) = a64.shape[0], (b64.shape[0], a64.shape[1])
        if d_out * d_in <= rank * (d_out + d_in):
            squared = float(((b64 @ a64) ** 2).sum())
        else:
            squared = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
        if not math.isfinite(squared):  # overflowed (inf, or inf·0 = NaN): max(0, NaN) once made this 0
            return math.inf
        total += s * s * max(0.0, squared)
    return math.sqrt(total)


def pinned(store: RoundStore, name: str, cache: dict[str, str] | None = None) -> str | None:
    """The federation's value of a pin, or None while unset. Pins never change once set, so a process may
    remember them and skip the Redis round trip on every later update."""
    if cache is not None and name in cache:
        return cache[name]
    result = store.pinned(name)
    if cache is not None and result is not None:
        cache[name] = result
    return result


def pin_accepted(valid: ValidUpdate, cache: dict[str, str] | None = None) -> None:
    """Remember the facts of an update just recorded: recording it pinned them (the store checks and sets the
    pins in the step that records, `RoundStore.record`), or found them pinned already. Only a recorded update
    sets them, so a join, or an update refused for any reason, can never lock honest clients out of a fresh
    federation, and two aggregators recording at once cannot pin different facts."""
    if cache is not None:
        cache.update(valid.pins)


def refuse_conflict(store: RoundStore, valid: ValidUpdate, cache: dict[str, str] | None = None) -> SchemaError:
    """The refusal of an update whose record met other pinned facts (pinned by another aggregator since this one
    read them): read them again, and name the one that differs."""
    if cache is not None:
        cache.pop(PIN_FINGERPRINT, None)
        cache.pop(PIN_MODULES, None)
    try:
        check_pins(store, valid, cache)
    except SchemaError as exc:
        return exc
    return SchemaError("its base model or modules differ from the federation's pinned facts", reason=Reason.MODULES)


def validate_update(
    message: Message,
    federation: str,
    store: RoundStore,
    pins: dict[str, str] | None = None,
    limits: Limits = Limits(),
    guard: Guard | None = None,
) -> ValidUpdate:
    """Header, sender, limits, integrity, safetensors, LoRA layout, then the federation's pinned base model and
    shapes.

    The first accepted update pins the base-model fingerprint and the module shapes (in the store's step that
    records it); every later update must match them, so updates from a different base model can never be
    averaged together.
    """
    valid = check_message(message, federation, limits, guard)
    check_pins(store, valid, pins)
    return valid


def check_message(message: Message, federation: str, limits: Limits, guard: Guard | None = None) -> ValidUpdate:
    """Every check of `validate_update` that needs nothing but the message itself (all but the federation's pins):
    safe to run on any thread, ahead of the store (aggregator.ingest)."""
    header = check_header(message, federation, limits, guard)
    return check_payload(header, message.body, limits)


def check_header(message: Message, federation: str, limits: Limits, guard: Guard | None = None) -> LoraUpdate:
    """The checks that need only the header, before any of the payload is decoded: schema, federation, sender
    (identity and signature), size and rank."""
    header = parse_update(message.headers.get(HEADER_KEY))
    if header.federation != federation:
        raise SchemaError(
            f"update is for federation {header.federation!r}, not {federation!r}", reason=Reason.FEDERATION
        )
    if guard is not None:
        guard.check(message, header.client_id)
    size = max(header.payload.size, len(message.body))
    if limits.max_bytes is not None and size > limits.max_bytes:
        raise SchemaError(
            f"payload of {size} bytes exceeds the federation's limit of {limits.max_bytes} bytes",
            reason=Reason.TOO_LARGE,
        )
    check_rank_bounds(header.request, limits, "")
    return header


def check_rank_bounds(request: RankRequest, limits: Limits, what: str) -> None:
    """Refuse ("rank") a request any of whose ranks (the default, and each of its rank pattern's: the bounds
    hold per module) lies outside the federation's bounds. `what` prefixes the refusal ("join at ")."""
    ranks = sorted(request.all_ranks())
    low, high = ranks[0], ranks[-1]
    if low < limits.min_rank or (limits.max_rank is not None and high > limits.max_rank):
        stated = f"rank {request.rank}" if request.uniform else f"{request.describe()}: ranks {ranks}"
        raise SchemaError(
            f"{what}{stated} is outside the federation's bounds [{limits.min_rank}, {limits.max_rank or '∞'}]"
            f"{'' if request.uniform else ' (they hold for every module)'}",
            reason=Reason.RANK,
        )


def validate_payload(
    header: LoraUpdate,
    body: Payload,
    store: RoundStore,
    pins: dict[str, str] | None = None,
    limits: Limits = Limits(),
) -> ValidUpdate:
    """Integrity, safetensors, LoRA layout, the norm bound, then the federation's pinned base model and shapes."""
    valid = check_payload(header, body, limits)
    check_pins(store, valid, pins)
    return valid


def check_payload(header: LoraUpdate, body: Payload, limits: Limits = Limits()) -> ValidUpdate:
    """Integrity, safetensors, LoRA layout and the norm bound: the payload's checks that need no store."""
    decoded = decode_payload(body, header.payload)
    # The fast check covers the common case; when it fails, split_lora's per-module check names the culprit.
    factors = split_lora(
        decoded.tensors, rank=header.request, target_modules=header.target_modules, check_values=not decoded.finite
    )
    valid = ValidUpdate(header, factors)
    if limits.max_norm is not None and not valid.norm <= limits.max_norm:
        raise SchemaError(
            f"‖ΔW‖ = {valid.norm:.4g} exceeds the federation's bound {limits.max_norm:.4g}", reason=Reason.NORM
        )
    held = {m.rsplit(".", 1)[-1] for m in factors}
    if held != set(header.target_modules):
        missing = sorted(set(header.target_modules) - held)
        raise LoraLayoutError(f"target_modules lists {missing}, which no tensor of the payload holds")
    return valid


def check_pins(store: RoundStore, valid: ValidUpdate, pins: dict[str, str] | None = None) -> None:
    """Refuse an update for another base model ("base-model") or other modules or shapes ("modules") than the
    federation pinned. Unset pins pass: recording the update checks them again, atomically, and sets them."""
    header = valid.header
    fingerprint = pinned(store, PIN_FINGERPRINT, pins)
    if fingerprint is not None and fingerprint != header.base_model_fingerprint:
        raise SchemaError(
            f"base model {header.base_model_fingerprint[:12]}… differs from the federation's {fingerprint[:12]}…",
            reason=Reason.BASE_MODEL,
        )
    pinned_shapes = pinned(store, PIN_MODULES, pins)
    if pinned_shapes is not None and pinned_shapes != valid.shapes:
        theirs = json.loads(pinned_shapes)
        ours = json.loads(valid.shapes)
        differing = sorted(m for m in set(theirs) | set(ours) if theirs.get(m) != ours.get(m))
        raise SchemaError(
            f"modules or shapes differ from the federation's on {len(differing)} modules, e.g. {differing[:3]}",
            reason=Reason.MODULES,
        )
