"""A device scores each round's starting adapter on examples it holds out, and reports it in its update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.transports.memory import MemoryBroker, MemoryTransport
from edge_client.app import build_worker, load_examples
from edge_client.datasets import DataError
from edge_client.model import tiny_model
from edge_client.settings import ClientSettings


def _settings(**overrides: object) -> ClientSettings:
    base = ClientSettings(client_id="c1", model="tiny", rank=4, local_steps=2, batch_size=4, samples_per_task=8)
    return base.model_copy(update=overrides)


def test_the_update_carries_the_held_out_score_of_the_adapter_it_started_from() -> None:
    worker = build_worker(_settings(eval_examples=3), MemoryTransport(MemoryBroker()), tiny_model())
    assert len(worker.trainer.held_out) == 3
    result = worker.trainer.train()
    assert result.start_score is not None and 0.0 <= result.start_score <= 1.0
    header, _ = worker.prepare(result)
    assert header.eval_score == result.start_score
    # Off by default: nothing is held out, nothing is reported.
    quiet = build_worker(_settings(), MemoryTransport(MemoryBroker()), tiny_model())
    assert quiet.trainer.held_out == []
    assert quiet.prepare(quiet.trainer.train())[0].eval_score is None


def test_built_in_tasks_hold_out_fresh_examples_of_the_same_tasks() -> None:
    settings = _settings(eval_examples=5)
    data = load_examples(settings)
    held, train = data.held_out, data.train
    assert len(held) == 5
    assert len(train) == settings.samples_per_task * len(settings.task_list)
    assert {ex.instruction for ex in held} <= {ex.instruction for ex in train}, "the device's own tasks"
    assert set(held) - set(train), "drawn with another seed, not copies of the training examples"


def test_a_jsonl_file_gives_its_last_records_to_scoring_and_keeps_the_rest_for_training(tmp_path: Path) -> None:
    data = tmp_path / "local.jsonl"
    records = [{"instruction": f"Say {w}.", "output": w} for w in ("a", "b", "c", "d", "e")]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = _settings(data=data, eval_examples=2)
    split = load_examples(settings)
    assert [ex.output for ex in split.train] == ["a", "b", "c"]
    assert [ex.output for ex in split.held_out] == ["d", "e"]
    with pytest.raises(DataError, match="5 records, but eval_examples=5 are held out"):
        load_examples(settings.model_copy(update={"eval_examples": 5}))
