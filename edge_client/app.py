"""Assemble an edge worker from settings: base model, LoRA at the client's rank, local data, transport."""

from __future__ import annotations

import copy
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import start_http_server
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tenacity import retry, retry_if_exception_type, stop_when_event_set, wait_exponential

from broker.connect import connect, say_retrying, sleeping_until
from broker.errors import BrokerError, ConnectionLost, DeliveryGone
from broker.transport import Transport
from edge_client.checkpoint import CheckpointStore
from edge_client.data import task_examples
from edge_client.datasets import DataError, load_jsonl
from edge_client.metrics import ClientMetrics
from edge_client.model import BaseModel, cache_dir, load_base_model, wrap_lora
from edge_client.ranks import FixedRank
from edge_client.settings import ClientSettings
from edge_client.tasks import Example
from edge_client.trainer import LocalTrainer, TrainConfig
from edge_client.worker import EdgeConfig, EdgeWorker, RoundOutcome

log = logging.getLogger(__name__)


def build_worker(
    settings: ClientSettings,
    transport: Transport,
    base: BaseModel,
    *,
    copy_base: bool = True,
    checkpoints: CheckpointStore | None = None,
    data: LocalData | None = None,
) -> EdgeWorker:
    """`copy_base` keeps `base` untouched, so one loaded model can seed several clients in one process."""
    policy = settings.rank_policy()
    choice = policy(0)
    rank, alpha = choice.rank, settings.alpha_for(choice.rank)
    request = settings.rank_request(rank)
    recipe = settings.recipe()
    log.info("%s trains at %s", settings.client_id, choice.reason)
    if not request.uniform:
        log.info("%s trains ranks per module: %s", settings.client_id, request.describe())
    if data is None:
        data = load_examples(settings)
    model = copy.deepcopy(base.model) if copy_base else base.model
    peft_model = wrap_lora(model, rank, alpha, list(settings.target_modules), settings.seed, request)
    trainer = LocalTrainer(
        peft_model,
        base.tokenizer,
        data.train,
        TrainConfig(
            local_steps=settings.local_steps,
            batch_size=settings.batch_size,
            learning_rate=recipe.learning_rate,
            seed=settings.seed,
            schedule=recipe.schedule,
            warmup_steps=min(recipe.warmup_steps, settings.local_steps - 1),
        ),
        held_out=data.held_out,
    )
    config = EdgeConfig(
        federation=settings.federation,
        client_id=settings.client_id,
        rank=rank,
        lora_alpha=alpha,
        target_modules=settings.target_modules,
        base_model_fingerprint=base.fingerprint,
        adapter_timeout_s=settings.adapter_timeout_s,
        chunk_bytes=settings.chunk_bytes,
        signing_key=bytes.fromhex(settings.signing_key) if settings.signing_key else None,
        follow_recipe=frozenset({"learning_rate", "schedule", "warmup_steps"}) - settings.recipe_given(),
        # A fixed rank needs no asking; `auto` and a schedule are asked again before every round.
        rank_policy=None if isinstance(policy, FixedRank) else policy,
        alpha_for=settings.alpha_for,
        rank_pattern=request.rank_pattern,
        alpha_pattern=request.alpha_pattern,
    )
    return EdgeWorker(transport, trainer, config, checkpoints)


@dataclass(frozen=True)
class LocalData:
    train: list[Example]
    # What the device scores each round's starting adapter on (empty unless eval_examples is set).
    held_out: list[Example]


