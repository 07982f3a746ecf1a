"""Property-based fuzzing of everything an aggregator consumes: update header JSON, safetensors payloads, chunk
headers and join requests, driven through the real validation and handlers in-process (in-memory broker and
store, `fail_fast` so any error that is not a refusal fails the test with the input that caused it).

Bounded in time for `make test`; FLEXLORA_FUZZ_EXAMPLES raises the number of inputs per property (the README
records a longer run)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.config import AggregatorConfig
from aggregator.rounds import RoundPolicy
from aggregator.service import AggregatorService
from aggregator.stores.memory import MemoryRoundStore
from broker.connect import connect
from broker.topology import JOIN_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from broker.transport import Subscription, Transport
from broker.transports.memory import MemoryBroker
from edge_client.synthetic import SyntheticShape, synthetic_update
from schemas.chunks import CHUNK_KEY, MIN_CHUNK_BYTES
from schemas.messages import HEADER_KEY, REASON_KEY, JoinRequest
from schemas.tensors import sha256_hex

FED = "fuzz"
SHAPE = SyntheticShape(layers=2, projections=(("self_attn.q_proj", 16, 16),))
EXAMPLES = int(os.environ.get("FLEXLORA_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class Rig:
    """One aggregator that has committed a round (so joins are answered with real cuts)."""

    def __init__(self) -> None:
        self.transport: Transport = connect("memory://", memory=MemoryBroker())
        self.store = MemoryRoundStore()
        config = AggregatorConfig(
            federation=FED,
            policy=RoundPolicy(max_updates=10**6, deadline_s=1e-6),
            poll_s=0.001,
            global_rank=16,
            fail_fast=True,
        )
        self.service = AggregatorService(self.transport, self.store, config)
        self.service.setup()
        self.topology = Topology(FED)
        self.transport.declare(self.topology.client("joiner"))  # a joining client declares its own mailbox
        self.tried = 0
        self.sub: Subscription = self.service.subscribe()
        self.dead = self.transport.subscribe(self.topology.dead_letter_queue, prefetch=1000, dead_letter_exchange="")
        header, data = synthetic_update(FED, "seed", rank=8, base_version=0, shape=SHAPE, seed=1)
        self.send(data, {HEADER_KEY: header.model_dump_json()})
        assert self.service.maybe_finalise() is not None

    def send(self, body: bytes, headers: dict[str, str], routing_key: str = UPDATE_ROUTING_KEY) -> str | None:
        """Handle one message; returns its dead-letter reason (None: taken). Errors other than refusals raise."""
        self.transport.publish(self.topology.updates_exchange, routing_key, body, headers)
        delivery = self.sub.get(1.0)
        assert delivery is not None
        self.service.handle(delivery)
        self.tried += 1
        dead = self.dead.get(0.0)
        if dead is None:
            return None
        dead.ack()
        return dead.message.headers.get(REASON_KEY)


@pytest.fixture(scope="module")
def rig() -> Rig:
    return Rig()


def _valid(seed: int) -> tuple[dict[str, Any], bytes]:
    header, data = synthetic_update(FED, f"c{seed % 5}", rank=8, base_version=1, shape=SHAPE, seed=seed)
    return json.loads(header.model_dump_json()), data


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([10**400, -(10**400), 2**53 + 1, 0, 1, 4096, 4097])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([5e-324, 1e-308, 1e200, 1.7e308, -0.0])
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
FIELDS = sorted(json.loads(synthetic_update(FED, "x", rank=8, base_version=0, shape=SHAPE)[0].model_dump_json()))


def _fix_payload(fields: dict[str, Any], body: bytes) -> None:
    fields["payload"] = {"size": len(body), "sha256": sha256_hex(body)}


@FUZZ
@given(
    seed=st.integers(0, 10_000),
    changes=st.dictionaries(st.sampled_from([*FIELDS, "extra"]), json_values, max_size=3),
)
def test_fuzzed_update_headers_are_taken_or_refused(rig: Rig, seed: int, changes: dict[str, Any]) -> None:
    fields, data = _valid(seed)
    fields.update(changes)
    rig.send(data, {HEADER_KEY: json.dumps(fields)})


@FUZZ
@given(
    seed=st.integers(0, 10_000),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000) | st.none(),
)
def test_fuzzed_payload_bytes_are_taken_or_refused(
    rig: Rig, seed: int, flips: list[tuple[int, int]], cut: int | None
) -> None:
    fields, data = _valid(seed)
    body = bytearray(data)
    for at, value in flips:
        body[at % len(body)] = value
    body = body[:cut] if cut is not None else body
    _fix_payload(fields, bytes(body))  # a consistent hash, so the bytes reach the safetensors decoder
    rig.send(bytes(body), {HEADER_KEY: json.dumps(fields)})


tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "x"]),
        "shape": st.lists(st.integers(-2, 2**40) | st.sampled_from([8, 16]), max_size=3),
        "data_offsets": st.lists(st.integers(-1, 2**33) | st.sampled_from([0, 512]), min_size=0, max_size=3),
    }
)
keys = st.sampled_from(
    [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
        "__metadata__",
        "other",
    ]
)


@FUZZ
@given(
    seed=st.integers(0, 10_000),
    entries=st.dictionaries(keys, tensor_entries | json_values, max_size=4),
    data_len=st.integers(0, 2048),
    declared=st.integers(0, 2**64 - 1) | st.none(),
)
def test_fuzzed_safetensors_headers_are_taken_or_refused(
    rig: Rig, seed: int, entries: dict[str, Any], data_len: int, declared: int | None
) -> None:
    fields, _ = _valid(seed)
    meta = json.dumps(entries).encode()
    body = struct.pack("<Q", len(meta) if declared is None else declared) + meta + bytes(data_len)
    _fix_payload(fields, body)
    rig.send(body, {HEADER_KEY: json.dumps(fields)})


@FUZZ
@given(
    seed=st.integers(0, 10_000),
    index=st.integers(-1, 5) | json_values,
    count=st.integers(0, 5) | json_values,
    chunk_bytes=st.sampled_from([MIN_CHUNK_BYTES, MIN_CHUNK_BYTES - 1, 2**31, 0]) | json_values,
    same_id=st.booleans(),
    good_hash=st.booleans(),
)
def test_fuzzed_chunks_are_kept_or_refused(
    rig: Rig, seed: int, index: Any, count: Any, chunk_bytes: Any, same_id: bool, good_hash: bool
) -> None:
    fields, _ = _valid(seed)
    body = os.urandom(MIN_CHUNK_BYTES)
    fields["payload"] = {"size": 2 * MIN_CHUNK_BYTES, "sha256": sha256_hex(body * 2)}
    chunk = {
        "schema_version": 1,
        "transfer_id": fields["update_id"] if same_id else "other-id",
        "index": index,
        "count": count,
        "chunk_bytes": chunk_bytes,
        "sha256": sha256_hex(body) if good_hash else "0" * 64,
    }
    rig.send(body, {HEADER_KEY: json.dumps(fields), CHUNK_KEY: json.dumps(chunk)})
    rig.store.expire_transfers(float("inf"))  # chunks kept from one example must not fill the open-transfer cap


JOIN = json.loads(
    JoinRequest(
        federation=FED,
        client_id="joiner",
        rank=8,
        lora_alpha=16.0,
        target_modules=SHAPE.target_modules,
        base_model_fingerprint=synthetic_update(FED, "x", 8, 0, shape=SHAPE)[0].base_model_fingerprint,
        have_version=0,
    ).model_dump_json()
)


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from([*JOIN, "extra"]), json_values, max_size=3),
    rank=st.integers(1, 4096),
    alpha=st.floats(min_value=1e-3, max_value=1e4),
)
def test_fuzzed_join_requests_are_answered_or_refused(
    rig: Rig, changes: dict[str, Any], rank: int, alpha: float
) -> None:
    fields = {**JOIN, "rank": rank, "lora_alpha": alpha, **changes}
    rig.send(b"", {HEADER_KEY: json.dumps(fields)}, JOIN_ROUTING_KEY)


def test_the_fuzzed_rig_still_commits_a_round(rig: Rig) -> None:
    """After every property above ran against it, the same aggregator still aggregates honest updates."""
    torch.manual_seed(0)
    for seed in (7001, 7002):
        fields, data = _valid(seed)
        rig.send(data, {HEADER_KEY: json.dumps(fields)})
    version = rig.store.version()
    assert rig.service.maybe_finalise() is not None and rig.store.version() == version + 1
    print(f"fuzz: {rig.tried} messages handled")
