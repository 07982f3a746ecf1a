"""A picture of a federation's stored round history: score, participants and rank mix per round (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Figure without pyplot: no global backend state, no screen needed, safe beside other threads.
from matplotlib.figure import Figure

from aggregator.rounds import RoundRecord
from aggregator.status import summarise


def plot_history(records: Sequence[RoundRecord], out: Path, title: str) -> Path:
    """Write a three-panel PNG: the participants' mean training loss per round (the score the history
    stores), updates per round, and how many of them trained at each rank. Raises ValueError when there
    are no rounds yet."""
    if not records:
        raise ValueError("no committed rounds yet: nothing to plot")
    rounds = [summarise(r) for r in records]
    versions = [s.version for s in rounds]
    ranks = sorted({rank for s in rounds for rank in s.rank_mix})
    fig = Figure(figsize=(8, 8), layout="constrained")
    score, counts, mix = fig.subplots(3, 1, sharex=True)
    fig.suptitle(title)

    scored = [(s.version, s.train_loss) for s in rounds if s.train_loss is not None]
    if scored:
        score.plot([v for v, _ in scored], [loss for _, loss in scored], marker="o")
    else:
        score.text(0.5, 0.5, "no participant reported a training loss", ha="center", transform=score.transAxes)
    score.set_ylabel("mean train loss\n(lower is better)")
    score.grid(alpha=0.3)

    counts.bar(versions, [s.participants for s in rounds], color="tab:gray")
    counts.set_ylabel("updates")
    counts.grid(axis="y", alpha=0.3)

    bottom = [0] * len(rounds)
    for rank in ranks:
        heights = [s.rank_mix.get(rank, 0) for s in rounds]
        mix.bar(versions, heights, bottom=bottom, label=f"rank {rank}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    mix.set_ylabel("rank mix")
    mix.set_xlabel("global version")
    mix.legend(loc="upper left", fontsize="small", ncols=min(len(ranks), 6))

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
