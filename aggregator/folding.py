"""A round's dense sum, folded in as its updates are recorded, so that closing the round is an SVD, not a sum.

FlexLoRA's round is ΔW = Σ_k w_k s_k B_k A_k per module (w_k the client's share, s_k = alpha_k / r_k); when the
round's total rank reaches min(d_out, d_in) the SVD works on that dense ΔW, and forming it (every client's
full-size product) was most of a round's time: 52 s of a round of 80 updates at LLaMA-1.3B layer shapes
(bench/round_memory.py), while the finaliser waited for the last update. Here each aggregator adds
raw_k s_k B_k A_k into one sum per base version as it records an update, on a worker thread (torch's products
release the GIL, so folding overlaps the ingestion of the next updates), and the finaliser only scales the sums
and takes the SVD.

Exact, whatever the round turns out to be: the shares depend on every update counted (normalisation), on how
stale each is when the round closes, and on a cap on any one share; a sum per base version holds updates
whose staleness is the same in any round, so its updates' raw weights change by one common factor, which the
finaliser checks and applies (aggregator.planning). What the fold cannot express (a share cap that binds, a
round below the dense threshold, differential privacy, another strategy) is aggregated from the factors as
before, and so is any update the fold does not hold (recorded by another aggregator, or past the budget).
Nothing here is a record: a crashed aggregator loses its sums and the next finaliser reads the updates back.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from aggregator.rounds import record_id
from aggregator.strategies import ClientMeta, Weighting
from schemas.lora import LoraFactors, RankRequest
from schemas.messages import LoraUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldedUpdate:
    sha256: str
    base_version: int
    raw_weight: float  # the weighting's raw weight at the staleness the fold assumed (its round − base version)


@dataclass
class Folded:
    """What one round's fold holds: Σ raw_k s_k B_k A_k per base version and module, and the updates in it."""

    round_id: int
    updates: dict[str, FoldedUpdate] = field(default_factory=dict)  # by record id
    sums: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # base version -> module -> dense
    # base version -> the modules of one shape and the (M, d_out, d_in) tensor whose views their sums are
    stacks: dict[int, list[tuple[list[str], torch.Tensor]]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for modules in self.sums.values() for t in modules.values())


@dataclass(frozen=True)
class _Job:
    header: LoraUpdate
    factors: Mapping[str, LoraFactors]
    round_id: int
    nbytes: int  # of its factors, while it waits in the backlog


# Updates folded in one pass over the sums (Σr of 32 rank-8 updates is 256), and the factors' bytes after which a
# batch is full: what a finaliser may wait for while the low-priority worker finishes the batch it has started.
_BATCH_UPDATES = 32
_BATCH_BYTES = 64 * 1024 * 1024


@dataclass
class _Tally:
    """The ranks of the updates handed in for one round, to project whether the round will take the dense path
    (Σr ≥ min(d_out, d_in) in every module), and the updates held back until it is clear that it will."""

    round_id: int
    count: int = 0
    rank_sums: dict[str, int] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)  # min(d_out, d_in) per module
    deferred: list[_Job] = field(default_factory=list)

    def add(self, factors: Mapping[str, LoraFactors], rank_of: Mapping[str, int]) -> None:
        self.count += 1
        for module, f in factors.items():
            self.rank_sums[module] = self.rank_sums.get(module, 0) + rank_of[module]
            self.widths[module] = min(f.B.shape[0], f.A.shape[1])

    def dense(self, expected: int) -> bool:
        """Would a round of `expected` updates of the mean rank seen so far reach the dense path in every module?"""
        return all(expected * total >= self.widths[m] * self.count for m, total in self.rank_sums.items())


