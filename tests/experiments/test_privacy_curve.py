"""The ε curve of an experiment (experiments.privacy_curve): one point per strategy and noise level, ε from the
runs' last round, the no-DP runs as the reference, written as a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from experiments.privacy_curve import main, points


def _doc(z: float | None, finals: dict[str, list[float]], epsilon: float | None) -> dict[str, Any]:
    runs = [
        {
            "strategy": strategy,
            "scores": [{"unseen": 1.0}, {"unseen": final}],
            "epsilon": [] if epsilon is None else [epsilon / 2, epsilon],
        }
        for strategy, values in finals.items()
        for final in values
    ]
    settings = {} if z is None else {"dp_noise_multiplier": z}
    return {"settings": settings, "metrics": ["unseen"], "higher_is_better": False, "runs": runs}


def test_each_strategy_gets_its_final_score_per_epsilon_with_the_no_dp_runs_first(tmp_path: Path) -> None:
    docs = {
        "no-dp.json": _doc(None, {"a": [0.1, 0.3], "b": [0.5, 0.5]}, None),
        "z-1.json": _doc(1.0, {"a": [0.4, 0.6], "b": [0.9, 1.1]}, 5.0),
        "z-4.json": _doc(4.0, {"a": [1.5, 1.5]}, 0.9),
    }
    for name, doc in docs.items():
        (tmp_path / name).write_text(json.dumps(doc))
    (tmp_path / "unrelated.json").write_text("{}")
    found = points(list(docs.values()), "unseen")
    assert [(p.strategy, p.epsilon) for p in found] == [("a", None), ("b", None), ("a", 5.0), ("b", 5.0), ("a", 0.9)]
    assert found[0].mean == pytest.approx(0.2) and found[0].se == pytest.approx(0.1)
    assert found[3].mean == pytest.approx(1.0)
    main([str(tmp_path)])
    table = (tmp_path / "privacy-curve.md").read_text()
    assert "| no DP | ∞ | 0.200 ± 0.100 (2 seeds) | 0.500 ± 0.000 (2 seeds) |" in table
    assert "| 4 | 0.9 | 1.500 ± 0.000 (2 seeds) | – |" in table
    assert (tmp_path / "privacy-curve.png").stat().st_size > 0


def test_a_document_mixing_private_and_open_runs_of_one_strategy_is_refused() -> None:
    doc = _doc(1.0, {"a": [0.4]}, 5.0)
    doc["runs"].append({"strategy": "a", "scores": [{"unseen": 0.3}], "epsilon": []})
    with pytest.raises(ValueError, match="some runs of one document are private"):
        points([doc], "unseen")
