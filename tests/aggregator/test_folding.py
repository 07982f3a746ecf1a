"""Folding recorded updates into the round's dense sum (aggregator.folding): the round comes out as if summed from
the factors, whatever its weights turn out to be, and falls back to the factors where the sums cannot say it."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import cast

import pytest
import torch
from rich.console import Console

from aggregator.config import AggregatorConfig
from aggregator.flexlora import ClientAdapter
from aggregator.folding import Folded, RoundFolder
from aggregator.lowrank import SvdMode
from aggregator.planning import (
    PLAIN_STEP,
    RoundInput,
    RoundPlan,
    ServerStep,
    aggregate_round,
    fold_coefficients,
    round_weights,
)
from aggregator.rounds import RoundPolicy, record_id
from aggregator.service import AggregatorService
from aggregator.status import collect, render
from aggregator.strategies import ClientMeta, DataSize, FedIT, FlexLoRA, StalenessDiscount, Weighting, get_weighting
from broker.connect import connect
from broker.topology import Topology
from broker.transports.memory import MemoryBroker
from schemas.lora import LoraFactors, RankRequest
from schemas.messages import LoraUpdate, PayloadInfo
from schemas.recipe import DEFAULT_RECIPE
from tests.aggregator.test_held import CountingStore
from tests.aggregator.test_round_store_contract import _update
from tests.aggregator.test_service import Rig, _memory_service, _serve_until, _valid
from tests.e2e.procs import wait_for

MODULES = {"model.layers.0.q_proj": (12, 10), "model.layers.0.v_proj": (6, 10), "model.layers.1.q_proj": (12, 10)}


def _client(i: int, rank: int, base: int, samples: int) -> tuple[LoraUpdate, dict[str, LoraFactors], RoundInput]:
    g = torch.Generator().manual_seed(i)
    factors = {
        m: LoraFactors(torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g) * 0.1)
        for m, (d_out, d_in) in MODULES.items()
    }
    header = _update(f"c{i}", f"update-{i:04d}", base=base).model_copy(
        update={
            "rank": rank,
            "lora_alpha": 2.0 * rank,
            "num_samples": samples,
            "target_modules": ("q_proj", "v_proj"),
            "payload": PayloadInfo(size=1, sha256=f"{i:064d}"),
        }
    )
    key = record_id(header.client_id, header.update_id)
    adapter = ClientAdapter.of(factors, header.request)
    return header, factors, RoundInput(header.client_id, samples, base, adapter, key)


ROUND = [(0, 2, 3, 10), (1, 4, 3, 30), (2, 8, 2, 20), (3, 2, 2, 5), (4, 4, 3, 40)]  # (i, rank, base, samples)


def _products(plan_adapters: dict[RankRequest, dict[str, LoraFactors]]) -> dict[tuple[int, str], torch.Tensor]:
    return {
        (req.rank, m): (f.B.double() @ f.A.double()) * (req.alpha / req.rank)
        for req, modules in plan_adapters.items()
        for m, f in modules.items()
    }


def _fold(weighting: Weighting, mode: str, which: set[int], round_id: int = 4, budget: int = 2**20) -> Folded | None:
    folder = RoundFolder(budget, weighting, torch.float32 if mode == "fast" else torch.float64, expected_updates=5)
    for i, rank, base, samples in ROUND:
        if i in which:
            header, factors, _ = _client(i, rank, base, samples)
            folder.add(header, factors, round_id)
    fold = folder.take(round_id)
    folder.close()
    return fold


def _plan(
    mode: str, weighting: Weighting, folded: Folded | None, cap: float | None = None, step: ServerStep = PLAIN_STEP
) -> RoundPlan:
    inputs = [_client(i, r, b, n)[2] for i, r, b, n in ROUND]
    if folded is not None:  # what the service passes for an update the fold holds: no factors
        inputs = [
            RoundInput(x.client_id, x.num_samples, x.base_version, ClientAdapter.of({}, x.request), x.key)
            if x.key in folded.updates
            else x
            for x in inputs
        ]
    strategy = FlexLoRA(mode=cast(SvdMode, mode))
    return aggregate_round(
        strategy, weighting, inputs, 4, global_rank=8, recipe=DEFAULT_RECIPE, max_weight_share=cap, step=step,
        global_at=lambda v: None, folded=folded,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("weighting", ["data_size", "uniform", "staleness"])
@pytest.mark.parametrize("which", [{0, 1, 2, 3, 4}, {1, 2, 4}])
def test_a_folded_round_is_the_round_summed_from_the_factors(mode: str, weighting: str, which: set[int]) -> None:
    """Two base versions (so two sums), weights that depend on the whole round and on staleness; all or some
    of the updates folded (the rest come from their factors, as another aggregator's would)."""
    w = get_weighting(weighting)
    folded = _fold(w, mode, which)
    assert folded is not None and len(folded.updates) == len(which)
    assert set(folded.sums) == {base for i, _, base, _ in ROUND if i in which}, "one sum per base version"
    plan = _plan(mode, w, folded)
    assert plan.info["folded_updates"] == len(which)
    reference = _plan(mode, w, None)
    assert "folded_updates" not in reference.info and plan.weights == reference.weights
    tol = 1e-5 if mode == "fast" else 1e-10
    got, want = _products(plan.result.adapters), _products(reference.result.adapters)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=tol, atol=tol * float(want[key].abs().max())), key


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_batches_folded_one_after_another_sum_as_one_would(mode: str) -> None:
    """The worker folds each batch into buffers kept from the batch before: a batch of fewer factor columns than
    the last (rank 8, then 2, 4, 4, 2) uses part of them, and none of the earlier batch's columns may leak in."""
    w = get_weighting("data_size")
    folder = RoundFolder(2**20, w, torch.float32 if mode == "fast" else torch.float64, expected_updates=5)
    order = [2, 0, 4, 1, 3]
    for n, i in enumerate(order, start=1):
        _, rank, base, samples = ROUND[i]
        header, factors, _ = _client(i, rank, base, samples)
        folder.add(header, factors, 4)
        wait_for(lambda: (folder.holding() or {}).get("updates") == n, 10, f"update {n} folded on its own")  # noqa: B023
    folded = folder.take(4)
    folder.close()
    assert folded is not None and len(folded.updates) == len(order)
    plan, reference = _plan(mode, w, folded), _plan(mode, w, None)
    tol = 1e-5 if mode == "fast" else 1e-10
    got, want = _products(plan.result.adapters), _products(reference.result.adapters)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=tol, atol=tol * float(want[key].abs().max())), key