def _yield_to_ingestion() -> None:
    """Run the calling thread (and the OpenMP threads it starts, which inherit this) at the lowest priority, on
    Linux, where each thread has its own: folding uses what ingestion leaves idle instead of competing with it,
    and catches up in the gaps (a finaliser folds what is left itself: RoundFolder.take). Measured on 2 cores,
    500 queued SmolLM2-shaped rank-8 updates, exact mode, one aggregator: 58 updates/s recorded with the
    worker at the process's priority folding one update at a time, 109-114 at the lowest with the batches
    below, 113-121 without folding (interleaved runs). SCHED_IDLE did no better, and may starve the worker
    outright on a busy machine."""
    if sys.platform != "linux":  # elsewhere a thread id is no process id: setpriority would renice another
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # not permitted in some sandboxes: fold at the normal priority
        log.debug("could not lower the fold worker's priority", exc_info=True)


class _Workspace:
    """The buffers a fold concatenates factors into, kept from one batch to the next while the worker is busy and
    let go when it stops. A fresh pair per batch, and in exact mode a second copy converted to float64, cost
    page faults and copies, not products: a batch of 32 rank-8 updates at SmolLM2 q/v shapes, one thread, took
    178 → 150 ms in float64 and 80 → 78 ms in float32 with these buffers and Bᵀ copied row-wise (the same sums,
    bit for bit); the exact-mode finaliser's aggregation went 1.25–1.33 → 1.23–1.26 s in a 50-client round
    (docs/bench-fold-workspace-ab-1207.json)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, columns) tensor to overwrite whole; the same memory as the last one of `name` when it fits."""
        need = rows * columns
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < need:
            buffer = self._buffers[name] = torch.empty(need, dtype=dtype)
        return buffer[:need].view(rows, columns)

    def clear(self) -> None:
        self._buffers.clear()


