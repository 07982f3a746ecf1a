"""The aggregator service: bad updates are dead-lettered with a reason and the service keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.rounds import RecordedUpdate, RecordResult, RoundPolicy, RoundStatus, RoundStore
from aggregator.service import AggregatorService
from aggregator.stores.memory import MemoryRoundStore
from aggregator.stores.redis import RedisRoundStore
from broker.connect import connect
from broker.topology import UPDATE_ROUTING_KEY, Topology
from broker.transport import Transport
from broker.transports.memory import MemoryBroker
from schemas.lora import LoraFactors, join_lora
from schemas.messages import HEADER_KEY, REASON_KEY, LoraUpdate, PayloadInfo
from schemas.tensors import encode_tensors, sha256_hex
from tests.conftest import AMQP_URL, REDIS_URL

FP = "a" * 64


@dataclass
class Rig:
    transport: Transport
    store: RoundStore
    service: AggregatorService
    topo: Topology


@pytest.fixture(params=["memory", "services"])
def rig(request: pytest.FixtureRequest, federation: str) -> Iterator[Rig]:
    if request.param == "memory":
        transport: Transport = connect("memory://", memory=MemoryBroker())
        store: RoundStore = MemoryRoundStore()
    else:
        request.getfixturevalue("amqp_cleanup").extend(
            Topology(federation).adapter_queue(c) for c in ("c1", "c2", "c3")
        )
        transport = connect(AMQP_URL)
        store = RedisRoundStore.from_url(REDIS_URL, federation)
    service = AggregatorService(
        transport, store, AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=2), poll_s=0.05)
    )
    service.setup()
    yield Rig(transport, store, service, Topology(federation))
    transport.close()
    if isinstance(store, RedisRoundStore):
        store.wipe()


def _factors(rank: int, seed: int, d: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return join_lora(
        {
            f"model.layers.{i}.self_attn.q_proj": LoraFactors(
                torch.randn(rank, d, generator=g), torch.randn(d, rank, generator=g)
            )
            for i in range(2)
        }
    )


def _update(federation: str, client: str, rank: int, payload: PayloadInfo, **changes: object) -> LoraUpdate:
    update = LoraUpdate(
        federation=federation,
        client_id=client,
        base_version=0,
        rank=rank,
        lora_alpha=2.0 * rank,
        num_samples=10,
        target_modules=("q_proj",),
        base_model_fingerprint=FP,
        payload=payload,
    )
    return update.model_copy(update=changes)


def _send(rig: Rig, body: bytes, headers: dict[str, str]) -> None:
    rig.transport.publish(rig.topo.updates_exchange, UPDATE_ROUTING_KEY, body, headers)


def _valid(rig: Rig, client: str, rank: int, seed: int) -> None:
    data, info = encode_tensors(_factors(rank, seed))
    _send(rig, data, {HEADER_KEY: _update(rig.topo.federation, client, rank, info).model_dump_json()})


def _serve_until(rig: Rig, done: threading.Event, timeout: float = 20.0) -> None:
    sub = rig.service.subscribe()
    stop = threading.Timer(timeout, done.set)
    stop.start()
    try:
        while not done.is_set():
            rig.service.step(sub)
            if rig.store.version() >= 1:
                done.set()
    finally:
        stop.cancel()
        sub.close()


def test_bad_updates_are_dead_lettered_with_reasons_and_the_service_keeps_serving(rig: Rig) -> None:
    fed = rig.topo.federation
    good, info = encode_tensors(_factors(4, 0))
    garbage = b"\x00not safetensors at all"
    garbage_info = PayloadInfo(size=len(garbage), sha256=sha256_hex(garbage))
    bad = [
        (good, {}, "schema"),  # no header at all
        (good, {HEADER_KEY: "{not json"}, "schema"),
        (
            good,
            {HEADER_KEY: _update(fed, "c9", 4, info).model_dump_json().replace('"rank":4', '"rank":"four"')},
            "schema",
        ),
        (
            good,
            {HEADER_KEY: _update(fed, "c9", 4, info.model_copy(update={"sha256": "0" * 64})).model_dump_json()},
            "integrity",
        ),
        (garbage, {HEADER_KEY: _update(fed, "c9", 4, garbage_info).model_dump_json()}, "safetensors"),
        (good, {HEADER_KEY: _update(fed, "c9", 8, info).model_dump_json()}, "layout"),  # declares rank 8, carries 4
        (good, {HEADER_KEY: _update("elsewhere", "c9", 4, info).model_dump_json()}, "federation"),
    ]
    for body, headers, _ in bad:
        _send(rig, body, headers)
    _valid(rig, "c1", 4, seed=1)
    _valid(rig, "c2", 8, seed=2)
    _serve_until(rig, threading.Event())

    assert rig.store.version() == 1, "the two valid updates still made a round"
    assert sorted(rig.store.releases(1)) == ["_global", "c1", "c2"]
    dead = rig.transport.subscribe(
        rig.topo.dead_letter_queue, prefetch=20, dead_letter_exchange=rig.topo.dead_letter_exchange
    )
    reasons = []
    while (d := dead.get(2.0)) is not None:
        reasons.append(d.message.headers[REASON_KEY])
        d.ack()
    dead.close()
    assert sorted(reasons) == sorted(r for _, _, r in bad)
    assert rig.service.counters["accepted"] == 2
    assert sum(v for k, v in rig.service.counters.items() if k.startswith("refused:")) == len(bad)
    assert rig.transport.queue_depth(rig.topo.updates_queue) == 0


def test_a_redelivered_update_is_counted_once(rig: Rig) -> None:
    data, info = encode_tensors(_factors(4, 0))
    header = _update(rig.topo.federation, "c1", 4, info).model_dump_json()
    for _ in range(3):  # the same update id three times, as redeliveries or a replay would bring it
        _send(rig, data, {HEADER_KEY: header})
    sub = rig.service.subscribe()
    for _ in range(30):
        rig.service.step(sub)
        if rig.service.counters["duplicate"] == 2:
            break
    sub.close()
    assert rig.service.counters["accepted"] == 1
    assert rig.service.counters["duplicate"] == 2
    assert rig.store.status().count == 1


def test_an_update_for_another_base_model_is_refused(rig: Rig) -> None:
    _valid(rig, "c1", 4, seed=1)
    data, info = encode_tensors(_factors(4, 5))
    other = _update(rig.topo.federation, "c2", 4, info, base_model_fingerprint="b" * 64)
    _send(rig, data, {HEADER_KEY: other.model_dump_json()})
    data, info = encode_tensors(_factors(4, 6, d=16))
    _send(rig, data, {HEADER_KEY: _update(rig.topo.federation, "c3", 4, info).model_dump_json()})
    sub = rig.service.subscribe()
    for _ in range(40):
        rig.service.step(sub)
        if rig.service.counters["refused:base-model"] and rig.service.counters["refused:modules"]:
            break
    sub.close()
    assert rig.service.counters["refused:base-model"] == 1
    assert rig.service.counters["refused:modules"] == 1
    assert rig.service.counters["accepted"] == 1


def test_strategy_and_weighting_are_chosen_per_federation() -> None:
    transport = connect("memory://", memory=MemoryBroker())
    store = MemoryRoundStore()
    with pytest.raises(ValueError, match="offline-only"):
        AggregatorService(transport, store, AggregatorConfig(federation="f", strategy="flora"))
    with pytest.raises(ValueError, match="unknown strategy"):
        AggregatorService(transport, store, AggregatorConfig(federation="f", strategy="nope"))
    config = AggregatorConfig(
        federation="f", policy=RoundPolicy(max_updates=2), strategy="hetlora", weighting="staleness", poll_s=0.01
    )
    service = AggregatorService(transport, store, config)
    service.setup()
    rig = Rig(transport, store, service, Topology("f"))
    _valid(rig, "c1", 4, seed=1)
    _valid(rig, "c2", 8, seed=2)
    _serve_until(rig, threading.Event())
    [record] = store.history()
    assert record.strategy == "hetlora"
    assert record.metrics["max_rank"] == 8.0
    assert {r.header.strategy for r in store.releases(1).values()} == {"hetlora"}
    assert [r.header.rank for _, r in sorted(store.releases(1).items())] == [4, 8]


def test_updates_past_the_maximum_staleness_are_dead_lettered(federation: str) -> None:
    transport = connect("memory://", memory=MemoryBroker())
    store = MemoryRoundStore()
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=1), max_staleness=0, poll_s=0.01)
    service = AggregatorService(transport, store, config)
    service.setup()
    rig = Rig(transport, store, service, Topology(federation))
    _valid(rig, "c1", 4, seed=1)  # base 0 at version 0: fresh; closes round 0
    sub = service.subscribe()
    for _ in range(20):
        service.step(sub)
    data, info = encode_tensors(_factors(4, 3))
    _send(rig, data, {HEADER_KEY: _update(federation, "c2", 4, info).model_dump_json()})  # base 0, now at v1
    data, info = encode_tensors(_factors(4, 4))
    _send(rig, data, {HEADER_KEY: _update(federation, "c3", 4, info, base_version=7).model_dump_json()})
    for _ in range(20):
        service.step(sub)
    sub.close()
    assert store.version() == 1
    assert service.counters["refused:stale"] == 1
    assert service.counters["refused:version"] == 1


def test_a_failing_round_does_not_stop_the_service(federation: str) -> None:
    class FlakyStore(MemoryRoundStore):
        failures = 2

        def round_updates(self, round_id: int, held: Collection[str] = frozenset()) -> list[RecordedUpdate]:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("redis went away")
            return super().round_updates(round_id, held)

    transport = connect("memory://", memory=MemoryBroker())
    store = FlakyStore()
    service = AggregatorService(
        transport, store, AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=1), poll_s=0.001)
    )
    service.setup()
    rig = Rig(transport, store, service, Topology(federation))
    _valid(rig, "c1", 4, seed=1)
    sub = service.subscribe()
    for _ in range(5):
        service.step(sub)
    sub.close()
    assert service.counters["round_errors"] == 2
    assert store.version() == 1, "the round went through once the store answered again"


def test_one_aggregator_closes_its_round_at_the_update_that_fills_it_without_a_status_read_per_update(
    federation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aggregator.service as service_module

    class Counting(MemoryRoundStore):
        reads = 0

        def status(self) -> RoundStatus:
            self.reads += 1
            return super().status()

    monkeypatch.setattr(service_module, "STATUS_EVERY_S", 3600.0)  # no reads for time's sake: only the rule's
    store = Counting()
    rig = _memory_service(federation, store, max_updates=20)
    service = rig.service
    for i in range(20):
        _valid(rig, f"c{i}", 4, seed=i)
    sub = service.subscribe()
    steps = 0
    while store.version() == 0 and steps < 40:
        service.step(sub)
        steps += 1
    sub.close()
    assert store.version() == 1 and steps == 20, "committed at the step that recorded the round's last update"
    assert store.reads <= 4, f"{store.reads} status reads for 20 updates"


def _memory_service(
    federation: str, store: MemoryRoundStore | None = None, max_updates: int = 10, **config: object
) -> Rig:
    transport: Transport = connect("memory://", memory=MemoryBroker())
    store = store or MemoryRoundStore()
    service = AggregatorService(
        transport,
        store,
        AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=max_updates), poll_s=0.01, **config),  # type: ignore[arg-type]
    )
    service.setup()
    return Rig(transport, store, service, Topology(federation))


def _take_all(rig: Rig) -> list[str]:
    """Handle every queued update; returns the dead-letter reasons, in order."""
    sub = rig.service.subscribe()
    while (d := sub.get(0.05)) is not None:
        rig.service.handle(d)
    sub.close()
    dead = rig.transport.subscribe(rig.topo.dead_letter_queue, prefetch=50, dead_letter_exchange="")
    reasons = []
    while (d := dead.get(0.05)) is not None:
        reasons.append(d.message.headers.get(REASON_KEY, ""))
        d.ack()
    return reasons


def test_an_update_far_above_the_rounds_median_norm_is_refused(federation: str) -> None:
    rig = _memory_service(federation, norm_outlier_factor=10.0)
    for seed in range(3):
        _valid(rig, f"c{seed}", 4, seed=seed)
    loud = {k: v * (1000.0 if ".lora_B." in k else 1.0) for k, v in _factors(4, 9).items()}
    data, info = encode_tensors(loud)
    _send(rig, data, {HEADER_KEY: _update(federation, "loud", 4, info).model_dump_json()})
    _valid(rig, "c3", 4, seed=3)  # an ordinary one after it is still taken
    assert _take_all(rig) == ["norm-outlier"]
    assert rig.store.status().count == 4
    assert len(rig.store.norms(0)) == 4


def test_a_signing_client_is_accepted_and_a_replayed_id_with_other_bytes_is_refused(federation: str) -> None:
    from edge_client.trainer import TrainResult
    from edge_client.worker import EdgeConfig, EdgeWorker

    key = b"k" * 32
    rig = _memory_service(federation, signing_keys={"signer": key})

    class Held:
        def adapter(self) -> dict[str, torch.Tensor]:
            return _factors(4, 5)

    config = EdgeConfig(federation, "signer", 4, 8.0, ("q_proj",), FP, signing_key=key)
    worker = EdgeWorker(rig.transport, Held(), config)  # type: ignore[arg-type]
    header = worker.publish(TrainResult(0.5, 1, 10))
    data, info = encode_tensors(_factors(4, 6))
    replay = _update(federation, "signer", 4, info, update_id=header.update_id)
    from schemas.signing import SIGNATURE_KEY, sign

    _send(rig, data, {HEADER_KEY: replay.model_dump_json(), SIGNATURE_KEY: sign(key, replay.model_dump_json())})
    assert _take_all(rig) == ["replay"]
    assert [u.header.update_id for u in rig.store.round_updates(0)] == [header.update_id]


def test_an_update_is_held_not_requeued_while_the_store_is_briefly_unreachable(federation: str) -> None:
    # Requeueing counts towards the updates queue's delivery limit: a Redis restart of a few seconds would
    # dead-letter sound updates after five tries.
    class Restarting(MemoryRoundStore):
        transient_errors = (ConnectionError,)
        failures = 3

        def record(self, *args: Any, **kwargs: Any) -> RecordResult:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("Redis is restarting")
            return super().record(*args, **kwargs)

    transport: Transport = connect("memory://", memory=MemoryBroker())
    store = Restarting()
    service = AggregatorService(transport, store, AggregatorConfig(federation=federation, poll_s=0.01))
    service.setup()
    rig = Rig(transport, store, service, Topology(federation))
    _valid(rig, "c1", 4, seed=1)
    assert _take_all(rig) == []
    assert service.counters["requeued"] == 0 and service.counters["store_retries"] == 3
    assert store.status().count == 1


class _Clock:
    """Time for aggregator.ingest that passes only when it sleeps: a long outage in no time."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Outage(MemoryRoundStore):
    """Unreachable until the clock passes `until`."""

    transient_errors = (ConnectionError,)

    def __init__(self, clock: _Clock, until: float) -> None:
        super().__init__()
        self.clock, self.until = clock, until

    def record(self, *args: Any, **kwargs: Any) -> RecordResult:
        if self.clock.now < self.until:
            raise ConnectionError("Redis is down")
        return super().record(*args, **kwargs)


