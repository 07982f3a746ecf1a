"""A corpus of hostile messages, published with raw pika as an attacker would, against an aggregator on the
real RabbitMQ and Redis that requires broker identities and signatures: each ends in the dead-letter queue
with its reason, the counters match, and a normal round completes right after."""

from __future__ import annotations

import collections
import hashlib
import json
import secrets
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pika
import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import UPDATE_ROUTING_KEY, Topology
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.chunks import CHUNK_KEY, ChunkInfo
from schemas.lora import LoraFactors, join_lora
from schemas.messages import HEADER_KEY, REASON_KEY, LoraUpdate
from schemas.signing import SIGNATURE_KEY, sign
from schemas.tensors import encode_tensors, sha256_hex
from tests.conftest import AMQP_URL, REDIS_URL
from tests.e2e.procs import wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]
SHAPE = SyntheticShape(layers=2, projections=(("self_attn.q_proj", 64, 64),))
KIND = "x-test-kind"


@dataclass
class Attack:
    headers: dict[str, str]
    body: bytes
    by: str = "mallory"  # who publishes it, with that client's broker user


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def users(federation: str) -> Iterator[dict[str, str]]:
    """Two broker users, as `flexlora provision` names them: the honest client and mallory."""
    topology = Topology(federation)
    made = {}
    for client in ("honest", "mallory"):
        user, password = topology.client_user(client), secrets.token_hex(16)
        _rabbitmqctl("add_user", user, password)
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        made[client] = f"amqp://{user}:{password}@127.0.0.1:5672/%2F"
    yield made
    for client in made:
        _rabbitmqctl("delete_user", topology.client_user(client))


def _update(federation: str, client: str, *, seed: int, base: int = 0, **changes: object) -> tuple[LoraUpdate, bytes]:
    header, data = synthetic_update(federation, client, rank=8, base_version=base, shape=SHAPE, seed=seed)
    return header.model_copy(update=changes) if changes else header, data


def _signed(header_json: str, key: bytes, **extra: str) -> dict[str, str]:
    return {HEADER_KEY: header_json, SIGNATURE_KEY: sign(key, header_json), **extra}


def _with_payload(header: LoraUpdate, data: bytes) -> LoraUpdate:
    return header.model_copy(
        update={"payload": header.payload.model_copy(update={"size": len(data), "sha256": sha256_hex(data)})}
    )


def _factors_payload(d_out: int, d_in: int, rank: int, fill: Callable[[torch.Tensor], object] | None = None) -> bytes:
    factors = {
        f"model.layers.{i}.self_attn.q_proj": LoraFactors(
            torch.randn(rank, d_in) * 0.1, torch.randn(d_out, rank) * 0.01
        )
        for i in range(2)
    }
    if fill is not None:
        fill(factors["model.layers.1.self_attn.q_proj"].B)
    return encode_tensors(join_lora(factors))[0]


def _unknown_module() -> bytes:
    evil = {"model.layers.0.self_attn.evil_proj": LoraFactors(torch.ones(8, 64), torch.zeros(64, 8))}
    return encode_tensors(join_lora(evil))[0]


