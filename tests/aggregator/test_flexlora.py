"""The FlexLoRA math against an independent numpy computation of GUIDE §1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.flexlora import (
    AggregationError,
    ClientAdapter,
    ModuleReport,
    RankRequest,
    cut,
    cut_modules,
    data_size_weights,
    flexlora,
    flexlora_dense,
)
from aggregator.lowrank import SvdMode
from schemas.lora import LoraFactors


def _client(
    rng: np.random.Generator, d_out: int, d_in: int, rank: int, alpha: float, module: str = "m"
) -> ClientAdapter:
    a = torch.from_numpy(rng.standard_normal((rank, d_in))).float()
    b = torch.from_numpy(rng.standard_normal((d_out, rank))).float()
    return ClientAdapter({module: LoraFactors(A=a, B=b)}, rank=rank, alpha=alpha)


def _reference(clients: list[ClientAdapter], n: list[int], rank: int, module: str = "m") -> np.ndarray:
    p = np.asarray(n, dtype=np.float64) / sum(n)
    delta = sum(
        pk * (c.alpha / c.rank) * (c.factors[module].B.double().numpy() @ c.factors[module].A.double().numpy())
        for pk, c in zip(p, clients, strict=True)
    )
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    out: np.ndarray = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return out


def _product(f: LoraFactors, req: RankRequest) -> np.ndarray:
    return (req.alpha / req.rank) * (f.B.double() @ f.A.double()).numpy()


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(4, 24),
    d_in=st.integers(4, 24),
    ranks=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=5),
    target=st.sampled_from([1, 2, 4, 8, 16]),
    alpha=st.sampled_from([1.0, 8.0, 16.0]),
    seed=st.integers(0, 2**31),
)
def test_each_cut_is_the_best_rank_r_approximation(d_out, d_in, ranks, target, alpha, seed) -> None:
    rng = np.random.default_rng(seed)
    clients = [_client(rng, d_out, d_in, r, float(2 * r)) for r in ranks]
    n = [int(x) for x in rng.integers(1, 100, size=len(clients))]
    req = RankRequest(target, alpha)
    out = flexlora(clients, data_size_weights(n), [req], dtype=torch.float64)
    got = _product(out[req]["m"], req)
    want = _reference(clients, n, target)
    assert out[req]["m"].B.shape == (d_out, target)
    assert out[req]["m"].A.shape == (target, d_in)
    assert np.linalg.norm(got - want) <= 1e-8 * max(1.0, float(np.linalg.norm(want)))


def test_full_rank_cut_reproduces_the_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    clients = [_client(rng, 16, 12, r, 16.0) for r in (2, 4, 8)]
    n = [10, 20, 70]
    req = RankRequest(14, 16.0)  # 2+4+8 = 14 ≥ rank of ΔW, so nothing is cut away
    got = _product(flexlora(clients, data_size_weights(n), [req], torch.float64)[req]["m"], req)
    p = np.asarray(n) / 100
    want = sum(
        pk * (c.alpha / c.rank) * (c.factors["m"].B.double() @ c.factors["m"].A.double()).numpy()
        for pk, c in zip(p, clients, strict=True)
    )
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_singular_values_go_into_b_and_a_is_orthonormal() -> None:
    rng = np.random.default_rng(1)
    clients = [_client(rng, 20, 10, 4, 8.0), _client(rng, 20, 10, 8, 16.0)]
    req = RankRequest(4, 8.0)
    f = flexlora(clients, [1.0, 1.0], [req], torch.float64)[req]["m"]
    np.testing.assert_allclose((f.A @ f.A.T).numpy(), np.eye(4), atol=1e-10)
    norms = torch.linalg.norm(f.B, dim=0).numpy()
    assert np.all(np.diff(norms) <= 1e-12), "columns of B carry descending singular values"


def test_repeated_runs_give_identical_adapters() -> None:
    rng = np.random.default_rng(2)
    clients = [_client(rng, 32, 24, r, 2.0 * r) for r in (4, 8, 16)]
    reqs = [RankRequest(4, 8.0), RankRequest(16, 32.0)]
    first = flexlora(clients, [3, 1, 2], reqs)
    second = flexlora(list(clients), [3, 1, 2], reqs)
    for req in reqs:
        assert torch.equal(first[req]["m"].A, second[req]["m"].A)
        assert torch.equal(first[req]["m"].B, second[req]["m"].B)


def test_rank_above_available_singular_values_is_zero_padded() -> None:
    rng = np.random.default_rng(3)
    clients = [_client(rng, 6, 5, 2, 4.0)]
    req = RankRequest(8, 16.0)
    f = flexlora(clients, [1.0], [req], torch.float64)[req]["m"]
    assert f.B.shape == (6, 8) and f.A.shape == (8, 5)
    assert torch.all(f.B[:, 5:] == 0) and torch.all(f.A[5:] == 0)
    np.testing.assert_allclose(_product(f, req), _reference(clients, [1], 8), atol=1e-10)


def test_weights_and_inputs_are_checked() -> None:
    assert data_size_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        data_size_weights([0, 3])
    rng = np.random.default_rng(4)
    a, b = _client(rng, 4, 4, 2, 2.0), _client(rng, 4, 4, 2, 2.0, module="other")
    with pytest.raises(ValueError, match="client 1 adapts a different module set"):
        flexlora([a, b], [1, 1], [RankRequest(2, 2.0)])
    with pytest.raises(ValueError, match="weights"):
        flexlora([a], [1, 1], [RankRequest(2, 2.0)])
    with pytest.raises(ValueError, match=r"client 1, module 'm': \(d_out, d_in\) is \(5, 4\)"):
        flexlora([a, _client(rng, 5, 4, 2, 2.0)], [1, 1], [RankRequest(2, 2.0)])


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(20, 64),
    d_in=st.integers(20, 64),
    ranks=st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=3),
    target=st.integers(1, 8),
    mode=st.sampled_from(["exact", "fast"]),
    seed=st.integers(0, 2**31),
)
def test_factored_paths_equal_dense(d_out, d_in, ranks, target, mode, seed) -> None:
    # R = Σ r_k stays below min(d_out, d_in), so the factored path (not the dense fallback) runs.
    rng = np.random.default_rng(seed)
    clients = [_client(rng, d_out, d_in, r, float(r + 1)) for r in ranks]
    n = [int(x) for x in rng.integers(1, 50, size=len(clients))]
    req = RankRequest(target, 3.0)
    reports: list[ModuleReport] = []
    want = _reference(clients, n, target)
    if mode == "exact":
        for dtype, tol in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
            got = _product(flexlora(clients, n, [req], dtype=dtype, mode=mode, reports=reports)[req]["m"], req)
            assert np.linalg.norm(got - want) <= tol * max(1.0, float(np.linalg.norm(want)))
    else:
        # Fast mode promises a rank-r error within its tolerance of the optimum (up to float32 rounding),
        # not the same factors: near-equal singular values may be mixed differently.
        got = _product(flexlora(clients, n, [req], torch.float64, mode=mode, reports=reports)[req]["m"], req)
        delta = _reference(clients, n, 64)
        opt = float(np.linalg.norm(delta - want))
        assert float(np.linalg.norm(delta - got)) <= (1 + 1e-3) * opt + 1e-5 * float(np.linalg.norm(delta))
    allowed = {"factored", "factored-qr", "fast", "fast-truncated", "fast→factored", "fast→factored-qr"}
    assert {r.path for r in reports} <= allowed


def test_released_error_is_the_norm_of_the_discarded_singular_values() -> None:
    rng = np.random.default_rng(7)
    clients = [_client(rng, 48, 40, r, 2.0 * r) for r in (4, 8, 8)]
    n = [5, 10, 20]
    delta = _reference(clients, n, 40)  # rank ≥ 20 = R: the whole ΔW
    sv = np.linalg.svd(delta, compute_uv=False)
    for mode in ("exact", "fast", "dense"):
        for r in (1, 4, 12):
            req = RankRequest(r, 2.0 * r)
            got = _product(flexlora(clients, n, [req], torch.float64, mode=mode)[req]["m"], req)
            err = np.linalg.norm(delta - got)
            assert abs(err - np.linalg.norm(sv[r:])) <= 1e-8 * np.linalg.norm(sv), (mode, r)


@pytest.mark.parametrize("mode", ["exact", "fast", "dense"])
def test_one_client_is_reproduced_exactly_at_its_rank_or_above(mode: SvdMode) -> None:
    rng = np.random.default_rng(8)
    client = _client(rng, 40, 30, 6, 12.0)
    want = 2.0 * (client.factors["m"].B.double() @ client.factors["m"].A.double()).numpy()
    for r in (6, 9):
        req = RankRequest(r, 4.0)
        got = _product(flexlora([client], [1.0], [req], torch.float64, mode=mode)[req]["m"], req)
        # fast mode stacks the (float32) client factors in float32: exact up to float32 rounding.
        tol = 1e-5 if mode == "fast" else 1e-10
        np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())


def test_dependent_factors_fall_back_to_householder_qr() -> None:
    rng = np.random.default_rng(9)
    a = _client(rng, 40, 30, 4, 8.0)
    zero = ClientAdapter({"m": LoraFactors(A=a.factors["m"].A, B=torch.zeros(40, 4))}, rank=4, alpha=8.0)
    twin = ClientAdapter(dict(a.factors), rank=4, alpha=8.0)  # exactly dependent columns
    reports: list[ModuleReport] = []
    req = RankRequest(4, 8.0)
    out = flexlora([a, zero, twin], [1, 1, 1], [req], torch.float64, reports=reports)
    assert reports[0].path == "factored-qr"
    want = (2.0 / 3.0) * 2.0 * (a.factors["m"].B.double() @ a.factors["m"].A.double()).numpy()
    np.testing.assert_allclose(_product(out[req]["m"], req), want, atol=1e-9 * np.abs(want).max())


def test_fast_mode_reports_its_certified_excess_and_batches_modules() -> None:
    rng = np.random.default_rng(10)
    modules = [f"layers.{i}.q_proj" for i in range(5)]
    clients = []
    for r in (4, 8, 16, 8):
        a = torch.from_numpy(rng.standard_normal((5, r, 96)))
        b = torch.from_numpy(rng.standard_normal((5, 80, r)))
        clients.append(ClientAdapter({m: LoraFactors(a[i], b[i]) for i, m in enumerate(modules)}, r, 2.0 * r))
    reports: list[ModuleReport] = []
    reqs = [RankRequest(4, 8.0), RankRequest(16, 32.0)]
    fast = flexlora(clients, [1, 2, 3, 4], reqs, torch.float64, mode="fast", tolerance=1e-3, reports=reports)
    exact = flexlora(clients, [1, 2, 3, 4], reqs, torch.float64, mode="exact", batch_bytes=1)
    assert [r.module for r in reports] == sorted(modules)
    for report in reports:
        assert report.total_rank == 36
        assert (report.path == "fast" and 0.0 <= report.excess <= 1e-3) or report.path.startswith("fast→")
    for req in reqs:
        for m in modules:
            err_fast = np.linalg.norm(_product(fast[req][m], req) - _product(exact[req][m], req))
            assert err_fast <= 0.05 * np.linalg.norm(_product(exact[req][m], req))


def test_bad_inputs_name_the_client_and_module() -> None:
    rng = np.random.default_rng(11)
    good = _client(rng, 8, 8, 2, 4.0)
    nan_a = good.factors["m"].A.clone()
    nan_a[0, 0] = float("nan")
    with pytest.raises(ValueError, match="client 1, module 'm': factors hold NaN"):
        flexlora(
            [good, ClientAdapter({"m": LoraFactors(nan_a, good.factors["m"].B)}, 2, 4.0)], [1, 1], [RankRequest(2, 4.0)]
        )
    with pytest.raises(ValueError, match=r"client 1, module 'm': .* declared rank 3"):
        flexlora([good, ClientAdapter(dict(good.factors), 3, 4.0)], [1, 1], [RankRequest(2, 4.0)])
    with pytest.raises(ValueError, match="request 0 asks for rank 0"):
        flexlora([good], [1], [RankRequest(0, 4.0)])
    with pytest.raises(ValueError, match="client 0 declares rank 0"):
        flexlora([ClientAdapter(dict(good.factors), 0, 4.0)], [1], [RankRequest(2, 4.0)])


@pytest.mark.parametrize(("d_out", "d_in"), [(40, 24), (24, 40)])
def test_fast_mode_with_total_rank_above_the_width_uses_the_gram_eigenproblem(d_out: int, d_in: int) -> None:
    rng = np.random.default_rng(12)
    clients = [_client(rng, d_out, d_in, r, 2.0 * r) for r in (8, 16, 8)]  # R = 32 ≥ min(d_out, d_in)
    n = [3, 5, 2]
    reports: list[ModuleReport] = []
    req = RankRequest(6, 12.0)
    got = _product(flexlora(clients, n, [req], torch.float64, mode="fast", reports=reports)[req]["m"], req)
    assert reports[0].path == "dense-eigh"
    delta = _reference(clients, n, 64)
    opt = float(np.linalg.norm(delta - _reference(clients, n, 6)))
    assert float(np.linalg.norm(delta - got)) <= (1 + 1e-4) * opt


@pytest.mark.parametrize(("d_out", "d_in"), [(40, 24), (24, 40)])
def test_exact_mode_on_a_dense_round_takes_the_float64_gram_eigenpairs_and_is_the_svds_cut(
    d_out: int, d_in: int
) -> None:
    rng = np.random.default_rng(13)
    clients = [_client(rng, d_out, d_in, r, 2.0 * r) for r in (8, 16, 8)]  # R = 32 ≥ min(d_out, d_in)
    n = [3, 5, 2]
    for target in (1, 6, 20):
        reports: list[ModuleReport] = []
        req = RankRequest(target, 2.0 * target)
        got = _product(flexlora(clients, n, [req], torch.float64, reports=reports)[req]["m"], req)
        assert reports[0].path == "dense-eigh"
        want = _reference(clients, n, target)
        assert np.linalg.norm(got - want) <= 1e-10 * float(np.linalg.norm(want)), target


def test_exact_mode_takes_the_full_svd_where_squaring_would_lose_a_kept_singular_value() -> None:
    """σ₁₀ ≈ 1e-7·σ₁: the Gram matrix would hold it to ~1e-2 relative; the released cut needs the SVD's."""
    rng = np.random.default_rng(14)
    strong = _client(rng, 12, 10, 8, 16.0)
    weak = _client(rng, 12, 10, 4, 8.0)
    weak.factors["m"].B.mul_(1e-7)
    reports: list[ModuleReport] = []
    req = RankRequest(10, 20.0)
    got = _product(flexlora([strong, weak], [1, 1], [req], torch.float64, reports=reports)[req]["m"], req)
    assert reports[0].path == "dense"
    want = _reference([strong, weak], [1, 1], 10)
    assert np.linalg.norm(got - want) <= 1e-12 * float(np.linalg.norm(want))
    tail = _reference([strong, weak], [1, 1], 10) - _reference([strong, weak], [1, 1], 8)
    assert np.linalg.norm((got - _reference([strong, weak], [1, 1], 8)) - tail) <= 1e-6 * np.linalg.norm(tail)