class _NoPreparing(MemoryRoundStore):
    """Unreachable for `prepare` (on the check-ahead thread), reachable for everything else."""

    transient_errors = (ConnectionError,)

    def prepare(self, header: LoraUpdate, payload: Any) -> None:
        raise ConnectionError("Redis is down")


def test_an_update_for_another_base_model_is_refused_without_its_bytes_being_written_ahead(federation: str) -> None:
    """Bytes prepared for an update the pins refuse would stay in the store for a day: a client could fill it."""

    class Preparing(MemoryRoundStore):
        def __init__(self) -> None:
            super().__init__()
            self.prepared: list[str] = []

        def prepare(self, header: LoraUpdate, payload: Any) -> None:
            self.prepared.append(header.client_id)

    store = Preparing()
    rig = _memory_service(federation, store)
    service = rig.service
    _valid(rig, "c1", 4, seed=1)
    sub = service.subscribe()
    service.step(sub)
    data, info = encode_tensors(_factors(4, 2))
    other = _update(federation, "c2", 4, info, base_model_fingerprint="b" * 64)
    _send(rig, data, {HEADER_KEY: other.model_dump_json()})
    for _ in range(5):
        service.step(sub)
    sub.close()
    assert service.counters["refused:base-model"] == 1
    assert store.prepared == ["c1"]


