"""Refusal notices from the aggregator's side: sent only to a client that is shown to be the sender of an
update it has not had counted, and never at the cost of the service."""

from __future__ import annotations

import torch

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.memory import MemoryRoundStore
from broker.topology import UPDATE_ROUTING_KEY, Topology
from broker.transports.memory import MemoryBroker, MemoryTransport
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.lora import LoraFactors, join_lora
from schemas.messages import HEADER_KEY, REFUSED_KEY, LoraUpdate
from schemas.signing import SIGNATURE_KEY, sign
from schemas.tensors import encode_tensors

SHAPE = SyntheticShape(layers=2, projections=(("self_attn.q_proj", 16, 16),))
TOPOLOGY = Topology("f")


class Rig:
    def __init__(self, **config: object) -> None:
        self.broker, self.store = MemoryBroker(), MemoryRoundStore()
        policy = RoundPolicy(max_updates=100)  # the round stays open
        settings = AggregatorConfig(federation="f", policy=policy, poll_s=0.001, **config)  # type: ignore[arg-type]
        self.service = AggregatorService(MemoryTransport(self.broker), self.store, settings)
        self.service.setup()
        self.sub = self.service.subscribe()
        self.client = MemoryTransport(self.broker)

    def mailbox(self, client_id: str) -> str:
        self.client.declare(TOPOLOGY.client(client_id))
        return TOPOLOGY.adapter_queue(client_id)

    def send(self, header: LoraUpdate | str, body: bytes, **headers: str) -> None:
        text = header if isinstance(header, str) else header.model_dump_json()
        self.client.publish(TOPOLOGY.updates_exchange, UPDATE_ROUTING_KEY, body, {HEADER_KEY: text, **headers})
        self.service.step(self.sub)  # never raises for what a message holds

    def notices(self, queue: str) -> list[str]:
        sub = self.client.subscribe(queue, prefetch=100, dead_letter_exchange="")
        out = []
        while (d := sub.get(0.1)) is not None:
            out.append(d.message.headers.get(REFUSED_KEY, ""))
            d.ack()
        sub.close()
        return out


def _update(client: str, seed: int, scale: float = 1.0) -> tuple[LoraUpdate, bytes]:
    header, _ = synthetic_update("f", client, 8, 0, shape=SHAPE, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    factors = {
        f"model.layers.{i}.self_attn.q_proj": LoraFactors(
            A=torch.randn(8, 16, generator=gen) * 0.1, B=torch.randn(16, 8, generator=gen) * 0.01 * scale
        )
        for i in range(2)
    }
    body, info = encode_tensors(join_lora(factors))
    return header.model_copy(update={"payload": info}), body


def test_a_header_nested_past_the_stack_is_refused_and_the_service_goes_on() -> None:
    """The notice read the refused header again, and a RecursionError there ended the aggregator's process."""
    rig = Rig()
    rig.send("[" * 5000 + "]" * 5000, b"x")
    header, body = _update("c1", 1)
    rig.send(header, body)
    assert rig.store.refusals() == {"schema": 1} and rig.store.status().count == 1


def test_an_update_refused_for_its_signature_sends_the_named_client_nothing() -> None:
    """Anyone may publish a header naming a victim; a notice for it would let them fill the victim's mailbox."""
    rig = Rig(signing_keys={"victim": b"k" * 32})
    queue = rig.mailbox("victim")
    header, body = _update("victim", 1)
    for _ in range(3):
        rig.send(header, body, **{SIGNATURE_KEY: sign(b"x" * 32, header.model_dump_json())})
    assert rig.store.refusals() == {"signature": 3}
    assert rig.notices(queue) == []


def test_a_counted_update_delivered_again_is_a_duplicate_whatever_the_median_became() -> None:
    """Counted first (under three norms there is no median), then redelivered once three small updates made it
    an outlier: it was refused, and its client, told so, dropped an update that counted and sent another."""
    rig = Rig(norm_outlier_factor=2.0)
    queue = rig.mailbox("big")
    big, big_body = _update("big", 1, scale=50.0)
    rig.send(big, big_body)
    for n in range(3):
        rig.send(*_update(f"small{n}", 10 + n))
    outlier, outlier_body = _update("big", 2, scale=50.0)  # a new update this large is an outlier now
    rig.send(outlier, outlier_body)
    rig.send(big, big_body)  # the first one, again
    assert rig.store.refusals() == {"norm-outlier": 1}
    assert rig.service.counters["duplicate"] == 1 and rig.store.status().count == 4
    assert rig.notices(queue) == [outlier.update_id], "told of the outlier only, not of the counted update"
