"""Plain-numba matmul kernels for every ggml type: the fallback for CPUs without AVX2 (ARM).

Shared by both paths: the activation quantizer, the float-weight kernels
(F32, F16, BF16) and the block decoders that ``embedding_rows`` uses.

Every quantized type is read through one form. A *decoder* turns the 32-element
block ``b`` of weight row ``r`` into small integers ``q[0:32]`` (scratch array)
and five numbers::

    weight[e] = d * scale_h * q[e] + offset_h        h = e // 16 (which half)

(``scale_0 == scale_1`` and ``offset_0 == offset_1`` for types with 32-element
sub-blocks). With activations quantized to int8 per 16 elements, ``x[e] ~ dx_h * xq[e]``,
the block's share of a dot product is::

    d * (dx_0 * scale_0 * sum_{e<16} q[e] xq[e] + dx_1 * scale_1 * sum_{e>=16} q[e] xq[e])
        + offset_0 * dx_0 * sum_{e<16} xq[e] + offset_1 * dx_1 * sum_{e>=16} xq[e]

The integer sums are exact. The offset terms use ``xsums``, computed once per call:
``xsums[2b] = dx_0 * sum_{e<16} xq[e]`` and ``xsums[2b + 1]`` = that plus
``dx_1 * sum_{e>=16} xq[e]``, the whole block's. So a type whose two offsets are equal
(32-element sub-blocks) needs one product, ``offset * xsums[2b + 1]``; the others take
``(offset_0 - offset_1) * xsums[2b] + offset_1 * xsums[2b + 1]``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..ops.kernels import (PARALLEL_MIN_ROWS, _geglu_one, _geglu_parallel, _geglu_serial, _rms_norm_one,
                           _rms_norm_parallel, _rms_norm_serial, _swiglu_one, _swiglu_parallel, _swiglu_serial)
from .intrinsics import float32_from_bits, load_u8

BLOCK = 32          # weight block: the unit of the decoders
HALF = 16           # activation block: one float scale per 16 activations
# Activations are quantized to 8 bits (|xq| <= 127), as llama.cpp's and ik_llama.cpp's are, so that one
# ``vpmaddubsw`` does 32 multiply-adds (16-bit activations took one ``vpmaddwd`` per 16, and prefill ran at
# half the speed). Their scale is per 16, not per 32 as in llama.cpp: on the golden cases the logits' distance
# to the float model is then 0.18 (SmolLM2) and 0.12 (Gemma 3) root mean square, against llama.cpp's 0.23 and
# 0.24 (per 32, like llama.cpp: about llama.cpp's own).
ACTIVATION_MAX = np.float32(127.0)
ROWS_PER_TASK = 8   # weight rows per parallel task (one scratch allocation each)


# --------------------------------------------------------------------------- scalars

@njit(cache=True, inline="always")
def f16_to_f32(bits):
    """IEEE half (as an integer 0..65535) -> float32, without F16C."""
    bits = np.int64(bits)
    sign = (bits >> 15) & 1
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:  # zero or subnormal: mantissa * 2^-24, exact in float32
        value = np.float32(mantissa) * np.float32(5.960464477539063e-08)
        return -value if sign else value
    if exponent == 31:  # inf / nan
        return float32_from_bits((sign << 31) | (0xFF << 23) | (mantissa << 13))
    return float32_from_bits((sign << 31) | ((exponent + 112) << 23) | (mantissa << 13))


@njit(cache=True, inline="always")
def _f16_at(w, offset):
    return f16_to_f32(load_u8(w, offset) | (load_u8(w, offset + 1) << 8))


# --------------------------------------------------------------------------- activations

@njit(cache=True, fastmath={"nnan", "ninf", "nsz"})  # a maximum is exact: the flags only let it vectorize
def _group_maxima(x, j, maxima):
    """maxima[j, g] = max |x[j, 16 g:16 g + 16]|."""
    for g in range(x.shape[1] // HALF):
        amax = np.float32(0.0)
        for e in range(g * HALF, g * HALF + HALF):
            amax = max(amax, abs(x[j, e]))
        maxima[j, g] = amax


@njit(cache=True, inline="always")
def _quantize_row(x, j, xq, xd, xsums):
    """Row j of x -> int8 xq (round half to even), scales xd per 16 and the scaled sums: xsums[j, 2b] = xd * the
    sum of block b's first 16 xq, xsums[j, 2b + 1] = that plus the same of its second 16 (the block's)."""
    _group_maxima(x, j, xd)  # each group's max |x| in xd first, then its scale
    for g in range(x.shape[1] // HALF):
        start = g * HALF
        d = xd[j, g] / ACTIVATION_MAX
        inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        xd[j, g] = d
        total = np.int32(0)
        for e in range(start, start + HALF):
            v = np.int32(np.rint(x[j, e] * inverse))  # int32: AVX2 converts float vectors to int32, not int64
            xq[j, e] = v
            total += v
        xsums[j, g] = d * np.float32(total) if g % 2 == 0 else xsums[j, g - 1] + d * np.float32(total)


@njit(cache=True, parallel=True)
def quantize_activations(x):
    """x float32 (n, cols), cols % 32 == 0 -> (xq int8 (n, cols), xd (n, cols/16), xsums (n, cols/16))."""
    n, cols = x.shape
    xq = np.empty((n, cols), dtype=np.int8)
    xd = np.empty((n, cols // HALF), dtype=np.float32)
    xsums = np.empty((n, cols // 16), dtype=np.float32)
    if n >= 16:
        for j in prange(n):
            _quantize_row(x, j, xq, xd, xsums)
    else:
        for j in range(n):
            _quantize_row(x, j, xq, xd, xsums)
    return xq, xd, xsums


# Prologues: what the activations are before quantization (one compiled form for all of them).
NO_PROLOGUE, RMS_NORM, SWIGLU, GEGLU = 0, 1, 2, 3
GATED_PROLOGUES = {"silu": SWIGLU, "gelu_tanh": GEGLU}


@njit(cache=True)
def prepare_activations(x, prologue, norm_weight, eps, up):
    """``quantize_activations`` of x (NO_PROLOGUE), of ``rms_norm(x, norm_weight, eps)`` (RMS_NORM), of
    ``silu(x) * up`` (SWIGLU) or of ``gelu_tanh(x) * up`` (GEGLU), computed by the very kernels of
    ``ops.kernels`` (same bits as calling them)."""
    if prologue == NO_PROLOGUE:
        return quantize_activations(x)
    h = np.empty_like(x)
    parallel = x.shape[0] >= PARALLEL_MIN_ROWS
    if prologue == RMS_NORM:
        if parallel:
            _rms_norm_parallel(x, norm_weight, eps, h)
        else:
            _rms_norm_serial(x, norm_weight, eps, h)
    elif prologue == SWIGLU:
        if parallel:
            _swiglu_parallel(x, up, h)
        else:
            _swiglu_serial(x, up, h)
    elif parallel:
        _geglu_parallel(x, up, h)
    else:
        _geglu_serial(x, up, h)
    return quantize_activations(h)


@njit(cache=True)
def prepare_activations_serial(x, prologue, norm_weight, eps, up, h, xq, xd, xsums, xd_by_block, xsums_by_block):
    """``prepare_activations`` on one thread into given arrays (for work inside a parallel region):
    h (n, cols) holds the prologue's output; xq, xd, xsums as ``quantize_activations`` returns them and
    xd_by_block, xsums_by_block their transposes. Same functions, same bits."""
    source = x
    if prologue == RMS_NORM:
        _rms_norm_serial(x, norm_weight, eps, h)
        source = h
    elif prologue == SWIGLU:
        _swiglu_serial(x, up, h)
        source = h
    elif prologue == GEGLU:
        _geglu_serial(x, up, h)
        source = h
    for j in range(x.shape[0]):
        _quantize_row(source, j, xq, xd, xsums)
    for j in range(x.shape[0]):
        for b in range(xd.shape[1]):
            xd_by_block[b, j] = xd[j, b]
        for b in range(xsums.shape[1]):
            xsums_by_block[b, j] = xsums[j, b]


@njit(cache=True)
def prepare_activations_row(x, prologue, norm_weight, eps, up, h, xq, xd, xsums, xd_by_block, xsums_by_block, j):
    """Row j of ``prepare_activations_serial``'s results (workers of one parallel region take a row each): the
    same row functions, the same bits."""
    source = x
    if prologue == RMS_NORM:
        _rms_norm_one(x, norm_weight, eps, h, j)
        source = h
    elif prologue == SWIGLU:
        _swiglu_one(x, up, h, j)
        source = h
    elif prologue == GEGLU:
        _geglu_one(x, up, h, j)
        source = h
    _quantize_row(source, j, xq, xd, xsums)
    for b in range(xd.shape[1]):
        xd_by_block[b, j] = xd[j, b]
    for b in range(xsums.shape[1]):
        xsums_by_block[b, j] = xsums[j, b]


@njit(cache=True, inline="always")
def store(out, j, r, value, accumulate):
    """out[j, r] = value, or out[j, r] + value (the residual add of ``matmul_add``, same rounding as numpy's)."""
    out[j, r] = out[j, r] + value if accumulate else value


# --------------------------------------------------------------------------- decoders (32-element blocks)

@njit(cache=True, inline="always")
def _nibbles(w, offset, q):
    for i in range(16):
        byte = load_u8(w, offset + i)
        q[i] = byte & 0x0F
        q[i + 16] = byte >> 4


@njit(cache=True, inline="always")
def _high_bits(w, offset, q):
    """OR bit j of the little-endian u32 at offset, shifted to 16, into q[j]."""
    for i in range(4):
        byte = load_u8(w, offset + i)
        for k in range(8):
            q[8 * i + k] |= ((byte >> k) & 1) << 4


@njit(cache=True)
def decode_Q4_0(w, row, b, q):
    o = row + b * 18
    d = _f16_at(w, o)
    _nibbles(w, o + 2, q)
    return d, 1, 1, np.float32(-8.0) * d, np.float32(-8.0) * d


@njit(cache=True)
def decode_Q4_1(w, row, b, q):
    o = row + b * 20
    d, m = _f16_at(w, o), _f16_at(w, o + 2)
    _nibbles(w, o + 4, q)
    return d, 1, 1, m, m


@njit(cache=True)
def decode_Q5_0(w, row, b, q):
    o = row + b * 22
    d = _f16_at(w, o)
    _nibbles(w, o + 6, q)
    _high_bits(w, o + 2, q)
    return d, 1, 1, np.float32(-16.0) * d, np.float32(-16.0) * d


@njit(cache=True)
def decode_Q5_1(w, row, b, q):
    o = row + b * 24
    d, m = _f16_at(w, o), _f16_at(w, o + 2)
    _nibbles(w, o + 8, q)
    _high_bits(w, o + 4, q)
    return d, 1, 1, m, m


@njit(cache=True)
def decode_Q8_0(w, row, b, q):
    o = row + b * 34
    for i in range(32):
        v = np.int64(load_u8(w, o + 2 + i))
        q[i] = v - 256 if v >= 128 else v
    return _f16_at(w, o), 1, 1, np.float32(0.0), np.float32(0.0)


# --------------------------------------------------------------------------- decoders (K super-blocks)
# The 32-block b lies in super-block b // 8 as its sub-block s = b % 8.

@njit(cache=True)
def decode_Q2_K(w, row, b, q):
    o, s = row + (b >> 3) * 84, b & 7
    half, j = s >> 2, s & 3
    for l in range(32):
        q[l] = (load_u8(w, o + 16 + 32 * half + l) >> (2 * j)) & 3
    d, dmin = _f16_at(w, o + 80), _f16_at(w, o + 82)
    packed0, packed1 = load_u8(w, o + 2 * s), load_u8(w, o + 2 * s + 1)
    return (d, packed0 & 0x0F, packed1 & 0x0F,
            -dmin * np.float32(packed0 >> 4), -dmin * np.float32(packed1 >> 4))


@njit(cache=True, inline="always")
def q3_k_scale(w, o, i):
    """Six-bit scale of 16-sub-block i of the Q3_K block at o, bias removed (-32..31)."""
    low = (load_u8(w, o + 96 + i) & 0x0F) if i < 8 else (load_u8(w, o + 96 + i - 8) >> 4)
    high = (load_u8(w, o + 104 + (i & 3)) >> (2 * (i >> 2))) & 3
    return np.int64(low | (high << 4)) - 32


@njit(cache=True)
def decode_Q3_K(w, row, b, q):
    o, s = row + (b >> 3) * 110, b & 7
    half, j = s >> 2, s & 3
    for l in range(32):
        low = (load_u8(w, o + 32 + 32 * half + l) >> (2 * j)) & 3
        high = (load_u8(w, o + l) >> s) & 1
        q[l] = low | (high << 2)  # q + 4, in 0..7
    d = _f16_at(w, o + 108)
    scale0, scale1 = q3_k_scale(w, o, 2 * s), q3_k_scale(w, o, 2 * s + 1)
    return d, scale0, scale1, np.float32(-4 * scale0) * d, np.float32(-4 * scale1) * d


@njit(cache=True, inline="always")
def k4_scale_min(w, o, s):
    """Q4_K / Q5_K: six-bit scale and min of sub-block s from the 12 bytes at o + 4."""
    p = o + 4
    if s < 4:
        return load_u8(w, p + s) & 63, load_u8(w, p + s + 4) & 63
    scale = (load_u8(w, p + s + 4) & 0x0F) | ((load_u8(w, p + s - 4) >> 6) << 4)
    minimum = (load_u8(w, p + s + 4) >> 4) | ((load_u8(w, p + s) >> 6) << 4)
    return scale, minimum


@njit(cache=True)
def decode_Q4_K(w, row, b, q):
    o, s = row + (b >> 3) * 144, b & 7
    shift = 4 * (s & 1)
    for l in range(32):
        q[l] = (load_u8(w, o + 16 + 32 * (s >> 1) + l) >> shift) & 0x0F
    scale, minimum = k4_scale_min(w, o, s)
    d = _f16_at(w, o) * np.float32(scale)
    m = -_f16_at(w, o + 2) * np.float32(minimum)
    return d, 1, 1, m, m


@njit(cache=True)
def decode_Q5_K(w, row, b, q):
    o, s = row + (b >> 3) * 176, b & 7
    shift = 4 * (s & 1)
    for l in range(32):
        low = (load_u8(w, o + 48 + 32 * (s >> 1) + l) >> shift) & 0x0F
        q[l] = low | (((load_u8(w, o + 16 + l) >> s) & 1) << 4)
    scale, minimum = k4_scale_min(w, o, s)
    d = _f16_at(w, o) * np.float32(scale)
    m = -_f16_at(w, o + 2) * np.float32(minimum)
    return d, 1, 1, m, m


@njit(cache=True)
def decode_Q6_K(w, row, b, q):
    o, s = row + (b >> 3) * 210, b & 7
    half, k = s >> 2, s & 3
    low_at, low_shift = o + 64 * half + 32 * (k & 1), 4 * (k >> 1)
    for l in range(32):
        low = (load_u8(w, low_at + l) >> low_shift) & 0x0F
        high = (load_u8(w, o + 128 + 32 * half + l) >> (2 * k)) & 3
        q[l] = low | (high << 4)  # q + 32, in 0..63
    d = _f16_at(w, o + 208)
    scale0, scale1 = np.int64(load_u8(w, o + 192 + 2 * s)), np.int64(load_u8(w, o + 193 + 2 * s))
    scale0 = scale0 - 256 if scale0 >= 128 else scale0
    scale1 = scale1 - 256 if scale1 >= 128 else scale1
    return d, scale0, scale1, np.float32(-32 * scale0) * d, np.float32(-32 * scale1) * d


# --------------------------------------------------------------------------- quantized matmul

@njit(cache=True, inline="always")
def count_tasks(ws, rows_per_task):
    """Number of tasks of ``rows_per_task`` rows over all matrices of the tuple ws."""
    total = 0
    for m in range(len(ws)):
        total += (ws[m].shape[0] + rows_per_task - 1) // rows_per_task
    return total


@njit(cache=True)
def task_location(ws, t, rows_per_task):
    """Task t -> (matrix index, first row): matrices in order, each cut into tasks of rows_per_task rows.

    Both come back as int64 (a prange index may be unsigned, and unsigned times signed is float in numba)."""
    remaining = np.int64(t)
    for m in range(len(ws)):
        count = (ws[m].shape[0] + rows_per_task - 1) // rows_per_task
        if remaining < count:
            return m, remaining * rows_per_task
        remaining -= count
    return 0, 0


def njit_named(name: str, **options):
    """``njit(**options)`` for a kernel a factory makes, compiled under ``name`` (its ``__name__`` and
    ``__qualname__``). numba names a compiled function by module, qualified name and a counter of the process
    that compiled it, and links what a kernel calls into the kernel's own code as one-definition symbols: two
    closures of one factory, compiled by two processes into one kernel cache, could get one symbol name, and a
    process loading both kept one definition for both (a type's rows computed by another type's decoder;
    tests/test_kernel_cache_processes.py). Every closure that is not inlined needs a name of its own."""
    def decorate(function):
        function.__name__ = function.__qualname__ = name
        return njit(**options)(function)
    return decorate


def make_rows_task(decode):
    """``rows_task(w, r_start, xq, xd, xsums, out)``: ``out[:, r] = x @ W[r]`` for
    ROWS_PER_TASK rows from ``r_start``, each weight block decoded once for all n."""

    @njit_named(f"rows_task_of_{decode.py_func.__name__}")  # no fastmath: each row's sum in a fixed order
    def rows_task(w, r_start, xq, xd, xsums, out, accumulate):
        n = xq.shape[0]
        q = np.empty(BLOCK, dtype=np.int32)
        acc = np.empty(n, dtype=np.float32)
        for r in range(r_start, min(r_start + ROWS_PER_TASK, w.shape[0])):
            acc[:] = 0.0
            for b in range(xd.shape[1] // 2):
                d, scale0, scale1, offset0, offset1 = decode(w, r * w.shape[1], b, q)
                start = b * BLOCK
                for j in range(n):
                    dot0 = 0
                    dot1 = 0
                    for e in range(16):
                        dot0 += np.int64(q[e]) * xq[j, start + e]
                        dot1 += np.int64(q[e + 16]) * xq[j, start + 16 + e]
                    acc[j] += d * (np.float32(scale0 * dot0) * xd[j, 2 * b]
                                   + np.float32(scale1 * dot1) * xd[j, 2 * b + 1]) \
                        + (offset0 - offset1) * xsums[j, 2 * b] + offset1 * xsums[j, 2 * b + 1]
            for j in range(n):
                store(out, j, r, acc[j], accumulate)

    return rows_task


_rows_Q4_0 = make_rows_task(decode_Q4_0)
_rows_Q4_1 = make_rows_task(decode_Q4_1)
_rows_Q5_0 = make_rows_task(decode_Q5_0)
_rows_Q5_1 = make_rows_task(decode_Q5_1)
_rows_Q8_0 = make_rows_task(decode_Q8_0)
_rows_Q2_K = make_rows_task(decode_Q2_K)
_rows_Q3_K = make_rows_task(decode_Q3_K)
_rows_Q4_K = make_rows_task(decode_Q4_K)
_rows_Q5_K = make_rows_task(decode_Q5_K)
_rows_Q6_K = make_rows_task(decode_Q6_K)

# One parallel entry per type (module-level, so that each has its own cache entry):
# ws a tuple of uint8 (rows_m, row_bytes) matrices, x float32 (n, cols), outs float32 (n, rows_m);
# the activations are prologue(x) (see prepare_activations), added into outs when accumulate.


@njit(parallel=True, cache=True)
def matmul_Q4_0(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_0(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q4_1(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_1(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q5_0(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_0(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q5_1(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_1(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q8_0(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q8_0(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q2_K(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q2_K(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q3_K(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q3_K(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q4_K(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_K(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q5_K(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_K(ws[m], r, xq, xd, xsums, outs[m], accumulate)


@njit(parallel=True, cache=True)
def matmul_Q6_K(ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q6_K(ws[m], r, xq, xd, xsums, outs[m], accumulate)


MATMULS = {
    "Q4_0": matmul_Q4_0, "Q4_1": matmul_Q4_1, "Q5_0": matmul_Q5_0, "Q5_1": matmul_Q5_1,
    "Q8_0": matmul_Q8_0, "Q2_K": matmul_Q2_K, "Q3_K": matmul_Q3_K, "Q4_K": matmul_Q4_K,
    "Q5_K": matmul_Q5_K, "Q6_K": matmul_Q6_K,
}
DECODERS = {
    "Q4_0": decode_Q4_0, "Q4_1": decode_Q4_1, "Q5_0": decode_Q5_0, "Q5_1": decode_Q5_1,
    "Q8_0": decode_Q8_0, "Q2_K": decode_Q2_K, "Q3_K": decode_Q3_K, "Q4_K": decode_Q4_K,
    "Q5_K": decode_Q5_K, "Q6_K": decode_Q6_K,
}


# --------------------------------------------------------------------------- float weights
# F32 data is float32 (rows, cols); F16 and BF16 data are passed as their uint16 bits (rows, cols).

@njit(cache=True, inline="always")
def _row_F32(w, r, buffer):
    for k in range(w.shape[1]):
        buffer[k] = w[r, k]


@njit(cache=True, inline="always")
def _row_F16(w, r, buffer):
    for k in range(w.shape[1]):
        buffer[k] = f16_to_f32(w[r, k])


@njit(cache=True, inline="always")
def _row_BF16(w, r, buffer):
    for k in range(w.shape[1]):
        buffer[k] = float32_from_bits(np.int64(w[r, k]) << 16)


def make_float_rows_task(decode_row):
    """Like ``make_rows_task`` for float weights: x stays float32, each row decoded once for all n."""

    @njit_named(f"rows_task_of_{decode_row.py_func.__name__}", fastmath=True)
    def rows_task(w, r_start, x, out):
        n, cols = x.shape
        buffer = np.empty(cols, dtype=np.float32)
        for r in range(r_start, min(r_start + ROWS_PER_TASK, w.shape[0])):
            decode_row(w, r, buffer)
            for j in range(n):
                acc = np.float32(0.0)
                for k in range(cols):
                    acc += buffer[k] * x[j, k]
                out[j, r] = acc

    return rows_task


_rows_F32 = make_float_rows_task(_row_F32)
_rows_F16 = make_float_rows_task(_row_F16)
_rows_BF16 = make_float_rows_task(_row_BF16)


@njit(parallel=True, cache=True)
def matmul_F32(ws, x, outs):
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_F32(ws[m], r, x, outs[m])


@njit(parallel=True, cache=True)
def matmul_F16(ws, x, outs):
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_F16(ws[m], r, x, outs[m])


@njit(parallel=True, cache=True)
def matmul_BF16(ws, x, outs):
    for t in prange(count_tasks(ws, ROWS_PER_TASK)):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_BF16(ws[m], r, x, outs[m])


FLOAT_MATMULS = {"F32": matmul_F32, "F16": matmul_F16, "BF16": matmul_BF16}

# --------------------------------------------------------------------------- embedding rows

TYPE_CODES = {name: code for code, name in enumerate(
    ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F32", "F16", "BF16"))}


@njit(inline="always")
def _embedding_rows(decode, w, ids, out):
    """out[i] = dequantized row ids[i] of w, block by block through ``decode`` (the type's decoder)."""
    q = np.empty(BLOCK, dtype=np.int32)
    for i in range(ids.shape[0]):
        for b in range(out.shape[1] // BLOCK):
            d, scale0, scale1, offset0, offset1 = decode(w, ids[i] * w.shape[1], b, q)
            for e in range(16):
                out[i, b * BLOCK + e] = d * np.float32(scale0 * q[e]) + offset0
                out[i, b * BLOCK + 16 + e] = d * np.float32(scale1 * q[16 + e]) + offset1


# One function per type (module-level, so that each has its own cache entry and a model compiles only its own):
# out[i] = dequantized row ids[i] of the quantized w (uint8 (rows, row_bytes)).

@njit(cache=True)
def embedding_Q4_0(w, ids, out):
    _embedding_rows(decode_Q4_0, w, ids, out)


@njit(cache=True)
def embedding_Q4_1(w, ids, out):
    _embedding_rows(decode_Q4_1, w, ids, out)


@njit(cache=True)
def embedding_Q5_0(w, ids, out):
    _embedding_rows(decode_Q5_0, w, ids, out)


@njit(cache=True)
def embedding_Q5_1(w, ids, out):
    _embedding_rows(decode_Q5_1, w, ids, out)


@njit(cache=True)
def embedding_Q8_0(w, ids, out):
    _embedding_rows(decode_Q8_0, w, ids, out)


@njit(cache=True)
def embedding_Q2_K(w, ids, out):
    _embedding_rows(decode_Q2_K, w, ids, out)


@njit(cache=True)
def embedding_Q3_K(w, ids, out):
    _embedding_rows(decode_Q3_K, w, ids, out)


@njit(cache=True)
def embedding_Q4_K(w, ids, out):
    _embedding_rows(decode_Q4_K, w, ids, out)


@njit(cache=True)
def embedding_Q5_K(w, ids, out):
    _embedding_rows(decode_Q5_K, w, ids, out)


@njit(cache=True)
def embedding_Q6_K(w, ids, out):
    _embedding_rows(decode_Q6_K, w, ids, out)


EMBEDDINGS = {
    "Q4_0": embedding_Q4_0, "Q4_1": embedding_Q4_1, "Q5_0": embedding_Q5_0, "Q5_1": embedding_Q5_1,
    "Q8_0": embedding_Q8_0, "Q2_K": embedding_Q2_K, "Q3_K": embedding_Q3_K, "Q4_K": embedding_Q4_K,
    "Q5_K": embedding_Q5_K, "Q6_K": embedding_Q6_K,
}


@njit(cache=True)
def embedding_float(code, w, ids, out):
    """out[i] = row ids[i] of F32 / F16 / BF16 weights (code 10, 11, 12)."""
    for i in range(ids.shape[0]):
        if code == 10:
            _row_F32(w, ids[i], out[i])
        elif code == 11:
            _row_F16(w, ids[i], out[i])
        else:
            _row_BF16(w, ids[i], out[i])