def test_a_fold_assumes_one_staleness_and_the_round_corrects_it() -> None:
    """Folded while round 3 was open, counted in round 4: every update is one version staler than assumed."""
    w = StalenessDiscount(exponent=1.0)
    folded = _fold(w, "exact", {0, 1, 2, 3, 4}, round_id=3)
    assert folded is not None
    folded.round_id = 4  # the round that counts them
    got, want = _products(_plan("exact", w, folded).result.adapters), _products(_plan("exact", w, None).result.adapters)
    assert all(torch.allclose(got[k], want[k], rtol=1e-10, atol=1e-12) for k in want)


def test_where_the_sums_cannot_say_the_round_it_is_summed_from_the_factors() -> None:
    w = get_weighting("data_size")
    all_in = {0, 1, 2, 3, 4}
    # A binding cap on shares reweights clients unevenly: no common factor per base version.
    capped = _fold(w, "exact", all_in)
    inputs_with_factors = [_client(i, r, b, n)[2] for i, r, b, n in ROUND]
    plan = aggregate_round(
        FlexLoRA(), w, inputs_with_factors, 4, global_rank=8, recipe=DEFAULT_RECIPE, max_weight_share=0.25,
        folded=capped,
    )  # fmt: skip
    assert "folded_updates" not in plan.info
    # Another strategy has no dense sum.
    weights = round_weights(w, inputs_with_factors, 4)
    fold = _fold(w, "exact", all_in)
    assert fold is not None and fold_coefficients(FlexLoRA(), fold, inputs_with_factors, weights) is not None
    assert fold_coefficients(FedIT(), fold, inputs_with_factors, weights) is None
    # Below the dense threshold nothing is folded at all (a round of 5 such updates takes the factored path).
    folder = RoundFolder(2**20, w, torch.float64, expected_updates=1)
    header, factors, _ = _client(0, 2, 3, 10)
    folder.add(header, factors, 4)
    assert folder.take(4) is None
    # Past the budget, updates are not folded (their round sums them from the factors).
    assert _fold(w, "exact", all_in, budget=100) is None


