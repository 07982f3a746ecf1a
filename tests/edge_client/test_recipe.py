"""The training recipe: the LoRA scaling convention and the local learning-rate schedule are what a run uses."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from edge_client.data import task_examples
from edge_client.model import tiny_model, wrap_lora
from edge_client.trainer import LocalTrainer, TrainConfig, teacher_forced
from schemas.recipe import Recipe, lora_alpha, lr_multiplier


def test_scaling_conventions_give_the_documented_lora_scale() -> None:
    # rsLoRA: alpha/rank = factor/√rank; rank: the same scale at every rank; fixed: alpha whatever the rank.
    assert lora_alpha(16, "rslora", 4.0) / 16 == pytest.approx(4.0 / math.sqrt(16))
    assert lora_alpha(2, "rank") / 2 == lora_alpha(56, "rank") / 56 == pytest.approx(2.0)
    assert lora_alpha(8, "fixed") == lora_alpha(200, "fixed") == 16.0
    with pytest.raises(ValueError, match="unknown scaling"):
        lora_alpha(8, "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha_factor"):
        Recipe(alpha_factor=0.0)
    with pytest.raises(ValueError, match="scaling"):
        Recipe(scaling="nope")  # type: ignore[arg-type]


def test_schedules_warm_up_then_decay_to_nearly_zero_inside_a_local_run() -> None:
    linear = [lr_multiplier("linear", 10, warmup_steps=2)(i) for i in range(10)]
    assert linear[0] < linear[1] < linear[2] == 1.0
    assert all(a > b for a, b in itertools.pairwise(linear[2:])) and 0 < linear[-1] < 0.2
    assert {lr_multiplier("constant", 5)(i) for i in range(5)} == {1.0}
    with pytest.raises(ValueError, match="warm-up"):
        lr_multiplier("linear", 4, warmup_steps=4)


def _trainer(schedule: str) -> LocalTrainer:
    base = tiny_model()
    model = wrap_lora(base.model, 4, 8.0, ["q_proj", "v_proj"], seed=0)
    examples = task_examples(["uppercase_word"], 8, seed=0)
    config = TrainConfig(local_steps=4, batch_size=4, learning_rate=1e-2, schedule=schedule)  # type: ignore[arg-type]
    return LocalTrainer(model, base.tokenizer, examples, config)


def test_the_local_run_applies_the_schedule_to_the_optimiser(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def record(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        seen.append(float(self.param_groups[0]["lr"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    _trainer("linear").train()
    assert seen == pytest.approx([1e-2 * m for m in (1.0, 0.75, 0.5, 0.25)])
    seen.clear()
    _trainer("constant").train()
    assert seen == pytest.approx([1e-2] * 4)


def test_teacher_forced_scores_are_a_likelihood_and_an_exact_match_share() -> None:
    trainer = _trainer("linear")
    examples = task_examples(["uppercase_word"], 6, seed=1)
    scores = teacher_forced(trainer.model, trainer.tokenizer, examples)
    assert scores.nll > 0 and 0.0 <= scores.exact <= 1.0
