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

import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from aggregator.rounds import record_id
from aggregator.strategies import ClientMeta, Weighting
from schemas.lora import LoraFactors
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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for modules in self.sums.values() for t in modules.values())


@dataclass(frozen=True)
class _Job:
    header: LoraUpdate
    factors: Mapping[str, LoraFactors]
    round_id: int


def dense_threshold_met(factors: Mapping[str, LoraFactors], rank_of: Mapping[str, int], expected: int) -> bool:
    """Would a round of `expected` updates like this one reach the dense path in every module (Σr ≥ min(d))?"""
    return all(
        expected * rank_of[module] >= min(f.B.shape[0], f.A.shape[1]) for module, f in factors.items()
    )  # fmt: skip


class RoundFolder:
    """Folds recorded updates into the open round's sums on a worker thread, within `budget_bytes` of sums
    (0: fold nothing). `dtype` is the precision of the strategy's dense path (float32 in fast mode)."""

    def __init__(self, budget_bytes: int, weighting: Weighting, dtype: torch.dtype, expected_updates: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes, self.weighting, self.dtype = budget_bytes, weighting, dtype
        self.expected_updates = expected_updates
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._lock = threading.Lock()
        self._fold: Folded | None = None
        self._thread: threading.Thread | None = None

    def add(self, header: LoraUpdate, factors: Mapping[str, LoraFactors], round_id: int) -> None:
        """Fold a just-recorded update (`round_id`: the round open when it was recorded), in the background."""
        if self.budget_bytes == 0:
            return
        if not dense_threshold_met(factors, header.request.ranks(factors), self.expected_updates):
            return  # its round will take the factored path: a dense sum would be work for nothing
        with self._lock:
            self._jobs.put(_Job(header, factors, round_id))
            if self._thread is None:
                # A worker lives only while there is work: an idle thread that ran torch's OpenMP kernels
                # slows the next SVD on another thread 2.5-3.5x (measured: 1.7 s -> 4.5-6.4 s at 30 × 576²).
                self._thread = threading.Thread(target=self._work, name="round-fold", daemon=True)
                self._thread.start()

    def take(self, round_id: int) -> Folded | None:
        """The fold of `round_id` once every update handed in is folded (None: none for that round); the folder
        starts afresh after."""
        self._drain()
        with self._lock:
            fold, self._fold = self._fold, None
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

    def _drain(self) -> None:
        """Wait until every update handed in is folded and the worker has exited."""
        self._jobs.join()
        with self._lock:
            worker = self._thread
        if worker is not None:
            worker.join()

    def _work(self) -> None:
        while True:
            with self._lock:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    self._thread = None
                    return
            try:
                self._fold_one(job)
            except Exception:  # said, not lost: the round is aggregated from the factors instead
                log.exception("folding update %s failed; its round is summed from the factors", job.header.update_id)
                with self._lock:
                    self._fold = None
            finally:
                self._jobs.task_done()

    def _fold_one(self, job: _Job) -> None:
        with self._lock:
            fold = self._fold
            if fold is None or fold.round_id < job.round_id:
                fold = self._fold = Folded(job.round_id)
        if fold.round_id != job.round_id:
            return  # recorded while an older round was open (seen late): the finaliser adds it from its factors
        h = job.header
        raw = self.weighting([ClientMeta(h.num_samples, job.round_id - h.base_version)])[0]
        sums = fold.sums.get(h.base_version)
        if sums is None:
            size = sum(f.B.shape[0] * f.A.shape[1] for f in job.factors.values()) * self.dtype.itemsize
            if fold.nbytes + size > self.budget_bytes:
                return  # past the budget: this update is aggregated from its factors
            sums = {m: torch.zeros((f.B.shape[0], f.A.shape[1]), dtype=self.dtype) for m, f in job.factors.items()}
        request = h.request
        for module, f in job.factors.items():
            at = request.at(module)
            scale = raw * at.alpha / at.rank
            sums[module].addmm_(f.B.to(self.dtype), f.A.to(self.dtype), alpha=scale)
        with self._lock:
            if self._fold is fold:
                fold.sums[h.base_version] = sums
                fold.updates[record_id(h.client_id, h.update_id)] = FoldedUpdate(h.payload.sha256, h.base_version, raw)