def test_updates_below_the_dense_threshold_are_folded_once_the_round_is_seen_to_reach_it() -> None:
    """A round of 5 whose first updates are rank 1 (5 × 1 < width 10): they wait, and are folded with the rest
    once the round's mean rank says its total will reach the dense path; the round is the factors' sum."""
    w = get_weighting("data_size")
    folder = RoundFolder(2**20, w, torch.float64, expected_updates=5)
    clients = [_client(i, rank, 3, 10 + i) for i, rank in enumerate((1, 1, 8, 2))]
    for header, factors, _ in clients[:2]:
        folder.add(header, factors, 4)
    for header, factors, _ in clients[2:]:
        folder.add(header, factors, 4)
    fold = folder.take(4)
    assert fold is not None and set(fold.updates) == {x.key for _, _, x in clients}
    q = "model.layers.0.q_proj"
    want = sum(
        (10 + i) * (2.0 * (f[q].B.double() @ f[q].A.double())) for i, (_, f, _) in enumerate(clients)
    )  # raw data-size weights and s = alpha / r = 2
    assert isinstance(want, torch.Tensor) and torch.allclose(fold.sums[3][q], want, rtol=1e-12, atol=1e-12)
    # A round that never reaches it folds nothing, and the updates it held back are let go.
    folder.add(*_client(9, 1, 4, 10)[:2], 5)
    assert folder.take(5) is None and folder._backlog_bytes == 0


class _Gated:
    """Data-size weights that the test holds back: the fold worker waits in here with the batch it started."""

    name = "data_size"

    def __init__(self) -> None:
        self.open, self.entered = threading.Event(), threading.Event()
        self.calls: list[tuple[str, int | None]] = []  # (thread, its nice value where threads have their own)

    def __call__(self, clients: Sequence[ClientMeta]) -> list[float]:
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if sys.platform == "linux" else None
        self.calls.append((threading.current_thread().name, nice))
        self.entered.set()
        assert self.open.wait(10), "the test never let the fold go on"
        return DataSize()(clients)


def _gated_folder(budget: int) -> tuple[RoundFolder, _Gated, list[LoraUpdate], list[dict[str, LoraFactors]]]:
    """A folder whose worker has started on update 0 and is held there, and four more updates for one base."""
    gate = _Gated()
    folder = RoundFolder(budget, gate, torch.float64, expected_updates=5)
    clients = [_client(i, 8, 3, 10 * (i + 1)) for i in range(5)]
    folder.add(clients[0][0], clients[0][1], 4)
    assert gate.entered.wait(10)
    return folder, gate, [c[0] for c in clients], [c[1] for c in clients]


def _open_once_taken(folder: RoundFolder, gate: _Gated) -> None:
    """Let the held worker go on only once the finaliser has taken the backlog out of its queue."""
    waiting_for_worker = folder._jobs.join

    def join() -> None:
        gate.open.set()
        waiting_for_worker()

    folder._jobs.join = join  # type: ignore[method-assign]