@pytest.mark.parametrize("mode", ["exact", "fast", "dense"])
@pytest.mark.parametrize("rank", [2, 6])  # total rank 4 < width 8 (factored paths) and 12 ≥ 8 (dense paths)
@pytest.mark.parametrize(("factor", "value"), [("A", float("nan")), ("B", float("inf")), ("B", float("-inf"))])
def test_nonfinite_factors_are_named_on_every_path(mode: SvdMode, rank: int, factor: str, value: float) -> None:
    # NaN/Inf is detected in the products rather than by scanning every factor; the error still names
    # the client and module, whichever path the module takes.
    rng = np.random.default_rng(13)
    good = _client(rng, 8, 8, rank, 2.0 * rank)
    a, b = (t.clone() for t in good.factors["m"])
    (a if factor == "A" else b)[1, 1] = value
    bad = ClientAdapter({"m": LoraFactors(A=a, B=b)}, rank, 2.0 * rank)
    with pytest.raises(ValueError, match="client 1, module 'm': factors hold NaN or infinite values"):
        flexlora([good, bad], [1, 1], [RankRequest(rank, 2.0 * rank)], mode=mode)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("shape", [(8, 6), (6, 8)])  # the Gram matrix of the rows, and of the columns
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 3e38])
def test_a_folded_round_with_nonfinite_values_is_refused_with_its_modules(
    mode: SvdMode, shape: tuple[int, int], value: float
) -> None:
    # A folded ΔW (aggregator.folding) is checked through its Gram matrix's diagonal, with no pass over ΔW itself:
    # any NaN or Inf, anywhere in it, must still be refused, and so must a square past the working precision
    # (3e38² overflows float32, fast mode's; exact mode works in float64, which holds it).
    dense = {m: torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i, m in enumerate("ab")}
    dense["b"][shape[0] - 1, shape[1] - 1] = value
    if value == 3e38 and mode == "exact":
        assert set(flexlora_dense(dense, [RankRequest(2, 4.0)], mode=mode)[RankRequest(2, 4.0)]) == {"a", "b"}
        return
    with pytest.raises(AggregationError, match=r"modules \['a', 'b'\]: the folded round holds NaN or infinite"):
        flexlora_dense(dense, [RankRequest(2, 4.0)], mode=mode)
    dense["b"][shape[0] - 1, shape[1] - 1] = 1.0
    assert set(flexlora_dense(dense, [RankRequest(2, 4.0)], mode=mode)[RankRequest(2, 4.0)]) == {"a", "b"}


