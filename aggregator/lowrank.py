"""Top singular triplets of ΔW = P·Q from its factors, without ever forming the d_out × d_in matrix.

P (d_out × R) stacks every client's weighted, scaled B_k side by side; Q (R × d_in) stacks the A_k.
With P = Q₁R₁ and Qᵀ = Q₂R₂ (thin QR), ΔW = Q₁ (R₁R₂ᵀ) Q₂ᵀ, so the SVD of the small R × R core
C = R₁R₂ᵀ gives ΔW's: U = Q₁U_c, V = Q₂V_c. Cost O((d_out + d_in)·R² + R³) instead of O(d³).

The triangular factors come from Cholesky of the column-equilibrated Gram matrices (CholeskyQR):
one BLAS syrk each (half a GEMM: only one triangle is computed) instead of a Householder QR, several
times faster at these shapes. It is accurate while
the equilibrated factor is well conditioned; when Cholesky fails or the conditioning guard trips
(rank-deficient or nearly dependent factors), that module falls back to Householder QR.

Modes: `exact` (float64 throughout, full SVD of the core), `fast` (Gram products in the factors' own
dtype, then only the top k eigenpairs of the core's float64 Gram matrix by LAPACK's MRRR solver
(syevr on an index subset: one tridiagonalisation, k eigenvectors); every released rank is certified
against the optimal rank-r error, and a module whose certificate fails is redone exactly), and `dense`.
All functions take batches: P is (M, d_out, R) and Q is (M, R, d_in) for M modules of one shape.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from aggregator.symeig import top_eigh

SvdMode = Literal["exact", "fast", "dense"]
# Conditioning guard on the equilibrated triangular factor: CholeskyQR's loss of orthogonality grows
# like eps·cond², so beyond ~1e4 (eps·cond² ≈ 1e-8 in float64) Householder QR takes over.
_MAX_COND = 1e4
# Exact mode takes a dense ΔW's top k from its float64 Gram matrix while every kept σ is at least this share of σ₁.
_EXACT_GRAM_RATIO = 1e-4


class NonFiniteError(ValueError):
    """The factors hold NaN or Inf, or their products overflow the working precision."""


def _require_finite(x: torch.Tensor, what: str) -> None:
    # Called on Gram diagonals (squared column norms) and dense products, where any NaN or Inf in the
    # factors surfaces, so the factors themselves are never scanned on the fast path.
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} is not finite")


@dataclass(frozen=True)
class TopSVD:
    """The top-k triplets of a batch (float64), with how each module was computed."""

    U: torch.Tensor  # (M, d_out, k)
    S: torch.Tensor  # (M, k)
    Vh: torch.Tensor  # (M, k, d_in)
    paths: list[str]  # dense | dense-eigh | factored | factored-qr | fast | fast-truncated | fast→factored[-qr]
    excess: list[float]  # per module: max over certified ranks of err_r / err_opt − 1 (0 when exact)


def _sign_fix(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each U column's largest-magnitude entry positive, so equal inputs give identical factors."""
    pivots = u.abs().argmax(dim=-2, keepdim=True)  # (M, 1, k)
    signs = torch.sign(torch.gather(u, -2, pivots))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs.transpose(-1, -2)


