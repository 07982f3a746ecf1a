"""Hostile input, round two: messages that once crashed, wedged or poisoned a federation, published with raw
pika against an aggregator on the real RabbitMQ and Redis. Each is dead-lettered (or dropped) with its reason,
the aggregator keeps serving, and a normal round completes right after."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.errors import BrokerError
from broker.topology import JOIN_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from broker.transport import Transport
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.chunks import CHUNK_KEY, ChunkInfo
from schemas.lora import LoraFactors, join_lora
from schemas.messages import DROPPED_KEY, HEADER_KEY, REASON_KEY, JoinRequest, LoraUpdate, parse_release
from schemas.tensors import encode_tensors, sha256_hex
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.procs import wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]
SHAPE = SyntheticShape(layers=2, projections=(("self_attn.q_proj", 64, 64),))
KIND = "x-test-kind"


def honest(federation: str, client: str, seed: int, base: int = 0, rank: int = 8) -> tuple[LoraUpdate, bytes]:
    return synthetic_update(federation, client, rank=rank, base_version=base, shape=SHAPE, seed=seed)


def join_fields(federation: str, **changes: Any) -> dict[str, Any]:
    header, _ = honest(federation, "joiner", seed=0)
    request = JoinRequest(
        federation=federation,
        client_id="joiner",
        rank=8,
        lora_alpha=16.0,
        target_modules=header.target_modules,
        base_model_fingerprint=header.base_model_fingerprint,
        have_version=0,
    )
    return {**json.loads(request.model_dump_json()), **changes}


@dataclass
class Federation:
    name: str
    store: RedisRoundStore
    service: AggregatorService
    server: threading.Thread
    client: Transport
    topology: Topology
    sent: int = 0
    kinds: list[str] = field(default_factory=list)

    def raw(self, headers: dict[str, str], body: bytes, kind: str, routing_key: str = UPDATE_ROUTING_KEY) -> None:
        """Raw pika, as an attacker would: no helper of ours between the bytes and the broker."""
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            props = pika.BasicProperties(headers={**headers, KIND: kind}, delivery_mode=2)
            conn.channel().basic_publish(self.topology.updates_exchange, routing_key, body, props)
        finally:
            conn.close()
        self.kinds.append(kind)

    def update_json(self, fields: dict[str, Any], body: bytes, kind: str) -> None:
        self.raw({HEADER_KEY: json.dumps(fields)}, body, kind)

    def join(self, fields: dict[str, Any], kind: str) -> None:
        self.raw({HEADER_KEY: json.dumps(fields)}, b"", kind, JOIN_ROUTING_KEY)

    def honest_round(self, seeds: tuple[int, ...] = (1, 2)) -> None:
        """Honest updates from the open round's version; waits until they commit the next version."""
        base = self.store.version()
        for seed in seeds:
            header, data = honest(self.name, f"honest{seed}", seed=seed, base=base)
            self.client.publish(
                self.topology.updates_exchange, UPDATE_ROUTING_KEY, data, {HEADER_KEY: header.model_dump_json()}
            )
        wait_for(lambda: self.store.version() == base + 1, timeout=60, what=f"an honest round to version {base + 1}")
        assert self.server.is_alive(), "the aggregator died"

    def dead_letters(self, want: int) -> dict[str, dict[str, str]]:
        """kind -> headers of the dead-lettered copy, for `want` messages."""
        reader = connect(AMQP_URL)
        sub = reader.subscribe(self.topology.dead_letter_queue, prefetch=100, dead_letter_exchange="")
        got: dict[str, dict[str, str]] = {}
        try:
            while len(got) < want and (d := sub.get(20.0)) is not None:
                got[d.message.headers.get(KIND, d.message.message_id or "?")] = dict(d.message.headers)
                d.ack()
        finally:
            sub.close()
            reader.close()
        return got


@pytest.fixture
def start(federation: str, amqp_cleanup: list[str]) -> Iterator[Callable[..., Federation]]:
    started: list[tuple[threading.Event, Federation]] = []

    def run(**config: Any) -> Federation:
        topology = Topology(federation)
        # "legacy" too: an aggregator declares the mailboxes of a round's participants while it aggregates, so one
        # whose update the round then drops gets its mailbox all the same.
        clients = [*(f"honest{i}" for i in range(8)), "joiner", "mallory", "legacy"]
        amqp_cleanup.extend(topology.adapter_queue(c) for c in clients)
        store = RedisRoundStore.from_url(REDIS_URL, federation)
        settings = {"policy": RoundPolicy(max_updates=2), "poll_s": 0.05, "global_rank": 16, **config}
        service = AggregatorService(connect(AMQP_URL), store, AggregatorConfig(federation=federation, **settings))
        stop = threading.Event()
        server = threading.Thread(target=service.run, args=(stop,), daemon=True)
        server.start()
        wait_for(lambda: bool(store.health()), timeout=30, what="the aggregator serving")
        fed = Federation(federation, store, service, server, connect(AMQP_URL), topology)
        started.append((stop, fed))
        return fed

    yield run
    for stop, fed in started:
        stop.set()
        fed.server.join(timeout=30)
        fed.client.close()
        fed.service.transport.close()
        fed.store.wipe()