def test_factors_that_overflow_float32_in_fast_mode_are_refused_with_the_module() -> None:
    rng = np.random.default_rng(14)
    huge = _client(rng, 8, 8, 2, 4.0)
    huge = ClientAdapter({"m": LoraFactors(A=huge.factors["m"].A * 1e30, B=huge.factors["m"].B)}, 2, 4.0)
    with pytest.raises(ValueError, match=r"modules \['m'\]: the weighted factors overflow"):
        flexlora([huge], [1], [RankRequest(2, 4.0)], mode="fast")
    # float64 holds them: the exact path aggregates the same input.
    assert set(flexlora([huge], [1], [RankRequest(2, 4.0)], mode="exact")[RankRequest(2, 4.0)]) == {"m"}


def _shared_direction_clients(rng: np.random.Generator, noise: float, count: int = 6) -> list[ClientAdapter]:
    """Clients that all trained the same 8 directions, up to `noise`: P's columns are nearly dependent."""
    d_out, d_in, rank = 200, 160, 8
    u = np.linalg.qr(rng.standard_normal((d_out, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((d_in, rank)))[0]
    clients = []
    for k in range(count):
        b = u * np.linspace(1.0, 0.2, rank) + noise * rng.standard_normal((d_out, rank))
        a = v.T * (1 + 0.1 * k) + 1e-2 * rng.standard_normal((rank, d_in))
        factors = LoraFactors(A=torch.tensor(a, dtype=torch.float32), B=torch.tensor(b, dtype=torch.float32))
        clients.append(ClientAdapter({"m": factors}, rank=rank, alpha=2.0 * rank))
    return clients


def test_fast_mode_keeps_nearly_dependent_factors_accurate_and_certified() -> None:
    # CholeskyQR refuses such a P; whichever way fast mode answers (a truncated Gram eigenbasis, or the
    # exact fallback), what a user relies on is the released cut and its certificate.
    clients = _shared_direction_clients(np.random.default_rng(15), noise=1e-6)
    reqs = [RankRequest(2, 4.0), RankRequest(4, 8.0)]
    exact = flexlora(clients, [1] * 6, reqs, torch.float64)
    reports: list[ModuleReport] = []
    fast = flexlora(clients, [1] * 6, reqs, torch.float64, mode="fast", reports=reports)
    assert 0.0 <= reports[0].excess <= 1e-3
    for req in reqs:
        want = _product(exact[req]["m"], req)
        got = _product(fast[req]["m"], req)
        assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)


def test_exactly_repeated_clients_are_reproduced_in_fast_mode() -> None:
    # ΔW has rank 8, so the rank-8 cut's optimal error is 0: fast mode must give the product itself,
    # whether its certificate holds or it falls back to the exact path (rounding decides which).
    clients = _shared_direction_clients(np.random.default_rng(16), noise=0.0, count=3)
    clients = [ClientAdapter(dict(clients[0].factors), 8, 16.0)] * 3
    reports: list[ModuleReport] = []
    req = RankRequest(8, 16.0)
    out = flexlora(clients, [1, 1, 1], [req], torch.float64, mode="fast", reports=reports)
    assert 0.0 <= reports[0].excess <= 1e-3
    want = 2.0 * (clients[0].factors["m"].B.double() @ clients[0].factors["m"].A.double()).numpy()
    np.testing.assert_allclose(_product(out[req]["m"], req), want, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-2])
