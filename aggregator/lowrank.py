"""Top singular triplets of ΔW = P·Q from its factors, without ever forming the d_out × d_in matrix.

P (d_out × R) stacks every client's weighted, scaled B_k side by side; Q (R × d_in) stacks the A_k.
With P = Q₁R₁ and Qᵀ = Q₂R₂ (thin QR), ΔW = Q₁ (R₁R₂ᵀ) Q₂ᵀ, so the SVD of the small R × R core
C = R₁R₂ᵀ gives ΔW's: U = Q₁U_c, V = Q₂V_c. Cost O((d_out + d_in)·R² + R³) instead of O(d³).

The triangular factors come from Cholesky of the column-equilibrated Gram matrices (CholeskyQR):
one GEMM each instead of a Householder QR, several times faster at these shapes. It is accurate while
the equilibrated factor is well conditioned; when Cholesky fails or the conditioning guard trips
(rank-deficient or nearly dependent factors), that module falls back to Householder QR.

Modes: `exact` (float64 throughout, full SVD of the core), `fast` (Gram products in the factors' own
dtype, then a float64 block subspace iteration for only the top k triplets of the core, certified
against the core's exact spectrum and redone exactly when the certificate fails), and `dense`.
All functions take batches: P is (M, d_out, R) and Q is (M, R, d_in) for M modules of one shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SvdMode = Literal["exact", "fast", "dense"]
# Conditioning guard on the equilibrated triangular factor: CholeskyQR's loss of orthogonality grows
# like eps·cond², so beyond ~1e4 (eps·cond² ≈ 1e-8 in float64) Householder QR takes over.
_MAX_COND = 1e4
_OVERSAMPLE = 10


@dataclass(frozen=True)
class TopSVD:
    """The top-k triplets of a batch (float64), with how each module was computed."""

    U: torch.Tensor  # (M, d_out, k)
    S: torch.Tensor  # (M, k)
    Vh: torch.Tensor  # (M, k, d_in)
    paths: list[str]  # per module: dense | factored | factored-qr | fast | fast→exact
    excess: list[float]  # per module: max over certified ranks of err_r / err_opt − 1 (0 when exact)


def _sign_fix(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each U column's largest-magnitude entry positive, so equal inputs give identical factors."""
    pivots = u.abs().argmax(dim=-2, keepdim=True)  # (M, 1, k)
    signs = torch.sign(torch.gather(u, -2, pivots))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs.transpose(-1, -2)