def _reasons(fed: Federation, want: int) -> dict[str, str]:
    return {kind: headers.get(REASON_KEY, "") for kind, headers in fed.dead_letters(want).items()}


def test_a_join_at_a_vanishing_alpha_is_refused_and_every_aggregator_survives(start: Callable[..., Federation]) -> None:
    fed = start()
    fed.honest_round()
    fed.join(join_fields(fed.name, lora_alpha=5e-324), "alpha 5e-324")
    fed.join(join_fields(fed.name, lora_alpha=1e200), "alpha 1e200")
    fed.join(join_fields(fed.name, rank=4096, lora_alpha=8192.0), "rank 4096 above the global cut")
    assert _reasons(fed, 3) == {
        "alpha 5e-324": "schema",
        "alpha 1e200": "schema",
        "rank 4096 above the global cut": "rank",
    }
    fed.honest_round((3, 4))


def test_a_join_above_max_rank_is_refused(start: Callable[..., Federation]) -> None:
    fed = start(max_rank=8)
    fed.honest_round()
    fed.join(join_fields(fed.name, rank=16, lora_alpha=32.0), "rank 16 over max_rank 8")
    assert _reasons(fed, 1) == {"rank 16 over max_rank 8": "rank"}
    fed.honest_round((3, 4))


def test_extreme_numbers_in_an_update_never_reach_a_round(start: Callable[..., Federation]) -> None:
    fed = start()
    header, data = honest(fed.name, "mallory", seed=9)
    good = json.loads(header.model_dump_json())
    attacks: dict[str, dict[str, Any]] = {
        "alpha 1e200": {"lora_alpha": 1e200},
        "alpha/rank tiny": {"lora_alpha": 1e-3, "rank": 16},
        "samples past float range": {"num_samples": 10**400},
        "samples 10^18": {"num_samples": 10**18},
        "loss 1e300": {"train_loss": 1e300},
        "base version 10^30": {"base_version": 10**30},
        "reserved client id": {"client_id": "_global"},
    }
    for kind, change in attacks.items():
        fed.update_json({**good, **change}, data, kind)
    assert _reasons(fed, len(attacks)) == dict.fromkeys(attacks, "schema")
    fed.honest_round()
    fed.honest_round((3, 4))


def test_pins_come_only_from_accepted_updates(start: Callable[..., Federation]) -> None:
    """In a fresh federation, a join for another base model and an update refused (for its version) with other
    shapes come first; honest updates are still accepted, and releases name the honest base model."""
    fed = start()
    fed.join(join_fields(fed.name, base_model_fingerprint="e" * 64), "join for another base model")
    factors = {f"model.layers.{i}.self_attn.q_proj": LoraFactors(*_pair(8, 32, 16)) for i in range(2)}
    body, info = encode_tensors(join_lora(factors))
    other, _ = honest(fed.name, "mallory", seed=5, base=7)
    fed.raw({HEADER_KEY: other.model_copy(update={"payload": info}).model_dump_json()}, body, "future, other shapes")
    wait_for(lambda: fed.store.refusals().get("version") == 1, timeout=30, what="the future update refused")
    fed.honest_round()
    assert fed.store.refusals() == {"version": 1}
    honest_fp = honest(fed.name, "x", seed=0)[0].base_model_fingerprint
    assert {r.header.base_model_fingerprint for r in fed.store.releases(1).values()} == {honest_fp}


def _pair(rank: int, d_out: int, d_in: int) -> tuple[Any, Any]:
    import torch

    return torch.randn(rank, d_in) * 0.1, torch.randn(d_out, rank) * 0.01


def test_target_modules_naming_a_module_the_tensors_lack_are_refused(start: Callable[..., Federation]) -> None:
    fed = start()
    header, data = honest(fed.name, "mallory", seed=9)
    fields = {**json.loads(header.model_dump_json()), "target_modules": ["q_proj", "v_proj"]}
    fed.update_json(fields, data, "target module without tensors")
    assert _reasons(fed, 1) == {"target module without tensors": "layout"}
    fed.honest_round()
    assert {tuple(r.header.target_modules) for r in fed.store.releases(1).values()} == {("q_proj",)}