def test_a_finaliser_folds_the_backlog_itself_rather_than_wait_for_the_worker() -> None:
    """The worker folds at the lowest priority (on Linux), so that ingestion comes first; what it has not started
    when the round closes is folded by the finaliser, at the finaliser's own priority, and nothing is missing."""
    folder, gate, headers, factors = _gated_folder(2**20)
    for header, f in zip(headers[1:], factors[1:], strict=True):
        folder.add(header, f, 4)
    _open_once_taken(folder, gate)
    fold = folder.take(4)
    assert fold is not None and set(fold.updates) == {record_id(h.client_id, h.update_id) for h in headers}
    workers = [call for call in gate.calls if call[0] == "round-fold"]
    assert len(workers) == 1, "the worker folded only the update it had started"
    assert [name for name, _ in gate.calls].count(threading.current_thread().name) == 4
    if sys.platform == "linux":
        assert workers[0][1] == 19
    q = "model.layers.0.q_proj"
    expected = torch.stack(
        [(10 * (i + 1)) / 150 * 2.0 * (f[q].B.double() @ f[q].A.double()) for i, f in enumerate(factors)]
    )
    total = sum(fold.updates[record_id(h.client_id, h.update_id)].raw_weight for h in headers)
    assert torch.allclose(fold.sums[3][q] / total, expected.sum(0), rtol=1e-10, atol=1e-12)


def test_a_batch_of_updates_whose_modules_differ_in_rank_is_folded_as_the_sum_of_their_products() -> None:
    """Modules of one shape are folded together, every update's factors side by side; an update with a rank
    pattern (one q_proj at another rank than the other) makes its batch fold those modules one at a time. Either
    way each sum is Σ raw_k (α_k/r_k) B_k A_k of its own module."""
    patterns: list[dict[str, int]] = [{}, {"model.layers.1.q_proj": 3}, {}, {"v_proj": 5}]
    clients = []
    for i, pattern in enumerate(patterns):
        header, _, _ = _client(i, 4, 3, 10 * (i + 1))
        header = header.model_copy(update={"rank_pattern": pattern})
        g = torch.Generator().manual_seed(100 + i)
        factors = {}
        for m, (d_out, d_in) in MODULES.items():
            rank = header.request.at(m).rank
            factors[m] = LoraFactors(torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g))
        clients.append((header, factors))
    for together in ([0, 2], [0, 1, 2, 3]):  # one rank across modules; then patterns in the batch
        gate = _Gated()
        folder = RoundFolder(2**20, gate, torch.float64, expected_updates=4)
        folder.add(*clients[together[0]], 4)
        assert gate.entered.wait(10)  # the worker holds the first; the rest wait, then go as one batch
        for i in together[1:]:
            folder.add(*clients[i], 4)
        gate.open.set()
        fold = folder.take(4)
        folder.close()
        assert fold is not None and len(fold.updates) == len(together)
        for m in MODULES:
            want = torch.zeros(MODULES[m], dtype=torch.float64)
            for i in together:
                header, factors = clients[i]
                at = header.request.at(m)
                want += 10 * (i + 1) * (at.alpha / at.rank) * (factors[m].B.double() @ factors[m].A.double())
            assert torch.allclose(fold.sums[3][m], want, rtol=1e-12, atol=1e-12), (together, m)


def test_a_fold_that_fails_on_the_finalisers_thread_leaves_the_round_to_the_factors() -> None:
    folder, gate, headers, factors = _gated_folder(2**20)
    for header, f in zip(headers[1:], factors[1:], strict=True):
        folder.add(header, f, 4)

    class Broken(_Gated):
        def __call__(self, clients: Sequence[ClientMeta]) -> list[float]:
            if threading.current_thread() is threading.main_thread():
                raise RuntimeError("a bug in folding")
            return super().__call__(clients)

    gate.__class__ = Broken
    _open_once_taken(folder, gate)
    assert folder.take(4) is None, "no fold: the finaliser sums the round from the factors instead of failing"


def test_a_fold_that_falls_behind_holds_a_bounded_backlog() -> None:
    """Ingestion outpacing the worker: an update that would put more than the budget of factors in the backlog is
    not folded (its round takes it from its factors), so memory stays within fold_bytes."""
    one = sum(f.A.nbytes + f.B.nbytes for f in _client(0, 8, 3, 10)[1].values())
    folder, gate, headers, factors = _gated_folder(int(2.5 * one))
    for header, f in zip(headers[1:], factors[1:], strict=True):
        folder.add(header, f, 4)
    gate.open.set()
    fold = folder.take(4)
    assert fold is not None
    assert set(fold.updates) == {record_id(h.client_id, h.update_id) for h in headers[:2]}


