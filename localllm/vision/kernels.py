"""The vision encoder's measured hot spots beside BLAS, each with its numpy twin (``*_ref``, same contract).

- ``softmax_rows``: at 896 pixels a head's scores are (4096, 4096); numpy's softmax walks those 64 MB five
  times (max, subtract, exp, sum, divide). Here each row is done while it sits in cache, with
  ``ops.kernels.fast_exp`` (vectorizable), on the calling thread and without the GIL: the encoder shares
  the heads among threads, one per core (``encoder.bidirectional_attention``), and each thread's softmax
  runs beside the others' matmuls (numba's own worker threads beside BLAS's spinning ones made the
  attention slower: 3.1-3.6 CPU s a layer against 2.4 serial).
- ``gelu_tanh``: SigLIP's MLP activation over (4096, 4304) values a layer; numpy's takes six passes and a
  float32 ``tanh``. Here one pass, written as ``x * sigmoid(2u)`` (the same function as
  ``x/2 * (1 + tanh(u))``, u = sqrt(2/pi) (x + 0.044715 x^3)) so that it vectorizes with ``fast_exp``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..ops import ref as ops_ref
from ..ops.kernels import fast_exp

_SQRT_2_OVER_PI = np.float32(0.7978845608028654)


def softmax_rows_ref(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float32 (n, m), in place; returns ``scores``."""
    scores -= scores.max(axis=1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=1, keepdims=True)
    return scores


@njit(cache=True, fastmath=True, nogil=True)
def _softmax_rows_kernel(scores):
    n, m = scores.shape
    for i in range(n):
        row = scores[i]
        largest = row[0]
        for j in range(1, m):
            largest = max(largest, row[j])
        total = np.float32(0.0)
        for j in range(m):
            e = fast_exp(row[j] - largest)
            row[j] = e
            total += e
        inverse = np.float32(1.0) / total
        for j in range(m):
            row[j] *= inverse


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Fast twin of :func:`softmax_rows_ref`: float32 C-contiguous (n, m), in place; returns ``scores``."""
    if scores.dtype != np.float32 or scores.ndim != 2 or not scores.flags.c_contiguous or scores.shape[1] == 0:
        raise ValueError(f"softmax_rows takes a C-contiguous float32 (n, m > 0) array, got {scores.dtype} "
                         f"{scores.shape}")
    _softmax_rows_kernel(scores)
    return scores


def gelu_tanh_ref(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation, of float32 (n, m): a new array (``ops.ref.gelu_tanh``)."""
    return ops_ref.gelu_tanh(x)


@njit(cache=True, fastmath=True, parallel=True)
def _gelu_tanh_kernel(x):
    n, m = x.shape
    for i in prange(n):
        row = x[i]
        for j in range(m):
            v = row[j]
            u = _SQRT_2_OVER_PI * (v + np.float32(0.044715) * v * v * v)
            row[j] = v / (np.float32(1.0) + fast_exp(np.float32(-2.0) * u))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """Fast twin of :func:`gelu_tanh_ref`, in place on a C-contiguous float32 (n, m) array; returns it."""
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(f"gelu_tanh takes a C-contiguous float32 (n, m) array, got {x.dtype} {x.shape}")
    _gelu_tanh_kernel(x)
    return x
