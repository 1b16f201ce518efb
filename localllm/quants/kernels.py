"""Fast path for quantized tensors: numba kernels, same names and results as ``quants.ref``.

``matmul(w, x)`` multiplies by a weight matrix in its file format: activations
are quantized to int8 per 16 values (one float scale each; llama.cpp's Q8_0/Q8_1
have one per 32, and its logits sit further from the float model's), dotted
with the weights in integers and scaled once per 16-half of a block. The ``(n, cols)`` activations are handled inside one kernel, so each
weight block is read once for the whole batch (prefill, batched decode).

The model calls fused forms that save launches and passes over the
activations: ``rms_norm_matmul_many`` (RMSNorm on the way into the quantizer,
then Q/K/V or gate/up in one launch), ``matmul_add`` (residual added as the
outputs are written) and ``swiglu_matmul_add`` (SiLU(gate) * up on the way in);
each gives the same bits as its separate ops.

Two implementations, chosen at import:

* ``avx2``: ``quants.kernels_avx2`` (``vpmaddubsw`` and ``vpmaddwd`` through ``quants.intrinsics``),
  on x86-64 CPUs with AVX2, FMA and F16C;
* ``portable``: ``quants.portable``, plain numba, for every other CPU (ARM).

``LOCALLLM_KERNELS=avx2|portable|auto`` overrides the choice (tests run both);
``KERNELS`` says which one is in use. Threads: the numba ``omp`` threading
layer is preferred (about 2 us a parallel launch against about 40 us for
``workqueue``) unless ``NUMBA_THREADING_LAYER`` is set; ``NUMBA_NUM_THREADS``
sets the thread count. ``threading_layer()`` reports the layer in use. The
``omp`` threads spin between parallel regions, which keeps launches cheap on
an idle machine; on a machine busy with other work, ``OMP_WAIT_POLICY=passive``
avoids losing whole scheduler time slices at every launch (measured here under
a load of 7 on 2 cores: 25 decoded tokens/s passive against under 3 spinning).
"""
from __future__ import annotations

import functools
import os
import weakref
from typing import Sequence

import numpy as np
import numba
from numba import njit, prange

from . import GGML_BLOCK_SIZES, QTensor, UnsupportedTensorType
from . import portable

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def cpu_has_avx2() -> bool:
    """True on x86-64 CPUs with AVX2, FMA and F16C (what ``kernels_avx2`` needs)."""
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    return all(features.get(name, False) for name in ("avx2", "fma", "f16c"))


def _choose_kernels() -> str:
    choice = os.environ.get("LOCALLLM_KERNELS", "auto").strip().lower() or "auto"
    if choice not in ("auto", "avx2", "portable"):
        raise ValueError(f"LOCALLLM_KERNELS must be 'auto', 'avx2' or 'portable', got {choice!r}")
    if choice == "auto":
        return "avx2" if cpu_has_avx2() else "portable"
    if choice == "avx2" and not cpu_has_avx2():
        raise RuntimeError("LOCALLLM_KERNELS=avx2 but this CPU lacks AVX2, FMA or F16C")
    return choice


KERNELS = _choose_kernels()

# implementation name -> {ggml type -> parallel kernel (ws, x, outs)}
_MATMULS = {"portable": {**portable.MATMULS, **portable.FLOAT_MATMULS}}
if KERNELS == "avx2" or cpu_has_avx2():
    from . import kernels_avx2
    _MATMULS["avx2"] = {**kernels_avx2.MATMULS, **portable.FLOAT_MATMULS}
AVAILABLE_KERNELS = tuple(_MATMULS)


@njit(parallel=True, cache=True)
def _touch_threads(values):
    total = 0.0
    for i in prange(values.shape[0]):
        total += values[i]
    return total


def threading_layer() -> str:
    """The numba threading layer that runs the parallel kernels ('omp', 'tbb' or 'workqueue')."""
    _touch_threads(np.ones(4))
    return numba.threading_layer()


# --------------------------------------------------------------------------- weights as the kernels take them

_kernel_views: "weakref.WeakKeyDictionary[QTensor, np.ndarray]" = weakref.WeakKeyDictionary()


