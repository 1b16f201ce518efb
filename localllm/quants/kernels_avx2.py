"""AVX2 matmul kernels for the quantized ggml types (x86-64 with AVX2, F16C and FMA).

Same form as ``quants.portable`` (read its docstring): a decoder turns the
32-element block ``b`` of a weight row into 32 small integers (one ``I8x32``
register) and ``(scale_0, scale_1, d, offset_0, offset_1)``. The integers are
widened to two int16 halves, multiplied by their per-16 scales where the type
has them, and dotted with the int16 activations by ``vpmaddwd``
(``intrinsics.dot_i16``): an exact integer per block, turned into float once.

The row kernel puts eight dot products in the lanes of one vector: eight
tokens of a weight row in prefill and batched decode (every weight block is
read and unpacked once for eight tokens), eight weight rows of one token in
decode. Both do the same arithmetic per (row, token), and leftovers one at a
time too: a token's result does not depend on the batch it came in (chunked
prefill equals one-shot prefill bit for bit).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import (dot_i16, fma_f32, fma_f32x8, lane_f32, load_bits, load_f16, load_f32x8, load_i8, load_i16x16,
                         load_i8x32, load_nibbles, load_nibbles_i16, load_u8, mul_f32x8, or_shifted, pack_f32x8, prefetch, scale_i16,
                         shift_right_and, splat_f32x8, sum_lanes_by8, sum_lanes_i32, to_f32x8, widen_high,
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
def decode_Q4_0_wide(w, row, b):
    """``decode_Q4_0`` with the nibbles already widened to two I16x16 halves."""
    o = row + b * 18
    d = load_f16(w, o)
    low, high = load_nibbles_i16(w, o + 2)
    return low, high, 1, 1, d, np.float32(-8.0) * d, np.float32(-8.0) * d


@njit(cache=True)
def decode_Q4_1_wide(w, row, b):
    """``decode_Q4_1`` with the nibbles already widened to two I16x16 halves."""
    o = row + b * 20
    m = load_f16(w, o + 2)
    low, high = load_nibbles_i16(w, o + 4)
    return low, high, 1, 1, load_f16(w, o), m, m


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


def make_rows_task(decode, signed: bool, scaled: bool, wide: bool = False):
    """``rows_task(w, r_start, xq, xd, xd_by_block, xds16, out, offsets)``: ``out[:, r] = x @ W[r]``
    for ROWS_PER_TASK weight rows from ``r_start``.

    Each weight block is widened to two int16 halves (sign-extended when
    ``signed``, multiplied by its per-16 scales when ``scaled``) and dotted with
    the int16 activations by ``vpmaddwd``. Every (row, token) result is the same
    arithmetic on every path, so it does not depend on the batch::

        acc = 0;  for each block b:  acc = fma(float(s_b) * dx_b, d_b, acc)
        out = acc + offset terms

    where ``s_b`` is the exact integer dot of the block. The paths differ only
    in what the eight lanes of a vector hold: eight tokens of one weight row
    (prefill: each weight block is decoded once for eight tokens) or eight
    weight rows of one token (decode); leftovers go one at a time.
    """

    @njit(inline="always")
    def widened_weights(w, row, b):
        q, scale0, scale1, d, offset0, offset1 = decode(w, row, b)
        low = widen_low_signed(q) if signed else widen_low(q)
        high = widen_high_signed(q) if signed else widen_high(q)
        if scaled:
            low, high = scale_i16(low, scale0), scale_i16(high, scale1)
        return low, high, d, offset0, offset1

    @njit(inline="always")
    def wide_weights(w, row, b):  # the decoder widens itself
        low, high, _, _, d, offset0, offset1 = decode(w, row, b)
        return low, high, d, offset0, offset1

    weights = wide_weights if wide else widened_weights

    @njit  # no fastmath: every path must round alike (batch-invariant)
    def rows_task(w, r_start, xq, xd, xd_by_block, xds16, out, offsets):
        n, cols = xq.shape
        n_blocks = cols // BLOCK
        row_bytes = 2 * cols  # int16 activations
        stride = w.shape[1]
        r_stop = min(r_start + ROWS_PER_TASK, w.shape[0])
        for r in range(r_start, r_stop):  # the offset terms, once per weight row (only the scalars are decoded)
            for b in range(n_blocks):
                _, _, _, offsets[r - r_start, 2 * b], offsets[r - r_start, 2 * b + 1] = weights(w, r * stride, b)
        j = 0
        while j + 8 <= n:  # eight tokens in the lanes: each weight block decoded once for all eight
            for r in range(r_start, r_stop):
                acc = zeros_f32x8()
                for b in range(n_blocks):
                    low, high, d, _, _ = weights(w, r * stride, b)
                    xo = j * row_bytes + b * 2 * BLOCK
                    sums = sum_lanes_by8(
                        dot_i16(low, load_i16x16(xq, xo), high, load_i16x16(xq, xo + 32)),
                        dot_i16(low, load_i16x16(xq, xo + row_bytes), high, load_i16x16(xq, xo + row_bytes + 32)),
                        dot_i16(low, load_i16x16(xq, xo + 2 * row_bytes), high,
                                load_i16x16(xq, xo + 2 * row_bytes + 32)),
                        dot_i16(low, load_i16x16(xq, xo + 3 * row_bytes), high,
                                load_i16x16(xq, xo + 3 * row_bytes + 32)),
                        dot_i16(low, load_i16x16(xq, xo + 4 * row_bytes), high,
                                load_i16x16(xq, xo + 4 * row_bytes + 32)),
                        dot_i16(low, load_i16x16(xq, xo + 5 * row_bytes), high,
                                load_i16x16(xq, xo + 5 * row_bytes + 32)),
                        dot_i16(low, load_i16x16(xq, xo + 6 * row_bytes), high,
                                load_i16x16(xq, xo + 6 * row_bytes + 32)),
                        dot_i16(low, load_i16x16(xq, xo + 7 * row_bytes), high,
                                load_i16x16(xq, xo + 7 * row_bytes + 32)))
                    scaled_sums = mul_f32x8(to_f32x8(sums), load_f32x8(xd_by_block, 4 * (b * n + j)))
                    acc = fma_f32x8(scaled_sums, splat_f32x8(d), acc)
                for lane in range(8):
                    out[j + lane, r] = lane_f32(acc, lane) + offset_dot(offsets[r - r_start], xds16, j + lane)
            j += 8
        while j < n:  # one token: eight weight rows in the lanes, then the leftover rows
            r = r_start
            while r + 8 <= r_stop:
                acc = zeros_f32x8()
                row = r * stride
                # eight rows read side by side defeat the hardware prefetcher: fetch the next
                # eight rows (this thread's next task) ahead, a share of them per block
                share = 8 * stride // n_blocks
                for b in range(n_blocks):
                    ahead = row + 8 * stride + b * share
                    for line in range(0, share + 63, 64):
                        prefetch(w, ahead + line)
                    xo = j * row_bytes + b * 2 * BLOCK
                    x_low, x_high = load_i16x16(xq, xo), load_i16x16(xq, xo + 32)
                    low, high, d0, _, _ = weights(w, row, b)
                    s0 = dot_i16(low, x_low, high, x_high)
                    low, high, d1, _, _ = weights(w, row + stride, b)
                    s1 = dot_i16(low, x_low, high, x_high)
                    low, high, d2, _, _ = weights(w, row + 2 * stride, b)
                    s2 = dot_i16(low, x_low, high, x_high)
                    low, high, d3, _, _ = weights(w, row + 3 * stride, b)
                    s3 = dot_i16(low, x_low, high, x_high)
                    low, high, d4, _, _ = weights(w, row + 4 * stride, b)
                    s4 = dot_i16(low, x_low, high, x_high)
                    low, high, d5, _, _ = weights(w, row + 5 * stride, b)
                    s5 = dot_i16(low, x_low, high, x_high)
                    low, high, d6, _, _ = weights(w, row + 6 * stride, b)
                    s6 = dot_i16(low, x_low, high, x_high)
                    low, high, d7, _, _ = weights(w, row + 7 * stride, b)
                    s7 = dot_i16(low, x_low, high, x_high)
                    scaled_sums = mul_f32x8(to_f32x8(sum_lanes_by8(s0, s1, s2, s3, s4, s5, s6, s7)),
                                            splat_f32x8(xd[j, b]))
                    acc = fma_f32x8(scaled_sums, pack_f32x8(d0, d1, d2, d3, d4, d5, d6, d7), acc)
                for lane in range(8):
                    out[j, r + lane] = lane_f32(acc, lane) + offset_dot(offsets[r + lane - r_start], xds16, j)
                r += 8
            while r < r_stop:
                total = np.float32(0.0)
                for b in range(n_blocks):
                    xo = j * row_bytes + b * 2 * BLOCK
                    low, high, d, _, _ = weights(w, r * stride, b)
                    s = sum_lanes_i32(dot_i16(low, load_i16x16(xq, xo), high, load_i16x16(xq, xo + 32)))
                    total = fma_f32(np.float32(s) * xd[j, b], d, total)
                out[j, r] = total + offset_dot(offsets[r - r_start], xds16, j)
                r += 1
            j += 1

    return rows_task


_rows_Q4_0 = make_rows_task(decode_Q4_0_wide, signed=False, scaled=False, wide=True)
_rows_Q4_1 = make_rows_task(decode_Q4_1_wide, signed=False, scaled=False, wide=True)
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
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_0(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q4_1(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_1(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q5_0(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_0(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q5_1(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_1(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q8_0(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q8_0(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q2_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q2_K(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q3_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q3_K(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q4_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q4_K(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q5_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q5_K(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


@njit(parallel=True, cache=True)
def matmul_Q6_K(ws, x, outs):
    xq, xd, xds16 = quantize_activations(x)
    xd_by_block = np.ascontiguousarray(xd.T)  # (n_blocks, n): eight tokens' scales side by side
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    offsets = np.empty((n_tasks, ROWS_PER_TASK, xds16.shape[1]), dtype=np.float32)  # scratch: offsets per task
    for t in prange(n_tasks):
        m, r = task_location(ws, t, ROWS_PER_TASK)
        _rows_Q6_K(ws[m], r, xq, xd, xd_by_block, xds16, outs[m], offsets[t])


MATMULS = {
    "Q4_0": matmul_Q4_0, "Q4_1": matmul_Q4_1, "Q5_0": matmul_Q5_0, "Q5_1": matmul_Q5_1,
    "Q8_0": matmul_Q8_0, "Q2_K": matmul_Q2_K, "Q3_K": matmul_Q3_K, "Q4_K": matmul_Q4_K,
    "Q5_K": matmul_Q5_K, "Q6_K": matmul_Q6_K,
}