def _triangular(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangular R (float64) with xᵀx = RᵀR per batch element, via the equilibrated Gram matrix
    (the product in x's own dtype, everything after it in float64).

    Returns (R, ok): ok[m] is False where Cholesky failed or the factor is too ill-conditioned to trust.
    """
    gram = (x.transpose(-1, -2) @ x).to(torch.float64)
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


def _subspace_top(
    gram: torch.Tensor, k: int, iterations: int, seed: int, start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block subspace iteration on M = C·Cᵀ (R × R, symmetric) for its top-k eigenpairs, then Rayleigh–Ritz.

    Returns (U_k, σ²_k, basis); pass `basis` back as `start` to continue where it stopped.
    """
    n = gram.shape[-1]
    if start is None:
        # A block twice the wanted rank converges in a few steps even on the flat spectra of sums of
        # random updates (measured: 4 steps reach 1e-4 of optimal where a k+10 block needs 16).
        block = min(n, 2 * k + _OVERSAMPLE)
        gen = torch.Generator().manual_seed(seed)
        basis = torch.randn((gram.shape[0], n, block), dtype=gram.dtype, generator=gen)
    else:
        basis = start
    for _ in range(iterations):
        basis, _ = torch.linalg.qr(gram @ basis)
    ritz, vectors = torch.linalg.eigh(basis.transpose(-1, -2) @ gram @ basis)
    top = vectors.flip(-1)[..., :k]
    # The release U_r U_rᵀ C is the projection of C onto the first r Ritz vectors; its error is
    # ‖C‖² − Σ_{i≤r} θ_i exactly, which is what _excess certifies.
    return basis @ top, ritz.flip(-1)[..., :k].clamp_min(0), basis


def _excess(core: torch.Tensor, eig: torch.Tensor, s_approx: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Per module: max over `ranks` of err_r / err_opt − 1, where err_r is the Frobenius error of the
    projection onto the approximate top-r left vectors and err_opt that of the true best rank r."""
    total = core.square().sum(dim=(-2, -1))
    worst = torch.zeros_like(total)
    for r in ranks:
        opt = (total - eig[..., :r].sum(-1)).clamp_min(0)
        got = (total - s_approx[..., :r].square().sum(-1)).clamp_min(0)
        # Both near zero means ΔW has rank ≤ r and the cut is exact whatever the rounding says.
        tiny = 1e-24 * total.clamp_min(torch.finfo(torch.float64).tiny)
        ratio = torch.where(opt > tiny, (got / opt.clamp_min(tiny)).sqrt() - 1, torch.where(got > tiny, torch.inf, 0.0))
        worst = torch.maximum(worst, ratio.clamp_min(0))
    return worst


def _dense_top(p: torch.Tensor, q: torch.Tensor, k: int) -> TopSVD:
    """Fast mode when R ≥ min(d_out, d_in): the top k eigenpairs of the smaller Gram matrix of ΔW (an
    eigendecomposition is several times cheaper than an SVD). Only σ ≪ σ₁ lose relative accuracy by the
    squaring, and those are the directions a cut keeps least of; the error excess is recorded as 0."""
    delta = p @ q  # the factors' own dtype: float32 in fast mode
    wide = delta.shape[-2] > delta.shape[-1]
    side = delta.transpose(-1, -2) if wide else delta  # (small × large)
    # In the factors' dtype too (float32 in fast mode, 1.6× faster than float64 at d = 576): fast mode
    # trades float32 rounding in the released factors for speed, as its products already do.
    theta, vectors = torch.linalg.eigh(side @ side.transpose(-1, -2))
    theta, left = theta.flip(-1)[..., :k].clamp_min(0).to(torch.float64), vectors.flip(-1)[..., :k].to(torch.float64)
    s = theta.sqrt()
    floor = s[..., :1] * torch.finfo(torch.float32).eps * side.shape[-1]
    right = (side.transpose(-1, -2).to(torch.float64) @ left) / torch.where(s > floor, s, torch.inf).unsqueeze(-2)
    u, v = (right, left) if wide else (left, right)
    u, vh = _sign_fix(u, v.transpose(-1, -2))
    return TopSVD(u, s, vh, ["dense-eigh"] * p.shape[0], [0.0] * p.shape[0])


def top_svd(
    p: torch.Tensor,
    q: torch.Tensor,
    k: int,
    *,
    mode: SvdMode = "exact",
    certify_ranks: list[int] | None = None,
    tolerance: float = 1e-3,
    iterations: int = 4,
    max_iterations: int = 16,
    seed: int = 0,
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
    if mode == "dense" or total_rank >= min(d_out, d_in):
        u, s, vh = torch.linalg.svd(p.to(torch.float64) @ q.to(torch.float64), full_matrices=False)
        u, vh = _sign_fix(u[..., :k], vh[..., :k, :])
        return TopSVD(u, s[..., :k], vh, ["dense"] * batch, [0.0] * batch)
    if mode == "exact":
        u, s, vh, paths = _core_exact(p, q, k)
        u, vh = _sign_fix(u, vh)
        return TopSVD(u, s, vh, paths, [0.0] * batch)
    if mode != "fast":
        raise ValueError(f"unknown SVD mode {mode!r}; use exact, fast or dense")

    # The O(d·R²) products run in the factors' own dtype (float32 from flexlora() in this mode: twice
    # the speed, half the memory); the R × R work after them is float64.
    r1, ok1 = _triangular(p)
    r2, ok2 = _triangular(q.transpose(-1, -2))
    core = r1 @ r2.transpose(-1, -2)
    ranks = sorted({min(r, k) for r in (certify_ranks or [k])})
    gram = core @ core.transpose(-1, -2)
    # Every σ² of the core, descending: eigenvalues only, several times cheaper than the SVD they certify.
    eig = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
    uc, theta, basis = _subspace_top(gram, k, iterations, seed)
    excess = _excess(core, eig, theta.sqrt(), ranks)
    done = iterations
    while done < max_iterations and not bool((excess <= tolerance).all()):
        uc, theta, basis = _subspace_top(gram, k, iterations, seed, start=basis)
        excess = _excess(core, eig, theta.sqrt(), ranks)
        done += iterations
    s = theta.sqrt()
    # V = Cᵀ U Σ⁻¹; directions with σ ≈ 0 carry nothing (their B column is 0), so their A row is left 0
    # rather than amplifying rounding noise.
    floor = s[..., :1] * torch.finfo(torch.float64).eps * core.shape[-1]
    vc = (core.transpose(-1, -2) @ uc) / torch.where(s > floor, s, torch.inf).unsqueeze(-2)
    u = _apply_inverse(p, r1, uc)
    v = _apply_inverse(q.transpose(-1, -2), r2, vc)
    vh = v.transpose(-1, -2)
    paths = ["fast"] * batch
    redo = (~(ok1 & ok2)) | ~(excess <= tolerance)
    if bool(redo.any()):
        idx = torch.nonzero(redo).flatten()
        eu, es, evh, epaths = _core_exact(p[idx], q[idx], k)
        u[idx], s[idx], vh[idx] = eu, es, evh
        for j, m in enumerate(idx.tolist()):
            paths[m] = "fast→" + epaths[j]
            excess[m] = 0.0
    u, vh = _sign_fix(u, vh)
    return TopSVD(u, s, vh, paths, [float(e) for e in excess])
