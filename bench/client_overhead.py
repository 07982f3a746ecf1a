"""Benchmark: the edge client's per-step LoRA training time against a plain peft loop, same model, same batches.

    python bench/client_overhead.py [--model smollm2] [--steps 10] [--batch-size 8] [--rank 8] [--repeats 3]

Baseline: `get_peft_model` on a copy of the base model with wrap_lora's LoraConfig and seed, AdamW at the
same learning rate, then forward/backward/clip/step over a batch list built once with edge_client.data;
nothing else. Client: `LocalTrainer.train()`, the call EdgeWorker makes each round, on its own copy
wrapped by `wrap_lora`, built from the same examples and seed so it draws the same batches in the same
order (checked on every warm-up step). After a warm-up the two alternate over `--repeats` rounds of
`--steps` steps each; medians per step. The worker's per-round extras outside training (copying the
adapter out, safetensors encoding, the LoraUpdate header) are timed apart and amortised over the
round's steps. Prints one JSON document; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftModel, get_peft_model

from edge_client.data import batches, encode, task_examples
from edge_client.model import TextTokenizer, adapter_state, load_base_model, lora_config, wrap_lora
from edge_client.settings import ClientSettings
from edge_client.tasks import task_names
from edge_client.trainer import LocalTrainer, TrainConfig, TrainResult
from schemas.messages import LoraUpdate
from schemas.recipe import DEFAULT_RECIPE
from schemas.tensors import encode_tensors

TARGET = 0.05
Batch = dict[str, torch.Tensor]


def _client_default(name: str) -> Any:
    # The client's own defaults, so the benchmark trains what a device trains unless told otherwise.
    return ClientSettings.model_fields[name].default


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def baseline_model(base: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], seed: int) -> PeftModel:
    """The plain peft setup: get_peft_model with the client's LoraConfig and init seed, nothing else."""
    config = lora_config(rank, alpha, target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), config)
    assert isinstance(model, PeftModel)
    return model


def baseline_round(model: PeftModel, batch_list: Sequence[Batch], learning_rate: float) -> float:
    """Seconds for one round of the minimal loop; a fresh optimiser per round, as the trainer makes."""
    started = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    model.train()
    for batch in batch_list:
        loss = model(**batch).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
    return time.perf_counter() - started


def client_round(trainer: LocalTrainer) -> tuple[float, TrainResult]:
    started = time.perf_counter()
    result = trainer.train()
    return time.perf_counter() - started, result


def publish_extras(
    trainer: LocalTrainer, result: TrainResult, rank: int, alpha: float, target_modules: Sequence[str], base_fp: str
) -> tuple[float, int]:
    """Seconds and payload bytes of what EdgeWorker.publish does besides the broker call."""
    started = time.perf_counter()
    data, info = encode_tensors(trainer.adapter())
    update = LoraUpdate(
        federation="bench",
        client_id="bench-client",
        base_version=0,
        rank=rank,
        lora_alpha=alpha,
        num_samples=result.num_samples,
        target_modules=tuple(target_modules),
        base_model_fingerprint=base_fp,
        payload=info,
        train_loss=result.mean_loss,
    )
    update.model_dump_json()
    return time.perf_counter() - started, len(data)


