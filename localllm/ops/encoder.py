"""Encoder (BERT) ops: numba kernels and their numpy twins (``*_ref``), same signatures.

An encoder runs over every token of a packed batch: the linear layers
(``linear``: Q/K/V, attention output, feed-forward up and down), LayerNorm
after each residual add, GELU over the feed-forward activations, and
bidirectional attention within each sentence. The kernels here do each in one
parallel pass over all cores, with vectorizable ``erf`` and ``exp``
(``fast_erf`` below, ``ops.kernels.fast_exp``).

Batch invariance: a sentence gets the same bits whatever else is in the batch.
So nothing here may round differently for a row depending on how many rows
there are or where the row sits. BLAS does (measured with OpenBLAS: its
Haswell/Zen sgemm kernels round a row differently by its position in the
call and by the number of rows; on AVX-512 the small-matrix and gemv paths
for a few rows differ), so the linear layers are a kernel of our own: every
output is ``bias + x[j, 0] * w[0] + x[j, 1] * w[1] + ...`` accumulated in that
order with fused multiply-adds, in vectors across output columns (``LANES``
wide: 16 where the compile target has AVX-512, else 8; the lane count changes
speed, not bits), whatever tile the row falls in. And each op runs one
compiled parallel kernel, the same machine code for one row or ten thousand:
no serial form for small calls, since the serial and parallel compiled forms
of attention rounded differently on AVX-512 (GELU keeps a one-thread form for
callers between BLAS calls, the ref backend; a caller keeps to one form).

Shapes: ``x`` is ``(n, dim)`` float32, one row per token of a *packed* batch
(the real tokens of all sentences back to back, no padding); attention takes
``q, k, v`` as ``(n, dim)`` (heads side by side in ``dim``) and ``offsets``
``(n_sentences + 1,)``: sentence ``s`` is rows ``offsets[s]:offsets[s + 1]``.
``linear`` takes its weights packed once by ``pack_linear`` (``linear_ref``
takes them as stored, ``(n_out, n_in)``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic, models, register_model

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


# --------------------------------------------------------------------------- numpy reference

def linear_ref(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """x (n, n_in) @ weight.T (weight (n_out, n_in)) + bias (n_out,) -> (n, n_out), through BLAS."""
    y = np.asarray(x, np.float32) @ np.asarray(weight, np.float32).T
    if bias is not None:
        y += bias
    return y


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


# --------------------------------------------------------------------------- float32 vectors

def _target_lanes() -> int:
    """16 float32 lanes where numba compiles for AVX-512 (its own cpu name / feature string), else 8."""
    return 16 if "+avx512f" in cpu_target.target_context.codegen().magic_tuple()[2] else 8


LANES = _target_lanes()
_F32 = ir.FloatType()
_I32 = ir.IntType(32)


class F32Vector(types.Type):
    """``LANES`` float32 values in one LLVM vector (one zmm or ymm register)."""

    def __init__(self, lanes: int):
        self.lanes = lanes
        self.llvm_type = ir.VectorType(_F32, lanes)
        super().__init__(name=f"EncoderF32x{lanes}")


@register_model(F32Vector)
class _F32VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type)


f32v = F32Vector(LANES)


def _vector_pointer(context, builder, array_type, array, index):
    """``(vector*) &array.flat[index]`` (C-contiguous float32 arrays)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), f32v.llvm_type.as_pointer())


@intrinsic
def vload(typingctx, array, index):
    """array.flat[index:index + LANES] as one vector."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_vector_pointer(context, builder, sig.args[0], *args), align=4)
    return f32v(array, index), codegen


@intrinsic
def vstore(typingctx, array, index, value):
    """array.flat[index:index + LANES] = value."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and value == f32v):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _vector_pointer(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()
    return types.none(array, index, value), codegen


