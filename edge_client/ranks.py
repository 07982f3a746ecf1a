"""Rank policies: the rank a device trains its next round at, asked before every round.

A device's resources change (a phone on its charger and idle affords more than on battery; a laptop frees its
GPU at night), so the rank is not fixed for life: `auto` measures the device again before every round
(edge_client.resources), a schedule gives one rank per round, and a fixed rank is a policy too. The worker
(edge_client.worker) moves its adapter to the new rank exactly: down by cutting what it holds (FlexLoRA's cuts
nest), up by asking the federation for the global adapter at the new rank (a join), so the new directions
start from the global's next singular vectors rather than from zero.

Ranks per module (a rank pattern, `--rank-pattern`) are fixed for life: the pattern's modules train at its
ranks, the others at the fixed rank; a pattern with `auto` or a schedule is refused by the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edge_client.resources import DeviceResources, RankChoice, choose_rank, detect_resources, parse_rank


class RankPolicy(Protocol):
    def __call__(self, round_index: int) -> RankChoice:
        """The rank of round `round_index` (0 for this client's first round), and why."""
        ...


@dataclass(frozen=True)
class FixedRank:
    choice: RankChoice

    def __call__(self, round_index: int) -> RankChoice:
        return self.choice


@dataclass(frozen=True)
class RankSchedule:
    """One rank per round; the last holds once the schedule runs out."""

    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"a rank schedule needs ranks >= 1, got {list(self.ranks)}")

    def __call__(self, round_index: int) -> RankChoice:
        index = min(round_index, len(self.ranks) - 1)
        rank = self.ranks[index]
        return RankChoice(rank, "schedule", f"rank {rank} (round {round_index + 1} of the schedule {list(self.ranks)})")


@dataclass(frozen=True)
class AutoRank:
    """The device's tier measured again before every round (free memory, battery, cores)."""

    measure: Callable[[], DeviceResources] = field(default=detect_resources)

    def __call__(self, round_index: int) -> RankChoice:
        return choose_rank(self.measure())


def rank_policy(rank: int | str, schedule: Sequence[int] = ()) -> RankPolicy:
    """A schedule when one is given, else `auto` measured every round, else the fixed rank."""
    if schedule:
        return RankSchedule(tuple(schedule))
    if isinstance(rank, str) and rank.strip().lower() == "auto":
        return AutoRank()
    return FixedRank(parse_rank(rank))