def test_headers_near_the_frame_limit_are_refused_without_losing_the_connection(
    start: Callable[..., Federation],
) -> None:
    """A refusal adds headers; a message whose headers were just under RabbitMQ's frame limit (128 KiB) once
    closed the aggregator's connection when it was dead-lettered, and the honest updates behind it went too."""
    fed = start()
    _, data = honest(fed.name, "mallory", seed=9)
    padded = {HEADER_KEY: "{not json", "x-pad": "p" * 130_000}
    fed.raw(padded, data, "headers near the frame limit")
    fed.raw({HEADER_KEY: "{not json", "x-pad": "p" * 70_000}, data, "headers over the bound")
    fed.honest_round()
    got = fed.dead_letters(2)
    assert {k: h[REASON_KEY] for k, h in got.items()} == {
        "headers near the frame limit": "header-size",
        "headers over the bound": "header-size",
    }
    assert all("x-pad" not in h and h[DROPPED_KEY] == "x-pad" for h in got.values())
    assert fed.service.counters["refused:header-size"] == 2 and fed.service.counters["accepted"] == 2


def test_open_chunked_transfers_are_bounded_per_client(start: Callable[..., Federation]) -> None:
    fed = start(max_transfers_per_client=1, chunk_bytes=64 * 1024)
    for n in range(2):
        header, _ = honest(fed.name, "mallory", seed=20 + n)
        body = bytes(64 * 1024)
        big = header.model_copy(update={"payload": header.payload.model_copy(update={"size": 3 * len(body)})})
        chunk = ChunkInfo(transfer_id=big.update_id, index=0, count=3, chunk_bytes=len(body), sha256=sha256_hex(body))
        fed.raw({HEADER_KEY: big.model_dump_json(), CHUNK_KEY: chunk.model_dump_json()}, body, f"transfer {n}")
    assert _reasons(fed, 1) == {"transfer 1": "transfers"}
    fed.honest_round()


def test_an_update_the_round_cannot_aggregate_is_dropped_not_retried_forever(start: Callable[..., Federation]) -> None:
    """An update in the round that fails aggregation (here: stored before today's shape checks, straight into
    Redis) is dropped with reason "aggregation"; the round commits with the others, and the ledger is exact."""
    fed = start(policy=RoundPolicy(max_updates=3))
    header, data = honest(fed.name, "honest1", seed=1)
    fed.client.publish(fed.topology.updates_exchange, UPDATE_ROUTING_KEY, data, {HEADER_KEY: header.model_dump_json()})
    wait_for(lambda: fed.store.status().count == 1, timeout=30, what="the first update counted")
    factors = {f"model.layers.{i}.self_attn.q_proj": LoraFactors(*_pair(8, 32, 16)) for i in range(2)}
    body, info = encode_tensors(join_lora(factors))
    legacy, _ = honest(fed.name, "legacy", seed=3)
    legacy = legacy.model_copy(update={"payload": info})
    fed.store.record(legacy, body, 0.0)
    header2, data2 = honest(fed.name, "honest2", seed=2)
    fed.client.publish(
        fed.topology.updates_exchange, UPDATE_ROUTING_KEY, data2, {HEADER_KEY: header2.model_dump_json()}
    )
    wait_for(lambda: fed.store.refusals() == {"aggregation": 1}, timeout=60, what="the bad update dropped")
    assert fed.store.version() == 0 and fed.store.status().count == 2
    header3, data3 = honest(fed.name, "honest3", seed=4)
    fed.client.publish(
        fed.topology.updates_exchange, UPDATE_ROUTING_KEY, data3, {HEADER_KEY: header3.model_dump_json()}
    )
    wait_for(lambda: fed.store.version() == 1, timeout=60, what="the round committed without the bad update")
    [record] = fed.store.history()
    want = [header.update_id, header2.update_id, header3.update_id]
    assert sorted(p.update_id for p in record.participants) == sorted(want)
    assert fed.store.refusals() == {"aggregation": 1}
    assert fed.dead_letters(1)[legacy.update_id][REASON_KEY] == "aggregation"
    fed.honest_round((5, 6, 7))


