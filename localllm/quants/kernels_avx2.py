"""AVX2 matmul kernels for the quantized ggml types (x86-64 with AVX2, F16C and FMA).

Same form as ``quants.portable`` (read its docstring): a decoder turns the
32-element block ``b`` of a weight row into 32 small integers (one ``I8x32``
register) and ``(scale_0, scale_1, d, offset_0, offset_1)``. The integers are
widened to two int16 halves, multiplied by their per-16 scales where the type
has them, dotted with the int16 activations by ``vpmaddwd``
(``intrinsics.dot_i16``) and scaled once per block into eight float lanes with
one FMA.

The row kernel takes four activation rows at a time, so every weight block is
read and unpacked once for four tokens (prefill and batched decode), and the
remaining rows one by one with the very same arithmetic: a token's result does
not depend on the batch it came in (chunked prefill equals one-shot prefill
bit for bit).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import (dot_i16, fma_int, horizontal_sum, load_bits, load_f16, load_i8, load_i16x16, load_i8x32,
                         load_nibbles, load_u8, or_shifted, scale_i16, shift_right_and, widen_high,
                         widen_high_signed, widen_low, widen_low_signed, zeros_f32x8)
from .portable import BLOCK, count_tasks, k4_scale_min, quantize_activations, task_location

ROWS_PER_TASK = 8

_ZERO = np.float32(0.0)


# --------------------------------------------------------------------------- decoders (32-element blocks)
# decode(w, row, b) with ``row`` the flat byte offset of the weight row.

@njit(cache=True)
def decode_Q4_0(w, row, b):
    o = row + b * 18
    d = load_f16(w, o)
    return load_nibbles(w, o + 2), 1, 1, d, np.float32(-8.0) * d, np.float32(-8.0) * d


@njit(cache=True)
def decode_Q4_1(w, row, b):
    o = row + b * 20
    m = load_f16(w, o + 2)
    return load_nibbles(w, o + 4), 1, 1, load_f16(w, o), m, m


@njit(cache=True)
def decode_Q5_0(w, row, b):
    o = row + b * 22
    d = load_f16(w, o)
    q = or_shifted(load_nibbles(w, o + 6), load_bits(w, o + 2, 16), 0)
    return q, 1, 1, d, np.float32(-16.0) * d, np.float32(-16.0) * d


@njit(cache=True)
def decode_Q5_1(w, row, b):
    o = row + b * 24
    m = load_f16(w, o + 2)
    q = or_shifted(load_nibbles(w, o + 8), load_bits(w, o + 4, 16), 0)
    return q, 1, 1, load_f16(w, o), m, m


@njit(cache=True)
def decode_Q8_0(w, row, b):
    o = row + b * 34
    return load_i8x32(w, o + 2), 1, 1, load_f16(w, o), _ZERO, _ZERO


# --------------------------------------------------------------------------- decoders (K super-blocks)
# The 32-block b lies in super-block b // 8 (at byte o) as its sub-block s = b % 8.

@njit(cache=True)
def decode_Q2_K(w, row, b):
    o, s = row + (b >> 3) * 84, b & 7
    q = shift_right_and(load_i8x32(w, o + 16 + 32 * (s >> 2)), 2 * (s & 3), 3)
    packed0, packed1 = load_u8(w, o + 2 * s), load_u8(w, o + 2 * s + 1)
    dmin = load_f16(w, o + 82)
    return (q, packed0 & 0x0F, packed1 & 0x0F, load_f16(w, o + 80),
            -dmin * np.float32(packed0 >> 4), -dmin * np.float32(packed1 >> 4))


@njit(cache=True, inline="always")
def _q3_k_scale(w, o, i):
    """Six-bit scale of 16-sub-block i of the Q3_K block at o, bias removed (-32..31)."""
    low = (load_u8(w, o + 96 + i) & 0x0F) if i < 8 else (load_u8(w, o + 88 + i) >> 4)
    high = (load_u8(w, o + 104 + (i & 3)) >> (2 * (i >> 2))) & 3
    return (low | (high << 4)) - 32


@njit(cache=True)
def decode_Q3_K(w, row, b):
    o, s = row + (b >> 3) * 110, b & 7
    low = shift_right_and(load_i8x32(w, o + 32 + 32 * (s >> 2)), 2 * (s & 3), 3)
    high = shift_right_and(load_i8x32(w, o), s, 1)
    scale0, scale1 = _q3_k_scale(w, o, 2 * s), _q3_k_scale(w, o, 2 * s + 1)
    d = load_f16(w, o + 108)
    return (or_shifted(low, high, 2), scale0, scale1, d,
            np.float32(-4 * scale0) * d, np.float32(-4 * scale1) * d)


@njit(cache=True)
def decode_Q4_K(w, row, b):
    o, s = row + (b >> 3) * 144, b & 7
    q = shift_right_and(load_i8x32(w, o + 16 + 32 * (s >> 1)), 4 * (s & 1), 0x0F)
    scale, minimum = k4_scale_min(w, o, s)
    m = -load_f16(w, o + 2) * np.float32(minimum)
    return q, 1, 1, load_f16(w, o) * np.float32(scale), m, m


@njit(cache=True)
def decode_Q5_K(w, row, b):
    o, s = row + (b >> 3) * 176, b & 7
    low = shift_right_and(load_i8x32(w, o + 48 + 32 * (s >> 1)), 4 * (s & 1), 0x0F)
    high = shift_right_and(load_i8x32(w, o + 16), s, 1)
    scale, minimum = k4_scale_min(w, o, s)
    m = -load_f16(w, o + 2) * np.float32(minimum)
    return or_shifted(low, high, 4), 1, 1, load_f16(w, o) * np.float32(scale), m, m


@njit(cache=True)
def decode_Q6_K(w, row, b):
    o, s = row + (b >> 3) * 210, b & 7
    half, k = s >> 2, s & 3
    low = shift_right_and(load_i8x32(w, o + 64 * half + 32 * (k & 1)), 4 * (k >> 1), 0x0F)
    high = shift_right_and(load_i8x32(w, o + 128 + 32 * half), 2 * k, 3)
    scale0, scale1 = load_i8(w, o + 192 + 2 * s), load_i8(w, o + 193 + 2 * s)
    d = load_f16(w, o + 208)
    return (or_shifted(low, high, 4), scale0, scale1, d,
            np.float32(-32 * scale0) * d, np.float32(-32 * scale1) * d)


# --------------------------------------------------------------------------- row kernels

@njit(cache=True, fastmath=True)
def offset_dot(offsets, xds16, j):
    """sum_k offsets[k] * xds16[j, k]: the offset_h * dx * sum(xq) terms of a whole row (vectorized;
    the same summation order for every j, so still batch-invariant)."""
    total = np.float32(0.0)
    for k in range(offsets.shape[0]):
        total += offsets[k] * xds16[j, k]
    return total


def make_rows_task(decode, signed: bool, scaled: bool):
    """``rows_task(w, r_start, xq, xd, xds16, out, offsets)``: ``out[:, r] = x @ W[r]`` for
    ROWS_PER_TASK weight rows from ``r_start``.

    Each weight block is widened to two int16 halves (sign-extended when
    ``signed``, multiplied by its per-16 scales when ``scaled``) and dotted with
    the int16 activations by ``vpmaddwd``. Activation rows go four at a time
    through all the task's weight rows (the four rows stay in L1 while the
    weights stream); single activation rows (decode) take two weight rows at a
    time, two independent FMA chains. Every (row, token) result is the same sum
    in the same order on every path: batch-invariant.
    """

    @njit(inline="always")
    def weights(w, row, b):
        q, scale0, scale1, d, offset0, offset1 = decode(w, row, b)
        low = widen_low_signed(q) if signed else widen_low(q)
        high = widen_high_signed(q) if signed else widen_high(q)
        if scaled:
            low, high = scale_i16(low, scale0), scale_i16(high, scale1)
        return low, high, d, offset0, offset1

    @njit(inline="always")
    def block_dot(w, row, b, xq, xo, dx, acc):
        """acc + d * dx * (W[row] block b . xq block at byte xo), in eight float lanes."""
        low, high, d, _, _ = weights(w, row, b)
        return fma_int(dot_i16(low, load_i16x16(xq, xo), high, load_i16x16(xq, xo + 32)), d * dx, acc)

    @njit  # no fastmath: a row's result must not depend on the path it took (batch-invariant)
    def rows_task(w, r_start, xq, xd, xds16, out, offsets):
        n, cols = xq.shape
        n_blocks = cols // BLOCK
        row_bytes = 2 * cols  # int16 activations
        r_stop = min(r_start + ROWS_PER_TASK, w.shape[0])
        for r in range(r_start, r_stop):  # the offset terms, once per weight row (only the scalars are decoded)
            row = r * w.shape[1]
            for b in range(n_blocks):
                _, _, _, offsets[r - r_start, 2 * b], offsets[r - r_start, 2 * b + 1] = weights(w, row, b)
        j = 0
        while j + 4 <= n:
            for r in range(r_start, r_stop):
                row = r * w.shape[1]
                acc0, acc1, acc2, acc3 = zeros_f32x8(), zeros_f32x8(), zeros_f32x8(), zeros_f32x8()
                x0 = j * row_bytes
                for b in range(n_blocks):
                    low, high, d, _, _ = weights(w, row, b)
                    xo = x0 + b * 2 * BLOCK
                    acc0 = fma_int(dot_i16(low, load_i16x16(xq, xo), high, load_i16x16(xq, xo + 32)),
                                   d * xd[j, b], acc0)
                    xo += row_bytes
                    acc1 = fma_int(dot_i16(low, load_i16x16(xq, xo), high, load_i16x16(xq, xo + 32)),
                                   d * xd[j + 1, b], acc1)
                    xo += row_bytes
                    acc2 = fma_int(dot_i16(low, load_i16x16(xq, xo), high, load_i16x16(xq, xo + 32)),
                                   d * xd[j + 2, b], acc2)
                    xo += row_bytes
                    acc3 = fma_int(dot_i16(low, load_i16x16(xq, xo), high, load_i16x16(xq, xo + 32)),
                                   d * xd[j + 3, b], acc3)
                offset_row = offsets[r - r_start]
                out[j, r] = horizontal_sum(acc0) + offset_dot(offset_row, xds16, j)
                out[j + 1, r] = horizontal_sum(acc1) + offset_dot(offset_row, xds16, j + 1)
                out[j + 2, r] = horizontal_sum(acc2) + offset_dot(offset_row, xds16, j + 2)
                out[j + 3, r] = horizontal_sum(acc3) + offset_dot(offset_row, xds16, j + 3)
            j += 4
        while j < n:  # the same arithmetic, in the same order, as one row of the tile above
            x0 = j * row_bytes
            pair = r_start
            while pair + 2 <= r_stop:
                pair_row = pair * w.shape[1]
                acc0, acc1 = zeros_f32x8(), zeros_f32x8()
                for b in range(n_blocks):
                    xo = x0 + b * 2 * BLOCK
                    acc0 = block_dot(w, pair_row, b, xq, xo, xd[j, b], acc0)
                    acc1 = block_dot(w, pair_row + w.shape[1], b, xq, xo, xd[j, b], acc1)
                out[j, pair] = horizontal_sum(acc0) + offset_dot(offsets[pair - r_start], xds16, j)
                out[j, pair + 1] = horizontal_sum(acc1) + offset_dot(offsets[pair + 1 - r_start], xds16, j)
                pair += 2
            if pair < r_stop:
                last_row = pair * w.shape[1]
                acc0 = zeros_f32x8()
                for b in range(n_blocks):
                    acc0 = block_dot(w, last_row, b, xq, x0 + b * 2 * BLOCK, xd[j, b], acc0)
                out[j, pair] = horizontal_sum(acc0) + offset_dot(offsets[pair - r_start], xds16, j)
            j += 1

    return rows_task


_rows_Q4_0 = make_rows_task(decode_Q4_0, signed=False, scaled=False)
_rows_Q4_1 = make_rows_task(decode_Q4_1, signed=False, scaled=False)
_rows_Q5_0 = make_rows_task(decode_Q5_0, signed=False, scaled=False)
_rows_Q5_1 = make_rows_task(decode_Q5_1, signed=False, scaled=False)
_rows_Q8_0 = make_rows_task(decode_Q8_0, signed=True, scaled=False)
_rows_Q2_K = make_rows_task(decode_Q2_K, signed=False, scaled=True)
_rows_Q3_K = make_rows_task(decode_Q3_K, signed=False, scaled=True)
_rows_Q4_K = make_rows_task(decode_Q4_K, signed=False, scaled=False)
_rows_Q5_K = make_rows_task(decode_Q5_K, signed=False, scaled=False)
_rows_Q6_K = make_rows_task(decode_Q6_K, signed=False, scaled=True)

# One parallel entry per type (module-level, so that each has its own cache entry):
# ws a tuple of uint8 (rows_m, row_bytes) matrices, x float32 (n, cols), outs float32 (n, rows_m).


@njit(parallel=True, cache=True)
def matmul_Q4_0(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_0(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q4_1(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_1(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q5_0(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_0(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q5_1(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_1(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q8_0(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q8_0(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q2_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q2_K(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q3_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q3_K(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q4_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_K(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q5_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_K(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q6_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q6_K(ws[m], r, xq, xd, xds16, outs[m], offsets[t])


MATMULS = {
    "Q4_0": matmul_Q4_0, "Q4_1": matmul_Q4_1, "Q5_0": matmul_Q5_0, "Q5_1": matmul_Q5_1,
    "Q8_0": matmul_Q8_0, "Q2_K": matmul_Q2_K, "Q3_K": matmul_Q3_K, "Q4_K": matmul_Q4_K,
    "Q5_K": matmul_Q5_K, "Q6_K": matmul_Q6_K,
}