def test_an_update_whose_bytes_could_not_be_prepared_ahead_is_recorded(federation: str) -> None:
    """Preparing ahead is an optimisation: a store error there must not hold, give back or refuse the update."""
    store = _NoPreparing()
    rig = _memory_service(federation, store, store_retry_s=0.5)
    service = rig.service
    _valid(rig, "c1", 4, seed=1)
    _valid(rig, "c2", 4, seed=2)
    sub = service.subscribe()
    for _ in range(10):
        service.step(sub)
    sub.close()
    assert service.counters["requeued"] == 0 and service.counters["accepted"] == 2
    assert store.status().count == 2


def test_a_redis_outage_longer_than_the_delivery_limits_give_backs_dead_letters_nothing(
    federation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten minutes down: five give-backs of 60 s each (the old default) dead-lettered the update as
    delivery_limit, a device's work lost to an outage; it is held until Redis answers, and counted once."""
    import aggregator.ingest as ingest_module

    clock = _Clock()
    monkeypatch.setattr(ingest_module, "time", clock)
    transport: Transport = connect("memory://", memory=MemoryBroker())
    store = _Outage(clock, until=600.0)
    service = AggregatorService(transport, store, AggregatorConfig(federation=federation, poll_s=0.01))
    service.setup()
    rig = Rig(transport, store, service, Topology(federation))
    _valid(rig, "c1", 4, seed=1)
    assert _take_all(rig) == []
    assert service.counters["requeued"] == 0 and clock.now >= 600.0
    assert store.status().count == 1


def test_an_update_held_through_an_outage_is_given_back_when_the_process_stops(
    federation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aggregator.ingest as ingest_module

    clock = _Clock()
    monkeypatch.setattr(ingest_module, "time", clock)
    transport: Transport = connect("memory://", memory=MemoryBroker())
    store = _Outage(clock, until=float("inf"))
    service = AggregatorService(transport, store, AggregatorConfig(federation=federation, poll_s=0.01))
    service.setup()
    rig = Rig(transport, store, service, Topology(federation))
    _valid(rig, "c1", 4, seed=1)
    stop = threading.Event()
    service._stop = stop  # what run(stop) does
    sub = service.subscribe()
    delivery = sub.get(1.0)
    assert delivery is not None
    original = clock.sleep

    def sleep(seconds: float) -> None:  # SIGTERM arrives an hour into the outage
        original(seconds)
        if clock.now > 3600:
            stop.set()

    clock.sleep = sleep  # type: ignore[method-assign]
    service.handle(delivery)
    sub.close()
    assert service.counters["requeued"] == 1 and 3600 < clock.now < 3700
    assert rig.transport.queue_depth(rig.topo.updates_queue) == 1, "back in the queue, for whoever comes next"


def test_a_chunked_replay_is_refused_and_leaves_nothing_behind_to_expire(federation: str) -> None:
    from broker.chunked import publish_payload

    rig = _memory_service(federation)

    def send_chunked(header: LoraUpdate, data: bytes) -> None:
        publish_payload(
            rig.transport,
            rig.topo.updates_exchange,
            UPDATE_ROUTING_KEY,
            header.model_dump_json(),
            data,
            header.payload,
            message_id=header.update_id,
            chunk_bytes=64 * 1024,
        )

    data, info = encode_tensors(_factors(8, 1, d=2048))
    first = _update(federation, "c1", 8, info)
    send_chunked(first, data)
    other, other_info = encode_tensors(_factors(8, 2, d=2048))
    send_chunked(_update(federation, "c1", 8, other_info, update_id=first.update_id), other)
    reasons = _take_all(rig)
    assert set(reasons) == {"replay"} and len(reasons) == len(other) // (64 * 1024) + 1, "every chunk refused"
    assert rig.store.status().count == 1
    assert rig.store.expire_transfers(now=1e12) == [], "the refused transfer's chunks were dropped with it"


def test_every_release_and_every_join_answer_carries_the_federations_recipe(federation: str) -> None:
    from aggregator.joining import join_release
    from schemas.messages import JoinRequest
    from schemas.recipe import Recipe

    recipe = Recipe(scaling="fixed", learning_rate=2e-4, schedule="cosine", warmup_steps=2)
    transport = connect("memory://", memory=MemoryBroker())
    store = MemoryRoundStore()
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=2), poll_s=0.01, recipe=recipe)
    service = AggregatorService(transport, store, config)
    service.setup()
    rig = Rig(transport, store, service, Topology(federation))
    _valid(rig, "c1", 4, seed=1)
    _valid(rig, "c2", 8, seed=2)
    _serve_until(rig, threading.Event())
    releases = store.releases(1)
    assert len(releases) == 3 and {r.header.recipe for r in releases.values()} == {recipe}  # c1, c2, the global
    join = JoinRequest(
        federation=federation,
        client_id="c1",
        rank=2,
        lora_alpha=recipe.alpha(2),
        target_modules=("q_proj",),
        base_model_fingerprint=FP,
        have_version=0,
    )
    answer = join_release(store, join)
    assert answer is not None and answer.header.recipe == recipe