def _gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """xᵀx for each batch element of x (M, d, R), in x's dtype, computing only the upper block triangle.

    With 4 column blocks that is 10/16 of a full product's flops; measured at d = 4096, R = 672 (float32,
    2 cores): 13.9 ms against 18.7 ms for x.mT @ x. (BLAS syrk is no faster once its thread pool has to
    share the cores with torch's.) Transposed views go to BLAS as they are, without copies."""
    n = x.shape[-1]
    edges = [(i * n) // blocks for i in range(blocks + 1)]
    out = torch.empty((*x.shape[:-2], n, n), dtype=x.dtype)
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            block = x[..., lo:hi].transpose(-1, -2) @ x[..., lo:]
            out[..., lo:hi, lo:] = block
            out[..., hi:, lo:hi] = block[..., hi - lo :].transpose(-1, -2)
    return out


def _top_eigh(sym: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenpairs of each symmetric matrix in a batch (M, n, n), in descending order.

    LAPACK's syevr on an index subset: the tridiagonalisation costs as much as eigenvalues alone, and only
    k eigenvectors are computed and transformed back (at n = 672, k = 64: 27 ms, where a full eigh takes
    38 ms and the certified block subspace iteration this replaced took 41 ms: eigvalsh 23 ms plus
    18 ms for its first four steps).

    One module per core at a time, each on one OpenBLAS thread, through aggregator.symeig, which lets go of the
    GIL while LAPACK runs (scipy.linalg.eigh does not: the modules were solved one after another)."""
    batch, n = sym.shape[0], sym.shape[-1]
    values = torch.empty((batch, k), dtype=sym.dtype)
    vectors = torch.empty((batch, n, k), dtype=sym.dtype)

    def solve(m: int) -> None:
        w, v = top_eigh(sym[m].numpy(), k)
        values[m] = torch.from_numpy(w).flip(-1)
        vectors[m] = torch.from_numpy(v).flip(-1)

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(solve, range(batch)))
    return values, vectors


def _triangular(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangular R (float64) with xᵀx = RᵀR per batch element, via the equilibrated Gram matrix
    (the product in x's own dtype, everything after it in float64).

    Returns (R, ok): ok[m] is False where Cholesky failed or the factor is too ill-conditioned to trust.
    """
    gram = _gram(x).to(torch.float64)
    _require_finite(torch.diagonal(gram, dim1=-2, dim2=-1), "a Gram matrix")
    # Equilibrate on the small Gram matrix (D⁻¹GD⁻¹) rather than on x: same result, no d × R copy.
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    lower, info = torch.linalg.cholesky_ex(gram / (safe.unsqueeze(-1) * safe.unsqueeze(-2)))
    diag = torch.diagonal(lower, dim1=-2, dim2=-1).abs()
    ok = (info == 0) & (norms > 0).all(dim=-1)
    ok &= diag.amax(dim=-1) <= _MAX_COND * diag.amin(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    upper = lower.transpose(-1, -2) * safe.unsqueeze(-2)  # undo the equilibration: R = L̂ᵀ D
    return upper, ok


def _apply_inverse(x: torch.Tensor, upper: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """x · R⁻¹ · coeffs (float64) without forming x·R⁻¹ (the orthonormal factor) in full."""
    solved: torch.Tensor = torch.linalg.solve_triangular(upper, coeffs, upper=True)
    return (x @ solved.to(x.dtype)).to(torch.float64)


def _core_exact(p: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """float64 factored SVD; modules whose CholeskyQR is not trustworthy use Householder QR."""
    p, q = p.to(torch.float64), q.to(torch.float64)
    r1, ok1 = _triangular(p)
    r2, ok2 = _triangular(q.transpose(-1, -2))
    ok = ok1 & ok2
    uc, s, vch = torch.linalg.svd(r1 @ r2.transpose(-1, -2))
    u = _apply_inverse(p, r1, uc[..., :k])
    v = _apply_inverse(q.transpose(-1, -2), r2, vch[..., :k, :].transpose(-1, -2))
    paths = ["factored"] * p.shape[0]
    for m in torch.nonzero(~ok).flatten().tolist():
        q1, qr1 = torch.linalg.qr(p[m])
        q2, qr2 = torch.linalg.qr(q[m].transpose(0, 1))
        ucm, sm, vchm = torch.linalg.svd(qr1 @ qr2.transpose(0, 1))
        u[m], s[m], v[m] = q1 @ ucm[:, :k], sm, q2 @ vchm[:k].transpose(0, 1)
        paths[m] = "factored-qr"
    return u, s[..., :k], v.transpose(-1, -2), paths


def _excess(
    total: torch.Tensor,
    theta: torch.Tensor,
    captured: torch.Tensor,
    ranks: list[int],
    slack: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per module: max over `ranks` of err_r / err_opt − 1.

    err_r is the Frobenius error of projecting C onto the released top-r left vectors, measured with those
    vectors themselves (‖C‖² − Σ_{i≤r} ‖u_iᵀC‖², `captured` holds the ‖u_iᵀC‖²); err_opt is that of the
    best rank r (‖C‖² − Σ_{i≤r} σ_i², from the eigenvalues `theta`). Vectors that missed part of the top
    subspace show up as captured < theta; eigenvalues that came out too large make err_opt smaller, so
    they can only make the certificate stricter. `slack` bounds, in Frobenius norm, how far the problem
    solved is from the one asked (a truncated factor): it is added to err_r and taken from err_opt."""
    worst = torch.zeros_like(total)
    slack = torch.zeros_like(total) if slack is None else slack
    # Both near zero means ΔW has rank ≤ r and the cut is exact whatever the rounding says.
    tiny = 1e-12 * total.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    for r in ranks:
        opt = (total - theta[..., :r].sum(-1)).clamp_min(0).sqrt() - slack
        got = (total - captured[..., :r].sum(-1)).clamp_min(0).sqrt() + slack
        ratio = torch.where(opt > tiny, got / opt.clamp_min(tiny) - 1, torch.where(got > tiny, torch.inf, 0.0))
        worst = torch.maximum(worst, ratio.clamp_min(0))
    return worst


def _fast_truncated(
    p: torch.Tensor, q: torch.Tensor, k: int, ranks: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Fast mode for one module whose P has (nearly) dependent columns, where CholeskyQR is refused: clients
    that trained the same directions. G_P = WΛWᵀ stands in for R₁ᵀR₁ with F = Λ_K^½W_Kᵀ, keeping only the
    eigenvalues above float64 rounding; what is dropped is bounded (‖P W_D‖₂‖Q‖_F) and charged to the
    certificate. Float64 throughout: in float32 that bound alone is ~1e-3 of ‖ΔW‖, as large as the
    tolerance, and U = P W_K Λ_K^-½ u amplifies rounding by Λ_K^-½. Still much cheaper than the Householder
    QR and full core SVD it saves.

    Returns (U, S, Vh, excess) for one module, k columns, zero-padded above the kept rank."""
    p, q = p.to(torch.float64), q.to(torch.float64)
    lam, w = torch.linalg.eigh(_gram(p.unsqueeze(0))[0])
    floor = 10 * p.shape[0] ** 0.5 * torch.finfo(torch.float64).eps * lam[-1].clamp_min(0)
    keep = lam > floor
    kept = int(keep.sum())
    u = torch.zeros((p.shape[0], k), dtype=torch.float64)
    s = torch.zeros(k, dtype=torch.float64)
    vh = torch.zeros((k, q.shape[1]), dtype=torch.float64)
    if kept == 0:  # P is zero to rounding: so is ΔW
        return u, s, vh, 0.0
    lam_k, w_k = lam[keep], w[:, keep]
    f = lam_k.sqrt().unsqueeze(-1) * w_k.transpose(0, 1)  # FᵀF = P's Gram matrix on the kept eigenvectors
    gq = _gram(q.transpose(0, 1).unsqueeze(0))[0]
    h = f @ gq @ f.transpose(0, 1)
    h = (h + h.transpose(0, 1)) / 2
    width = min(k, kept)
    theta, uc = _top_eigh(h.unsqueeze(0), width)
    theta, uc = theta[0].clamp_min(0), uc[0]
    dropped = float(lam[~keep].clamp_min(0).max()) if kept < lam.numel() else 0.0
    slack = torch.tensor([(dropped * float(torch.diagonal(gq).sum().clamp_min(0))) ** 0.5], dtype=torch.float64)
    captured = (uc * (h @ uc)).sum(0)
    excess = _excess(torch.diagonal(h).sum().unsqueeze(0), theta[None], captured[None], ranks, slack)
    # U = P W_K Λ_K^-½ u and σ v = ΔWᵀu = Qᵀ Fᵀ u.
    u[:, :width] = p @ ((w_k * lam_k.rsqrt()) @ uc)
    s[:width] = theta.sqrt()
    cutoff = s[:1] * torch.finfo(torch.float64).eps * lam.numel()
    back = f.transpose(0, 1) @ uc
    v = (q.transpose(0, 1) @ back) / torch.where(s[:width] > cutoff, s[:width], torch.inf)
    vh[:width] = v.transpose(0, 1)
    return u, s, vh, float(excess[0])


def _dense_top(p: torch.Tensor, q: torch.Tensor, k: int) -> TopSVD:
    """Fast mode when R ≥ min(d_out, d_in): the top k eigenpairs of the smaller Gram matrix of ΔW (an
    eigendecomposition is several times cheaper than an SVD). Only σ ≪ σ₁ lose relative accuracy by the
    squaring, and those are the directions a cut keeps least of; the error excess is recorded as 0."""
    return _dense_eigh(p @ q, k)  # the factors' own dtype: float32 in fast mode


def dense_top_svd(delta: torch.Tensor, k: int, *, mode: SvdMode = "exact") -> TopSVD:
    """Top-k singular triplets of each dense ΔW of a batch (M, d_out, d_in), as top_svd computes them once
    it has formed ΔW: the Gram eigenpairs in fast mode, the float64 SVD otherwise (aggregator.folding)."""
    if delta.ndim != 3:
        raise ValueError(f"a batch of dense matrices is 3-D, got {tuple(delta.shape)}")
    k = min(k, delta.shape[-2], delta.shape[-1])
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if mode == "fast":
        return _dense_eigh(delta, k)
    if mode == "exact":
        return _dense_exact(delta.to(torch.float64), k)
    return _dense_svd(delta.to(torch.float64), k)


def _dense_svd(delta: torch.Tensor, k: int) -> TopSVD:
    _require_finite(delta, "ΔW")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, vh = _sign_fix(u[..., :k], vh[..., :k, :])
    return TopSVD(u, s[..., :k], vh, ["dense"] * delta.shape[0], [0.0] * delta.shape[0])


def _dense_exact(delta: torch.Tensor, k: int) -> TopSVD:
    """Exact mode on a dense float64 ΔW: the top k eigenpairs of its smaller Gram matrix, in float64. Squaring
    costs σᵢ relative accuracy ε₆₄·(σ₁/σᵢ)², below 1e-8 (under float32's rounding of the released factors) for
    every kept σᵢ ≥ 1e-4·σ₁; a module whose k-th σ is smaller than that takes the full SVD instead. Measured
    on 2 cores, 30 × 576² and 30 × 192 × 576 at k = 64 (two runs): 1.04-1.09 s against 1.76-2.08 s for the SVD."""
    top = _dense_eigh(delta, k)
    weak = torch.nonzero(~(top.S[..., -1] >= _EXACT_GRAM_RATIO * top.S[..., 0])).flatten()
    paths = list(top.paths)
    if len(weak):
        full = _dense_svd(delta[weak], k)
        top.U[weak], top.S[weak], top.Vh[weak] = full.U, full.S, full.Vh
        for m in weak.tolist():
            paths[m] = "dense"
    return TopSVD(top.U, top.S, top.Vh, paths, top.excess)


def _dense_eigh(delta: torch.Tensor, k: int) -> TopSVD:
    wide = delta.shape[-2] > delta.shape[-1]
    side = delta.transpose(-1, -2) if wide else delta  # (small × large)
    # In the factors' dtype too (float32 in fast mode, 1.7× faster than float64 at d = 576): fast mode
    # trades float32 rounding in the released factors for speed, as its products already do.
    gram = _gram(side.transpose(-1, -2))
    # Its diagonal holds the squared norm of every row of ΔW, so any NaN or Inf in ΔW (or a square past the
    # dtype's range) shows there: no pass of its own over ΔW (35 ms of a 30 × 576² round in float32).
    _require_finite(torch.diagonal(gram, dim1=-2, dim2=-1), "ΔW")
    theta, left = _top_eigh(gram, k)
    theta, left = theta.clamp_min(0).to(torch.float64), left.to(torch.float64)
    s = theta.sqrt()
    floor = s[..., :1] * torch.finfo(torch.float32).eps * side.shape[-1]
    # In ΔW's dtype as well: a float64 copy of a float32 ΔW cost as much as the product.
    right = (side.transpose(-1, -2) @ left.to(side.dtype)).to(torch.float64)
    right = right / torch.where(s > floor, s, torch.inf).unsqueeze(-2)
    u, v = (right, left) if wide else (left, right)
    u, vh = _sign_fix(u, v.transpose(-1, -2))
    return TopSVD(u, s, vh, ["dense-eigh"] * delta.shape[0], [0.0] * delta.shape[0])


def top_svd(
    p: torch.Tensor,
    q: torch.Tensor,
    k: int,
    *,
    mode: SvdMode = "exact",
    certify_ranks: list[int] | None = None,
    tolerance: float = 1e-3,
) -> TopSVD:
    """Top-k singular triplets of each P[m] @ Q[m]. `fast` certifies every rank in `certify_ranks`
    (default: k) to within `tolerance` of the optimal rank-r error, or recomputes that module exactly."""
    if p.ndim != 3 or q.ndim != 3 or p.shape[0] != q.shape[0] or p.shape[2] != q.shape[1]:
        raise ValueError(f"factor batches do not chain: P {tuple(p.shape)}, Q {tuple(q.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    batch, d_out, total_rank = p.shape
    d_in = q.shape[2]
    k = min(k, total_rank, d_out, d_in)
    if mode == "fast" and total_rank >= min(d_out, d_in):
        return _dense_top(p, q, k)
    if mode == "dense":
        return _dense_svd(p.to(torch.float64) @ q.to(torch.float64), k)
    if total_rank >= min(d_out, d_in):
        return _dense_exact(p.to(torch.float64) @ q.to(torch.float64), k)
    if mode == "exact":
        u, s, vh, paths = _core_exact(p, q, k)
        u, vh = _sign_fix(u, vh)
        return TopSVD(u, s, vh, paths, [0.0] * batch)
    if mode != "fast":
        raise ValueError(f"unknown SVD mode {mode!r}; use exact, fast or dense")

    # The products run in the factors' own dtype (float32 from flexlora() in this mode: twice the speed,
    # half the memory); the eigenproblem and the certificate are float64.
    # With P = Q₁R₁ and G_Q = Q·Qᵀ: ΔWᵀΔW's nonzero spectrum is that of H = R₁ G_Q R₁ᵀ (= C·Cᵀ for the core
    # C = R₁R₂ᵀ), and for an eigenvector w of H, u = P R₁⁻¹ w and σ v = ΔWᵀu = Qᵀ R₁ᵀ w. So Q needs
    # no triangular factor of its own: one Cholesky and one triangular solve fewer than the exact path.
    r1, ok = _triangular(p)
    gram_q = _gram(q.transpose(-1, -2))
    _require_finite(torch.diagonal(gram_q, dim1=-2, dim2=-1), "a Gram matrix")
    # H's own rounding in float32 is of the order of G_Q's (ε·‖R₁‖²‖Q‖² both), which this mode accepts
    # already; the certificate below is exact for the H computed here.
    r1w = r1.to(q.dtype)
    h = (r1w @ gram_q @ r1w.transpose(-1, -2)).to(torch.float64)
    h = (h + h.transpose(-1, -2)) / 2
    ranks = sorted({min(r, k) for r in (certify_ranks or [k])})
    theta, uc = _top_eigh(h, k)
    theta = theta.clamp_min(0)
    # u_iᵀ H u_i: what each released direction captures, measured with the vectors themselves.
    captured = (uc * (h @ uc)).sum(-2)
    excess = _excess(torch.diagonal(h, dim1=-2, dim2=-1).sum(-1), theta, captured, ranks)
    back = r1.transpose(-1, -2) @ uc  # column i is Pᵀu_i
    s = theta.sqrt()
    # V = ΔWᵀ U Σ⁻¹; directions with σ ≈ 0 carry nothing (their B column is 0), so their A row is left 0
    # rather than amplifying rounding noise.
    floor = s[..., :1] * torch.finfo(torch.float64).eps * total_rank
    u = _apply_inverse(p, r1, uc)
    v = (q.transpose(-1, -2) @ back.to(q.dtype)).to(torch.float64) / torch.where(s > floor, s, torch.inf).unsqueeze(-2)
    vh = v.transpose(-1, -2)
    paths = ["fast"] * batch
    for m in torch.nonzero(~ok).flatten().tolist():
        u[m], s[m], vh[m], excess[m] = _fast_truncated(p[m], q[m], k, ranks)
        paths[m] = "fast-truncated"
    redo = ~(excess <= tolerance)
    if bool(redo.any()):
        idx = torch.nonzero(redo).flatten()
        eu, es, evh, epaths = _core_exact(p[idx], q[idx], k)
        u[idx], s[idx], vh[idx] = eu, es, evh
        for j, m in enumerate(idx.tolist()):
            paths[m] = "fast→" + epaths[j]
            excess[m] = 0.0
    u, vh = _sign_fix(u, vh)
    return TopSVD(u, s, vh, paths, [float(e) for e in excess])


def randomized_top(
    matrix: torch.Tensor, k: int, *, oversample: int = 10, power_iterations: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets (U, S, Vh) of a dense matrix with no low-rank structure to exploit (a
    differentially private round: noise makes ΔW full rank): torch.svd_lowrank, Halko, Martinsson and Tropp's
    randomized range finder with `power_iterations` passes, k + `oversample` probe vectors. Each pass reads the
    matrix twice and forms nothing of its size. Falls back to the dense SVD when the probes would cover it."""
    _require_finite(matrix, "the dense round")
    m, n = matrix.shape
    probes = min(k + oversample, m, n)
    if probes >= min(m, n):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(matrix, q=probes, niter=power_iterations)
        vh = v.T
    u, vh = _sign_fix(u[:, :k], vh[:k])
    return u, s[:k], vh
