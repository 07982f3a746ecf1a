"""The k largest eigenpairs of a symmetric matrix by LAPACK's MRRR solver (syevr on an index subset), called so that
two threads really solve two matrices at once.

Two things kept a thread pool of solvers to one core (measured on this project's 2-core machine, 30 matrices of
576² at k = 32: 0.30-0.35 s with one thread or two):
- scipy.linalg.eigh holds the GIL while LAPACK runs (its f2py wrapper of syevr is not declared thread-safe). Here the
  same routine is called through scipy's public Cython LAPACK interface (scipy.linalg.cython_lapack exports a
  function pointer per routine) via ctypes, which releases the GIL for the length of a foreign call. Where that
  interface cannot be reached, scipy.linalg.eigh is used as before.
- OpenBLAS's own pool threads busy-wait for work after every call, and limiting OpenBLAS to one thread around each
  batch (threadpoolctl's context manager, which restores the limit on the way out) left one of them spinning on a
  core through the next batch. `one_blas_thread` sets the limit once, for the life of the process.
With both: 0.17-0.18 s with two threads. (Two processes solving at once, each with the per-call limit, took
1.6-2.0 s each instead of 0.44 s alone.)
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import numpy as np
import scipy.linalg
from threadpoolctl import ThreadpoolController

log = logging.getLogger(__name__)

_INT = ctypes.POINTER(ctypes.c_int)
_CHAR = ctypes.c_char_p
_PTR = ctypes.c_void_p


class EigenError(ArithmeticError):
    """LAPACK's syevr reported a failure (info ≠ 0)."""


@functools.cache
def _routine(dtype: str) -> Callable[..., None] | None:
    """ssyevr or dsyevr as a ctypes function (which drops the GIL while it runs), or None if unreachable."""
    name = {"float32": "ssyevr", "float64": "dsyevr"}[dtype]
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        address = get_pointer(capsule, get_name(capsule))
    except (ImportError, AttributeError, KeyError, ValueError) as exc:  # another scipy build: the slow path
        log.warning("LAPACK %s not reachable through scipy.linalg.cython_lapack (%s); eigh holds the GIL", name, exc)
        return None
    # jobz, range, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz, work, lwork, iwork, liwork, info
    signature = ctypes.CFUNCTYPE(
        None, _CHAR, _CHAR, _CHAR, _INT, _PTR, _INT, _PTR, _PTR, _INT, _INT, _PTR, _INT, _PTR, _PTR, _INT, _INT,
        _PTR, _INT, _INT, _INT, _INT,
    )  # fmt: skip
    return signature(address)


@functools.cache
def one_blas_thread() -> None:
    """Limit every OpenBLAS loaded in this process (scipy's and numpy's) to one thread, for good. This project asks
    OpenBLAS only for small problems (r × r products, one eigenproblem per thread), where its pool only costs:
    its idle threads spin. Called before any such work; later calls do nothing."""
    ThreadpoolController().select(internal_api="openblas").limit(limits=1)


def top_eigh(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (ascending) and their eigenvectors (n × k) of a symmetric float32 or float64
    matrix, of which only the lower triangle (in column-major terms) is read; the matrix is not modified."""
    n = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] != n:
        raise ValueError(f"a symmetric matrix is square, got {matrix.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    one_blas_thread()
    routine = _routine(str(matrix.dtype)) if matrix.dtype in (np.float32, np.float64) else None
    if routine is None:
        return scipy.linalg.eigh(matrix, subset_by_index=[n - k, n - 1], driver="evr", check_finite=False, lower=True)  # type: ignore[no-any-return]
    dtype = matrix.dtype
    # Column-major copy (syevr overwrites it). The matrix is symmetric, so its row-major buffer is the same matrix.
    a = np.array(matrix, dtype=dtype, order="F", copy=True)
    scalar = np.zeros(3, dtype=dtype)  # vl, vu (unused with range I), abstol 0: LAPACK's default tolerance
    w = np.empty(n, dtype=dtype)
    z = np.empty((n, k), dtype=dtype, order="F")
    isuppz = np.empty(2 * k, dtype=np.intc)
    found, info = ctypes.c_int(), ctypes.c_int()
    size, lda, il, iu, ldz = (ctypes.c_int(v) for v in (n, n, n - k + 1, n, n))

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        routine(
            b"V", b"I", b"L", ctypes.byref(size), a.ctypes.data, ctypes.byref(lda),
            scalar.ctypes.data, scalar[1:].ctypes.data, ctypes.byref(il), ctypes.byref(iu), scalar[2:].ctypes.data,
            ctypes.byref(found), w.ctypes.data, z.ctypes.data, ctypes.byref(ldz), isuppz.ctypes.data_as(_INT),
            work.ctypes.data, ctypes.byref(ctypes.c_int(lwork)), iwork.ctypes.data_as(_INT),
            ctypes.byref(ctypes.c_int(liwork)), ctypes.byref(info),
        )  # fmt: skip
        if info.value != 0:
            raise EigenError(f"syevr failed with info = {info.value}")

    # A workspace query first (lwork = liwork = -1), then the solve.
    work, iwork = np.empty(1, dtype=dtype), np.empty(1, dtype=np.intc)
    call(work, -1, iwork, -1)
    lwork, liwork = int(work[0]), int(iwork[0])
    call(np.empty(lwork, dtype=dtype), lwork, np.empty(liwork, dtype=np.intc), liwork)
    if found.value != k:
        raise EigenError(f"syevr found {found.value} eigenvalues, {k} were asked for")
    return w[:k].copy(), z