class RoundFolder:
    """Folds recorded updates into the open round's sums on a worker thread, within `budget_bytes` of sums
    (0: fold nothing). `dtype` is the precision of the strategy's dense path (float32 in fast mode)."""

    def __init__(self, budget_bytes: int, weighting: Weighting, dtype: torch.dtype, expected_updates: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes, self.weighting, self.dtype = budget_bytes, weighting, dtype
        self.expected_updates = expected_updates
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._backlog_bytes = 0  # of the factors of the updates waiting, deferred or queued
        self._tally: _Tally | None = None
        self._lock = threading.Lock()
        self._fold: Folded | None = None
        self._thread: threading.Thread | None = None
        self._workspace = _Workspace()
        self._folding = threading.Lock()  # one fold at a time uses the workspace (the worker, or `take` after it)

    def add(self, header: LoraUpdate, factors: Mapping[str, LoraFactors], round_id: int) -> None:
        """Fold a just-recorded update (`round_id`: the round open when it was recorded), in the background.

        Only a round projected to reach the dense path is folded (a dense sum would otherwise be work for
        nothing): while the mean rank of the round's updates so far says it would not, updates wait, and are
        folded once it does. An update that would put more than `budget_bytes` of factors in the backlog is not
        folded (its round takes it from its factors): the backlog never grows without bound while ingestion
        outpaces folding."""
        if self.budget_bytes == 0:
            return
        nbytes = sum(f.A.nbytes + f.B.nbytes for f in factors.values())
        with self._lock:
            if self._tally is None or self._tally.round_id < round_id:
                if self._tally is not None:  # the round closed with them unfolded: they were summed from factors
                    self._backlog_bytes -= sum(job.nbytes for job in self._tally.deferred)
                self._tally = _Tally(round_id)
            if self._tally.round_id != round_id or self._backlog_bytes + nbytes > self.budget_bytes:
                return
            self._tally.add(factors, header.request.ranks(factors))
            self._backlog_bytes += nbytes
            job = _Job(header, factors, round_id, nbytes)
            if not self._tally.dense(self.expected_updates):
                self._tally.deferred.append(job)
                return
            for ready in [*self._tally.deferred, job]:
                self._jobs.put(ready)
            self._tally.deferred = []
            if self._thread is None:
                # A worker lives only while there is work: an idle thread that ran torch's OpenMP kernels
                # slows the next SVD on another thread 2.5-3.5x (measured: 1.7 s -> 4.5-6.4 s at 30 × 576²).
                self._thread = threading.Thread(target=self._work, name="round-fold", daemon=True)
                self._thread.start()

    def take(self, round_id: int) -> Folded | None:
        """The fold of `round_id` with every update handed in folded (None: none for that round); the folder starts
        afresh after. What the worker has not started is folded here, on the caller's thread and at its priority,
        so a finaliser never waits on a backlog that the low-priority worker is working through."""
        waiting = self._drain()
        for start in range(0, len(waiting), _BATCH_UPDATES):
            self._fold_safely(waiting[start : start + _BATCH_UPDATES])
        with self._folding:
            self._workspace.clear()
        with self._lock:
            fold, self._fold = self._fold, None
            if self._tally is not None and self._tally.round_id <= round_id:  # what waited is summed from factors
                self._backlog_bytes -= sum(job.nbytes for job in self._tally.deferred)
                self._tally = None
        return fold if fold is not None and fold.round_id == round_id and fold.updates else None

    def holding(self) -> dict[str, int] | None:
        """The round being folded, how many updates and bytes of sums it holds (None: none), as of now."""
        with self._lock:
            fold = self._fold
            if fold is None:
                return None
            return {"round": fold.round_id, "updates": len(fold.updates), "bytes": fold.nbytes}

    def close(self) -> None:
        self._drain()

    def _drain(self) -> list[_Job]:
        """Take the updates the worker has not started out of its queue, wait for the batch it is folding, and
        return them."""
        waiting: list[_Job] = []
        with self._lock:
            while True:
                try:
                    waiting.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
                self._backlog_bytes -= waiting[-1].nbytes
                self._jobs.task_done()
        self._jobs.join()
        with self._lock:
            worker = self._thread
        if worker is not None:
            worker.join()
        return waiting

    def _work(self) -> None:
        _yield_to_ingestion()
        while True:
            with self._lock:
                jobs: list[_Job] = []
                while len(jobs) < _BATCH_UPDATES and sum(job.nbytes for job in jobs) < _BATCH_BYTES:
                    try:
                        jobs.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                if not jobs:
                    self._thread = None
            if not jobs:  # let the buffers go: taking _folding outside _lock, as a fold does (_folding, then _lock)
                with self._folding:
                    self._workspace.clear()
                return
            try:
                self._fold_safely(jobs)
            finally:
                with self._lock:
                    self._backlog_bytes -= sum(job.nbytes for job in jobs)
                for _ in jobs:
                    self._jobs.task_done()

    def _fold_safely(self, jobs: list[_Job]) -> None:
        """Fold a batch (on the worker or the finaliser); a failure is said, not lost: the fold is dropped and its
        round aggregated from the factors instead, never failed for it."""
        try:
            with self._folding:
                for round_id, batch in itertools.groupby(jobs, key=lambda job: job.round_id):
                    self._fold_batch(round_id, list(batch))
        except Exception:
            log.exception("folding %d updates failed; their round is summed from the factors", len(jobs))
            with self._lock:
                self._fold = None

    def _fold_batch(self, round_id: int, jobs: list[_Job]) -> None:
        """Fold updates recorded while `round_id` was open: one product per module and base version for the whole
        batch (the factors side by side), so the dense sum is read and written once per batch rather than once per
        update; at rank 8 that traffic, not the arithmetic, was the cost of folding."""
        with self._lock:
            fold = self._fold
            if fold is None or fold.round_id < round_id:
                fold = self._fold = Folded(round_id)
        if fold.round_id != round_id:
            return  # recorded while an older round was open (seen late): the finaliser adds them from their factors
        for base_version, group in itertools.groupby(sorted(jobs, key=lambda j: j.header.base_version), _base):
            self._fold_base(fold, base_version, list(group))

    def _fold_base(self, fold: Folded, base_version: int, jobs: list[_Job]) -> None:
        sums, stacks = fold.sums.get(base_version), fold.stacks.get(base_version, [])
        if sums is None:
            first = jobs[0].factors
            size = sum(f.B.shape[0] * f.A.shape[1] for f in first.values()) * self.dtype.itemsize
            if fold.nbytes + size > self.budget_bytes:
                return  # past the budget: these updates are aggregated from their factors
            sums, stacks = _stacked_zeros({m: (f.B.shape[0], f.A.shape[1]) for m, f in first.items()}, self.dtype)
        raws = [self.weighting([ClientMeta(j.header.num_samples, fold.round_id - base_version)])[0] for j in jobs]
        requests = [j.header.request for j in jobs]
        # A handful of torch calls per group of same-shaped modules, not per module nor per update: each call gives
        # the GIL back and takes it again, and a worker at the lowest priority that asks for it makes the ingesting
        # thread hand it over and wait until the worker is scheduled (CPython's forced switch): with a few calls per
        # module (240 a batch at SmolLM2 q/v) one aggregator ingested 20% fewer updates while folding.
        for modules, stack in stacks:
            columns = _columns(modules, jobs, raws, requests)
            if columns is not None:
                _fold_stacked(stack, modules, jobs, columns, self.dtype, self._workspace)
                continue
            for i, module in enumerate(modules):  # an update's modules differ in rank (a rank pattern)
                one = _columns([module], jobs, raws, requests) or []  # one module: never None
                _fold_stacked(stack[i : i + 1], [module], jobs, one, self.dtype, self._workspace)
        with self._lock:
            if self._fold is fold:
                fold.sums[base_version], fold.stacks[base_version] = sums, stacks
                for job, raw in zip(jobs, raws, strict=True):
                    h = job.header
                    fold.updates[record_id(h.client_id, h.update_id)] = FoldedUpdate(
                        h.payload.sha256, base_version, raw
                    )


def _base(job: _Job) -> int:
    return job.header.base_version


def _stacked_zeros(
    shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], list[tuple[list[str], torch.Tensor]]]:
    """One zero sum per module, and the stacks they are views of: one (M, d_out, d_in) tensor per shape."""
    sums: dict[str, torch.Tensor] = {}
    stacks = []
    for shape, group in itertools.groupby(sorted(shapes, key=lambda m: (shapes[m], m)), key=lambda m: shapes[m]):
        modules = list(group)
        stack = torch.zeros((len(modules), *shape), dtype=dtype)
        sums.update(zip(modules, stack.unbind(0), strict=True))
        stacks.append((modules, stack))
    return dict(sorted(sums.items())), stacks


