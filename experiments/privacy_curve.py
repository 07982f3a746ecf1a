"""Score against ε: gathers the `flexlora sim` results of one experiment run at several noise levels (and one
without differential privacy) into a table and a plot, one line per strategy.

    python -m experiments.privacy_curve docs/experiments/linear-dp [--metric unseen]

Reads every `*.json` result document in the folder; a document whose runs carry no ε is the no-DP reference.
Writes `privacy-curve.md` and `privacy-curve.png` beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Figure without pyplot: no global backend state, no screen needed.
from matplotlib.figure import Figure

from experiments.report import COLOURS, lower_is_better


@dataclass(frozen=True)
class Point:
    """One strategy at one noise level: ε after the last round (None without DP) and the final score per seed."""

    strategy: str
    noise_multiplier: float | None
    epsilon: float | None
    finals: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finals)

    @property
    def se(self) -> float:
        return statistics.stdev(self.finals) / math.sqrt(len(self.finals)) if len(self.finals) > 1 else 0.0


def points(documents: list[dict[str, Any]], metric: str) -> list[Point]:
    """Every (strategy, noise level) of the documents, the no-DP ones first, then by decreasing ε."""
    out = []
    for doc in documents:
        z = doc.get("settings", {}).get("dp_noise_multiplier")
        by_strategy: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for run in doc["runs"]:
            by_strategy[run["strategy"]].append(run)
        for strategy, runs in by_strategy.items():
            spent = [run["epsilon"][-1] for run in runs if run.get("epsilon")]
            if spent and len(spent) != len(runs):
                raise ValueError(f"{strategy}: some runs of one document are private and some not")
            # Every seed spends the same ε (same z, sampling rate and rounds); the mean guards against rounding.
            epsilon = statistics.fmean(spent) if spent else None
            finals = tuple(float(run["scores"][-1][metric]) for run in runs)
            out.append(Point(strategy, z, epsilon, finals))
    return sorted(out, key=lambda p: (p.epsilon is not None, -(p.epsilon or 0.0), p.strategy))


def markdown(found: list[Point], metric: str) -> str:
    strategies = sorted({p.strategy for p in found})
    levels = sorted({(p.epsilon, p.noise_multiplier) for p in found}, key=lambda e: (e[0] is not None, -(e[0] or 0)))
    table = {(p.strategy, p.epsilon, p.noise_multiplier): p for p in found}
    lines = [
        f"| noise multiplier z | ε | {' | '.join(f'{s}: final {metric}' for s in strategies)} |",
        f"|---|---|{'---|' * len(strategies)}",
    ]
    for epsilon, z in levels:
        cells = []
        for s in strategies:
            p = table.get((s, epsilon, z))
            cells.append("–" if p is None else f"{p.mean:.3f} ± {p.se:.3f} ({len(p.finals)} seeds)")
        zs = "no DP" if z is None else f"{z:g}"
        es = "∞" if epsilon is None else f"{epsilon:.3g}"
        lines.append(f"| {zs} | {es} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot(found: list[Point], metric: str, out: Path, lower: bool) -> Path:
    """Final score against ε (log axis), mean ± s.e. over seeds; each strategy's no-DP score a dashed line."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for strategy in sorted({p.strategy for p in found}):
        colour = COLOURS.get(strategy)
        private = sorted(
            (p for p in found if p.strategy == strategy and p.epsilon is not None), key=lambda p: p.epsilon or 0
        )
        if private:
            ax.errorbar(
                [p.epsilon or 0.0 for p in private],
                [p.mean for p in private],
                yerr=[p.se for p in private],
                marker="o",
                capsize=3,
                color=colour,
                label=strategy,
            )
        for p in found:
            if p.strategy == strategy and p.epsilon is None:
                ax.axhline(p.mean, linestyle="--", color=colour, alpha=0.7, label=f"{strategy}, no DP")
    ax.set_xscale("log")
    ax.set_xlabel("ε after the last round (δ as in the results)")
    ax.set_ylabel(f"final {metric} ({'lower' if lower else 'higher'} is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--metric", default=None, help="the score to plot (default: the documents' first metric)")
    args = parser.parse_args(argv)
    documents = [json.loads(p.read_text()) for p in sorted(args.folder.glob("*.json"))]
    documents = [d for d in documents if "runs" in d]
    if not documents:
        raise SystemExit(f"{args.folder}: no result documents (*.json with runs)")
    metric = args.metric or documents[0]["metrics"][0]
    found = points(documents, metric)
    lower = lower_is_better(metric, bool(documents[0].get("higher_is_better", True)))
    (args.folder / "privacy-curve.md").write_text(markdown(found, metric))
    plot(found, metric, args.folder / "privacy-curve.png", lower)
    print(markdown(found, metric), end="")


if __name__ == "__main__":
    main()