def test_fast_mode_redoes_exactly_a_module_whose_certificate_fails(noise: float) -> None:
    # A negative tolerance is a certificate no answer can meet: every module takes the exact fallback,
    # and what it releases is the exact path's answer.
    clients = _shared_direction_clients(np.random.default_rng(17), noise=noise, count=4)
    reqs = [RankRequest(2, 4.0), RankRequest(8, 16.0)]
    exact = flexlora(clients, [1, 2, 3, 4], reqs, torch.float64)
    reports: list[ModuleReport] = []
    fast = flexlora(clients, [1, 2, 3, 4], reqs, torch.float64, mode="fast", reports=reports, tolerance=-1.0)
    assert all(r.path.startswith("fast→") and r.excess == 0.0 for r in reports)
    for req in reqs:
        want = _product(exact[req]["m"], req)
        # fast mode stacks the float32 factors in float32: the same answer up to float32 rounding.
        assert np.linalg.norm(_product(fast[req]["m"], req) - want) <= 1e-6 * np.linalg.norm(want)


def test_cutting_a_batch_of_modules_gives_each_module_its_own_cut() -> None:
    """One product for the whole batch where every module is cut alike; with a rank pattern, or where a module
    has fewer singular values than the rank (zero-padded), each module as `cut` would make it."""
    g = torch.Generator().manual_seed(7)
    u, s, vh = (
        torch.randn(3, 9, 4, generator=g),
        torch.rand(3, 4, generator=g).double(),
        torch.randn(3, 4, 11, generator=g),
    )
    modules = ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"]
    requests = [
        RankRequest(3, 6.0),
        RankRequest(2, 16.0, rank_pattern=(("v_proj", 4),), alpha_pattern=(("v_proj", 8.0),)),
        RankRequest(6, 12.0),  # more than the 4 singular values there are: padded
    ]
    for request in requests:
        got = cut_modules(u, s, vh, modules, request)
        assert list(got) == modules
        for i, m in enumerate(modules):
            want = cut(u[i], s[i], vh[i], request.at(m))
            assert got[m].A.dtype == want.A.dtype == torch.float32 and got[m].B.dtype == torch.float32
            assert torch.equal(got[m].A, want.A) and torch.allclose(got[m].B, want.B, rtol=1e-6, atol=0), (request, m)
