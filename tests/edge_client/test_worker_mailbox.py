"""What an edge worker takes from its mailbox: the newest adapter at its rank, whole, even when older ones
or chunks of one are queued ahead of it."""

from __future__ import annotations

from typing import Any

import torch

from broker.chunked import publish_payload
from broker.connect import connect
from broker.topology import Topology
from broker.transport import Transport
from broker.transports.memory import MemoryBroker
from edge_client.trainer import TrainConfig
from edge_client.worker import EdgeConfig, EdgeWorker
from schemas.lora import LoraFactors, join_lora
from schemas.messages import AdapterRelease
from schemas.recipe import Recipe
from schemas.tensors import encode_tensors

FP = "e" * 64


class Loader:
    def __init__(self) -> None:
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.config = TrainConfig(local_steps=4, learning_rate=3e-3, schedule="constant", warmup_steps=1)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.loaded.append({k: v.clone() for k, v in tensors.items()})


def _send(
    transport: Transport,
    topology: Topology,
    version: int,
    d: int = 16,
    chunk_bytes: int = 2**20,
    recipe: Recipe | None = None,
) -> None:
    factors = {"model.layers.0.self_attn.q_proj": LoraFactors(torch.full((4, d), float(version)), torch.ones(d, 4))}
    data, info = encode_tensors(join_lora(factors))
    header = AdapterRelease(
        federation=topology.federation,
        version=version,
        client_id="c1",
        rank=4,
        lora_alpha=8.0,
        target_modules=("q_proj",),
        base_model_fingerprint=FP,
        num_updates=1,
        payload=info,
        recipe=recipe,
    )
    publish_payload(
        transport,
        topology.adapters_exchange,
        "c1",
        header.model_dump_json(),
        data,
        info,
        message_id=f"f:{version}:c1",
        chunk_bytes=chunk_bytes,
    )


def _worker(**config: Any) -> tuple[EdgeWorker, Loader, Transport, Topology]:
    transport = connect("memory://", memory=MemoryBroker())
    topology = Topology("f")
    transport.declare(topology.core())
    loader = Loader()
    worker = EdgeWorker(transport, loader, EdgeConfig("f", "c1", 4, 8.0, ("q_proj",), FP, join_wait_s=2.0, **config))  # type: ignore[arg-type]
    worker.setup()
    return worker, loader, transport, topology


def test_joining_takes_the_newest_adapter_even_with_an_older_one_queued_ahead() -> None:
    worker, _, transport, topology = _worker()
    _send(transport, topology, 1)  # answered a round this client took part in before it went away
    _send(transport, topology, 3)  # the join's answer
    release = worker.join()
    assert release is not None and release.version == 3 and worker.version == 3


def test_a_chunked_adapter_is_loaded_whole() -> None:
    worker, loader, transport, topology = _worker()
    _send(transport, topology, 2, d=20_000, chunk_bytes=64 * 1024)  # 640 KB: 10 chunks
    release = worker.wait_for_adapter(timeout_s=5)
    assert release is not None and release.version == 2
    assert torch.equal(
        loader.loaded[-1]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
        torch.full((4, 20_000), 2.0),
    )


def test_the_worker_trains_by_the_federations_recipe_for_what_it_was_not_given() -> None:
    # The device was given its warm-up (a flag); the rate and the schedule it takes from the federation.
    worker, loader, transport, topology = _worker(follow_recipe=frozenset({"learning_rate", "schedule"}))
    _send(transport, topology, 1, recipe=Recipe(learning_rate=1e-4, schedule="cosine", warmup_steps=3))
    assert worker.wait_for_adapter(timeout_s=5) is not None
    assert (loader.config.learning_rate, loader.config.schedule, loader.config.warmup_steps) == (1e-4, "cosine", 1)
    _send(transport, topology, 2)  # a release without a recipe changes nothing
    assert worker.wait_for_adapter(timeout_s=5) is not None
    assert loader.config.learning_rate == 1e-4


def test_settings_tell_the_recipe_given_from_the_defaults(monkeypatch: Any) -> None:
    from edge_client.settings import ClientSettings
    from schemas.recipe import DEFAULT_RECIPE

    monkeypatch.setenv("FLEXLORA_SCHEDULE", "cosine")
    settings = ClientSettings(client_id="c1", learning_rate=1e-3)
    assert settings.recipe_given() == {"learning_rate", "schedule"}
    assert settings.recipe() == DEFAULT_RECIPE.model_copy(update={"learning_rate": 1e-3, "schedule": "cosine"})
    assert settings.alpha_for(16) == DEFAULT_RECIPE.alpha(16) == 16.0  # rsLoRA: 4·√16