def test_an_update_whose_finite_values_overflow_the_round_is_dropped_and_no_release_holds_inf(
    start: Callable[..., Federation],
) -> None:
    """Every value 5e18: finite, so accepted, but its product overflows float32 in the cut. It once committed
    releases of inf to every participant, and every later round failed on the inf global it started from."""
    import torch

    from schemas.tensors import decode_tensors

    fed = start(policy=RoundPolicy(max_updates=3))
    factors = {
        f"model.layers.{i}.self_attn.q_proj": LoraFactors(torch.full((8, 64), 5e18), torch.full((64, 8), 5e18))
        for i in range(2)
    }
    body, info = encode_tensors(join_lora(factors))
    header, _ = honest(fed.name, "mallory", seed=9)
    fed.raw({HEADER_KEY: header.model_copy(update={"payload": info}).model_dump_json()}, body, "values of 5e18")
    fed.honest_round((1, 2, 3))  # the round fails on mallory's update, drops it, and commits the honest ones
    assert fed.store.refusals() == {"aggregation": 1}
    assert fed.dead_letters(1)[header.update_id][REASON_KEY] == "aggregation"
    [record] = fed.store.history()
    assert sorted(p.client_id for p in record.participants) == ["honest1", "honest2", "honest3"]
    for release in fed.store.releases(1).values():
        assert all(bool(torch.isfinite(t).all()) for t in decode_tensors(fed.store.payload(release)).values())
    fed.honest_round((4, 5, 6))


def test_a_bug_while_handling_a_message_dead_letters_it_as_internal(
    start: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong with one message is that message's failure: it is dead-lettered once (reason
    "internal"), never redelivered into the next aggregator, and the service goes on."""
    fed = start()
    fed.honest_round()

    def broken(*_: object, **__: object) -> None:
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr("aggregator.ingest.join_release", broken)
    fed.join(join_fields(fed.name), "join hitting a bug")
    assert _reasons(fed, 1) == {"join hitting a bug": "internal"}
    assert fed.service.counters["refused:internal"] == 1
    monkeypatch.undo()
    fed.honest_round((3, 4))


def test_another_clients_update_id_cannot_get_its_update_refused(start: Callable[..., Federation]) -> None:
    """Update ids are each client's own: mallory, who learned honest1's next update id, sends her own update under
    it first; honest1's update is still counted (not refused as a replay), and the round commits with both."""
    fed = start()
    victim, data = honest(fed.name, "honest1", seed=1)
    thief, thief_data = honest(fed.name, "mallory", seed=9)
    thief = thief.model_copy(update={"update_id": victim.update_id})
    fed.raw({HEADER_KEY: thief.model_dump_json()}, thief_data, "mallory under honest1's id")
    wait_for(lambda: fed.store.status().count == 1, timeout=30, what="mallory's update counted")
    fed.client.publish(fed.topology.updates_exchange, UPDATE_ROUTING_KEY, data, {HEADER_KEY: victim.model_dump_json()})
    wait_for(lambda: fed.store.version() == 1, timeout=60, what="the round committed with honest1's update")
    [record] = fed.store.history()
    assert sorted((p.client_id, p.update_id) for p in record.participants) == [
        ("honest1", victim.update_id),
        ("mallory", victim.update_id),
    ]
    assert fed.store.refusals() == {}
    fed.client.publish(fed.topology.updates_exchange, UPDATE_ROUTING_KEY, data, {HEADER_KEY: victim.model_dump_json()})
    fed.honest_round((3, 4))
    assert fed.store.refusals() == {} and fed.service.counters["duplicate"] == 1, "its own id again: a duplicate"


def test_joins_for_invented_client_ids_create_no_mailboxes(start: Callable[..., Federation]) -> None:
    """Without auth anyone can send joins under made-up client ids; the aggregator answers a join only into a
    mailbox that exists (the client's own, or a provisioned one), so none is created and nothing piles up."""
    fed = start()
    fed.join(join_fields(fed.name, client_id="ghost-early"), "join before any round")  # nothing to answer yet
    fed.honest_round()
    ghosts = [f"ghost{n}" for n in range(5)]
    for ghost in ghosts:
        fed.join(join_fields(fed.name, client_id=ghost), ghost)
    assert _reasons(fed, len(ghosts)) == dict.fromkeys(ghosts, "no-mailbox")
    for queue in [fed.topology.adapter_queue(c) for c in ["ghost-early", *ghosts]]:
        with pytest.raises(BrokerError):
            fed.client.queue_depth(queue)
    # An honest joiner declares its mailbox first and gets the newest global adapter at its rank.
    fed.client.declare(fed.topology.client("joiner"))
    fed.join(join_fields(fed.name), "honest join")
    reader = fed.client.subscribe(fed.topology.adapter_queue("joiner"), prefetch=1, dead_letter_exchange="")
    try:
        answer = reader.get(20.0)
        assert answer is not None and parse_release(answer.message.headers[HEADER_KEY]).version == 1
        answer.ack()
    finally:
        reader.close()
    assert fed.store.refusals() == {"no-mailbox": len(ghosts)}
    fed.honest_round((3, 4))
