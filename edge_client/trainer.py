"""Local LoRA training and held-out scoring on one device; pure compute, no broker."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from peft import LoraConfig, PeftModel

from edge_client.data import IGNORE, Encoded, batches, collate, encode, format_prompt
from edge_client.model import TextTokenizer, adapter_state, load_adapter_state, wrap_lora
from edge_client.tasks import Example, rouge_l
from schemas.recipe import DEFAULT_RECIPE, Schedule, lr_multiplier


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 20
    batch_size: int = 8
    learning_rate: float = DEFAULT_RECIPE.learning_rate
    max_length: int = 128
    seed: int = 0
    schedule: Schedule = DEFAULT_RECIPE.schedule
    warmup_steps: int = DEFAULT_RECIPE.warmup_steps

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError(f"invalid training config {self}")
        lr_multiplier(self.schedule, self.local_steps, self.warmup_steps)  # validates the schedule


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    num_samples: int
    # ROUGE-L on the device's held-out examples of the adapter this epoch started from (the global
    # version received), or None when the device holds none out.
    start_score: float | None = None


class Interrupted(Exception):
    """A local epoch stopped before its last step (the process was asked to stop)."""


class LocalTrainer:
    """Trains only the LoRA factors of a PeftModel on the device's own examples."""

    def __init__(
        self,
        model: PeftModel,
        tokenizer: TextTokenizer,
        examples: Sequence[Example],
        config: TrainConfig,
        held_out: Sequence[Example] = (),
    ) -> None:
        if not examples:
            raise ValueError("a client needs at least one training example")
        self.model = model
        self.held_out = list(held_out)
        self.tokenizer = tokenizer
        self.config = config
        self.encoded: list[Encoded] = [encode(tokenizer, ex, config.max_length) for ex in examples]
        self.rng = random.Random(config.seed)
        self._batches = batches(self.encoded, config.batch_size, tokenizer.pad_id, self.rng)
        # Called after every step with (step, loss): progress bars and logs hook in here.
        self.on_step: Callable[[int, float], None] | None = None

    @property
    def num_samples(self) -> int:
        return len(self.encoded)

    def train(self, stop: threading.Event | None = None) -> TrainResult:
        """One local epoch of `local_steps` steps from the current adapter; a fresh optimiser each time,
        since the factors were just replaced by the aggregator's and old moments no longer apply. Interrupted
        (raised after the step under way) once `stop` is set: the epoch is not finished, and the adapter holds
        the steps it took."""
        start_score = score(self.model, self.tokenizer, self.held_out) if self.held_out else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=self.config.learning_rate, weight_decay=0.0)
        c = self.config
        multiplier = lr_multiplier(c.schedule, c.local_steps, c.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, multiplier)
        self.model.train()
        losses: list[float] = []
        for step in range(self.config.local_steps):
            batch = next(self._batches)
            loss = self.model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.item()))
            if self.on_step is not None:
                self.on_step(step, losses[-1])
            if stop is not None and stop.is_set() and step + 1 < self.config.local_steps:
                self.model.eval()
                raise Interrupted(f"stopped after local step {step + 1} of {self.config.local_steps}")
        self.model.eval()
        return TrainResult(sum(losses) / len(losses), len(losses), self.num_samples, start_score)

    def adapter(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, tensors)

    def resize(self, rank: int, alpha: float) -> dict[str, torch.Tensor]:
        """Move to a fresh LoRA at `rank` and `alpha` on the same base model (peft's unload takes the LoRA
        layers out without merging them); returns the fresh adapter (A initialised as peft does, B = 0)."""
        targets = cast(LoraConfig, self.model.peft_config["default"]).target_modules
        if not isinstance(targets, list | set | tuple):
            raise TypeError(f"cannot resize a LoRA whose target_modules is {targets!r} (a pattern)")
        self.model = wrap_lora(self.model.unload(), rank, alpha, sorted(targets), self.config.seed)
        return self.adapter()


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer: TextTokenizer, examples: Sequence[Example], max_new_tokens: int = 16
) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts."""
    model.eval()
    out: list[str] = []
    for start in range(0, len(examples), 16):
        chunk = examples[start : start + 16]
        prompts = [tokenizer.encode(format_prompt(ex)) for ex in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        generated = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
        )
        for row in generated[:, width:].tolist():
            answer = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            out.append(tokenizer.decode(answer).strip())
    return out


def score(model: torch.nn.Module, tokenizer: TextTokenizer, examples: Sequence[Example]) -> float:
    """Mean ROUGE-L F of greedy answers against the exact outputs."""
    answers = generate_answers(model, tokenizer, examples)
    value = rouge_l(answers, [ex.output for ex in examples])
    return 0.0 if math.isnan(value) else value


@dataclass(frozen=True)
class TeacherForced:
    """Cheap scores from one forward pass: mean negative log-likelihood of the answer tokens (lower is better)
    and the share of examples whose every answer token is the model's top prediction (exact match)."""

    nll: float
    exact: float


@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module, tokenizer: TextTokenizer, examples: Sequence[Example], batch_size: int = 32
) -> TeacherForced:
    model.eval()
    encoded = [encode(tokenizer, ex) for ex in examples]
    total_nll, tokens, exact = 0.0, 0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], tokenizer.pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total_nll -= float(picked[mask].sum())
        tokens += int(mask.sum())
        right = (logits.argmax(-1) == labels) | ~mask
        exact += int(right.all(dim=-1).sum())
    return TeacherForced(total_nll / max(tokens, 1), exact / max(len(encoded), 1))
