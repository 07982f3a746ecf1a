"""Assemble an edge worker from settings: base model, LoRA at the client's rank, local data, transport."""

from __future__ import annotations

import copy
import logging
import signal
import threading
from collections.abc import Callable

from broker.connect import connect
from broker.transport import Transport
from edge_client.data import task_examples
from edge_client.model import BaseModel, load_base_model, wrap_lora
from edge_client.settings import ClientSettings
from edge_client.trainer import LocalTrainer, TrainConfig
from edge_client.worker import EdgeConfig, EdgeWorker, RoundOutcome

log = logging.getLogger(__name__)


def build_worker(
    settings: ClientSettings, transport: Transport, base: BaseModel, *, copy_base: bool = True
) -> EdgeWorker:
    """`copy_base` keeps `base` untouched, so one loaded model can seed several clients in one process."""
    model = copy.deepcopy(base.model) if copy_base else base.model
    peft_model = wrap_lora(model, settings.rank, settings.alpha, list(settings.target_modules), settings.seed)
    examples = task_examples(settings.task_list, settings.samples_per_task, settings.seed)
    trainer = LocalTrainer(
        peft_model,
        base.tokenizer,
        examples,
        TrainConfig(
            local_steps=settings.local_steps,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
        ),
    )
    config = EdgeConfig(
        federation=settings.federation,
        client_id=settings.client_id,
        rank=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=settings.target_modules,
        base_model_fingerprint=base.fingerprint,
        adapter_timeout_s=settings.adapter_timeout_s,
    )
    return EdgeWorker(transport, trainer, config)


def run_client(settings: ClientSettings, on_round: Callable[[RoundOutcome], None] | None = None) -> int:
    """The `flexlora client` process: stops cleanly on SIGTERM/SIGINT after the current step."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    base = load_base_model(settings.model)
    log.info("loaded %s (fingerprint %s…)", base.name, base.fingerprint[:12])
    transport = connect(settings.broker_url, heartbeat=settings.heartbeat_s, connection_name=settings.client_id)
    try:
        worker = build_worker(settings, transport, base, copy_base=False)
        try:
            return worker.run(settings.rounds or None, stop, on_round)
        finally:
            worker.close()
    finally:
        transport.close()