def _columns(
    modules: list[str], jobs: list[_Job], raws: list[float], requests: list[RankRequest]
) -> list[float] | None:
    """Each factor column's coefficient raw_k·α_k/r_k, module by module and update by update (_fold_stacked's
    order); None when an update's ranks differ between these modules, which then cannot share one product."""
    columns: list[float] = []
    for module in modules:
        for raw, job, request in zip(raws, jobs, requests, strict=True):
            rank = job.factors[module].B.shape[1]
            if rank != job.factors[modules[0]].B.shape[1]:
                return None
            at = request.at(module)
            columns += [raw * at.alpha / at.rank] * rank
    return columns


def _fold_stacked(
    stack: torch.Tensor,
    modules: list[str],
    jobs: list[_Job],
    columns: list[float],
    dtype: torch.dtype,
    workspace: _Workspace,
) -> None:
    """stack[i] += Σ_j B_ij diag(columns) A_ij for the modules of one stack, every update of one rank across them:
    the factors of every module and update side by side (module-major), one batched product. Bᵀ and A are both
    concatenated row-wise, converted to `dtype` as they are copied, into the workspace."""
    count, d_out, d_in = stack.shape
    rows = len(columns)
    bt = torch.cat(
        [j.factors[m].B.T for m in modules for j in jobs], dim=0, out=workspace.take("B", rows, d_out, dtype)
    )
    bt.mul_(torch.tensor(columns, dtype=dtype).unsqueeze(1))
    a = torch.cat([j.factors[m].A for m in modules for j in jobs], dim=0, out=workspace.take("A", rows, d_in, dtype))
    width = rows // count
    stack.baddbmm_(bt.view(count, width, d_out).transpose(1, 2), a.view(count, width, d_in))