def test_every_setting_of_the_aggregator_reaches_its_config(tmp_path: Any) -> None:
    import dataclasses
    import json

    from aggregator.config import config_from_settings
    from aggregator.settings import AggregatorSettings

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"c1": "ab" * 32}))
    given = dict(
        federation="f",
        lease_s=7.0,
        prefetch=3,
        strategy="hetlora",
        svd_mode="fast",
        weighting="staleness",
        staleness_exponent=1.5,
        max_staleness=2,
        keep_versions=5,
        chunk_bytes=2**21,
        max_update_bytes=2**20,
        transfer_expiry_s=9.0,
        hold_bytes=2**22,
        fold_bytes=2**23,
        min_rank=2,
        max_rank=32,
        max_update_norm=10.0,
        norm_outlier_factor=4.0,
        max_weight_share=0.4,
        max_transfers_per_client=2,
        max_transfers=9,
        carry_residual=True,
        server_lr=0.5,
        global_rank=48,
        require_identity=True,
        max_updates=3,
        learning_rate=1e-4,
    )
    settings = AggregatorSettings(**given, signing_keys=keys)  # type: ignore[arg-type]
    config = config_from_settings(settings)
    shared = {f.name for f in dataclasses.fields(config)} & set(AggregatorSettings.model_fields)
    assert shared - {"signing_keys"} <= set(given), "a field both have must be in this test"
    assert all(getattr(config, name) == given[name] for name in shared - {"signing_keys"})
    assert config.policy.max_updates == 3 and config.recipe.learning_rate == 1e-4
    assert config.signing_keys == {"c1": bytes.fromhex("ab" * 32)}


