"""Encoder (BERT) ops: numba kernels and their numpy twins (``*_ref``), same signatures.

The big matrix products of an encoder go to BLAS. What is left runs over
every token of a padded batch: LayerNorm after each residual add, GELU over
the feed-forward activations, and bidirectional attention within each
sentence. In numpy those are many single-threaded passes (and libm's scalar
``erf`` / ``exp``); the kernels here do one pass per row over all cores, with
vectorizable ``erf`` and ``exp`` (``fast_erf`` below, ``ops.kernels.fast_exp``).

Shapes: ``x`` is ``(n, dim)`` float32, one row per token of a *packed* batch
(the real tokens of all sentences back to back, no padding); attention takes
``q, k, v`` as ``(n, dim)`` (heads side by side in ``dim``) and ``offsets``
``(n_sentences + 1,)``: sentence ``s`` is rows ``offsets[s]:offsets[s + 1]``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import ref as ops_ref
from .kernels import fast_exp

# erf(x) = x * P(x^2) / Q(x^2) on |x| <= 4 (erf(4) = 1 - 1.5e-8), a rational fit of
# degree 5/5 made for localllm: max abs error 2.8e-8 in float64.
_ERF_P = (1.1283791590421357, 0.19167202680439918, 0.052852465567699444,
          0.0038033767627813704, 0.0002828318555901498, 2.0014792998720143e-06)
_ERF_Q = (1.0, 0.5031978066087543, 0.11457453902695894,
          0.015046061844829218, 0.0011663631327940769, 3.748299543856033e-05)
_P0, _P1, _P2, _P3, _P4, _P5 = _ERF_P
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5 = _ERF_Q
_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654
# Threads pay off only for large calls: a parallel region costs a launch and, on a busy
# machine, spinning workers that compete with BLAS' own threads.
PARALLEL_MIN_ROWS = 2048      # rows from which the layer norm uses threads
PARALLEL_MIN_WORK = 1 << 20   # elements from which GELU uses threads (x16 multiply-adds for attention)


# --------------------------------------------------------------------------- numpy reference

def layer_norm_ref(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """x (n, dim) -> (x - mean) / sqrt(var + eps) * weight + bias."""
    return ops_ref.layer_norm(x, weight, bias, eps)


def add_layer_norm_ref(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                       eps: float) -> np.ndarray:
    """LayerNorm(x + residual), both (n, dim): BERT's post-norm residual step."""
    return ops_ref.layer_norm(x + residual, weight, bias, eps)


def gelu_ref(x: np.ndarray, kind: str = "gelu") -> np.ndarray:
    """GELU: ``gelu`` = x * Phi(x) with erf (exact); ``gelu_tanh`` = the tanh approximation."""
    x64 = np.asarray(x, np.float32).astype(np.float64)
    if kind == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return (0.5 * x64 * (1.0 + erf(x64 * _SQRT_HALF))).astype(np.float32)
    if kind == "gelu_tanh":
        return (0.5 * x64 * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x64 + 0.044715 * x64 ** 3)))).astype(np.float32)
    raise ValueError(f"unknown GELU kind '{kind}' (expected 'gelu' or 'gelu_tanh')")


def attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, offsets: np.ndarray, n_heads: int) -> np.ndarray:
    """Bidirectional multi-head attention over packed sentences.

    q, k, v (n, dim): the tokens of all sentences back to back; sentence s is
    rows ``offsets[s]:offsets[s + 1]`` and attends to itself only (no padding,
    no causal mask). Returns (n, dim).
    """
    n, dim = q.shape
    head_dim = dim // n_heads
    out = np.empty((n, dim), np.float32)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        def heads(t):
            return t[start:stop].reshape(stop - start, n_heads, head_dim).transpose(1, 0, 2)  # (n_heads, m, head_dim)
        scores = heads(q) @ heads(k).transpose(0, 2, 1) / np.sqrt(head_dim)                 # (n_heads, m, m)
        mixed = ops_ref.softmax(scores, axis=-1) @ heads(v)                                 # (n_heads, m, head_dim)
        out[start:stop] = mixed.transpose(1, 0, 2).reshape(stop - start, dim)
    return out


# --------------------------------------------------------------------------- scalar helpers

@njit(cache=True, fastmath=True, inline="always")
def fast_erf(x):
    """erf for float64 ``x`` by the rational fit above (vectorizable, |error| < 3e-8); exactly +-1 past 4."""
    c = min(max(x, -4.0), 4.0)
    z = c * c
    p = ((((_P5 * z + _P4) * z + _P3) * z + _P2) * z + _P1) * z + _P0
    q = ((((_Q5 * z + _Q4) * z + _Q3) * z + _Q2) * z + _Q1) * z + _Q0
    return 1.0 if x >= 4.0 else -1.0 if x <= -4.0 else c * p / q


# --------------------------------------------------------------------------- layer norm

@njit(cache=True, fastmath=True, inline="always")
def _layer_norm_row(x, residual, weight, bias, eps, out, i):
    dim = x.shape[1]
    total = 0.0
    for j in range(dim):
        out[i, j] = x[i, j] + residual[i, j]
        total += out[i, j]
    mean = total / dim
    var = 0.0
    for j in range(dim):
        d = out[i, j] - mean
        var += d * d
    inv = 1.0 / math.sqrt(var / dim + eps)
    for j in range(dim):
        out[i, j] = np.float32((out[i, j] - mean) * inv) * weight[j] + bias[j]


@njit(cache=True, fastmath=True, parallel=True)
def _add_layer_norm_parallel(x, residual, weight, bias, eps, out):
    for i in prange(x.shape[0]):
        _layer_norm_row(x, residual, weight, bias, eps, out, i)


