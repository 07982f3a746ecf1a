"""aggregator.symeig: the top eigenpairs that FlexLoRA's cuts come from, solved with the GIL let go so that a round's
modules are solved side by side."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from aggregator.symeig import one_blas_thread, top_eigh


def _symmetric(n: int, dtype: type, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, n + 7))
    return (x @ x.T).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_the_top_eigenpairs_are_those_of_a_full_decomposition(dtype: type, k: int) -> None:
    matrix = _symmetric(40, dtype)
    before = matrix.copy()
    values, vectors = top_eigh(matrix, k)
    assert values.dtype == dtype and vectors.dtype == dtype and vectors.shape == (40, k)
    expected, _ = np.linalg.eigh(matrix.astype(np.float64))
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(values, expected[-k:], rtol=tol, atol=tol * expected[-1])
    # Each column is a unit eigenvector of its value: A v = λ v.
    residual = matrix.astype(np.float64) @ vectors - vectors * values
    assert np.abs(residual).max() <= 50 * tol * expected[-1]
    np.testing.assert_allclose(vectors.T.astype(np.float64) @ vectors, np.eye(k), atol=50 * tol)
    np.testing.assert_array_equal(matrix, before)  # the caller's matrix is left as it was


def test_a_wrong_shape_or_k_is_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        top_eigh(np.zeros((3, 4)), 1)
    with pytest.raises(ValueError, match="k must be"):
        top_eigh(np.eye(3), 0)
    with pytest.raises(ValueError, match="k must be"):
        top_eigh(np.eye(3), 4)


def test_other_threads_run_while_a_matrix_is_solved() -> None:
    """The bug: scipy.linalg.eigh held the GIL for the whole LAPACK call, so the thread pool meant to solve a round's
    modules one per core solved them one after another. A thread that only sleeps and counts must get to run many
    times while one large solve is under way (with the GIL held it ran a handful of times at most, at the edges)."""
    matrix = _symmetric(1100, np.float64)
    entered, finished = threading.Event(), threading.Event()

    def solve() -> None:
        entered.set()
        top_eigh(matrix, 1100)
        finished.set()

    solver = threading.Thread(target=solve)
    solver.start()
    entered.wait()
    ticks = 0
    while not finished.is_set():
        ticks += 1
        time.sleep(0.001)
    solver.join()
    assert ticks >= 20, f"the counting thread ran only {ticks} times during the solve"


def test_openblas_stays_on_one_thread() -> None:
    """OpenBLAS's idle pool threads spin; a per-call limit, restored after each call, left one spinning on a core."""
    one_blas_thread()
    openblas = [lib for lib in threadpool_info() if lib.get("internal_api") == "openblas"]
    assert openblas, "numpy and scipy load OpenBLAS"
    assert all(lib["num_threads"] == 1 for lib in openblas)


def test_without_the_cython_interface_scipy_gives_the_same_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another scipy build, where the Cython LAPACK interface cannot be reached: scipy.linalg.eigh, same answer."""
    import aggregator.symeig as symeig

    matrix = _symmetric(30, np.float64, seed=3)
    fast_values, fast_vectors = top_eigh(matrix, 6)
    monkeypatch.setattr(symeig, "_routine", lambda dtype: None)
    values, vectors = top_eigh(matrix, 6)
    np.testing.assert_allclose(values, fast_values, rtol=1e-12)
    np.testing.assert_allclose(np.abs(vectors), np.abs(fast_vectors), atol=1e-10)