def _kernel_view(w: QTensor) -> np.ndarray:
    """``w.data`` as a read-only C-contiguous 2-D array: uint8 (rows, row_bytes) for quantized
    types, float32 (rows, cols) for F32, uint16 bits (rows, cols) for F16 and BF16."""
    view = _kernel_views.get(w)
    if view is not None:
        return view
    if w.ggml_type not in GGML_BLOCK_SIZES:
        raise UnsupportedTensorType(w.ggml_type, w.name)
    block_elems, block_bytes = GGML_BLOCK_SIZES[w.ggml_type]
    rows, cols = w.rows, w.cols
    dtype = {"F32": np.float32, "F16": np.float16}.get(w.ggml_type, np.uint8)
    items = cols if w.ggml_type in ("F32", "F16") else cols // block_elems * block_bytes
    data = np.asarray(w.data)
    if data.dtype != dtype or data.size != rows * items:
        raise ValueError(
            f"tensor '{w.name}': {w.ggml_type} data of shape {w.shape} must be {np.dtype(dtype).name} "
            f"with {rows}x{items} items, got {data.dtype} {data.shape}")
    view = np.ascontiguousarray(data.view(np.ndarray)).reshape(rows, items)
    if w.ggml_type in ("F16", "BF16"):
        view = view.view(np.uint16)
    view = view.view()
    view.flags.writeable = False
    _kernel_views[w] = view
    return view


def _activations(x, cols: int, what: str) -> np.ndarray:
    """x as the kernels take it: writeable C-contiguous float32 (n, cols)."""
    if not (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable):
        x = np.array(x, dtype=np.float32, order="C")
    if x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"matmul with {what}: x must be (n, {cols}), got {x.shape}")
    return x


def _kernel_for(w: QTensor, kernels: str | None):
    table = _MATMULS.get(kernels or KERNELS)
    if table is None:
        raise ValueError(f"kernels must be one of {AVAILABLE_KERNELS} on this CPU, got {kernels!r}")
    kernel = table.get(w.ggml_type)
    if kernel is None:
        raise UnsupportedTensorType(w.ggml_type, w.name)
    return kernel


# ws[0] -> {(ws[1:], kernels): plan}; a plan is (cols, rows of each w, [(kernel, views, indices)], description)
_plans: "weakref.WeakKeyDictionary[QTensor, dict]" = weakref.WeakKeyDictionary()


def _plan(ws: tuple, kernels: str | None):
    """How to multiply by the weights ``ws``: checked once, then remembered (decode calls this 200 times a token)."""
    key = (ws[1:], kernels)
    plans = _plans.get(ws[0])
    if plans is not None and key in plans:
        return plans[key]
    cols = ws[0].shape[-1]
    for w in ws:
        if len(w.shape) != 2 or w.shape[1] != cols:
            raise ValueError(f"matmul: '{w.name}' {w.shape} does not match '{ws[0].name}' {ws[0].shape}: "
                             f"every weight must be 2-D with {cols} columns")
    views = [_kernel_view(w) for w in ws]
    groups = []
    for ggml_type in dict.fromkeys(w.ggml_type for w in ws):  # one launch per type
        indices = tuple(i for i, w in enumerate(ws) if w.ggml_type == ggml_type)
        groups.append((_kernel_for(ws[indices[0]], kernels), tuple(views[i] for i in indices), indices))
    plan = (cols, tuple(view.shape[0] for view in views), groups, f"'{ws[0].name}' {ws[0].shape}")
    _plans.setdefault(ws[0], {})[key] = plan
    return plan


# Quantized kernels always get LAUNCH_WIDTH weights (Q, K, V at most), padded with empty
# matrices: numba then compiles and loads one form (``kernels_avx2.matmul_rows``, the type's row
# ranges a function pointer) for every count and type.
LAUNCH_WIDTH = 3


def _empty_view(like: np.ndarray) -> np.ndarray:
    return _empty_matrix(like.dtype.str, like.shape[1])


@functools.lru_cache(maxsize=64)
def _empty_matrix(dtype: str, row_items: int) -> np.ndarray:
    """A read-only (0, row_items) matrix (shared: nothing is ever written to it)."""
    view = np.zeros((0, row_items), dtype=dtype)
    view.flags.writeable = False
    return view


