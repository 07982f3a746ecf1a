"""The real-LM workload: clients hold one built-in procedural task each and train LoRA on SmolLM2 (or the tiny
test model) with the edge client's trainer; the global model is scored by ROUGE-L on tasks no client holds
(unseen) and on held-out examples of the clients' tasks (seen)."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch
from peft import PeftModel

from edge_client.data import task_examples
from edge_client.model import BaseModel, adapter_state, load_adapter_state, wrap_lora
from edge_client.tasks import Example, task_names
from edge_client.trainer import LocalTrainer, TrainConfig, score, teacher_forced
from experiments.federation import Factors
from experiments.runner import Trained
from schemas.lora import join_lora, split_lora
from schemas.recipe import DEFAULT_RECIPE, Recipe


@dataclass(frozen=True)
class LmConfig:
    clients: int = 20  # cycling through the seen tasks if there are more clients than tasks
    unseen_tasks: int = 7  # of the 27 built-in tasks, held back from every client
    tasks_per_client: int = 1  # non-IID: each client holds its own few tasks
    samples_per_task: int = 32
    local_steps: int = 10
    batch_size: int = 8
    recipe: Recipe = DEFAULT_RECIPE
    eval_unseen_per_task: int = 4
    eval_seen_per_task: int = 2
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    split_seed: int = 0  # which tasks are unseen
    generate: bool = True  # ROUGE-L of generated answers; off: only the teacher-forced scores (quick runs)
    generate_every: int = 1  # generate after every this many rounds (and always for the base and the last round)

    def split(self) -> tuple[list[str], list[str]]:
        """(seen, unseen) task names: a fixed shuffle of the built-in tasks."""
        names = task_names()
        if not 1 <= self.unseen_tasks < len(names):
            raise ValueError(f"unseen_tasks must be between 1 and {len(names) - 1}, got {self.unseen_tasks}")
        random.Random(f"split:{self.split_seed}").shuffle(names)
        return names[self.unseen_tasks :], names[: self.unseen_tasks]

    def client_tasks(self, client: int) -> list[str]:
        seen, _ = self.split()
        k = self.tasks_per_client
        return [seen[(client * k + j) % len(seen)] for j in range(k)]


@dataclass
class LmWorkload:
    """One PEFT copy of the base per rank (clients of a rank take turns on it: they train one after another),
    plus one at the evaluation rank; FLoRA's merges go into every copy's base weights."""

    base: BaseModel
    config: LmConfig
    tiers: tuple[int, ...]
    seed: int = 0
    metrics: tuple[str, ...] = field(init=False)
    higher_is_better: bool = True
    target_modules: tuple[str, ...] = field(init=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.target_modules = self.config.target_modules
        forced = ("unseen_exact", "unseen_nll")
        self.metrics = ("unseen", "seen", *forced) if self.config.generate else forced
        self.fingerprint = self.base.fingerprint
        _, unseen = self.config.split()
        clients_tasks = sorted({t for c in range(self.config.clients) for t in self.config.client_tasks(c)})
        self.unseen_examples = task_examples(unseen, self.config.eval_unseen_per_task, seed=20_000)
        self.seen_examples = task_examples(clients_tasks, self.config.eval_seen_per_task, seed=10_000)
        self.models: dict[int, PeftModel] = {}
        self.initial: dict[int, dict[str, torch.Tensor]] = {}
        self.trainers: dict[tuple[int, int], LocalTrainer] = {}
        self.eval_rank = max(self.tiers)
        for rank in sorted(set(self.tiers)):
            self._model(rank)
        self.merged = False

    def _model(self, rank: int) -> PeftModel:
        if rank not in self.models:
            model = wrap_lora(
                copy.deepcopy(self.base.model), rank, self.alpha(rank), list(self.target_modules), seed=self.seed + rank
            )
            self.models[rank] = model
            self.initial[rank] = adapter_state(model)
        return self.models[rank]

    def alpha(self, rank: int) -> float:
        return self.config.recipe.alpha(rank)

    def examples(self, client: int) -> list[Example]:
        return task_examples(self.config.client_tasks(client), self.config.samples_per_task, seed=self.seed + client)

    def _trainer(self, client: int, rank: int) -> LocalTrainer:
        key = (client, rank)
        if key not in self.trainers:
            c, recipe = self.config, self.config.recipe
            train = TrainConfig(
                c.local_steps,
                c.batch_size,
                recipe.learning_rate,
                seed=self.seed * 10_000 + client,
                schedule=recipe.schedule,
                warmup_steps=min(recipe.warmup_steps, c.local_steps - 1),
            )
            self.trainers[key] = LocalTrainer(self._model(rank), self.base.tokenizer, self.examples(client), train)
        return self.trainers[key]

    def reset(self) -> None:
        # Fresh batch order per run: every strategy sees the same data stream.
        self.trainers.clear()
        if self.merged:
            pristine = self.base.model
            with torch.no_grad():
                for model in self.models.values():
                    for name, weight in self._base_weights(model).items():
                        weight.copy_(_weight(pristine.get_submodule(name)))
            self.merged = False
        for rank, model in self.models.items():
            load_adapter_state(model, self.initial[rank])

    @staticmethod
    def _base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
        """The frozen base weight under every LoRA layer, by module name (the names updates use)."""
        inner = model.get_base_model()
        out = {}
        for name, module in inner.named_modules():
            layer = getattr(module, "base_layer", None)
            if isinstance(layer, torch.nn.Module):
                out[name] = _weight(layer)
        return out

    def train(self, client: int, rank: int, alpha: float, start: Factors | None) -> Trained:
        trainer = self._trainer(client, rank)
        trainer.load(self.initial[rank] if start is None else join_lora(start))
        result = trainer.train()
        factors = split_lora(trainer.adapter(), rank=rank, target_modules=self.target_modules)
        return Trained(factors, result.num_samples, result.mean_loss)

    def merge(self, factors: Factors, scale: float) -> None:
        with torch.no_grad():
            for model in self.models.values():
                weights = self._base_weights(model)
                for name, f in factors.items():
                    weight = weights[name]
                    weight += scale * (f.B.to(weight.dtype) @ f.A.to(weight.dtype))
        self.merged = True

    def evaluate(
        self, factors: Factors | None, rank: int, alpha: float, *, round_index: int = 0, last: bool = True
    ) -> dict[str, float]:
        model = self._model(rank)
        load_adapter_state(model, self.initial[rank] if factors is None else join_lora(factors))
        # With no global adapter the initial one (B = 0) leaves the model exactly its (possibly merged) base.
        tokenizer = self.base.tokenizer
        forced = teacher_forced(model, tokenizer, self.unseen_examples)
        scores = {"unseen_exact": forced.exact, "unseen_nll": forced.nll}
        if self.config.generate and (last or round_index % self.config.generate_every == 0):
            scores["unseen"] = score(model, tokenizer, self.unseen_examples)
            scores["seen"] = score(model, tokenizer, self.seen_examples)
        return scores


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor to merge into")
    return weight
