"""The LoRA key layout on the wire, which is PEFT's own adapter_model.safetensors layout."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from schemas.errors import LoraLayoutError
from schemas.ranks import RankRequest as RankRequest  # re-exported: the LoRA layout names it from here

# PEFT saves `base_model.model.<module path>.lora_A.weight`; keeping that prefix means a payload
# can be written straight to an adapter directory and loaded with PeftModel.from_pretrained.
PEFT_PREFIX = "base_model.model."
# A module's name has the bounds of the headers' (schemas.messages.ModuleName): at most 256 characters.
_KEY = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]{1,256})\.lora_(?P<factor>[AB])\.weight$")


class LoraFactors(NamedTuple):
    """One module's factors: A is (rank × d_in), B is (d_out × rank)."""

    A: torch.Tensor
    B: torch.Tensor


def recut(factors: Mapping[str, LoraFactors], source: RankRequest, target: RankRequest) -> dict[str, LoraFactors]:
    """The rank-r cut of ΔW from a larger FlexLoRA cut of it: truncated SVDs nest, so B[:, :r] and A[:r]
    (rescaled for the target's alpha) are exactly the target cut. Zero-padded above the source's rank. Module by
    module, at each module's rank and alpha when the requests carry patterns."""
    out = {}
    for module, f in factors.items():
        s, t = source.at(module), target.at(module)
        keep = min(s.rank, t.rank)
        ratio = (s.alpha / s.rank) / (t.alpha / t.rank)
        a = torch.zeros((t.rank, f.A.shape[1]), dtype=f.A.dtype)
        b = torch.zeros((f.B.shape[0], t.rank), dtype=f.B.dtype)
        a[:keep] = f.A[:keep]
        b[:, :keep] = f.B[:, :keep] * ratio
        out[module] = LoraFactors(A=a, B=b)
    return out


def adapter_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    """The rank of a PEFT adapter state dict (its first lora_A's rows); ValueError when it holds none."""
    for key, tensor in tensors.items():
        if key.endswith(".lora_A.weight"):
            return int(tensor.shape[0])
    raise ValueError("no lora_A weight in the adapter")


def lora_key(module: str, factor: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"


def join_lora(factors: Mapping[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """Flatten per-module factors into PEFT state-dict keys."""
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in factors.items():
        out[lora_key(module, "A")] = a
        out[lora_key(module, "B")] = b
    return out


def key_parts(key: str) -> tuple[str, str] | None:
    """(module, "A" or "B") of a PEFT LoRA key, or None if the key is not one."""
    match = _KEY.match(key)
    return None if match is None else (match["module"], match["factor"])


def split_lora(
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int | RankRequest,
    target_modules: Iterable[str] | None = None,
    check_values: bool = True,
) -> dict[str, LoraFactors]:
    """Group PEFT state-dict keys by module, checking every key, rank and shape (and, unless told not to,
    that every value is finite); raises LoraLayoutError. `rank` is one rank, or a request whose patterns
    give each module its own."""
    request = rank if isinstance(rank, RankRequest) else None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoraLayoutError(f"unexpected tensor key {key!r}; expected {PEFT_PREFIX}<module>.lora_A|B.weight")
        parts.setdefault(match["module"], {})[match["factor"]] = tensor
    if not parts:
        raise LoraLayoutError("payload holds no LoRA tensors")
    targets = tuple(target_modules) if target_modules is not None else None
    factors: dict[str, LoraFactors] = {}
    for module in sorted(parts):
        pair = parts[module]
        if set(pair) != {"A", "B"}:
            raise LoraLayoutError(f"module {module!r} lacks lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2:
            raise LoraLayoutError(f"module {module!r}: factors must be 2-D, got {tuple(a.shape)}, {tuple(b.shape)}")
        if a.shape[1] == 0 or b.shape[0] == 0:  # such an update would pin shapes no honest update has
            raise LoraLayoutError(f"module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} have an empty side")
        if targets is not None and module.rsplit(".", 1)[-1] not in targets:
            raise LoraLayoutError(f"module {module!r} is not one of the declared target modules {list(targets)}")
        declared = request.at(module).rank if request is not None else rank
        if a.shape[0] != declared or b.shape[1] != declared:
            how = "" if request is None or request.uniform else " (the module's rank by the rank pattern)"
            raise LoraLayoutError(
                f"module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not have the declared rank "
                f"{declared}{how}"
            )
        if check_values and not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise LoraLayoutError(f"module {module!r} holds NaN or infinite values")
        factors[module] = LoraFactors(a, b)
    return factors


def module_shapes(factors: Mapping[str, LoraFactors]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every module: what two updates must agree on to be aggregated together."""
    return {m: (int(f.B.shape[0]), int(f.A.shape[1])) for m, f in factors.items()}