@functools.lru_cache(maxsize=64)
def _empty_output(n: int) -> np.ndarray:
    """A (n, 0) output (shared: it has no element to write)."""
    return np.zeros((n, 0), dtype=np.float32)


_NO_NORM_WEIGHT = np.zeros(0, dtype=np.float32)
_NO_UP = np.zeros((0, 0), dtype=np.float32)


def _run(ws: tuple, x, kernels: str | None, prologue: int = portable.NO_PROLOGUE,
         norm_weight: np.ndarray = _NO_NORM_WEIGHT, eps: float = 0.0, up: np.ndarray = _NO_UP,
         residual: np.ndarray | None = None) -> list[np.ndarray]:
    """outs[i] = [residual +] prologue(x) @ ws[i].T, one launch per ggml type among ws."""
    cols, rows, groups, description = _plan(ws, kernels)
    x = _activations(x, cols, description)
    if residual is None:
        outs = [np.empty((x.shape[0], r), dtype=np.float32) for r in rows]  # (n, rows) each
    else:
        outs = [np.array(residual, dtype=np.float32, order="C")]           # (n, rows), added into
        if len(ws) != 1 or outs[0].shape != (x.shape[0], rows[0]):
            raise ValueError(f"matmul_add with {description}: residual must be ({x.shape[0]}, {rows[0]}), "
                             f"got {np.shape(residual)}")
    float_x = None
    for kernel, views, indices in groups:
        group_outs = tuple(outs[i] for i in indices)
        if ws[indices[0]].ggml_type in portable.FLOAT_MATMULS:  # float weights take float activations
            if float_x is None:
                float_x = _apply_prologue(x, prologue, norm_weight, eps, up)
            products = tuple(np.empty_like(out) for out in group_outs) if residual is not None else group_outs
            kernel(views, float_x, products)
            if residual is not None:
                np.add(group_outs[0], products[0], out=group_outs[0])
        else:
            for start in range(0, len(views), LAUNCH_WIDTH):  # fixed-width tuples: one compiled form per type
                width = min(LAUNCH_WIDTH, len(views) - start)
                padding = LAUNCH_WIDTH - width
                kernel(views[start:start + width] + (_empty_view(views[0]),) * padding, x,
                       group_outs[start:start + width] + (_empty_output(x.shape[0]),) * padding,
                       prologue, norm_weight, np.float32(eps), up, residual is not None)
    return outs


def _apply_prologue(x, prologue, norm_weight, eps, up):
    from ..ops import kernels as ops_kernels
    if prologue == portable.RMS_NORM:
        return ops_kernels.rms_norm(x, norm_weight, eps)
    if prologue == portable.SWIGLU:
        return ops_kernels.swiglu(x, up)
    if prologue == portable.GEGLU:
        return ops_kernels.geglu(x, up)
    return x


# --------------------------------------------------------------------------- public API

def matmul(w: QTensor, x: np.ndarray, *, kernels: str | None = None) -> np.ndarray:
    """``x @ dequantize(w).T``: x float32 ``(n, cols)`` -> ``(n, rows)`` (x ``(cols,)`` -> ``(rows,)``).

    Quantized types use int8 activations (one scale per 16 values): results
    differ from ``quants.ref.matmul`` by that rounding, at most
    ``sum_k |W[r, k]| * scale_k / 2``, about 5e-3 of a typical output.
    F32, F16 and BF16 keep float activations. ``kernels`` picks an
    implementation from ``AVAILABLE_KERNELS`` (default ``KERNELS``).
    """
    if np.ndim(x) == 1:
        return _run((w,), np.asarray(x)[None, :], kernels)[0][0]
    return _run((w,), x, kernels)[0]


def matmul_many(ws: Sequence[QTensor], x: np.ndarray, *, kernels: str | None = None) -> list[np.ndarray]:
    """``[matmul(w, x) for w in ws]`` with one parallel launch per ggml type among ``ws``
    (e.g. Q/K/V, or gate/up: the activations are quantized once). All ``ws`` take ``cols`` inputs."""
    ws = tuple(ws)
    if not ws:
        raise ValueError("matmul_many needs at least one weight")
    if np.ndim(x) == 1:
        return [out[0] for out in _run(ws, np.asarray(x)[None, :], kernels)]
    return _run(ws, x, kernels)


