"""Synthetic-update clients: real message shapes without training, for load, scale and fault tests."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from broker.topology import UPDATE_ROUTING_KEY, Topology
from broker.transport import Transport
from schemas.lora import LoraFactors, join_lora
from schemas.messages import HEADER_KEY, LoraUpdate
from schemas.tensors import encode_tensors

# (module name suffix, d_out, d_in) per layer: SmolLM2-135M's attention projections LoRA adapts by default.
SMOLLM2_QV: tuple[tuple[str, int, int], ...] = (("self_attn.q_proj", 576, 576), ("self_attn.v_proj", 192, 576))
SYNTHETIC_FINGERPRINT = hashlib.sha256(b"flexlora synthetic base model").hexdigest()


@dataclass(frozen=True)
class SyntheticShape:
    layers: int = 30
    projections: tuple[tuple[str, int, int], ...] = SMOLLM2_QV

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({name.rsplit(".", 1)[-1] for name, _, _ in self.projections}))


def _noise(gen: np.random.Generator, shape: tuple[int, int], std: float) -> torch.Tensor:
    """Zero-mean uniform noise with standard deviation `std`, float32."""
    out = gen.random(shape, dtype=np.float32)
    out -= 0.5
    out *= std * 12**0.5  # U(-1/2, 1/2) has variance 1/12
    return torch.from_numpy(out)


def synthetic_update(
    federation: str,
    client_id: str,
    rank: int,
    base_version: int,
    *,
    shape: SyntheticShape = SyntheticShape(),
    num_samples: int | None = None,
    seed: int = 0,
) -> tuple[LoraUpdate, bytes]:
    """A well-formed update with random factors (B scaled small, as after a few LoRA steps). The values are
    uniform noise of the stated spread: numpy draws them several times faster than normal noise, and a load run
    makes hundreds of MB of them per round. numpy fills and hashlib hashes without the GIL, so updates made on
    several threads are made side by side."""
    gen = np.random.default_rng(seed)
    factors = {
        f"model.layers.{layer}.{name}": LoraFactors(
            A=_noise(gen, (rank, d_in), d_in**-0.5), B=_noise(gen, (d_out, rank), 1e-2)
        )
        for layer in range(shape.layers)
        for name, d_out, d_in in shape.projections
    }
    data, info = encode_tensors(join_lora(factors))
    header = LoraUpdate(
        federation=federation,
        client_id=client_id,
        base_version=base_version,
        rank=rank,
        lora_alpha=2.0 * rank,
        num_samples=num_samples if num_samples is not None else random.Random(seed).randint(20, 500),
        target_modules=shape.target_modules,
        base_model_fingerprint=SYNTHETIC_FINGERPRINT,
        payload=info,
    )
    return header, data


def publish_update(transport: Transport, topology: Topology, header: LoraUpdate, payload: bytes) -> None:
    transport.publish(
        topology.updates_exchange,
        UPDATE_ROUTING_KEY,
        payload,
        {HEADER_KEY: header.model_dump_json()},
        message_id=header.update_id,
    )


def rank_mix(count: int, ranks: Sequence[int] = (4, 8, 16, 32), seed: int = 0) -> list[int]:
    """Ranks for `count` clients, drawn reproducibly from `ranks`."""
    rng = random.Random(seed)
    return [rng.choice(list(ranks)) for _ in range(count)]