def test_a_carried_residual_is_added_to_the_folded_round() -> None:
    """FlexLoRA's carried residual (the default server step): the global the clients started from comes in."""
    w = get_weighting("data_size")
    g = torch.Generator().manual_seed(99)
    start = {
        m: LoraFactors(torch.randn(8, d_in, generator=g), torch.randn(d_out, 8, generator=g))
        for m, (d_out, d_in) in MODULES.items()
    }
    source = RankRequest(8, 16.0)
    step = ServerStep(carry_residual=True, server_lr=0.5)

    def plan(folded: Folded | None) -> RoundPlan:
        inputs = [_client(i, r, b, n)[2] for i, r, b, n in ROUND]
        return aggregate_round(
            FlexLoRA(), w, inputs, 4, global_rank=8, recipe=DEFAULT_RECIPE, step=step,
            global_at=lambda v: (source, start), folded=folded,
        )  # fmt: skip

    folded, reference = plan(_fold(w, "exact", {0, 1, 2, 3, 4})), plan(None)
    assert folded.info["folded_updates"] == 5 and folded.info["carried_versions"] == 2
    got, want = _products(folded.result.adapters), _products(reference.result.adapters)
    assert all(torch.allclose(got[k], want[k], rtol=1e-10, atol=1e-12) for k in want)


def _service_round(federation: str, fold_bytes: int) -> tuple[CountingStore, dict[str, torch.Tensor], int]:
    transport = connect("memory://", memory=MemoryBroker())
    store = CountingStore()
    config = AggregatorConfig(
        federation=federation, policy=RoundPolicy(max_updates=3), poll_s=0.01, hold_bytes=0, fold_bytes=fold_bytes
    )
    service = AggregatorService(transport, store, config)
    service.setup()
    rig = Rig(transport, store, service, Topology(federation))
    for i, rank in enumerate((4, 4, 8)):
        _valid(rig, f"c{i}", rank, seed=i)
    _serve_until(rig, threading.Event())
    assert store.version() == 1
    from schemas.tensors import decode_tensors

    releases = {c: decode_tensors(store.payload(r)) for c, r in store.releases(1).items()}
    service.folder.close()
    return (
        store,
        {f"{c}/{k}": t for c, ts in releases.items() for k, t in ts.items()},
        service.counters["round_updates_folded"],
    )


def test_the_service_folds_what_it_records_and_reads_nothing_back(federation: str) -> None:
    folding, folded, count = _service_round(federation, fold_bytes=2**20)
    reading, summed, none = _service_round(federation, fold_bytes=0)
    assert (count, folding.read) == (3, 0), "every update folded, none read back (nothing held either)"
    assert (none, reading.read) == (0, 3)
    assert folded.keys() == summed.keys()
    for key, t in summed.items():
        assert torch.allclose(folded[key], t, rtol=1e-5, atol=1e-6), key


def test_flexlora_status_shows_what_each_aggregator_is_folding(federation: str) -> None:
    rig = _memory_service(federation)
    service, store, config = rig.service, rig.store, rig.service.config
    for i, rank in enumerate((4, 8)):
        _valid(rig, f"c{i}", rank, seed=i)
    sub = service.subscribe()
    for _ in range(10):
        service.step(sub)
    sub.close()
    wait_for(lambda: (service.folder.holding() or {}).get("updates") == 2, 10, "both updates folded")
    store.record_health(config.owner, service.health_info(), ttl_s=60)
    [live] = collect(store, None, federation, now=time.time()).aggregators
    assert live.fold is not None and live.fold["round"] == 0 and live.fold["updates"] == 2 and live.fold["bytes"] > 0
    console = Console(record=True, width=200)
    render(collect(store, None, federation, now=time.time()), console, now=time.time())
    assert "round 0: 2 updates" in console.export_text()
    service.folder.close()
