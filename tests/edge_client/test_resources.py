"""Tests for choosing a LoRA rank from the device's resources (`--rank auto`)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edge_client import resources
from edge_client.resources import (
    RANK_TIERS,
    DeviceResources,
    choose_rank,
    detect_resources,
    parse_rank,
)

JUST_BELOW = 1e-6


def ram_only(gib: float, cpus: int = 8) -> DeviceResources:
    return DeviceResources(memory_gib=gib, accelerator_memory_gib=None, cpu_count=cpus)


def with_gpu(gib: float, cpus: int = 8, ram: float = 16.0) -> DeviceResources:
    return DeviceResources(memory_gib=ram, accelerator_memory_gib=gib, cpu_count=cpus)


def test_tier_table_is_ascending_and_matches_the_documented_ranks() -> None:
    thresholds = [t.min_memory_gib for t in RANK_TIERS]
    assert thresholds == sorted(thresholds)
    assert thresholds[0] == 0.0
    assert [(t.name, t.rank) for t in RANK_TIERS] == [
        ("phone", 4),
        ("laptop", 8),
        ("workstation", 32),
        ("gpu-box", 64),
        ("datacenter-gpu", 200),
    ]
    assert resources.__doc__ is not None
    for tier in RANK_TIERS:
        assert tier.name in resources.__doc__


@pytest.mark.parametrize(
    ("gib", "rank", "tier"),
    [
        (0.5, 4, "phone"),
        (4 - JUST_BELOW, 4, "phone"),
        (4.0, 8, "laptop"),
        (12 - JUST_BELOW, 8, "laptop"),
        (12.0, 32, "workstation"),
        (32 - JUST_BELOW, 32, "workstation"),
        (32.0, 64, "gpu-box"),
        (40.0, 64, "gpu-box"),  # the 200 tier needs an accelerator
        (512.0, 64, "gpu-box"),
    ],
)
def test_ram_only_tiers(gib: float, rank: int, tier: str) -> None:
    choice = choose_rank(ram_only(gib))
    assert (choice.rank, choice.tier) == (rank, tier)
    assert "no accelerator" in choice.reason and "\n" not in choice.reason


@pytest.mark.parametrize(
    ("gib", "rank", "tier"),
    [
        (2.0, 4, "phone"),
        (4 - JUST_BELOW, 4, "phone"),
        (4.0, 8, "laptop"),
        (12 - JUST_BELOW, 8, "laptop"),
        (12.0, 32, "workstation"),
        (32 - JUST_BELOW, 32, "workstation"),
        (32.0, 64, "gpu-box"),
        (40 - JUST_BELOW, 64, "gpu-box"),
        (40.0, 200, "datacenter-gpu"),
        (80.0, 200, "datacenter-gpu"),
    ],
)
def test_accelerator_tiers(gib: float, rank: int, tier: str) -> None:
    choice = choose_rank(with_gpu(gib))
    assert (choice.rank, choice.tier) == (rank, tier)
    assert "accelerator memory" in choice.reason and str(rank) in choice.reason


def test_accelerator_memory_decides_not_ram() -> None:
    assert choose_rank(with_gpu(6.0, ram=256.0)).rank == 8
    assert choose_rank(with_gpu(80.0, ram=8.0)).rank == 200


@pytest.mark.parametrize(
    ("gib", "cpus", "rank", "tier"),
    [
        (16.0, 2, 8, "laptop"),
        (16.0, 1, 8, "laptop"),
        (16.0, 3, 32, "workstation"),
        (100.0, 2, 32, "workstation"),
        (8.0, 2, 4, "phone"),
        (2.0, 1, 4, "phone"),  # already the lowest tier
    ],
)
def test_two_core_cpu_only_device_drops_one_tier(gib: float, cpus: int, rank: int, tier: str) -> None:
    choice = choose_rank(ram_only(gib, cpus=cpus))
    assert (choice.rank, choice.tier) == (rank, tier)


def test_downgrade_is_explained() -> None:
    assert "one below workstation" in choose_rank(ram_only(16.0, cpus=2)).reason


def test_no_downgrade_with_an_accelerator() -> None:
    assert choose_rank(with_gpu(16.0, cpus=1)).rank == 32
    assert choose_rank(with_gpu(48.0, cpus=2)).rank == 200


def test_parse_rank_auto_uses_given_resources() -> None:
    choice = parse_rank("auto", ram_only(16.0))
    assert (choice.rank, choice.tier) == (32, "workstation")
    assert parse_rank(" AUTO ", with_gpu(48.0)).rank == 200


def test_parse_rank_auto_detects_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "detect_resources", lambda: ram_only(5.0))
    assert parse_rank("auto").rank == 8


@pytest.mark.parametrize(("value", "rank"), [("12", 12), (" 16 ", 16), ("+4", 4), (200, 200), ("1", 1)])
def test_parse_rank_explicit(value: str | int, rank: int) -> None:
    choice = parse_rank(value, ram_only(1.0))
    assert (choice.rank, choice.tier) == (rank, "explicit")
    assert str(rank) in choice.reason


@pytest.mark.parametrize("value", ["0", "-3", 0, -3])
def test_parse_rank_rejects_non_positive(value: str | int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        parse_rank(value)


@pytest.mark.parametrize("value", ["big", "", "1.5", "1e2", "1_000", "١٢", "auto8"])
def test_parse_rank_rejects_non_integers(value: str) -> None:
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        parse_rank(value)


def test_parse_rank_rejects_bool() -> None:
    with pytest.raises(ValueError):
        parse_rank(True)


def test_detect_resources_returns_positive_values() -> None:
    found = detect_resources()
    assert found.memory_gib > 0
    assert found.cpu_count >= 1
    assert found.accelerator_memory_gib is None or found.accelerator_memory_gib > 0
    assert found.accelerator_memory_gib is None or torch.cuda.is_available()


def test_detect_resources_reads_cuda_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=24 * 1024**3))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (10 * 1024**3, 24 * 1024**3))
    found = detect_resources()
    assert found.accelerator_memory_gib == pytest.approx(24.0)
    assert found.available_gib == pytest.approx(10.0)


def test_the_tier_follows_the_memory_free_now_and_drops_on_battery() -> None:
    roomy = DeviceResources(memory_gib=64.0, accelerator_memory_gib=None, cpu_count=8)
    assert choose_rank(roomy).rank == 64
    busy = DeviceResources(memory_gib=64.0, accelerator_memory_gib=None, cpu_count=8, available_gib=6.0)
    assert choose_rank(busy).rank == 8 and "6.0 free" in choose_rank(busy).reason
    unplugged = DeviceResources(memory_gib=64.0, accelerator_memory_gib=None, cpu_count=8, on_battery=True)
    assert choose_rank(unplugged).rank == 32 and "battery" in choose_rank(unplugged).reason


def test_battery_state_is_read_from_the_power_supply_class(tmp_path: Path) -> None:
    assert resources._on_battery(tmp_path) is None  # no battery reports: unknown
    (tmp_path / "AC").mkdir()
    battery = tmp_path / "BAT0"
    battery.mkdir()
    (battery / "status").write_text("Charging\n", encoding="ascii")
    assert resources._on_battery(tmp_path) is False
    (battery / "status").write_text("Discharging\n", encoding="ascii")
    assert resources._on_battery(tmp_path) is True


def test_available_memory_is_read_from_meminfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16777216 kB\nMemAvailable:    2097152 kB\n", encoding="ascii")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(resources, "MEMINFO", meminfo)
    assert resources._available_gib() == pytest.approx(2.0)


def test_ram_falls_back_to_proc_meminfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_sysconf(name: str) -> int:
        raise ValueError(name)

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16777216 kB\nMemFree:         1024 kB\n", encoding="ascii")
    monkeypatch.setattr(os, "sysconf", no_sysconf)
    monkeypatch.setattr(resources, "MEMINFO", meminfo)
    assert detect_resources().memory_gib == pytest.approx(16.0)


def test_ram_undetectable_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_sysconf(name: str) -> int:
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    monkeypatch.setattr(resources, "MEMINFO", tmp_path / "absent")
    with pytest.raises(RuntimeError, match="explicit rank"):
        detect_resources()
