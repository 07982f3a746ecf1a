"""`--rank auto`: pick a LoRA rank from the device's memory and cores, after FlexLoRA's heterogeneous rank tiers.

The tier is chosen on the memory that will hold the model: the accelerator's memory when there is one,
otherwise system RAM. FlexLoRA's clients use ranks 8 / 30 / 200 for low / medium / high resources; the
tiers below bracket those with one smaller rank for phones and one in between for large hosts.

=================  ====================  =====  ==========================================
tier               memory (GiB)          rank   typical device
=================  ====================  =====  ==========================================
phone              < 4                   4      phone, single-board computer
laptop             4 – 12                8      laptop; the paper's low tier
workstation        12 – 32               32     workstation; about the paper's medium 30
gpu-box            ≥ 32                  64     GPU box or large server
datacenter-gpu     ≥ 40, accelerator     200    data-centre GPU; the paper's high tier
=================  ====================  =====  ==========================================

A device with at most two CPU cores and no accelerator drops one tier: it has the memory for a larger
adapter but not the compute to train it within a round. So does a device running on its battery (where the
platform says so: /sys/class/power_supply on Linux). Where the free memory is known (MemAvailable, or the
accelerator's free memory), the tier is chosen on that rather than the total, so `--rank auto` measured before
every round follows what the device can spare now (see edge_client.ranks).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
MEMINFO = Path("/proc/meminfo")
POWER_SUPPLY = Path("/sys/class/power_supply")
SLOW_CPU_COUNT = 2  # at or below this, and without an accelerator, training is compute-bound


@dataclass(frozen=True)
class DeviceResources:
    memory_gib: float
    accelerator_memory_gib: float | None
    cpu_count: int
    # What is free now (None: not measured): the tier follows it when known.
    available_gib: float | None = None
    # Running on battery, not on a charger (None: the platform does not say, or there is no battery).
    on_battery: bool | None = None


@dataclass(frozen=True)
class RankTier:
    name: str
    min_memory_gib: float
    rank: int
    description: str
    needs_accelerator: bool = False


@dataclass(frozen=True)
class RankChoice:
    rank: int
    tier: str
    reason: str  # one line for the log, saying why this rank


# Ascending by min_memory_gib; choose_rank takes the last tier the device qualifies for.
RANK_TIERS: tuple[RankTier, ...] = (
    RankTier("phone", 0.0, 4, "phone or single-board computer"),
    RankTier("laptop", 4.0, 8, "laptop; the paper's low tier"),
    RankTier("workstation", 12.0, 32, "workstation; about the paper's medium tier (30)"),
    RankTier("gpu-box", 32.0, 64, "GPU box or large server"),
    RankTier("datacenter-gpu", 40.0, 200, "data-centre GPU; the paper's high tier", needs_accelerator=True),
)

EXPLICIT_TIER = "explicit"


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (AttributeError, ValueError, OSError):
        pass  # no sysconf (Windows) or the names are unknown here; /proc/meminfo may still answer
    try:
        meminfo = MEMINFO.read_text(encoding="ascii")
    except OSError:
        meminfo = ""
    match = re.search(r"^MemTotal:\s+(\d+)\s+kB", meminfo, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError("cannot determine the device's total memory; pass an explicit rank instead of 'auto'")
    return int(match.group(1)) * 1024 / GIB


def _accelerator_gib() -> float | None:
    # Imported here so that parsing an explicit rank never pays for loading torch.
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory) / GIB


def _available_gib() -> float | None:
    """Memory free for a new allocation now: the accelerator's free memory with one, else MemAvailable."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return float(free) / GIB
    try:
        meminfo = MEMINFO.read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", meminfo, flags=re.MULTILINE)
    return int(match.group(1)) * 1024 / GIB if match else None


def _on_battery(power_supply: Path = POWER_SUPPLY) -> bool | None:
    """True while a battery discharges (Linux's power_supply class); None where no battery reports."""
    statuses = []
    for battery in sorted(power_supply.glob("BAT*")):
        try:
            statuses.append((battery / "status").read_text(encoding="ascii").strip().lower())
        except OSError:
            continue
    if not statuses:
        return None
    return any(status == "discharging" for status in statuses)


def _cpu_count() -> int:
    # The cores this process may run on, which in a pinned container is fewer than the host has.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def detect_resources() -> DeviceResources:
    """Total RAM, the first CUDA device's memory (None without one), usable CPU cores, and, where the platform
    tells, the memory free now and whether the device runs on its battery."""
    return DeviceResources(
        memory_gib=_ram_gib(),
        accelerator_memory_gib=_accelerator_gib(),
        cpu_count=_cpu_count(),
        available_gib=_available_gib(),
        on_battery=_on_battery(),
    )


def choose_rank(resources: DeviceResources) -> RankChoice:
    """The rank of the highest tier the device qualifies for (on the memory free now, when measured), one lower
    on a compute-bound device or one running on its battery."""
    has_accelerator = resources.accelerator_memory_gib is not None
    total = resources.accelerator_memory_gib if resources.accelerator_memory_gib is not None else resources.memory_gib
    memory = total if resources.available_gib is None else min(total, resources.available_gib)
    eligible = [
        tier for tier in RANK_TIERS if memory >= tier.min_memory_gib and (has_accelerator or not tier.needs_accelerator)
    ]
    # The 0 GiB tier admits everything, so eligible is never empty unless the table is edited to break that.
    tier = eligible[-1]
    held_by = "GiB accelerator memory" if has_accelerator else "GiB RAM, no accelerator"
    free = "" if resources.available_gib is None else " free"
    facts = f"{memory:.1f}{free} {held_by}, {resources.cpu_count} CPU core(s)"
    if resources.on_battery:
        facts += ", on battery"
    slow = not has_accelerator and resources.cpu_count <= SLOW_CPU_COUNT
    if (slow or resources.on_battery) and len(eligible) > 1:
        lower = eligible[-2]
        why = "training is CPU-bound" if slow else "the device runs on its battery"
        reason = f"rank {lower.rank} ({lower.name} tier, one below {tier.name} as {why}): {facts}"
        return RankChoice(rank=lower.rank, tier=lower.name, reason=reason)
    return RankChoice(rank=tier.rank, tier=tier.name, reason=f"rank {tier.rank} ({tier.name} tier): {facts}")


def parse_rank(value: str | int, resources: DeviceResources | None = None) -> RankChoice:
    """A positive integer rank as given, or 'auto' to choose one from `resources` (detected when None)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid rank {value!r}: expected a positive integer or 'auto'")
    if isinstance(value, int):
        number = value
    else:
        text = value.strip()
        if text.lower() == "auto":
            return choose_rank(resources if resources is not None else detect_resources())
        # ASCII digits only: int() would also take "1_000" and non-Latin digits, which a typo should not become.
        if re.fullmatch(r"[+-]?[0-9]+", text) is None:
            raise ValueError(f"invalid rank {value!r}: expected a positive integer or 'auto'")
        number = int(text)
    if number < 1:
        raise ValueError(f"invalid rank {value!r}: a LoRA rank must be at least 1 (or use 'auto')")
    return RankChoice(rank=number, tier=EXPLICIT_TIER, reason=f"rank {number} set explicitly")