@intrinsic
def vsplat(typingctx, x):
    """``LANES`` lanes equal to the float32 ``x``."""
    def codegen(context, builder, sig, args):
        vector_type = f32v.llvm_type
        undef = ir.Constant(vector_type, ir.Undefined)
        one = builder.insert_element(undef, context.cast(builder, args[0], sig.args[0], types.float32),
                                     ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
    return f32v(x), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane-wise (``llvm.fmuladd``: one fused instruction where the CPU has it)."""
    if not (a == b == c == f32v):
        return None

    def codegen(context, builder, sig, args):
        vector_type = f32v.llvm_type
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type] * 3),
                                                  f"llvm.fmuladd.v{LANES}f32")
        return builder.call(function, args)
    return f32v(a, b, c), codegen


# --------------------------------------------------------------------------- linear

PANEL = 2 * LANES   # output columns per tile: two vectors
TILE_ROWS = 6       # rows per tile: 12 vector accumulators


class PackedLinear(NamedTuple):
    """Weights of ``y = x @ weight.T + bias`` laid out for :func:`linear`."""

    panels: np.ndarray   # (n_panels, n_in, PANEL): column block p of weight.T, zero past n_out
    bias: np.ndarray     # (n_panels * PANEL,), zero past n_out
    n_out: int


def pack_linear(weight: np.ndarray, bias: np.ndarray | None) -> PackedLinear:
    """weight (n_out, n_in), bias (n_out,) or None -> :class:`PackedLinear` (a copy: done once, at load)."""
    weight = np.asarray(weight, np.float32)
    n_out, n_in = weight.shape
    n_panels = -(-n_out // PANEL)
    padded = np.zeros((n_panels * PANEL, n_in), np.float32)
    padded[:n_out] = weight
    panels = np.ascontiguousarray(padded.reshape(n_panels, PANEL, n_in).transpose(0, 2, 1))  # (n_panels, n_in, PANEL)
    padded_bias = np.zeros(n_panels * PANEL, np.float32)
    if bias is not None:
        padded_bias[:n_out] = bias
    return PackedLinear(panels, padded_bias, n_out)


@njit(cache=True, inline="always")
def _linear_tile(x, panels, bias, out, p, j0):
    """out[j0:j0 + TILE_ROWS, p * PANEL:(p + 1) * PANEL] (rows past n skipped): each output starts
    at its bias and adds x[j, kk] * w[kk] for kk = 0, 1, ... in order, one fused multiply-add each."""
    n, n_in = x.shape
    cols = out.shape[1]
    # rows past the end repeat the last row: the same arithmetic for every slot, stores skipped
    j1, j2, j3, j4, j5 = min(j0 + 1, n - 1), min(j0 + 2, n - 1), min(j0 + 3, n - 1), min(j0 + 4, n - 1), \
        min(j0 + 5, n - 1)
    b0, b1 = vload(bias, p * PANEL), vload(bias, p * PANEL + LANES)
    a00, a01, a10, a11, a20, a21 = b0, b1, b0, b1, b0, b1
    a30, a31, a40, a41, a50, a51 = b0, b1, b0, b1, b0, b1
    w = p * n_in * PANEL
    for kk in range(n_in):
        w0, w1 = vload(panels, w), vload(panels, w + LANES)
        s = vsplat(x[j0, kk])
        a00, a01 = vfma(s, w0, a00), vfma(s, w1, a01)
        s = vsplat(x[j1, kk])
        a10, a11 = vfma(s, w0, a10), vfma(s, w1, a11)
        s = vsplat(x[j2, kk])
        a20, a21 = vfma(s, w0, a20), vfma(s, w1, a21)
        s = vsplat(x[j3, kk])
        a30, a31 = vfma(s, w0, a30), vfma(s, w1, a31)
        s = vsplat(x[j4, kk])
        a40, a41 = vfma(s, w0, a40), vfma(s, w1, a41)
        s = vsplat(x[j5, kk])
        a50, a51 = vfma(s, w0, a50), vfma(s, w1, a51)
        w += PANEL
    o = j0 * cols + p * PANEL
    vstore(out, o, a00)
    vstore(out, o + LANES, a01)
    if j0 + 1 < n:
        vstore(out, o + cols, a10)
        vstore(out, o + cols + LANES, a11)
    if j0 + 2 < n:
        vstore(out, o + 2 * cols, a20)
        vstore(out, o + 2 * cols + LANES, a21)
    if j0 + 3 < n:
        vstore(out, o + 3 * cols, a30)
        vstore(out, o + 3 * cols + LANES, a31)
    if j0 + 4 < n:
        vstore(out, o + 4 * cols, a40)
        vstore(out, o + 4 * cols + LANES, a41)
    if j0 + 5 < n:
        vstore(out, o + 5 * cols, a50)
        vstore(out, o + 5 * cols + LANES, a51)


@njit(cache=True, parallel=True)
def _linear_kernel(x, panels, bias, out):
    n_tiles = (x.shape[0] + TILE_ROWS - 1) // TILE_ROWS
    for task in prange(panels.shape[0] * n_tiles):  # consecutive tasks share a weight panel
        _linear_tile(x, panels, bias, out, task // n_tiles, task % n_tiles * TILE_ROWS)


def linear(x: np.ndarray, packed: PackedLinear) -> np.ndarray:
    """Fast twin of :func:`linear_ref`: x (n, n_in) -> (n, n_out), weights from :func:`pack_linear`.

    Row j of the result depends on row j of x alone, bit for bit (see the module docstring).
    """
    x = _f32(x)
    n_panels, n_in, _ = packed.panels.shape
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"linear: x must be (n, {n_in}), got {x.shape}")
    out = np.empty((x.shape[0], n_panels * PANEL), np.float32)  # (n, n_out rounded up to PANEL)
    if x.shape[0]:
        _linear_kernel(x, packed.panels, packed.bias, out)
    return out if out.shape[1] == packed.n_out else np.ascontiguousarray(out[:, :packed.n_out])


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

@njit(cache=True, fastmath=True, parallel=True)
def _add_layer_norm_kernel(x, residual, weight, bias, eps, out):
    dim = x.shape[1]
    for i in prange(x.shape[0]):
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


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def add_layer_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                   eps: float) -> np.ndarray:
    """Fast twin of :func:`add_layer_norm_ref`; returns a new (n, dim) array."""
    x, residual = _f32(x), _f32(residual)
    if residual.shape != x.shape or x.ndim != 2:
        raise ValueError(f"add_layer_norm: x {x.shape} and residual {residual.shape} must be one (n, dim) shape")
    out = np.empty_like(x)
    _add_layer_norm_kernel(x, residual, _f32(weight), _f32(bias), float(eps), out)
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


@njit(cache=True, inline="always")
def _gelu_tanh_row(x, i):
    for j in range(x.shape[1]):
        v = np.float64(x[i, j])
        x[i, j] = np.float32(0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))))


@njit(cache=True, fastmath=True, parallel=True)
def _gelu_erf_parallel(x):
    for i in prange(x.shape[0]):
        _gelu_erf_row(x, i)


@njit(cache=True, fastmath=True)
def _gelu_erf_serial(x):
    for i in range(x.shape[0]):
        _gelu_erf_row(x, i)


@njit(cache=True, parallel=True)
def _gelu_tanh_parallel(x):
    for i in prange(x.shape[0]):
        _gelu_tanh_row(x, i)


@njit(cache=True)
def _gelu_tanh_serial(x):
    for i in range(x.shape[0]):
        _gelu_tanh_row(x, i)


_GELU_KERNELS = {("gelu", True): _gelu_erf_parallel, ("gelu", False): _gelu_erf_serial,
                 ("gelu_tanh", True): _gelu_tanh_parallel, ("gelu_tanh", False): _gelu_tanh_serial}


def gelu(x: np.ndarray, kind: str = "gelu", threads: bool = True) -> np.ndarray:
    """Fast twin of :func:`gelu_ref`; in place when ``x`` is a contiguous float32 (n, cols) array.

    ``threads=False`` runs on the calling thread only (for callers between BLAS calls, beside whose
    threads numba's would spin); a caller keeps to one form, the two need not round alike.
    """
    if kind not in ("gelu", "gelu_tanh"):
        raise ValueError(f"unknown GELU kind '{kind}' (expected 'gelu' or 'gelu_tanh')")
    x = _f32(x)
    _GELU_KERNELS[kind, bool(threads)](x.reshape(-1, x.shape[-1] if x.ndim else 1))
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
def _attention_kernel(q, k, v, offsets, n_heads, scale, out):
    for task in prange((offsets.shape[0] - 1) * n_heads):
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
    _attention_kernel(q, k, v, offsets, n_heads, scale, out)
    return out
