"""Updates an aggregator recorded, held decoded for the rounds it finalises (aggregator.held): the finaliser
reads back only what it does not hold, gets the same round either way, and never uses a held entry for another
payload than the one recorded."""

from __future__ import annotations

import threading
from collections.abc import Collection

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.held import HeldUpdates, factors_bytes
from aggregator.rounds import RecordedUpdate, RoundPolicy, RoundStore, record_id
from aggregator.service import AggregatorService
from aggregator.stores.memory import MemoryRoundStore
from broker.connect import connect
from broker.topology import Topology
from broker.transports.memory import MemoryBroker
from schemas.lora import LoraFactors
from schemas.messages import LoraUpdate, PayloadInfo
from tests.aggregator.test_round_store_contract import _update
from tests.aggregator.test_service import Rig, _serve_until, _valid


def _factors(n: int) -> dict[str, LoraFactors]:
    return {"m": LoraFactors(torch.zeros(1, n), torch.zeros(n, 1))}  # 8·n bytes


def _header(client: str, update_id: str, sha: str = "0" * 64) -> LoraUpdate:
    return _update(client, update_id).model_copy(update={"payload": PayloadInfo(size=3, sha256=sha)})


def test_held_updates_keep_within_their_budget_and_match_client_id_and_sha() -> None:
    held = HeldUpdates(budget_bytes=8 * 250)
    held.hold(_header("a", "update-1"), _factors(100), round_id=0)
    held.hold(_header("b", "update-1"), _factors(100), round_id=0)  # the same update id, another client's
    assert held.ids() == {record_id("a", "update-1"), record_id("b", "update-1")} and held.nbytes == 1600
    held.hold(_header("c", "update-2"), _factors(100), round_id=1)  # over the budget: the oldest goes
    assert held.ids() == {record_id("b", "update-1"), record_id("c", "update-2")} and held.nbytes <= held.budget_bytes
    held.hold(_header("d", "update-3"), _factors(1000), round_id=1)  # larger than the whole budget: not held
    assert record_id("d", "update-3") not in held.ids()
    assert held.take(_header("b", "update-1", sha="9" * 64)) is None  # the recorded payload is another one
    assert held.take(_header("b", "update-1")) is not None  # and taken once:
    assert record_id("b", "update-1") not in held.ids()
    held.forget_before(3)  # rounds 0 and 1 are committed once round 3 is open
    assert len(held) == 0 and held.nbytes == 0
    with pytest.raises(ValueError, match="budget_bytes"):
        HeldUpdates(-1)


def test_a_store_returns_held_updates_unread_and_reads_the_rest(store: RoundStore) -> None:
    store.record(_header("c1", "update-1"), b"abc", now=1.0)
    store.record(_header("c2", "update-1"), b"xyz", now=2.0)
    got = store.round_updates(0, held={record_id("c1", "update-1")})
    assert [(u.header.client_id, u.payload) for u in got] == [("c1", None), ("c2", b"xyz")]
    assert [u.payload for u in store.round_updates(0)] == [b"abc", b"xyz"]


class CountingStore(MemoryRoundStore):
    """Counts the payloads a finaliser reads back."""

    read = 0

    def round_updates(self, round_id: int, held: Collection[str] = frozenset()) -> list[RecordedUpdate]:
        out = super().round_updates(round_id, held)
        self.read += sum(u.payload is not None for u in out)
        return out


def _round(
    federation: str, hold_bytes: int, spoil: bool = False
) -> tuple[CountingStore, dict[str, bytes], dict[str, int]]:
    transport = connect("memory://", memory=MemoryBroker())
    store = CountingStore()
    config = AggregatorConfig(
        federation=federation, policy=RoundPolicy(max_updates=3), poll_s=0.01, hold_bytes=hold_bytes, fold_bytes=0
    )  # holding alone (folding spares reading back too: tests/aggregator/test_folding.py)
    service = AggregatorService(transport, store, config)
    service.setup()
    rig = Rig(transport, store, service, Topology(federation))
    for i, rank in enumerate((2, 4, 8)):
        _valid(rig, f"c{i}", rank, seed=i)
    if spoil:  # what is held under c1's update id is not what was recorded: it must not be used
        sub = service.subscribe()
        for _ in range(3):  # record them, without closing the round
            delivery = sub.get(5.0)
            assert delivery is not None
            service.ingest.handle(delivery)
        sub.close()
        assert len(service.held) == 3
        for key in service.held.ids():
            entry = service.held._entries[key]
            service.held._entries[key] = type(entry)("f" * 64, entry.factors, entry.nbytes, entry.round_id)
    _serve_until(rig, threading.Event())
    assert store.version() == 1
    counted = {k: service.counters[k] for k in ("round_updates_held", "round_updates_read_back")}
    return store, {c: bytes(store.payload(r)) for c, r in store.releases(1).items()}, counted


def test_the_finaliser_reads_back_only_what_it_does_not_hold_and_gets_the_same_round(federation: str) -> None:
    holding, with_held, held_counts = _round(federation, hold_bytes=2**20)
    reading, without, read_counts = _round(federation, hold_bytes=0)
    spoilt, after_spoil, _ = _round(federation, hold_bytes=2**20, spoil=True)
    assert holding.read == 0  # it recorded every update itself
    assert reading.read == 3 and spoilt.read == 3  # nothing held, or nothing held that was recorded: read all
    assert held_counts == {"round_updates_held": 3, "round_updates_read_back": 0}  # in its health info
    assert read_counts == {"round_updates_held": 0, "round_updates_read_back": 3}
    assert with_held == without == after_spoil  # the same releases, byte for byte


def test_factors_bytes_counts_both_factors() -> None:
    assert factors_bytes(_factors(10)) == 2 * 10 * 4
