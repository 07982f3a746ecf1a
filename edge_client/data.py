"""Local data for training: prompt format, tokenised examples with the prompt masked out, padded batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from edge_client.model import TextTokenizer
from edge_client.tasks import Example, make_examples

IGNORE = -100  # label value the loss skips: the model is graded only on the answer


def format_prompt(example: Example) -> str:
    text = f"### Instruction:\n{example.instruction}\n"
    if example.input:
        text += f"### Input:\n{example.input}\n"
    return text + "### Response:\n"


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode(tokenizer: TextTokenizer, example: Example, max_length: int = 128) -> Encoded:
    prompt = tokenizer.encode(format_prompt(example))
    answer = [*tokenizer.encode(example.output), tokenizer.eos_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return Encoded(ids, labels)


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item; padding is masked out of attention and loss."""
    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(
    items: Sequence[Encoded], batch_size: int, pad_id: int, rng: random.Random
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (epoch after epoch), so a fixed number of local steps is always possible."""
    if not items:
        raise ValueError("no training examples")
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([items[i] for i in order[start : start + batch_size]], pad_id)


def task_examples(tasks: Sequence[str], per_task: int, seed: int) -> list[Example]:
    """A client's local data set: `per_task` examples of each of its tasks."""
    out: list[Example] = []
    for task in tasks:
        out.extend(make_examples(task, per_task, seed))
    return out
