"""A small federation in one process: an aggregator and heterogeneous-rank clients, scored after every round."""

from __future__ import annotations

import copy
import queue
import threading
import time
import uuid
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy, RoundRecord, StoredRelease
from aggregator.service import AggregatorService
from aggregator.stores import open_store
from broker.connect import connect
from broker.transports.memory import MemoryBroker
from edge_client.app import build_worker
from edge_client.data import task_examples
from edge_client.model import load_adapter_state, load_base_model, wrap_lora
from edge_client.settings import ClientSettings
from edge_client.tasks import task_names
from edge_client.trainer import score
from edge_client.worker import EdgeWorker
from schemas.recipe import DEFAULT_RECIPE, Recipe
from schemas.tensors import decode_tensors

DEFAULT_RANKS = (4, 8, 16, 8)


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2"
    ranks: tuple[int, ...] = DEFAULT_RANKS
    rounds: int = 3
    local_steps: int = 10
    batch_size: int = 8
    recipe: Recipe = DEFAULT_RECIPE  # the federation's: the aggregator sends it, the clients follow it
    tasks_per_client: int = 2
    samples_per_task: int = 32
    eval_per_task: int = 4
    broker_url: str = "memory://"
    redis_url: str = "memory://"
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    scores: list[float]  # index 0 is the base model, then one per round
    wall_seconds: float
    records: list[RoundRecord]


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    console = console or Console()
    started = time.monotonic()
    embedded = config.broker_url.startswith("memory://")
    federation = f"demo-{uuid.uuid4().hex[:8]}"
    names = task_names()
    client_tasks = [
        [names[(i * config.tasks_per_client + j) % len(names)] for j in range(config.tasks_per_client)]
        for i in range(len(config.ranks))
    ]
    held_out = task_examples(sorted({t for ts in client_tasks for t in ts}), config.eval_per_task, seed=10_000)

    with console.status(f"loading {config.model} (the first run dequantises SmolLM2 once, ~20 s)…"):
        base = load_base_model(config.model)
    console.print(f"base model [bold]{base.name}[/] · fingerprint {base.fingerprint[:12]}…")

    memory = MemoryBroker() if embedded else None
    store = open_store(config.redis_url, federation)
    committed: queue.Queue[tuple[RoundRecord, dict[str, StoredRelease]]] = queue.Queue()
    aggregator = AggregatorService(
        connect(config.broker_url, memory=memory, connection_name="demo-aggregator"),
        store,
        AggregatorConfig(
            federation=federation,
            policy=RoundPolicy(max_updates=len(config.ranks)),
            recipe=config.recipe,
            fail_fast=embedded,
        ),
        on_commit=lambda record, releases: committed.put((record, releases)),
    )
    aggregator.setup()

    # The global model is scored at the largest rank any client trains: the closest cut of ΔW released.
    top = max(range(len(config.ranks)), key=lambda i: config.ranks[i])
    top_rank = config.ranks[top]
    evaluator = wrap_lora(
        copy.deepcopy(base.model), top_rank, config.recipe.alpha(top_rank), ["q_proj", "v_proj"], config.seed
    )
    with console.status("scoring the base model on held-out examples…"):
        scores = [score(evaluator, base.tokenizer, held_out)]
    console.print(f"held-out ROUGE-L before federated training: [bold]{scores[0]:.3f}[/] ({len(held_out)} examples)")

    workers: list[EdgeWorker] = []
    for i, rank in enumerate(config.ranks):
        settings = ClientSettings(
            client_id=f"client-{i}",
            federation=federation,
            rank=rank,
            tasks=tuple(client_tasks[i]),
            samples_per_task=config.samples_per_task,
            local_steps=config.local_steps,
            batch_size=config.batch_size,
            **config.recipe.model_dump(),
            seed=config.seed + i,
            broker_url=config.broker_url,
        )
        transport = connect(config.broker_url, memory=memory, connection_name=settings.client_id)
        workers.append(build_worker(settings, transport, base))
        console.print(f"  client-{i}: rank {rank:>2} · tasks {', '.join(client_tasks[i])}")

    stop = threading.Event()
    errors: list[BaseException] = []
    total_steps = len(workers) * config.rounds * config.local_steps
    table = Table("round", "updates", "ranks", "aggregate s", "held-out ROUGE-L")
    table.add_row("0 (base)", "-", "-", "-", f"{scores[0]:.3f}")

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("local training steps", total=total_steps)
        for worker in workers:
            worker.trainer.on_step = lambda _step, _loss: progress.advance(bar)

        def serve() -> None:
            try:
                sub = aggregator.subscribe()
                try:
                    while not stop.is_set():
                        aggregator.step(sub)
                finally:
                    sub.close()
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        def client(worker: EdgeWorker) -> None:
            try:
                worker.run(config.rounds, stop)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=serve, name="aggregator", daemon=True)]
        threads += [threading.Thread(target=client, args=(w,), name=w.config.client_id, daemon=True) for w in workers]
        for th in threads:
            th.start()

        records: list[RoundRecord] = []
        while len(records) < config.rounds and not stop.is_set():
            try:
                record, releases = committed.get(timeout=0.5)
            except queue.Empty:
                continue
            records.append(record)
            mine = releases[f"client-{top}"]
            assert isinstance(mine.payload, bytes), "SmolLM2's adapters fit one message"
            load_adapter_state(evaluator, decode_tensors(mine.payload, mine.header.payload))
            scores.append(score(evaluator, base.tokenizer, held_out))
            ranks = sorted(p.rank for p in record.participants)
            table.add_row(
                str(record.version),
                str(len(record.participants)),
                ",".join(map(str, ranks)),
                f"{record.aggregate_seconds:.2f}",
                f"{scores[-1]:.3f}",
            )
            progress.console.print(
                f"round {record.version}: {len(record.participants)} updates (ranks {ranks}) → "
                f"held-out ROUGE-L [bold]{scores[-1]:.3f}[/]"
            )
        for th in threads[1:]:
            th.join(timeout=60)
        stop.set()
        threads[0].join(timeout=10)

    for worker in workers:
        worker.close()
        worker.transport.close()
    if not embedded:
        # A demo federation is throwaway: leave no queues or keys behind on the shared services.
        topology = aggregator.topology
        specs = topology.core() + [s for w in workers for s in topology.client(w.config.client_id)]
        aggregator.transport.delete(specs)
        store.wipe()
    aggregator.transport.close()
    if errors:
        raise RuntimeError(f"the demo federation failed: {errors[0]!r}") from errors[0]

    wall = time.monotonic() - started
    console.print(table)
    console.print(
        f"held-out ROUGE-L: before {scores[0]:.3f} → after {scores[-1]:.3f} "
        f"({config.rounds} rounds, {len(config.ranks)} clients, ranks {list(config.ranks)}) in {wall:.0f} s"
    )
    return DemoResult(scores, wall, records)