@pytest.mark.parametrize("backend", ["memory", "services"])
def test_a_rounds_adapters_go_out_once_per_distinct_cut_and_reach_every_participant(
    request: pytest.FixtureRequest, federation: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from schemas.messages import SHARED_RELEASE, parse_release

    clients = {"c1": 2, "c2": 2, "c3": 4, "c4": 4, "c5": 4}
    if backend == "memory":
        transport: Transport = connect("memory://", memory=MemoryBroker())
        store: RoundStore = MemoryRoundStore()
    else:
        request.getfixturevalue("amqp_cleanup").extend(Topology(federation).adapter_queue(c) for c in clients)
        transport = connect(AMQP_URL)
        store = RedisRoundStore.from_url(REDIS_URL, federation)
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=len(clients)), poll_s=0.05)
    rig = Rig(transport, store, AggregatorService(transport, store, config), Topology(federation))
    rig.service.setup()
    sent: list[tuple[str, str, tuple[str, ...]]] = []
    publish = transport.publish

    def counting(exchange: str, routing_key: str, *args: Any, **kwargs: Any) -> None:
        if exchange == rig.topo.adapters_exchange:
            sent.append((routing_key, kwargs.get("message_id") or "", tuple(kwargs.get("bcc", ()))))
        publish(exchange, routing_key, *args, **kwargs)

    monkeypatch.setattr(transport, "publish", counting)
    try:
        for seed, (client, rank) in enumerate(clients.items()):
            _valid(rig, client, rank, seed)
        _serve_until(rig, threading.Event())
        assert len(sent) == 2  # one message per rank, not one per client
        assert sorted(len(bcc) + 1 for _, _, bcc in sent) == [2, 3]
        for client, rank in clients.items():
            sub = transport.subscribe(rig.topo.adapter_queue(client), prefetch=1, dead_letter_exchange="")
            delivery = sub.get(10)
            assert delivery is not None, f"{client} got no adapter"
            release = parse_release(delivery.message.headers[HEADER_KEY])
            assert (release.version, release.rank, release.client_id) == (1, rank, SHARED_RELEASE)
            assert f'"{client}"' not in delivery.message.headers[HEADER_KEY]  # nobody is named in it
            assert len(delivery.message.body) == release.payload.size
            delivery.ack()
            sub.close()
    finally:
        transport.close()
        if isinstance(store, RedisRoundStore):
            store.wipe()


def test_updates_taken_ahead_go_back_to_the_queue_when_the_service_stops(
    rig: Rig, federation: str, amqp_cleanup: list[str]
) -> None:
    # The service takes what the broker has delivered (up to the prefetch) to check it ahead while it records the
    # first; stopping there must hand the others back, for this or another aggregator to record, none lost.
    clients = [f"c{i}" for i in range(5)]
    amqp_cleanup.extend(rig.topo.adapter_queue(c) for c in clients)
    for i, client in enumerate(clients):
        _valid(rig, client, 4, seed=i)
    sub = rig.service.subscribe()
    try:
        for _ in range(200):  # each step waits at most poll_s for a delivery
            rig.service.step(sub)
            if rig.store.status().count:
                break
    finally:
        sub.close()
    assert rig.store.status().count == 1
    config = AggregatorConfig(federation=federation, policy=RoundPolicy(max_updates=5), poll_s=0.05)
    _serve_until(
        Rig(rig.transport, rig.store, AggregatorService(rig.transport, rig.store, config), rig.topo), threading.Event()
    )
    assert sorted(c for c in rig.store.releases(1) if c != "_global") == clients
