"""FlexLoRA as pure functions: tensors in, tensors out; no broker, no Redis, no files.

For one module, client k contributes B_k (d_out × r_k), A_k (r_k × d_in), alpha_k and a weight p_k.
The global update is ΔW = Σ_k p_k (alpha_k / r_k) B_k A_k; its SVD ΔW = U Σ Vᵀ is cut at each
requested rank r with B = U_r Σ_r / (alpha / r), A = V_rᵀ, so (alpha / r) B A is the best rank-r
approximation of ΔW (Eckart–Young). All singular values go into B, as in the authors' code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from aggregator.lowrank import NonFiniteError, SvdMode, dense_top_svd, top_svd
from schemas.lora import LoraFactors
from schemas.lora import RankRequest as RankRequest  # re-exported: the aggregator names it from here
from schemas.lora import recut as recut  # the exact cut of a cut, shared with the edge client
from schemas.ranks import AlphaPattern, RankPattern


@dataclass(frozen=True)
class ClientAdapter:
    """One client's LoRA factors for every module, with the rank and alpha it trained them at: `rank` and
    `alpha` for every module, unless the patterns (peft's rank_pattern / alpha_pattern, schemas.ranks) give a
    module its own."""

    factors: Mapping[str, LoraFactors]
    rank: int
    alpha: float
    rank_pattern: RankPattern = ()
    alpha_pattern: AlphaPattern = ()

    @classmethod
    def of(cls, factors: Mapping[str, LoraFactors], request: RankRequest) -> ClientAdapter:
        return cls(factors, request.rank, request.alpha, request.rank_pattern, request.alpha_pattern)

    @property
    def request(self) -> RankRequest:
        """The ranks this client trained at (and needs its release cut at)."""
        return RankRequest(self.rank, self.alpha, self.rank_pattern, self.alpha_pattern)

    def at(self, module: str) -> RankRequest:
        """The rank and alpha of one module."""
        return self.request.at(module)

    @property
    def scale(self) -> float:
        """alpha / rank of the modules no pattern names (every module's without patterns)."""
        return self.alpha / self.rank

    def scale_at(self, module: str) -> float:
        r = self.at(module)
        return r.alpha / r.rank


def data_size_weights(num_samples: Sequence[int]) -> list[float]:
    """p_k = n_k / Σ n: FlexLoRA's default weighting."""
    if not num_samples or any(n <= 0 for n in num_samples):
        raise ValueError(f"sample counts must be positive, got {list(num_samples)}")
    total = float(sum(num_samples))
    return [n / total for n in num_samples]


def cut(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, request: RankRequest, dtype: torch.dtype = torch.float32
) -> LoraFactors:
    """B = U_r Σ_r / (alpha / r), A = V_rᵀ; zero-padded when ΔW has fewer than r singular values."""
    r = request.rank
    k = min(r, s.shape[0])
    scale = request.alpha / r
    if k == r:  # the common case: no padding, so no full-size float64 copies (a round cuts every module 5 times)
        return LoraFactors(A=vh[:r, :].to(dtype), B=(u[:, :r] * (s[:r] / scale)).to(dtype))
    b = torch.zeros((u.shape[0], r), dtype=torch.float64)
    a = torch.zeros((r, vh.shape[1]), dtype=torch.float64)
    b[:, :k] = u[:, :k] * (s[:k] / scale)
    a[:k, :] = vh[:k, :]
    return LoraFactors(A=a.to(dtype), B=b.to(dtype))


def cut_modules(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    modules: Sequence[str],
    request: RankRequest,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoraFactors]:
    """`cut` of a batch (U, S, Vh of `modules`, stacked in that order): one product and one conversion for the
    whole batch when every module is cut at one (rank, alpha), not a few small ones per module (a 50-client round
    of SmolLM2 q/v cuts 60 modules at 5 ranks)."""
    at = {request.at(m) for m in modules}
    if len(at) != 1 or s.shape[-1] < request.rank:  # rank patterns, or padding: one module at a time
        return {m: cut(u[i], s[i], vh[i], request.at(m), dtype) for i, m in enumerate(modules)}
    (one,) = at
    r = one.rank
    b = (u[..., :r] * (s[..., :r] / (one.alpha / r)).unsqueeze(-2)).to(dtype)
    a = vh[..., :r, :].to(dtype)
    return {m: LoraFactors(A=a[i], B=b[i]) for i, m in enumerate(modules)}


@dataclass(frozen=True)
class ModuleReport:
    """How one module's SVD was computed (see aggregator.lowrank) and, in fast mode, how far its worst
    released rank-r error is above the optimal rank-r error (relative; 0.0 when computed exactly)."""

    module: str
    path: str
    total_rank: int
    excess: float


class AggregationError(ValueError):
    """Inputs that cannot be aggregated; the message names the client, module or request at fault."""


def validate_inputs(
    clients: Sequence[ClientAdapter],
    weights: Sequence[float],
    requests: Sequence[RankRequest],
    *,
    check_finite: bool = True,
) -> tuple[list[float], list[str]]:
    """Check everything aggregation relies on; returns the normalised weights and the sorted module names.

    Every message names the offending client (by index), module or request. `check_finite=False` leaves
    the NaN/Inf scan to the caller (see `_name_nonfinite`)."""
    if not clients:
        raise AggregationError("no clients to aggregate")
    if len(weights) != len(clients):
        raise AggregationError(f"{len(clients)} clients but {len(weights)} weights")
    for k, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise AggregationError(f"client {k} has weight {w}; weights must be finite and >= 0")
    total = math.fsum(weights)
    if total <= 0:
        raise AggregationError("every client has weight 0; at least one must be positive")
    if not requests:
        raise AggregationError("no ranks requested")
    for j, req in enumerate(requests):
        if min(req.all_ranks()) < 1:
            raise AggregationError(f"request {j} asks for {req.describe()}; ranks must be >= 1")
        alphas = [req.alpha, *(a for _, a in req.alpha_pattern)]
        if not all(math.isfinite(a) and a > 0 for a in alphas):
            raise AggregationError(f"request {j} ({req.describe()}) has alphas {alphas}; alpha must be finite and > 0")
    modules = set(clients[0].factors)
    if not modules:
        raise AggregationError("client 0 adapts no modules")
    shapes: dict[str, tuple[int, int]] = {}
    for k, client in enumerate(clients):
        request = client.request
        alphas = [request.alpha, *(a for _, a in request.alpha_pattern)]
        if min(request.all_ranks()) < 1 or not all(math.isfinite(a) and a > 0 for a in alphas):
            raise AggregationError(
                f"client {k} declares {request.describe()} and alphas {alphas}; need ranks >= 1 and alphas > 0"
            )
        if set(client.factors) != modules:
            missing = sorted(modules - set(client.factors))
            extra = sorted(set(client.factors) - modules)
            raise AggregationError(
                f"client {k} adapts a different module set than client 0: missing {missing}, extra {extra}"
            )
        for module in sorted(modules):
            a, b = client.factors[module]
            where = f"client {k}, module {module!r}"
            if a.ndim != 2 or b.ndim != 2:
                raise AggregationError(f"{where}: factors must be 2-D, got A {tuple(a.shape)} and B {tuple(b.shape)}")
            declared = request.at(module).rank
            if a.shape[0] != declared or b.shape[1] != declared:
                how = "" if request.uniform else " (the module's rank by the client's rank pattern)"
                raise AggregationError(
                    f"{where}: A {tuple(a.shape)} and B {tuple(b.shape)} do not match the declared rank {declared}{how}"
                )
            shape = (int(b.shape[0]), int(a.shape[1]))
            if shapes.setdefault(module, shape) != shape:
                raise AggregationError(f"{where}: (d_out, d_in) is {shape} but client 0 has {shapes[module]}")
            if check_finite and not _finite(a, b):
                raise AggregationError(f"{where}: factors hold NaN or infinite values")
    return [w / total for w in weights], sorted(modules)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _name_nonfinite(clients: Sequence[ClientAdapter], modules: Sequence[str]) -> AggregationError:
    """The error for a batch whose products came out NaN or Inf: names the client and module at fault.

    flexlora() does not scan every factor up front (at LLaMA-7B shapes that scan was 6% of a fast-mode
    aggregation); NaN and Inf show up for free in the Gram diagonals, and only then are the factors
    searched."""
    for module in modules:
        for k, client in enumerate(clients):
            if not _finite(*client.factors[module]):
                return AggregationError(f"client {k}, module {module!r}: factors hold NaN or infinite values")
    return AggregationError(f"modules {list(modules)}: the weighted factors overflow the working precision")


def flexlora(
    clients: Sequence[ClientAdapter],
    weights: Sequence[float],
    requests: Sequence[RankRequest],
    dtype: torch.dtype = torch.float32,
    *,
    mode: SvdMode = "exact",
    tolerance: float = 1e-3,
    reports: list[ModuleReport] | None = None,
    batch_bytes: int | None = None,
    carried: Sequence[ClientAdapter] = (),
) -> dict[RankRequest, dict[str, LoraFactors]]:
    """Aggregate every module and cut it at every requested rank; weights need not be normalised.

    `carried` adapters are added to the weighted sum as they are (weight 1, outside the normalisation): the
    part of earlier global adapters the clients could not hold at their ranks (see `carried_residual`).

    Modules of one shape are batched together (up to `batch_bytes` of stacked factors at a time), and
    only the top max-rank triplets are ever used, so ΔW is never formed unless R ≥ min(d_out, d_in).
    By default a batch holds 512 MiB of stacked factors, or a sixteenth of all of them if that is less: the
    working memory of a batch is several times its size, and must stay small next to a large update's
    factors (bench/large_update.py).
    """
    everyone = [*clients, *carried]
    normalised, modules = validate_inputs(everyone, [*weights, *(0.0 for _ in carried)], requests, check_finite=False)
    weights_of = [*normalised[: len(clients)], *(1.0 for _ in carried)]
    clients = everyone
    unique = sorted(set(requests))
    out: dict[RankRequest, dict[str, LoraFactors]] = {req: {} for req in unique}
    # Modules batch together when they agree on shape, on every client's rank and on the ranks cut from them:
    # one group per shape when every rank is uniform, one per (shape, tier) with rank patterns.
    groups: dict[_Group, list[str]] = {}
    for module in modules:
        ref = clients[0].factors[module]
        cuts = tuple(sorted({req.at(module).rank for req in unique}))
        key = _Group(int(ref.B.shape[0]), int(ref.A.shape[1]), tuple(c.at(module).rank for c in clients), cuts)
        groups.setdefault(key, []).append(module)
    if batch_bytes is None:
        stacked = sum(8 * g.total_rank * (g.d_out + g.d_in) * len(names) for g, names in groups.items())
        batch_bytes = min(512 * 2**20, max(32 * 2**20, stacked // 16))
    for group, names in groups.items():
        d_out, d_in, total_rank = group.d_out, group.d_in, group.total_rank
        per_batch = min(len(names), max(1, batch_bytes // (8 * total_rank * (d_out + d_in))))
        # Fast mode stacks in float32 (the clients' own precision) so its big products run at float32 speed.
        work = torch.float32 if mode == "fast" else torch.float64
        # One pair of buffers per group, reused by every batch: fresh ones page-fault on every 4 KiB each time
        # (measured at LLaMA-7B shapes, 11 batches of 0.5 GB: the exact path went from 32.8 s to 25.2 s).
        p_buffer = torch.empty((per_batch, d_out, total_rank), dtype=work)
        q_buffer = torch.empty((per_batch, total_rank, d_in), dtype=work)
        for start in range(0, len(names), per_batch):
            chunk = names[start : start + per_batch]
            p, q = p_buffer[: len(chunk)], q_buffer[: len(chunk)]
            for m, module in enumerate(chunk):
                offset = 0
                for client, w, rank in zip(clients, weights_of, group.client_ranks, strict=True):
                    a, b = client.factors[module]
                    # In place: no full-size temporaries per client (this loop moves every byte of input).
                    p[m, :, offset : offset + rank].copy_(b).mul_(w * client.scale_at(module))
                    q[m, offset : offset + rank].copy_(a)
                    offset += rank
            try:
                result = top_svd(p, q, max(group.cuts), mode=mode, certify_ranks=list(group.cuts), tolerance=tolerance)
            except NonFiniteError:
                raise _name_nonfinite(clients, chunk) from None
            for req in unique:
                out[req].update(cut_modules(result.U, result.S, result.Vh, chunk, req, dtype))
            if reports is not None:
                for m, module in enumerate(chunk):
                    reports.append(ModuleReport(module, result.paths[m], total_rank, result.excess[m]))
    return out


def flexlora_dense(
    dense: Mapping[str, torch.Tensor],
    requests: Sequence[RankRequest],
    dtype: torch.dtype = torch.float32,
    *,
    mode: SvdMode = "exact",
    reports: list[ModuleReport] | None = None,
    batch_bytes: int = 256 * 2**20,
) -> dict[RankRequest, dict[str, LoraFactors]]:
    """`flexlora` for a round whose ΔW per module is already summed (aggregator.folding): the same dense
    top-k (Gram eigenpairs in fast mode, the float64 SVD otherwise) and the same cuts, without the products."""
    if not dense:
        raise AggregationError("no modules to aggregate")
    unique = sorted(set(requests))
    out: dict[RankRequest, dict[str, LoraFactors]] = {req: {} for req in unique}
    shapes: dict[tuple[int, int], list[str]] = {}
    for module in sorted(dense):
        shapes.setdefault((int(dense[module].shape[0]), int(dense[module].shape[1])), []).append(module)
    for (d_out, d_in), names in shapes.items():
        per_batch = max(1, min(len(names), batch_bytes // (d_out * d_in * dense[names[0]].element_size())))
        for start in range(0, len(names), per_batch):
            chunk = names[start : start + per_batch]
            k = max(req.at(m).rank for req in unique for m in chunk)
            try:
                result = dense_top_svd(torch.stack([dense[m] for m in chunk]), k, mode=mode)
            except NonFiniteError:
                raise AggregationError(f"modules {chunk}: the folded round holds NaN or infinite values") from None
            for req in unique:
                out[req].update(cut_modules(result.U, result.S, result.Vh, chunk, req, dtype))
            if reports is not None:
                for m, module in enumerate(chunk):
                    reports.append(ModuleReport(module, result.paths[m], 0, result.excess[m]))
    return out


@dataclass(frozen=True)
class _Group:
    """What modules batched into one SVD call share."""

    d_out: int
    d_in: int
    client_ranks: tuple[int, ...]
    cuts: tuple[int, ...]

    @property
    def total_rank(self) -> int:
        return sum(self.client_ranks)


def carried_residual(
    global_factors: Mapping[str, LoraFactors],
    source: RankRequest,
    starts: Sequence[tuple[RankRequest, float]],
    server_lr: float = 1.0,
) -> ClientAdapter | None:
    """What a round must add back so that it averages the clients' changes instead of their products.

    Clients that started from the FlexLoRA cut G = Σ_j σ_j u_j v_jᵀ (`global_factors` at `source`) at ranks
    r_k each return P_k = cut_{r_k}(G) + Δ_k: the directions j ≥ r_k of G are not in what they send, so
    Σ_k w_k P_k shrinks every direction of G by the weight of the clients too small to hold it. The round
    wanted instead is Σ_k w_k (G + η Δ_k) = η Σ_k w_k P_k + Σ_j c_j σ_j u_j v_jᵀ with
    c_j = Σ_k w_k ((1 − η) + η [j ≥ r_k]): one adapter of G's own factors with B's columns scaled by c_j
    (η is the server learning rate; η = 1 gives plain averaging of changes). `starts` holds (the ranks of, w_k)
    for the clients that started from this G, their weights already multiplied by whatever the round gives
    them; with rank patterns r_k (so c_j) is per module. None when nothing needs carrying (every c_j is 0).
    """
    coeffs: dict[str, torch.Tensor] = {}
    for module in global_factors:
        s = source.at(module)
        c = torch.zeros(s.rank, dtype=torch.float64)
        index = torch.arange(s.rank)
        for request, w in starts:
            r = request.at(module).rank
            c += w * ((1.0 - server_lr) + server_lr * (index >= r).to(torch.float64))
        # The carried adapter has one scale, G's default one; a module of G at another scale folds the ratio in.
        coeffs[module] = c * ((s.alpha / s.rank) / (source.alpha / source.rank))
    nonzero = [torch.nonzero(c).flatten() for c in coeffs.values()]
    nonzero = [n for n in nonzero if n.numel()]
    if not nonzero:
        return None
    # One span of columns for every module (zero columns where a module carries less): one rank, one scale.
    lo, hi = min(int(n[0]) for n in nonzero), max(int(n[-1]) + 1 for n in nonzero)
    factors = {}
    for module, f in global_factors.items():
        coeff = torch.zeros(hi - lo, dtype=torch.float64)
        top = min(hi, coeffs[module].shape[0])
        coeff[: max(0, top - lo)] = coeffs[module][lo:top]
        a = torch.zeros((hi - lo, f.A.shape[1]), dtype=f.A.dtype)
        b = torch.zeros((f.B.shape[0], hi - lo), dtype=f.B.dtype)
        a[: max(0, top - lo)] = f.A[lo:top]
        b[:, : max(0, top - lo)] = (f.B[:, lo:top].to(torch.float64) * coeff[: max(0, top - lo)]).to(f.B.dtype)
        factors[module] = LoraFactors(A=a, B=b)
    # Keep G's scale (alpha / rank) on a rank of hi - lo.
    return ClientAdapter(factors, hi - lo, source.alpha / source.rank * (hi - lo))