def same_batch(a: Batch, b: Batch) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def warm_up_and_check(
    trainer: LocalTrainer, baseline: PeftModel, batch_list: Sequence[Batch], warmup: int, learning_rate: float
) -> int:
    """Run `warmup` steps on both and check the trainer fed its model exactly the baseline's batches.
    Returns how many batches were compared. The recording hook is gone before anything is timed."""
    seen: list[Batch] = []

    def record(_module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handle = trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    full = trainer.config
    try:
        # LocalTrainer runs config.local_steps per call; a shorter config for the warm-up only.
        trainer.config = dataclasses.replace(full, local_steps=warmup)
        trainer.train()
    finally:
        trainer.config = full
        handle.remove()
    baseline_round(baseline, batch_list[:warmup], learning_rate)
    if len(seen) != warmup:
        raise AssertionError(f"the trainer ran {len(seen)} forward passes in {warmup} warm-up steps")
    for step, (got, want) in enumerate(zip(seen, batch_list[:warmup], strict=True)):
        if not same_batch(got, want):
            raise AssertionError(f"warm-up step {step}: the trainer's batch differs from the baseline's")
    return len(seen)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise AssertionError("the two adapters have different keys")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    target_modules = list(_client_default("target_modules"))
    alpha = DEFAULT_RECIPE.alpha(args.rank)  # what a client trains at unless told otherwise
    config = TrainConfig(
        local_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=float(_client_default("learning_rate")),
        seed=args.seed,
        schedule="constant",  # the hand-written baseline loop below steps at a constant rate
    )
    _progress(f"loading {args.model}")
    base = load_base_model(args.model)
    tokenizer: TextTokenizer = base.tokenizer
    examples = task_examples(task_names()[:2], int(_client_default("samples_per_task")), args.seed)

    # Both get their own copy, so neither trains on weights the loader may still have memory-mapped.
    baseline = baseline_model(base.model, args.rank, alpha, target_modules, args.seed)
    client = wrap_lora(copy.deepcopy(base.model), args.rank, alpha, target_modules, args.seed)
    if max_abs_diff(adapter_state(baseline), adapter_state(client)) != 0.0:
        raise AssertionError("the baseline's LoRA init differs from wrap_lora's")
    trainer = LocalTrainer(client, tokenizer, examples, config)

    # The trainer's batch stream, rebuilt from the same encodings and seed, materialised once up front.
    encoded = [encode(tokenizer, ex, config.max_length) for ex in examples]
    if encoded != trainer.encoded:
        raise AssertionError("the trainer encoded the examples differently")
    stream = batches(encoded, config.batch_size, tokenizer.pad_id, random.Random(config.seed))
    batch_list = [next(stream) for _ in range(args.warmup + args.repeats * args.steps)]

    _progress(f"warm-up: {args.warmup} steps each")
    checked = warm_up_and_check(trainer, baseline, batch_list, args.warmup, config.learning_rate)

    per_round: dict[str, list[float]] = {"baseline": [], "client": [], "extras": []}
    payload_bytes = 0
    for rep in range(args.repeats):
        start = args.warmup + rep * args.steps
        rounds = batch_list[start : start + args.steps]
        # Alternate which loop goes first, so drift in machine load hits both alike.
        for side in ("baseline", "client") if rep % 2 == 0 else ("client", "baseline"):
            if side == "baseline":
                per_round["baseline"].append(baseline_round(baseline, rounds, config.learning_rate))
            else:
                seconds, result = client_round(trainer)
                per_round["client"].append(seconds)
                extra, payload_bytes = publish_extras(
                    trainer, result, args.rank, alpha, target_modules, base.fingerprint
                )
                per_round["extras"].append(extra)
        _progress(
            f"repeat {rep + 1}/{args.repeats}: baseline {per_round['baseline'][-1] / args.steps:.4f} s/step, "
            f"client {per_round['client'][-1] / args.steps:.4f} s/step"
        )

    base_step = statistics.median(per_round["baseline"]) / args.steps
    client_step = statistics.median(per_round["client"]) / args.steps
    extras_round = statistics.median(per_round["extras"])
    extras_step = extras_round / args.steps
    overhead = client_step / base_step - 1.0
    overhead_with_extras = (client_step + extras_step) / base_step - 1.0
    return {
        "model": base.name,
        "threads": args.threads,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "examples": len(examples),
        "repeats": args.repeats,
        "warmup_steps": args.warmup,
        "batch_check": {"batches_compared": checked, "all_equal": True},
        "baseline": {
            "seconds_per_step": base_step,
            "per_repeat_seconds_per_step": [s / args.steps for s in per_round["baseline"]],
        },
        "client": {
            "seconds_per_step": client_step,
            "per_repeat_seconds_per_step": [s / args.steps for s in per_round["client"]],
        },
        "overhead": overhead,
        # Each repeat's pair ran back to back, so its ratio is the least drift-prone view of the spread.
        "overhead_per_repeat": [c / b - 1.0 for c, b in zip(per_round["client"], per_round["baseline"], strict=True)],
        "per_round_extras": {
            "seconds_per_round": extras_round,
            "seconds_per_step_amortised": extras_step,
            "per_repeat_seconds": per_round["extras"],
            "payload_bytes": payload_bytes,
        },
        "overhead_with_extras": overhead_with_extras,
        # Same init and same batches: a zero (or tiny) difference shows the two loops did the same work.
        "final_adapter_max_abs_diff": max_abs_diff(adapter_state(baseline), trainer.adapter()),
        "target": TARGET,
        "meets_target": overhead <= TARGET,
        "meets_target_with_extras": overhead_with_extras <= TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="tiny, smollm2, a model directory or a .gguf file")
    parser.add_argument("--steps", type=int, default=int(_client_default("local_steps")), help="local steps a round")
    parser.add_argument("--batch-size", type=int, default=int(_client_default("batch_size")))
    parser.add_argument("--rank", type=int, default=int(_client_default("rank")))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each loop, alternating")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if min(args.steps, args.batch_size, args.rank, args.repeats, args.warmup, args.threads) < 1:
        parser.error("--steps, --batch-size, --rank, --repeats, --warmup and --threads must be at least 1")
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
