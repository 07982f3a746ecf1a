"""The results table: mean ± standard error over seeds, the best round per metric in that metric's direction,
and scores that only some rounds carry (generation kept for the last round)."""

from __future__ import annotations

import math

from experiments.report import kept, markdown_table, paired_table, stability_table
from experiments.runner import RunResult


def run(seed: int, scores: list[dict[str, float]]) -> RunResult:
    return RunResult("flexlora", "uniform", seed, {2: 1}, scores)


def test_table_gives_mean_and_standard_error_and_reads_nll_as_lower_is_better() -> None:
    runs = [
        run(
            0, [{"exact": 0.0, "unseen_nll": 4.0}, {"exact": 0.2, "unseen_nll": 1.0}, {"exact": 0.1, "unseen_nll": 3.0}]
        ),
        run(
            1, [{"exact": 0.0, "unseen_nll": 4.0}, {"exact": 0.4, "unseen_nll": 2.0}, {"exact": 0.3, "unseen_nll": 2.5}]
        ),
    ]
    table = markdown_table(runs, ["exact", "unseen_nll"], higher_is_better=True)
    row = table.splitlines()[-1]
    # final exact: mean 0.2, s.e. 0.1; best exact per run 0.2 and 0.4; best NLL per run is its lowest: 1.0 and 2.0
    assert "**0.200 ± 0.100**" in row
    assert "| 0.300 ± 0.100 |" in row
    assert "| 2.750 ± 0.250 |" in row and row.endswith("| 1.500 ± 0.500 |")


def test_a_score_only_some_rounds_carry_is_taken_from_those_rounds() -> None:
    scores = [{"nll": 4.0, "rouge": 0.1}, {"nll": 2.0}, {"nll": 3.0, "rouge": 0.3}]
    table = markdown_table([run(0, scores)], ["rouge", "nll"], higher_is_better=True)
    assert table.splitlines()[-1].endswith("| **0.300** | 0.300 | 3.000 | 2.000 |")


def test_kept_reads_a_log_likelihood_as_a_probability() -> None:
    # NLL 1.0 at best, 1.1 at the end: the answers keep exp(-0.1) ≈ 0.905 of their best probability.
    result = run(0, [{"unseen_nll": 4.0}, {"unseen_nll": 1.0}, {"unseen_nll": 1.1}])
    assert abs((kept(result, "unseen_nll") or 0) - math.exp(-0.1)) < 1e-12
    assert kept(run(0, [{"exact": 0.0}, {"exact": 0.5}, {"exact": 0.25}]), "exact") == 0.5
    assert "| flexlora | 0.905 |" in stability_table([result], ["unseen_nll"])
    # an error (lower is better): best 0.1, final 0.2 keeps half
    assert kept(run(0, [{"err": 1.0}, {"err": 0.1}, {"err": 0.2}]), "err", higher_is_better=False) == 0.5


def test_strategies_are_compared_seed_by_seed() -> None:
    mine = [RunResult("flexlora", "uniform", s, {2: 1}, [{"r": 0.0}, {"r": v}]) for s, v in [(0, 0.5), (1, 0.3)]]
    theirs = [RunResult("fedit", "uniform", s, {2: 1}, [{"r": 0.0}, {"r": v}]) for s, v in [(0, 0.4), (1, 0.1), (2, 9)]]
    table = paired_table([*mine, *theirs], "r", higher_is_better=True)
    # seeds 0 and 1 only: differences 0.1 and 0.2, mean 0.15, s.e. 0.05
    assert "| uniform | flexlora |  | 0.150 ± 0.050 (2) |" in table
    assert "| uniform | fedit | -0.150 ± 0.050 (2) |  |" in table
