"""Experiment results as JSON, a markdown table (final and best score per strategy and distribution, mean ±
standard error over seeds) and a PNG of the score per round, one line per strategy and one panel per distribution."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.runner import RunResult

COLOURS = {
    "flexlora": "tab:red",
    "flexlora-carry": "tab:orange",
    "fedit": "tab:blue",
    "fedit-top": "tab:cyan",
    "hetlora": "tab:green",
    "flora": "tab:purple",
}


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _mean_se(values: Sequence[float]) -> str:
    """`mean ± standard error` over seeds (the mean alone for one seed)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.fmean(values):.3f} ± {se:.3f}"


def lower_is_better(metric: str, higher_is_better: bool) -> bool:
    """A workload's scores go one way; a log-likelihood (`…_nll`) always the other: lower is better."""
    return metric.endswith("nll") or not higher_is_better


def _scored(result: RunResult, metric: str) -> list[float]:
    """The metric after every round that scored it (some scores are kept for a few rounds)."""
    return [s[metric] for s in result.scores[1:] if metric in s]


def _groups(results: Sequence[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    out: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        out.setdefault((r.distribution, r.strategy), []).append(r)
    return out


def markdown_table(results: Sequence[RunResult], metrics: Sequence[str], higher_is_better: bool) -> str:
    """One row per (distribution, strategy): clients per rank, the base model's score, the final and best
    score per metric (mean ± standard error over seeds; best: each run's best round); the winner of each
    distribution's final first metric in bold."""
    first = metrics[0]
    header = ["distribution", "strategy", "ranks (clients)", f"base {first}"]
    for m in metrics:
        header += [f"final {m}", f"best {m}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = _groups(results)
    distributions = list(dict.fromkeys(r.distribution for r in results))
    for distribution in distributions:
        rows = [(s, runs) for (d, s), runs in groups.items() if d == distribution]
        finals = {s: _mean([r.scores[-1][first] for r in runs]) for s, runs in rows}
        winner = (min if lower_is_better(first, higher_is_better) else max)(finals, key=lambda s: finals[s])
        for strategy, runs in rows:
            ranks = ", ".join(f"{k}×{v}" for k, v in sorted(runs[0].ranks.items()))
            cells = [distribution, strategy, ranks, _mean_se([r.scores[0][first] for r in runs])]
            for m in metrics:
                pick = min if lower_is_better(m, higher_is_better) else max
                final = _mean_se([r.scores[-1][m] for r in runs if m in r.scores[-1]])
                best = _mean_se([pick(_scored(r, m)) for r in runs if _scored(r, m)])
                cells += [f"**{final}**" if m == first and strategy == winner else final, best]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept(result: RunResult, metric: str, higher_is_better: bool = True) -> float | None:
    """How much of its best round a run keeps at the end, 1.0 when the last round is the best: final / best of a
    score scored every round (best / final of an error). A log-likelihood is read as the likelihood exp(-nll)
    (the geometric-mean probability of an answer token), so 0.9 means the final model gives the answers 0.9
    times the probability its best round gave."""
    values = _scored(result, metric)
    if len(values) < 2:
        return None
    if metric.endswith("nll"):
        values = [math.exp(-v) for v in values]
    elif not higher_is_better:
        best_error = min(values)
        return best_error / values[-1] if values[-1] > 0 else 1.0
    best = max(values)
    return values[-1] / best if best > 0 else None


def stability_table(results: Sequence[RunResult], metrics: Sequence[str], higher_is_better: bool = True) -> str:
    """Per (distribution, strategy), the worst run's final / best (see `kept`) of each per-round metric."""
    per_round = [m for m in metrics if results and all(len(_scored(r, m)) > 1 for r in results)]
    if not per_round:
        return ""
    lines = [
        "| distribution | strategy | " + " | ".join(f"kept {m} (worst seed)" for m in per_round) + " |",
        "|" + "---|" * (2 + len(per_round)),
    ]
    for (distribution, strategy), runs in _groups(results).items():
        cells = []
        for m in per_round:
            ratios = [k for r in runs if (k := kept(r, m, higher_is_better)) is not None]
            cells.append(f"{min(ratios):.3f}" if ratios else "–")
        lines.append(f"| {distribution} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: Sequence[RunResult], metric: str, higher_is_better: bool) -> str:
    """Final `metric` of each strategy minus each other strategy's, over the seeds both ran (they share the
    clients, their data and the order they are sampled in, so the per-seed difference is the fair comparison):
    mean ± standard error of the differences, and the seeds in parentheses. Positive is better."""
    sign = -1.0 if lower_is_better(metric, higher_is_better) else 1.0
    groups = _groups(results)
    strategies = list(dict.fromkeys(r.strategy for r in results))
    lines = [
        "| distribution | strategy | " + " | ".join(f"− {s}" for s in strategies) + " |",
        "|" + "---|" * (2 + len(strategies)),
    ]
    for distribution in dict.fromkeys(r.distribution for r in results):
        for strategy in strategies:
            mine = {r.seed: r.scores[-1][metric] for r in groups.get((distribution, strategy), [])}
            if not mine:
                continue
            cells = []
            for other in strategies:
                theirs = {r.seed: r.scores[-1][metric] for r in groups.get((distribution, other), [])}
                both = sorted(set(mine) & set(theirs))
                if other == strategy or not both:
                    cells.append("")
                    continue
                diffs = [sign * (mine[seed] - theirs[seed]) for seed in both]
                cells.append(f"{_mean_se(diffs)} ({len(both)})")
            lines.append(f"| {distribution} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Sequence[RunResult], metrics: Sequence[str], out: Path, title: str) -> Path:
    """Score per round (mean over seeds): the first metric solid, the second dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distributions = list(dict.fromkeys(r.distribution for r in results))
    fig, axes = plt.subplots(1, len(distributions), figsize=(4.2 * len(distributions), 3.6), squeeze=False)
    groups = _groups(results)
    for ax, distribution in zip(axes[0], distributions, strict=True):
        for (d, strategy), runs in groups.items():
            if d != distribution:
                continue
            for m, style in zip(metrics, ("-", "--"), strict=False):
                rounds = [t for t, s in enumerate(runs[0].scores) if m in s]
                values = [_mean([r.scores[t][m] for r in runs]) for t in rounds]
                label = f"{strategy} ({m})"
                ax.plot(rounds, values, style, color=COLOURS.get(strategy), label=label, marker=".")
        ax.set_title(distribution)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(" / ".join(metrics))
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_results(
    results: Sequence[RunResult],
    out_dir: Path,
    stem: str,
    *,
    metrics: Sequence[str],
    higher_is_better: bool,
    settings: dict[str, Any],
    command: str,
    title: str,
) -> tuple[Path, Path, Path]:
    """`<stem>.json`, `<stem>.md` and `<stem>.png` under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, metrics, higher_is_better)
    paired = paired_table(results, metrics[0], higher_is_better)
    stability = stability_table(results, metrics, higher_is_better)
    document = {
        "command": command,
        "settings": settings,
        "metrics": list(metrics),
        "higher_is_better": higher_is_better,
        "table": table,
        "paired": paired,
        "stability": stability,
        "runs": [r.to_json() for r in results],
    }
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path = out_dir / f"{stem}.md"
    sections = [f"{title}\n\n```\n{command}\n```\n\n{table}\n"]
    sections.append(f"Final {metrics[0]}, paired by seed (row minus column; positive is better):\n\n{paired}\n")
    if stability:
        sections.append(f"Final / best round of each run (a likelihood for `nll`), the worst seed:\n\n{stability}\n")
    md_path.write_text("\n".join(sections))
    png_path = plot(results, metrics, out_dir / f"{stem}.png", title)
    return json_path, md_path, png_path