def rms_norm_matmul_many(ws: Sequence[QTensor], x: np.ndarray, norm_weight: np.ndarray, eps: float, *,
                         kernels: str | None = None) -> list[np.ndarray]:
    """``matmul_many(ws, rms_norm(x, norm_weight, eps))`` in one launch per type: the norm is applied on
    the way into the activation quantizer (same bits as the two calls). x (n, cols), norm_weight (cols,)."""
    ws = tuple(ws)
    if not ws:
        raise ValueError("rms_norm_matmul_many needs at least one weight")
    norm_weight = np.ascontiguousarray(norm_weight, dtype=np.float32)
    if norm_weight.shape != (ws[0].shape[-1],):
        raise ValueError(f"rms_norm_matmul_many: norm_weight must be ({ws[0].shape[-1]},), got {norm_weight.shape}")
    return _run(ws, x, kernels, portable.RMS_NORM, norm_weight, eps)


def matmul_add(w: QTensor, x: np.ndarray, residual: np.ndarray, *, kernels: str | None = None) -> np.ndarray:
    """``residual + matmul(w, x)`` with the sum done as each output is written (a new array; the
    residual is not modified). x (n, cols), residual (n, rows)."""
    return _run((w,), x, kernels, residual=residual)[0]


def swiglu_matmul_add(w: QTensor, gate: np.ndarray, up: np.ndarray, residual: np.ndarray, *,
                      kernels: str | None = None) -> np.ndarray:
    """``residual + matmul(w, swiglu(gate, up))``: SiLU(gate) * up computed on the way into the activation
    quantizer. gate, up (n, cols), residual (n, rows)."""
    up = np.ascontiguousarray(up, dtype=np.float32)
    if np.shape(gate) != up.shape:
        raise ValueError(f"swiglu_matmul_add: gate and up must have the same shape, got {np.shape(gate)} "
                         f"and {up.shape}")
    return _run((w,), gate, kernels, portable.SWIGLU, up=up, residual=residual)[0]


def gated_matmul(w: QTensor, gate: np.ndarray, up: np.ndarray, activation: str,
                 residual: np.ndarray | None = None, *, kernels: str | None = None) -> np.ndarray:
    """``[residual +] matmul(w, activation(gate) * up)`` for a gated feed-forward's down projection
    (activation "silu" or "gelu_tanh"), the gating computed on the way into the activation quantizer.
    gate, up (n, cols); residual (n, rows) or None."""
    if activation not in portable.GATED_PROLOGUES:
        raise ValueError(f"unknown feed-forward activation '{activation}' (known: {sorted(portable.GATED_PROLOGUES)})")
    up = np.ascontiguousarray(up, dtype=np.float32)
    if np.shape(gate) != up.shape:
        raise ValueError(f"gated_matmul: gate and up must have the same shape, got {np.shape(gate)} and {up.shape}")
    return _run((w,), gate, kernels, portable.GATED_PROLOGUES[activation], up=up, residual=residual)[0]


def embedding_rows(w: QTensor, token_ids) -> np.ndarray:
    """Embedding lookup: rows ``token_ids`` of ``w`` as float32 ``(*token_ids.shape, cols)``."""
    view = _kernel_view(w)
    ids = w.checked_token_ids(token_ids)
    flat = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
    out = np.empty((flat.shape[0], w.cols), dtype=np.float32)
    if w.ggml_type in portable.FLOAT_MATMULS:
        portable.embedding_float(portable.TYPE_CODES[w.ggml_type], view, flat, out)
    else:
        portable.EMBEDDINGS[w.ggml_type](view, flat, out)
    return out.reshape(*ids.shape, w.cols)


def dequantize(t: QTensor) -> np.ndarray:
    """The whole tensor as float32 of shape ``t.shape``."""
    return embedding_rows(t, np.arange(t.rows)).reshape(t.shape)