def _corpus(federation: str, keys: dict[str, bytes], honest_id: str) -> dict[str, tuple[str, Attack]]:
    """Kind -> (the reason it must be dead-lettered with, the message)."""
    key = keys["mallory"]
    header, data = _update(federation, "mallory", seed=7, base=1)
    good = header.model_dump_json()

    def payload(body: bytes, **changes: object) -> Attack:
        h = _with_payload(header.model_copy(update=changes), body)
        return Attack(_signed(h.model_dump_json(), key), body)

    def raw_header(mutate: Callable[[dict[str, object]], None]) -> Attack:
        fields = json.loads(good)
        mutate(fields)
        return Attack(_signed(json.dumps(fields), key), data)

    huge = json.dumps({"w": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 4]}}).encode()
    chunk_body = bytes(64 * 1024)
    big = _with_payload(header, chunk_body * 3)
    chunk = ChunkInfo(
        transfer_id=big.update_id, index=0, count=3, chunk_bytes=64 * 1024, sha256=hashlib.sha256(b"x").hexdigest()
    )
    return {
        "not JSON": ("schema", Attack({HEADER_KEY: "{not json", SIGNATURE_KEY: sign(key, "{not json")}, data)),
        "no header": ("schema", Attack({}, data)),
        "wrong schema version": ("schema", raw_header(lambda f: f.update(schema_version=2))),
        "extra fields": ("schema", raw_header(lambda f: f.update(admin=True))),
        "rank 0": ("schema", raw_header(lambda f: f.update(rank=0))),
        "wrong federation": ("federation", raw_header(lambda f: f.update(federation="elsewhere"))),
        "forged client id": (
            "identity",
            Attack(_signed(header.model_copy(update={"client_id": "honest"}).model_dump_json(), keys["honest"]), data),
        ),
        "bad signature": ("signature", Attack({HEADER_KEY: good, SIGNATURE_KEY: sign(b"guessed", good)}, data)),
        "no signature": ("signature", Attack({HEADER_KEY: good}, data)),
        "oversize payload": ("too-large", payload(bytes(2 * 1024 * 1024))),
        "rank above the bound": ("rank", payload(_factors_payload(64, 64, 32), rank=32)),
        "payload not what the header hashes": ("integrity", Attack(_signed(good, key), data[:-1] + b"\x00")),
        "truncated safetensors": ("safetensors", payload(data[: len(data) // 2])),
        "header claiming huge tensors": ("safetensors", payload(struct.pack("<Q", len(huge)) + huge + bytes(4))),
        "NaN": ("layout", payload(_factors_payload(64, 64, 8, lambda b: b.__setitem__((0, 0), float("nan"))))),
        "Inf": ("layout", payload(_factors_payload(64, 64, 8, lambda b: b.__setitem__((0, 0), float("inf"))))),
        "wrong shapes": ("modules", payload(_factors_payload(64, 32, 8))),
        "unknown module names": ("layout", payload(_unknown_module())),
        "norm far above the bound": ("norm", payload(_factors_payload(64, 64, 8, lambda b: b.mul_(1e6)))),
        # Update ids are per client: only the honest client's own connection and key can replay its ids (a buggy
        # client, or stolen credentials); mallory under the same id is simply another update.
        "replayed update id": ("replay", _replay(federation, keys["honest"], honest_id)),
        "stale base version": ("stale", payload(data, base_version=0)),
        "future base version": ("version", payload(data, base_version=9)),
        "corrupted chunk": (
            "integrity",
            Attack(_signed(big.model_dump_json(), key, **{CHUNK_KEY: chunk.model_dump_json()}), chunk_body),
        ),
    }


def _replay(federation: str, key: bytes, update_id: str) -> Attack:
    """The honest client's counted update id again, with other bytes."""
    body = _factors_payload(64, 64, 8)
    header = _with_payload(_update(federation, "honest", seed=8, base=1, update_id=update_id)[0], body)
    return Attack(_signed(header.model_dump_json(), key), body, by="honest")


def _publish(url: str, exchange: str, attack: Attack, kind: str, user: str) -> None:
    """Raw pika, as an attacker would: no helper of ours between the bytes and the broker."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        props = pika.BasicProperties(headers={**attack.headers, KIND: kind}, user_id=user, delivery_mode=2)
        channel.basic_publish(exchange, UPDATE_ROUTING_KEY, attack.body, props)
    finally:
        conn.close()


def test_every_hostile_kind_is_dead_lettered_with_its_reason_and_a_normal_round_follows(
    federation: str, amqp_cleanup: list[str], users: dict[str, str]
) -> None:
    topology = Topology(federation)
    amqp_cleanup.extend(topology.adapter_queue(c) for c in ("honest", "mallory"))
    keys = {"honest": secrets.token_bytes(32), "mallory": secrets.token_bytes(32)}
    store = RedisRoundStore.from_url(REDIS_URL, federation)
    transport = connect(AMQP_URL)
    config = AggregatorConfig(
        federation=federation,
        policy=RoundPolicy(max_updates=2),
        poll_s=0.05,
        max_rank=16,
        max_update_bytes=1024 * 1024,
        max_update_norm=10.0,
        max_staleness=0,
        require_identity=True,
        signing_keys=keys,
    )
    service = AggregatorService(transport, store, config)
    stop = threading.Event()
    server = threading.Thread(target=service.run, args=(stop,), daemon=True)
    server.start()
    honest = connect(users["honest"])

    def honest_round(base: int, seeds: tuple[int, int]) -> list[str]:
        ids = []
        for seed in seeds:
            h, d = _update(federation, "honest", seed=seed, base=base)
            honest.publish(
                topology.updates_exchange, UPDATE_ROUTING_KEY, d, _signed(h.model_dump_json(), keys["honest"])
            )
            ids.append(h.update_id)
        return ids

    try:
        wait_for(lambda: bool(store.health()), timeout=30, what="the aggregator serving")
        first = honest_round(0, (1, 2))
        wait_for(lambda: store.version() == 1, timeout=60, what="the first honest round")
        corpus = _corpus(federation, keys, first[0])
        assert len(corpus) >= 15
        for kind, (_, attack) in corpus.items():
            _publish(users[attack.by], topology.updates_exchange, attack, kind, topology.client_user(attack.by))
        got = _dead_letters(federation, len(corpus))
        assert got == {kind: reason for kind, (reason, _) in corpus.items()}
        expected = collections.Counter(reason for reason, _ in corpus.values())
        assert store.refusals() == dict(expected)
        assert {k.split(":", 1)[1]: v for k, v in service.counters.items() if k.startswith("refused:")} == expected
        # Nothing hostile was counted, and the federation carries on.
        honest_round(1, (3, 4))
        wait_for(lambda: store.version() == 2, timeout=60, what="a normal round right after the corpus")
        counted = [i for r in (0, 1) for i in store.round_update_ids(r)]
        assert len(counted) == 4 and all(store.round_updates(r)[0].header.client_id == "honest" for r in (0, 1))
    finally:
        stop.set()
        server.join(timeout=30)
        honest.close()
        transport.close()
        store.wipe()


def _dead_letters(federation: str, want: int) -> dict[str, str]:
    reader = connect(AMQP_URL)
    sub = reader.subscribe(Topology(federation).dead_letter_queue, prefetch=100, dead_letter_exchange="")
    got: dict[str, str] = {}
    try:
        while len(got) < want and (d := sub.get(20.0)) is not None:
            got[d.message.headers.get(KIND, "?")] = d.message.headers.get(REASON_KEY, "")
            d.ack()
    finally:
        sub.close()
        reader.close()
    return got
