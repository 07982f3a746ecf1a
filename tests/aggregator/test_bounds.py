"""Bounds that keep one message from taking a federation over: weight shares, dead-letter headers, open
transfers, pins and dropped updates, on both round stores."""

from __future__ import annotations

import math
from typing import Any

import pytest

from aggregator.rounds import ChunkResult, Lease, RecordResult, RoundStore
from aggregator.stores.memory import MemoryRoundStore
from aggregator.strategies import shares
from broker.transport import dead_letter_headers, headers_size
from schemas.messages import DROPPED_KEY, MAX_HEADERS_BYTES, REASON_KEY, LoraUpdate, PayloadInfo


def test_shares_sum_to_one_without_overflow_and_respect_the_cap() -> None:
    assert shares([1e308, 1e308]) == [0.5, 0.5]
    capped = shares([10**12, 10, 10, 10], cap=0.4)
    assert math.isclose(sum(capped), 1.0) and max(capped) <= 0.4 + 1e-12
    assert capped[1:] == [capped[1]] * 3
    assert shares([5.0, 1.0], cap=0.4) == [0.5, 0.5]  # a cap below 1/n: equal shares
    assert shares([3.0, 1.0]) == [0.75, 0.25]


def test_a_dead_lettered_copy_never_outgrows_the_header_bound() -> None:
    huge = {"x-flexlora-header": "{}", "x-pad": "p" * 130_000, "x-test": "kind"}
    out = dead_letter_headers(huge, "schema", "d" * 5000)
    assert headers_size(out) <= MAX_HEADERS_BYTES
    assert out[REASON_KEY] == "schema" and out[DROPPED_KEY] == "x-pad" and out["x-test"] == "kind"
    small = dead_letter_headers({"x-flexlora-header": "{}"}, "rank", "why")
    assert DROPPED_KEY not in small and small["x-flexlora-header"] == "{}"


def _update(client: str, update_id: str) -> LoraUpdate:
    return LoraUpdate(
        update_id=update_id,
        federation="f",
        client_id=client,
        base_version=0,
        rank=4,
        lora_alpha=8.0,
        num_samples=10,
        target_modules=("q_proj",),
        base_model_fingerprint="f" * 64,
        payload=PayloadInfo(size=3, sha256="0" * 64),
    )


def _chunk(store: RoundStore, client: str, update_id: str, limits: tuple[int, int]) -> ChunkResult:
    return store.put_chunk(
        update_id, 0, b"x", count=2, signature="s", client_id=client, sha256="0" * 64, now=0.0, expiry_s=60.0,
        max_open=limits,
    )  # fmt: skip


def test_open_transfers_are_bounded_per_client_and_in_all(store: RoundStore) -> None:
    assert _chunk(store, "a", "id-a-0001", (1, 2)) is ChunkResult.STORED
    assert _chunk(store, "a", "id-a-0002", (1, 2)) is ChunkResult.BUSY
    assert _chunk(store, "a", "id-a-0001", (1, 2)) is ChunkResult.DUPLICATE  # its own transfer goes on
    assert _chunk(store, "b", "id-b-0001", (1, 2)) is ChunkResult.STORED
    assert _chunk(store, "c", "id-c-0001", (1, 2)) is ChunkResult.BUSY  # the federation's bound
    store.drop_transfer("a", "id-a-0001")
    assert _chunk(store, "c", "id-c-0001", (1, 2)) is ChunkResult.STORED


def test_reading_a_pin_never_sets_it(store: RoundStore) -> None:
    assert store.pinned("fingerprint") is None
    assert store.pinned("fingerprint") is None
    store.pin("fingerprint", "aaa")
    assert store.pinned("fingerprint") == "aaa"


def test_a_dropped_update_leaves_the_round_and_is_not_counted_again(store: RoundStore) -> None:
    for n in (1, 2):
        assert store.record(_update(f"c{n}", f"update-{n}"), b"abc", 0.0) is RecordResult.RECORDED
    lease = store.acquire(0, "agg", ttl_s=30)
    assert lease is not None and store.drop_update(lease, "c1", "update-1")
    assert store.status().count == 1 and [u.header.update_id for u in store.round_updates(0)] == ["update-2"]
    assert not store.drop_update(lease, "c1", "update-1")
    assert store.record(_update("c1", "update-1"), b"abc", 0.0) is RecordResult.DUPLICATE
    assert not store.drop_update(Lease(1, "agg", lease.token), "c2", "update-2")  # not the open round


