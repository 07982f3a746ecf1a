"""A picture of a federation's stored round history: score, participants and rank mix per round (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Figure without pyplot: no global backend state, no screen needed, safe beside other threads.
from matplotlib.figure import Figure

from aggregator.rounds import RoundRecord
from aggregator.status import summarise_all


def plot_history(records: Sequence[RoundRecord], out: Path, title: str) -> Path:
    """Write a three-panel PNG: the scores the participants reported (held-out ROUGE-L of the version they
    trained from, mean training loss), updates per round (and the ε spent, with differential privacy), and how
    many of them trained at each rank.
    Raises ValueError when there are no rounds yet."""
    if not records:
        raise ValueError("no committed rounds yet: nothing to plot")
    rounds = summarise_all(records)
    versions = [s.version for s in rounds]
    ranks = sorted({rank for s in rounds for rank in s.rank_mix})
    fig = Figure(figsize=(8, 8), layout="constrained")
    score, counts, mix = fig.subplots(3, 1, sharex=True)
    fig.suptitle(title)

    # Held-out ROUGE-L (higher is better) where clients report it, the training loss on a second axis.
    rouge = [(s.version, s.eval_score) for s in rounds if s.eval_score is not None]
    losses = [(s.version, s.train_loss) for s in rounds if s.train_loss is not None]
    if rouge:
        # Each round's participants scored the version they trained from, so it belongs one version back.
        score.plot([v - 1 for v, _ in rouge], [r for _, r in rouge], marker="o", color="tab:blue")
        score.set_ylabel("clients' held-out\nROUGE-L", color="tab:blue")
    if losses:
        axis = score.twinx() if rouge else score
        axis.plot([v for v, _ in losses], [x for _, x in losses], marker=".", color="tab:red")
        axis.set_ylabel("mean train loss", color="tab:red")
    if not rouge and not losses:
        score.text(0.5, 0.5, "no participant reported a score", ha="center", transform=score.transAxes)
    score.grid(alpha=0.3)

    counts.bar(versions, [s.participants for s in rounds], color="tab:gray")
    counts.set_ylabel("updates")
    counts.grid(axis="y", alpha=0.3)
    spent = [(s.version, s.epsilon) for s in rounds if s.epsilon is not None]
    if spent:  # differential privacy: the ε spent up to each version, on a second axis
        eps = counts.twinx()
        eps.plot([v for v, _ in spent], [e for _, e in spent], marker=".", color="tab:purple")
        eps.set_ylabel("ε spent", color="tab:purple")

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
