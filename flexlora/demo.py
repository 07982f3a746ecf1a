"""A small federation in one process: an aggregator and heterogeneous-rank clients, scored after every round."""

from __future__ import annotations

import copy
import functools
import queue
import threading
import time
import uuid
from collections.abc import Callable
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
from edge_client.model import BaseModel, load_adapter_state, load_base_model, wrap_lora
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
    federation: str = ""


class DemoFederation:
    """One throwaway federation: an aggregator service, one edge worker per rank, and an evaluator holding the
    global adapter at the largest rank any client trains (the closest cut of ΔW released)."""

    def __init__(self, config: DemoConfig, base: BaseModel, console: Console) -> None:
        self.config = config
        self.embedded = config.broker_url.startswith("memory://")
        self.federation = f"demo-{uuid.uuid4().hex[:8]}"
        names = task_names()
        tasks = [
            [names[(i * config.tasks_per_client + j) % len(names)] for j in range(config.tasks_per_client)]
            for i in range(len(config.ranks))
        ]
        self.base = base
        self.held_out = task_examples(sorted({t for ts in tasks for t in ts}), config.eval_per_task, seed=10_000)
        memory = MemoryBroker() if self.embedded else None
        self.store = open_store(config.redis_url, self.federation)
        self.committed: queue.Queue[tuple[RoundRecord, dict[str, StoredRelease]]] = queue.Queue()
        self.aggregator = AggregatorService(
            connect(config.broker_url, memory=memory, connection_name="demo-aggregator"),
            self.store,
            AggregatorConfig(
                federation=self.federation,
                policy=RoundPolicy(max_updates=len(config.ranks)),
                recipe=config.recipe,
                fail_fast=self.embedded,
            ),
            on_commit=lambda record, releases: self.committed.put((record, releases)),
        )
        self.aggregator.setup()
        self.top = f"client-{max(range(len(config.ranks)), key=lambda i: config.ranks[i])}"
        top_rank = max(config.ranks)
        self.evaluator = wrap_lora(
            copy.deepcopy(base.model), top_rank, config.recipe.alpha(top_rank), ["q_proj", "v_proj"], config.seed
        )
        self.workers: list[EdgeWorker] = []
        for i, rank in enumerate(config.ranks):
            settings = ClientSettings(
                client_id=f"client-{i}",
                federation=self.federation,
                rank=rank,
                tasks=tuple(tasks[i]),
                samples_per_task=config.samples_per_task,
                local_steps=config.local_steps,
                batch_size=config.batch_size,
                **config.recipe.model_dump(),
                seed=config.seed + i,
                broker_url=config.broker_url,
            )
            transport = connect(config.broker_url, memory=memory, connection_name=settings.client_id)
            self.workers.append(build_worker(settings, transport, base))
            console.print(f"  client-{i}: rank {rank:>2} · tasks {', '.join(tasks[i])}")

    def score(self, releases: dict[str, StoredRelease] | None = None) -> float:
        """Held-out ROUGE-L of the base model (no releases) or of the global adapter these releases carry."""
        if releases is not None:
            mine = releases[self.top]
            assert isinstance(mine.payload, bytes), "SmolLM2's adapters fit one message"
            load_adapter_state(self.evaluator, decode_tensors(mine.payload, mine.header.payload))
        return score(self.evaluator, self.base.tokenizer, self.held_out)

    def start(self, stop: threading.Event, errors: list[BaseException]) -> list[threading.Thread]:
        """The aggregator and every client on threads of their own; the first failure stops them all."""

        def guarded(target: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                try:
                    target()
                except BaseException as exc:
                    errors.append(exc)
                    stop.set()

            return run

        def serve() -> None:
            sub = self.aggregator.subscribe()
            try:
                while not stop.is_set():
                    self.aggregator.step(sub)
            finally:
                sub.close()

        threads = [threading.Thread(target=guarded(serve), name="aggregator", daemon=True)]
        for w in self.workers:
            work = functools.partial(w.run, self.config.rounds, stop)
            threads.append(threading.Thread(target=guarded(work), name=w.config.client_id, daemon=True))
        for th in threads:
            th.start()
        return threads

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
            worker.transport.close()
        if not self.embedded:
            # A demo federation is throwaway: leave no queues or keys behind on the shared services.
            topology = self.aggregator.topology
            specs = topology.core() + [s for w in self.workers for s in topology.client(w.config.client_id)]
            self.aggregator.transport.delete(specs)
            self.store.wipe()
        self.aggregator.transport.close()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run the federation for `config.rounds` rounds, scoring the global adapter after each; prints a table."""
    console = console or Console()
    started = time.monotonic()
    with console.status(f"loading {config.model} (the first run dequantises SmolLM2 once, ~20 s)…"):
        base = load_base_model(config.model)
    console.print(f"base model [bold]{base.name}[/] · fingerprint {base.fingerprint[:12]}…")
    fed = DemoFederation(config, base, console)
    with console.status("scoring the base model on held-out examples…"):
        scores = [fed.score()]
    console.print(
        f"held-out ROUGE-L before federated training: [bold]{scores[0]:.3f}[/] ({len(fed.held_out)} examples)"
    )
    table = Table("round", "updates", "ranks", "aggregate s", "held-out ROUGE-L")
    table.add_row("0 (base)", "-", "-", "-", f"{scores[0]:.3f}")
    stop = threading.Event()
    errors: list[BaseException] = []
    records: list[RoundRecord] = []
    try:
        with _progress(console) as progress:
            bar = progress.add_task("local training steps", total=len(fed.workers) * config.rounds * config.local_steps)
            for worker in fed.workers:
                worker.trainer.on_step = lambda _step, _loss: progress.advance(bar)
            threads = fed.start(stop, errors)
            while len(records) < config.rounds and not stop.is_set():
                try:
                    record, releases = fed.committed.get(timeout=0.5)
                except queue.Empty:
                    continue
                records.append(record)
                scores.append(fed.score(releases))
                ranks = sorted(p.rank for p in record.participants)
                cells = (len(record.participants), ",".join(map(str, ranks)), f"{record.aggregate_seconds:.2f}")
                table.add_row(str(record.version), *map(str, cells), f"{scores[-1]:.3f}")
                progress.console.print(
                    f"round {record.version}: {len(record.participants)} updates (ranks {ranks}) → "
                    f"held-out ROUGE-L [bold]{scores[-1]:.3f}[/]"
                )
            for th in threads[1:]:
                th.join(timeout=60)
            stop.set()
            threads[0].join(timeout=10)
    finally:
        stop.set()
        fed.close()
    if errors:
        raise RuntimeError(f"the demo federation failed: {errors[0]!r}") from errors[0]
    wall = time.monotonic() - started
    console.print(table)
    console.print(
        f"held-out ROUGE-L: before {scores[0]:.3f} → after {scores[-1]:.3f} "
        f"({config.rounds} rounds, {len(config.ranks)} clients, ranks {list(config.ranks)}) in {wall:.0f} s"
    )
    return DemoResult(scores, wall, records, fed.federation)