@njit(cache=True, fastmath=True)
def _add_layer_norm_serial(x, residual, weight, bias, eps, out):
    for i in range(x.shape[0]):
        _layer_norm_row(x, residual, weight, bias, eps, out, i)


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def add_layer_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                   eps: float) -> np.ndarray:
    """Fast twin of :func:`add_layer_norm_ref`; returns a new (n, dim) array."""
    x, residual = _f32(x), _f32(residual)
    if residual.shape != x.shape or x.ndim != 2:
        raise ValueError(f"add_layer_norm: x {x.shape} and residual {residual.shape} must be one (n, dim) shape")
    out = np.empty_like(x)
    kernel = _add_layer_norm_parallel if x.shape[0] >= PARALLEL_MIN_ROWS else _add_layer_norm_serial
    kernel(x, residual, _f32(weight), _f32(bias), float(eps), out)
    return out


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Fast twin of :func:`layer_norm_ref`."""
    x = _f32(x)
    return add_layer_norm(x, np.zeros_like(x), weight, bias, eps)


# --------------------------------------------------------------------------- gelu

@njit(cache=True, fastmath=True, inline="always")
def _gelu_erf_row(x, i):
    for j in range(x.shape[1]):
        v = np.float64(x[i, j])
        x[i, j] = np.float32(0.5 * v * (1.0 + fast_erf(v * _SQRT_HALF)))


@njit(cache=True, fastmath=True, parallel=True)
def _gelu_erf_parallel(x):
    for i in prange(x.shape[0]):
        _gelu_erf_row(x, i)


@njit(cache=True, fastmath=True)
def _gelu_erf_serial(x):
    for i in range(x.shape[0]):
        _gelu_erf_row(x, i)


@njit(cache=True, parallel=True)
def _gelu_tanh_kernel(x):
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            v = np.float64(x[i, j])
            x[i, j] = np.float32(0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))))


def gelu(x: np.ndarray, kind: str = "gelu") -> np.ndarray:
    """Fast twin of :func:`gelu_ref`; in place when ``x`` is a contiguous float32 (n, cols) array."""
    x = _f32(x)
    rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    if kind == "gelu":
        (_gelu_erf_parallel if rows.size >= PARALLEL_MIN_WORK else _gelu_erf_serial)(rows)
    elif kind == "gelu_tanh":
        _gelu_tanh_kernel(rows)
    else:
        raise ValueError(f"unknown GELU kind '{kind}' (expected 'gelu' or 'gelu_tanh')")
    return x


# --------------------------------------------------------------------------- attention

@njit(cache=True, fastmath=True, inline="always")
def _attend_head(q, k, v, offsets, n_heads, scale, out, task):
    """Sentence ``task // n_heads``, head ``task % n_heads``: softmax(q k^T * scale) v into ``out``.

    K and V of the head are copied transposed, (head_dim, n), so that both
    products run along contiguous rows: scores as ``n``-long multiply-adds per
    query component, the output as one ``n``-long dot product per component.
    """
    head_dim = q.shape[1] // n_heads
    start = offsets[task // n_heads]
    n = offsets[task // n_heads + 1] - start
    c0 = (task % n_heads) * head_dim
    keys_t = np.empty((head_dim, n), np.float32)                # (head_dim, n)
    values_t = np.empty((head_dim, n), np.float32)              # (head_dim, n)
    for j in range(n):
        for d in range(head_dim):
            keys_t[d, j] = k[start + j, c0 + d]
            values_t[d, j] = v[start + j, c0 + d]
    scores = np.empty(n, np.float32)                            # (n,) one query's row
    for i in range(n):
        for j in range(n):
            scores[j] = 0.0
        for d in range(head_dim):
            qd = q[start + i, c0 + d] * scale
            key_row = keys_t[d]
            for j in range(n):
                scores[j] += qd * key_row[j]
        top = np.float32(-np.inf)
        for j in range(n):
            top = max(top, scores[j])
        total = np.float32(0.0)
        for j in range(n):
            e = fast_exp(scores[j] - top)
            scores[j] = e
            total += e
        inv = np.float32(1.0) / total
        for d in range(head_dim):
            value_row = values_t[d]
            acc = np.float32(0.0)
            for j in range(n):
                acc += scores[j] * value_row[j]
            out[start + i, c0 + d] = acc * inv


@njit(cache=True, fastmath=True, parallel=True)
def _attention_parallel(q, k, v, offsets, n_heads, scale, out):
    for task in prange((offsets.shape[0] - 1) * n_heads):
        _attend_head(q, k, v, offsets, n_heads, scale, out, task)


@njit(cache=True, fastmath=True)
def _attention_serial(q, k, v, offsets, n_heads, scale, out):
    for task in range((offsets.shape[0] - 1) * n_heads):
        _attend_head(q, k, v, offsets, n_heads, scale, out, task)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, offsets: np.ndarray, n_heads: int) -> np.ndarray:
    """Fast twin of :func:`attention_ref`: one parallel task per (sentence, head)."""
    n, dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} must have one shape")
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
        raise ValueError(f"attention: offsets must rise from 0 to {n} (the number of tokens)")
    if dim % n_heads:
        raise ValueError(f"attention: dim {dim} is not a multiple of n_heads {n_heads}")
    out = np.empty((n, dim), np.float32)
    scale = np.float32(1.0 / math.sqrt(dim // n_heads))
    q, k, v = (t if t.dtype == np.float32 else t.astype(np.float32) for t in (q, k, v))
    work = int(np.sum(np.diff(offsets) ** 2)) * dim
    (_attention_parallel if work >= PARALLEL_MIN_WORK * 16 else _attention_serial)(q, k, v, offsets, n_heads,
                                                                                   scale, out)
    return out