def test_a_client_claiming_huge_data_takes_no_more_than_its_capped_share(federation: str) -> None:
    from aggregator.config import AggregatorConfig
    from aggregator.rounds import RoundPolicy
    from aggregator.service import AggregatorService
    from broker.connect import connect
    from broker.topology import UPDATE_ROUTING_KEY, Topology
    from broker.transports.memory import MemoryBroker
    from edge_client.synthetic import SyntheticShape, synthetic_update
    from schemas.messages import HEADER_KEY

    transport = connect("memory://", memory=MemoryBroker())
    store = MemoryRoundStore()
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=3), max_weight_share=0.5)
    service = AggregatorService(transport, store, config)
    service.setup()
    shape = SyntheticShape(layers=1, projections=(("self_attn.q_proj", 16, 16),))
    for n, samples in enumerate((10**12, 10, 30)):
        header, data = synthetic_update(federation, f"c{n}", 4, 0, shape=shape, num_samples=samples, seed=n)
        transport.publish(
            Topology(federation).updates_exchange, UPDATE_ROUTING_KEY, data, {HEADER_KEY: header.model_dump_json()}
        )
    sub = service.subscribe()
    for _ in range(3):
        service.step(sub)
    sub.close()
    [record] = store.history()
    weights = {p.client_id: p.weight for p in record.participants}
    assert weights["c0"] == pytest.approx(0.5) and weights["c2"] == pytest.approx(3 * weights["c1"])


def test_two_aggregators_recording_at_once_cannot_pin_different_base_models(
    store: RoundStore, federation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a fresh federation, two aggregators each validate an update (another base model each) before either
    records: both see no pin. Recording checks and sets the pins in one step, so one update is counted and
    pins its base model, and the other is refused ("base-model"), never both counted under different facts."""
    import threading

    from aggregator.config import AggregatorConfig
    from aggregator.rounds import RoundPolicy
    from aggregator.service import AggregatorService
    from aggregator.validation import PIN_FINGERPRINT, validate_update
    from broker.connect import connect
    from broker.topology import UPDATE_ROUTING_KEY, Topology
    from broker.transports.memory import MemoryBroker
    from edge_client.synthetic import SyntheticShape, synthetic_update
    from schemas.messages import HEADER_KEY

    transport = connect("memory://", memory=MemoryBroker())
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=10))
    services = [AggregatorService(transport, store, config) for _ in range(2)]
    services[0].setup()
    dead = transport.subscribe(Topology(federation).dead_letter_queue, prefetch=10, dead_letter_exchange="")
    shape = SyntheticShape(layers=1, projections=(("self_attn.q_proj", 16, 16),))
    for n, fingerprint in enumerate(("a" * 64, "b" * 64)):
        header, data = synthetic_update(federation, f"c{n}", 4, 0, shape=shape, seed=n)
        header = header.model_copy(update={"base_model_fingerprint": fingerprint})
        transport.publish(
            Topology(federation).updates_exchange, UPDATE_ROUTING_KEY, data, {HEADER_KEY: header.model_dump_json()}
        )
    validated = threading.Barrier(2, timeout=30)

    def racing(*args: Any, **kwargs: Any) -> Any:
        valid = validate_update(*args, **kwargs)
        validated.wait()  # both have read the pins (none) before either records
        return valid

    monkeypatch.setattr("aggregator.ingest.validate_update", racing)
    subs = [s.subscribe() for s in services]
    deliveries = [sub.get(1.0) for sub in subs]
    threads = [threading.Thread(target=s.handle, args=(d,)) for s, d in zip(services, deliveries, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    [counted] = store.round_updates(0)
    assert store.pinned(PIN_FINGERPRINT) == counted.header.base_model_fingerprint
    refusal = dead.get(1.0)
    assert refusal is not None and refusal.message.headers[REASON_KEY] == "base-model"
    assert store.refusals() == {"base-model": 1}