def load_examples(settings: ClientSettings) -> LocalData:
    """The device's data, read once: its JSONL file, whose last `eval_examples` records are held out, or
    built-in tasks, with as many fresh held-out examples drawn under another seed. A malformed file, or
    one with nothing left to train on, raises DataError."""
    held = settings.eval_examples
    if settings.data is not None:
        records = load_jsonl(settings.data)
        if held and len(records) <= held:
            raise DataError(
                settings.data,
                f"{len(records)} records, but eval_examples={held} are held out for scoring: "
                "nothing would be left to train on",
            )
        return LocalData(records[: len(records) - held], records[len(records) - held :])
    tasks = settings.task_list
    train = task_examples(tasks, settings.samples_per_task, settings.seed)
    if not held:
        return LocalData(train, [])
    per_task = -(-held // len(tasks))
    return LocalData(train, task_examples(tasks, per_task, settings.seed + 10_000)[:held])


def connect_with_retry(settings: ClientSettings, stop: threading.Event) -> Transport:
    """Connect, retrying with capped exponential backoff while the broker is away, or until stopped (which ends
    the back-off at once, and raises the last ConnectionLost)."""

    @retry(
        retry=retry_if_exception_type(ConnectionLost),
        wait=wait_exponential(multiplier=0.5, max=30),
        stop=stop_when_event_set(stop),
        sleep=sleeping_until(stop),
        before_sleep=say_retrying(log),
        reraise=True,
    )
    def attempt() -> Transport:
        if stop.is_set():  # asked to stop during the back-off: no attempt more (one may wait out a timeout)
            raise ConnectionLost("asked to stop before the broker answered")
        return connect(
            settings.broker_url,
            heartbeat=settings.heartbeat_s,
            connection_name=settings.client_id,
            tls=settings.tls_files(),
        )

    return attempt()


def run_resilient(
    worker: EdgeWorker,
    reconnect: Callable[[], Transport],
    rounds: int | None,
    stop: threading.Event,
    on_round: Callable[[RoundOutcome], None] | None = None,
    on_reconnect: Callable[[], None] | None = None,
) -> int:
    """Run the worker through broker outages: on a lost connection, reconnect and carry on with the same
    state. An update that was in flight is re-sent with its id, so it is counted once, never lost."""
    while True:
        try:
            return worker.run(rounds, stop, on_round)
        except (ConnectionLost, DeliveryGone) as exc:
            if stop.is_set():
                return worker.rounds_done
            log.warning("%s lost the broker (%s); reconnecting", worker.config.client_id, exc)
            try:
                worker.transport.close()
            except BrokerError:
                log.debug("closing the dead transport failed", exc_info=True)
            worker.attach(reconnect())
            if on_reconnect is not None:
                on_reconnect()


def run_client(
    settings: ClientSettings, on_round: Callable[[RoundOutcome], None] | None = None, *, progress: bool = False
) -> int:
    """The `flexlora client` process: survives broker outages, stops cleanly on SIGTERM/SIGINT, and resumes
    from its checkpoint after a restart."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    data = load_examples(settings)  # bad data stops the client before it loads a model or connects
    base = load_base_model(settings.model)
    log.info("loaded %s (fingerprint %s…)", base.name, base.fingerprint[:12])
    state_dir = settings.state_dir or cache_dir() / "clients" / settings.federation / settings.client_id
    transport = connect_with_retry(settings, stop)
    worker = build_worker(settings, transport, base, copy_base=False, checkpoints=CheckpointStore(state_dir), data=data)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        disable=not progress,
    )
    epoch = bar.add_task("local epoch", total=settings.local_steps, loss="-")
    metrics = ClientMetrics(settings.federation, settings.client_id, worker.config.rank)
    if settings.metrics_port is not None:
        server, _ = start_http_server(settings.metrics_port, registry=metrics.registry)
        log.info("metrics at http://0.0.0.0:%d/metrics", server.server_port)

    def on_step(step: int, loss: float) -> None:
        # One bar per local epoch (a round's local steps), restarted at its first step.
        if step == 0:
            bar.reset(epoch, total=settings.local_steps, description=f"round {worker.rounds_done + 1} local epoch")
        bar.update(epoch, advance=1, loss=f"{loss:.3f}")
        metrics.step(step)

    def after_round(outcome: RoundOutcome) -> None:
        log.info(
            "%s round %d done at rank %d: loss %.3f on %d samples, now at global version %d",
            settings.client_id,
            worker.rounds_done,
            outcome.update.rank,
            outcome.train.mean_loss,
            outcome.train.num_samples,
            outcome.release.version,
        )
        metrics.round_done(
            outcome.train.mean_loss, outcome.release.version, outcome.train.start_score, rank=outcome.update.rank
        )
        if on_round is not None:
            on_round(outcome)

    worker.trainer.on_step = on_step
    try:
        with bar:
            return run_resilient(
                worker,
                lambda: connect_with_retry(settings, stop),
                settings.rounds or None,
                stop,
                after_round,
                on_reconnect=metrics.reconnected,
            )
    finally:
        worker.close()
        worker.transport.close()
