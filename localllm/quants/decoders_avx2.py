"""The AVX2 block decoders of ``quants.kernels_avx2``: a weight row's 32-element block as 32 small integers and its
scales, and for the K types the eight-row decode forms of one token (``eight_rows_<TYPE>``).

``decode_<TYPE>(w, row, b)`` (``row`` the flat byte offset of the weight row) returns the block's integers (one
``I8x32``; the ``_wide`` forms two ``I16x16`` halves) and ``(scale_0, scale_1, d, offset_0, offset_1)``, as
``quants.portable``'s decoders do; the row kernels of ``kernels_avx2`` dot them with the int8 activations.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .intrinsics import (add_f32x8, add_i32x8, bits_i32x8, dot_pairs_i16, dot_u8_i8, fma_f32x8, halves_i16x16,
                         load_bits, load_f16, load_f16_pairs_x8_strided, load_f16x8_strided, load_i8, load_i8x32,
                         load_nibbles, load_u32x8_strided, load_u8, mul_f32x8, mul_i32x8, negate_f32x8, or_i32x8,
                         or_shifted, prefetch, shift_left_i32x8, shift_right_and, signed_byte_i32x8, splat_f32x8,
                         splat_i32x8, sum_halves_by8, to_f32x8, zeros_f32x8)
from .portable import BLOCK, k4_scale_min

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

@njit(inline="always")
def q2_k_quants(w, o, s):
    """The 32 two-bit quants (0..3) of sub-block s of the Q2_K super-block at byte o."""
    return shift_right_and(load_i8x32(w, o + 16 + 32 * (s >> 2)), 2 * (s & 3), 3)


@njit(inline="always")
def q3_k_quants(w, o, s):
    """The 32 three-bit quants (q + 4, 0..7) of sub-block s of the Q3_K super-block at byte o: two bits from qs,
    bit 2 = bit s of the hmask bytes."""
    low = shift_right_and(load_i8x32(w, o + 32 + 32 * (s >> 2)), 2 * (s & 3), 3)
    return or_shifted(low, shift_right_and(load_i8x32(w, o), s, 1), 2)


@njit(cache=True)
def decode_Q2_K(w, row, b):
    o, s = row + (b >> 3) * 84, b & 7
    q = q2_k_quants(w, o, s)
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
    scale0, scale1 = _q3_k_scale(w, o, 2 * s), _q3_k_scale(w, o, 2 * s + 1)
    d = load_f16(w, o + 108)
    return (q3_k_quants(w, o, s), scale0, scale1, d,
            np.float32(-4 * scale0) * d, np.float32(-4 * scale1) * d)


@njit(inline="always")
def q4_k_quants(w, o, s):
    """The 32 four-bit quants (0..15) of sub-block s of the Q4_K super-block at byte o."""
    return shift_right_and(load_i8x32(w, o + 16 + 32 * (s >> 1)), 4 * (s & 1), 0x0F)


@njit(inline="always")
def q5_k_quants(w, o, s):
    """The 32 five-bit quants (0..31) of sub-block s of the Q5_K super-block at byte o."""
    low = shift_right_and(load_i8x32(w, o + 48 + 32 * (s >> 1)), 4 * (s & 1), 0x0F)
    high = shift_right_and(load_i8x32(w, o + 16), s, 1)
    return or_shifted(low, high, 4)


@njit(inline="always")
def q6_k_quants(w, o, s):
    """The 32 six-bit quants (q + 32, 0..63) of 32-sub-block s of the Q6_K super-block at byte o."""
    half, k = s >> 2, s & 3
    low = shift_right_and(load_i8x32(w, o + 64 * half + 32 * (k & 1)), 4 * (k >> 1), 0x0F)
    high = shift_right_and(load_i8x32(w, o + 128 + 32 * half), 2 * k, 3)
    return or_shifted(low, high, 4)


@njit(cache=True)
def decode_Q4_K(w, row, b):
    o, s = row + (b >> 3) * 144, b & 7
    scale, minimum = k4_scale_min(w, o, s)
    m = -load_f16(w, o + 2) * np.float32(minimum)
    return q4_k_quants(w, o, s), 1, 1, load_f16(w, o) * np.float32(scale), m, m


@njit(cache=True)
def decode_Q5_K(w, row, b):
    o, s = row + (b >> 3) * 176, b & 7
    scale, minimum = k4_scale_min(w, o, s)
    m = -load_f16(w, o + 2) * np.float32(minimum)
    return q5_k_quants(w, o, s), 1, 1, load_f16(w, o) * np.float32(scale), m, m


@njit(cache=True)
def decode_Q6_K(w, row, b):
    o, s = row + (b >> 3) * 210, b & 7
    scale0, scale1 = load_i8(w, o + 192 + 2 * s), load_i8(w, o + 193 + 2 * s)
    d = load_f16(w, o + 208)
    return (q6_k_quants(w, o, s), scale0, scale1, d,
            np.float32(-32 * scale0) * d, np.float32(-32 * scale1) * d)


# --------------------------------------------------------------------------- eight weight rows of one token
# Decode of a K type reads eight rows' super-blocks side by side, as ``make_rows_task``'s
# loop does, with the same arithmetic per (row, token), operation for operation, so that every
# path gives the same bits. What differs is how the numbers are found: the scale fields of a
# super-block are unpacked for the eight rows at once (one 32-bit lane per row, four packed
# bytes in it) once per super-block, not per row and 32-block, and the offsets (-dmin * min,
# -32 * scale * d, ...) come from them too (no offset table).

def make_eight_row_dots(quants):
    """``dots(w, o, stride, s, x)`` -> (low, high): the exact dots of sub-block s of the eight rows (from byte o,
    ``stride`` apart) with the activation block x, their first 16-half in lane r for row r, and their second."""

    @njit(inline="always")
    def row_dot(w, o, s, x):
        return dot_pairs_i16(dot_u8_i8(quants(w, o, s), x), halves_i16x16(1, 1))

    @njit(inline="always")
    def eight_row_dots(w, o, stride, s, x):
        return sum_halves_by8(row_dot(w, o, s, x), row_dot(w, o + stride, s, x), row_dot(w, o + 2 * stride, s, x),
                              row_dot(w, o + 3 * stride, s, x), row_dot(w, o + 4 * stride, s, x),
                              row_dot(w, o + 5 * stride, s, x), row_dot(w, o + 6 * stride, s, x),
                              row_dot(w, o + 7 * stride, s, x))

    return eight_row_dots


@njit(inline="always")
def prefetch_ahead(w, at, share):
    """Eight rows read side by side defeat the hardware prefetcher: ``share`` bytes from ``at`` (of the next
    task's rows) are fetched ahead."""
    for line in range(0, share + 63, 64):
        prefetch(w, at + line)


@njit(inline="always")
def scaled_halves(low, high, x_low_scale, x_high_scale):
    """float(low) * dx_0 + float(high) * dx_1 (one multiply, one FMA) for int32 vectors of a block's two
    16-halves: what every path multiplies a block's d by (``kernels_avx2.make_rows_task``)."""
    return fma_f32x8(to_f32x8(high), x_high_scale, mul_f32x8(to_f32x8(low), x_low_scale))


def make_eight_rows_k4(quants, block_bytes):
    """``eight_rows(w, row, stride, xq, j, xd, xsums)`` for Q4_K / Q5_K: float32 lanes = the dots of the
    rows from byte ``row`` (``stride`` apart) with token j. Per super-block: the eight rows' d and dmin, and
    their six-bit scales and mins from the 12 packed bytes (bytes 0-3: scales 0-3, and in bits 6-7 bits 4-5
    of scales 4-7; bytes 4-7: the same for the mins; bytes 8-11: bits 0-3 of scales 4-7, and in bits 4-7
    those of mins 4-7), four bytes a lane."""
    dots = make_eight_row_dots(quants)

    @njit(inline="always")
    def sub_block(w, o, stride, s, i, xq, j, xd, xsums, d, minus_dmin, packed_scales, packed_mins, sums):
        """Sub-block s of super-block i (at byte o of the first row): the sums (acc, offsets) go on; one offset
        for the sub-block, by the block's activation sum (xsums[2b + 1]): make_rows_task's high chain."""
        acc, offsets = sums
        b = 8 * i + s
        low, high = dots(w, o, stride, s, load_i8x32(xq, j * xq.shape[1] + b * BLOCK))
        scale = to_f32x8(bits_i32x8(packed_scales, 8 * (s & 3), 0xFF))
        offset = mul_f32x8(minus_dmin, to_f32x8(bits_i32x8(packed_mins, 8 * (s & 3), 0xFF)))
        return (fma_f32x8(scaled_halves(low, high, splat_f32x8(xd[j, 2 * b]), splat_f32x8(xd[j, 2 * b + 1])),
                          mul_f32x8(d, scale), acc),
                fma_f32x8(offset, splat_f32x8(xsums[j, 2 * b + 1]), offsets))

    @njit(inline="always")
    def eight_rows(w, row, stride, xq, j, xd, xsums):
        n_super = xq.shape[1] // 256
        share = 8 * block_bytes  # a constant: the prefetch loop unrolls
        sums = (zeros_f32x8(), zeros_f32x8())      # (acc, offsets): make_rows_task's acc and high chain
        for i in range(n_super):
            o = row + i * block_bytes
            prefetch_ahead(w, row + 8 * stride + i * share, share)
            d, dmin = load_f16_pairs_x8_strided(w, o, stride)
            minus_dmin = negate_f32x8(dmin)
            packed0, packed1 = load_u32x8_strided(w, o + 4, stride), load_u32x8_strided(w, o + 8, stride)
            packed2 = load_u32x8_strided(w, o + 12, stride)
            scales_low, mins_low = bits_i32x8(packed0, 0, 0x3F3F3F3F), bits_i32x8(packed1, 0, 0x3F3F3F3F)
            scales_high = or_i32x8(bits_i32x8(packed2, 0, 0x0F0F0F0F), bits_i32x8(packed0, 2, 0x30303030))
            mins_high = or_i32x8(bits_i32x8(packed2, 4, 0x0F0F0F0F), bits_i32x8(packed1, 2, 0x30303030))
            # the eight sub-blocks written out, so that their shifts are constants
            sums = sub_block(w, o, stride, 0, i, xq, j, xd, xsums, d, minus_dmin, scales_low, mins_low, sums)
            sums = sub_block(w, o, stride, 1, i, xq, j, xd, xsums, d, minus_dmin, scales_low, mins_low, sums)
            sums = sub_block(w, o, stride, 2, i, xq, j, xd, xsums, d, minus_dmin, scales_low, mins_low, sums)
            sums = sub_block(w, o, stride, 3, i, xq, j, xd, xsums, d, minus_dmin, scales_low, mins_low, sums)
            sums = sub_block(w, o, stride, 4, i, xq, j, xd, xsums, d, minus_dmin, scales_high, mins_high, sums)
            sums = sub_block(w, o, stride, 5, i, xq, j, xd, xsums, d, minus_dmin, scales_high, mins_high, sums)
            sums = sub_block(w, o, stride, 6, i, xq, j, xd, xsums, d, minus_dmin, scales_high, mins_high, sums)
            sums = sub_block(w, o, stride, 7, i, xq, j, xd, xsums, d, minus_dmin, scales_high, mins_high, sums)
        acc, offsets = sums
        return add_f32x8(acc, offsets)   # as make_rows_task's add_offsets for one offset a block

    return eight_rows


@njit(inline="always")
def q2_k_fields(w, o, stride):
    """Per super-block of eight Q2_K rows: (d, -dmin, the 16 scale bytes as four vectors of four a lane)."""
    packed = (load_u32x8_strided(w, o, stride), load_u32x8_strided(w, o + 4, stride),
              load_u32x8_strided(w, o + 8, stride), load_u32x8_strided(w, o + 12, stride))
    d, dmin = load_f16_pairs_x8_strided(w, o + 80, stride)
    return d, negate_f32x8(dmin), packed


@njit(inline="always")
def q2_k_scales(packed, s):
    """Sub-block s: (scale of its first 16, of its last 16, their offsets / -dmin): four-bit scales and mins of
    scale byte 2s and 2s + 1."""
    word, byte = packed[s >> 1], 2 * (s & 1)
    return (bits_i32x8(word, 8 * byte, 0x0F), bits_i32x8(word, 8 * byte + 8, 0x0F),
            bits_i32x8(word, 8 * byte + 4, 0x0F), bits_i32x8(word, 8 * byte + 12, 0x0F))


@njit(inline="always")
def q3_k_fields(w, o, stride):
    """Per super-block of eight Q3_K rows: (d, d, the 12 packed scale bytes as three vectors of four a lane)."""
    d = load_f16x8_strided(w, o + 108, stride)
    low = load_u32x8_strided(w, o + 96, stride)
    return d, d, (low, load_u32x8_strided(w, o + 100, stride), load_u32x8_strided(w, o + 104, stride), low)


@njit(inline="always")
def _q3_k_scale_lanes(packed, i):
    """Six-bit scale of 16-sub-block i, bias removed (-32..31): bits 0-3 from byte i % 8 of bytes 0-7 (its low
    nibble for i < 8, else its high one), bits 4-5 from byte 8 + i % 4, bits 2 (i // 4), 2 (i // 4) + 1."""
    low = bits_i32x8(packed[(i >> 2) & 1], 8 * (i & 3) + 4 * (i >> 3), 0x0F)
    high = shift_left_i32x8(bits_i32x8(packed[2], 8 * (i & 3) + 2 * (i >> 2), 3), 4)
    return add_i32x8(or_i32x8(low, high), splat_i32x8(-32))


@njit(inline="always")
def q3_k_scales(packed, s):
    """Sub-block s: (scale of its first 16, of its last 16, their offsets / d: -4 scale)."""
    scale0, scale1 = _q3_k_scale_lanes(packed, 2 * s), _q3_k_scale_lanes(packed, 2 * s + 1)
    minus_4 = splat_i32x8(-4)
    return scale0, scale1, mul_i32x8(scale0, minus_4), mul_i32x8(scale1, minus_4)


@njit(inline="always")
def q6_k_fields(w, o, stride):
    """Per super-block of eight Q6_K rows: (d, d, the 16 signed scale bytes as four vectors of four a lane)."""
    d = load_f16x8_strided(w, o + 208, stride)
    packed = (load_u32x8_strided(w, o + 192, stride), load_u32x8_strided(w, o + 196, stride),
              load_u32x8_strided(w, o + 200, stride), load_u32x8_strided(w, o + 204, stride))
    return d, d, packed


@njit(inline="always")
def q6_k_scales(packed, s):
    """Sub-block s: (scale of its first 16, of its last 16, their offsets / d: -32 scale)."""
    scale0 = signed_byte_i32x8(packed[s >> 1], 2 * (s & 1))
    scale1 = signed_byte_i32x8(packed[s >> 1], 2 * (s & 1) + 1)
    minus_32 = splat_i32x8(-32)
    return scale0, scale1, mul_i32x8(scale0, minus_32), mul_i32x8(scale1, minus_32)


def make_eight_rows_scaled(quants, block_bytes, fields, scales):
    """``eight_rows`` (see ``make_eight_rows_k4``) for the K types with a scale per 16 weights (Q2_K, Q3_K,
    Q6_K): per super-block, ``fields(w, o, stride)`` -> (d, offset scale, packed scale bytes) of the eight rows;
    per sub-block, ``scales(packed, s)`` -> (scale0, scale1, offset0, offset1) int32 vectors, so that
    ``offset_h = offset_scale * float(offset_h)``. The two 16-halves' dots are scaled in int32 (the same integer
    as ``vpmaddwd`` by the scales gives in ``make_rows_task``)."""
    dots = make_eight_row_dots(quants)

    @njit(inline="always")
    def sub_block(w, o, stride, s, i, xq, j, xd, xsums, d, offset_scale, packed, sums):
        """Sub-block s of super-block i (at byte o of the first row): the sums (acc, low, high) go on."""
        acc, low_sum, high_sum = sums
        b = 8 * i + s
        low, high = dots(w, o, stride, s, load_i8x32(xq, j * xq.shape[1] + b * BLOCK))
        scale0, scale1, offset0, offset1 = scales(packed, s)
        halves = scaled_halves(mul_i32x8(low, scale0), mul_i32x8(high, scale1), splat_f32x8(xd[j, 2 * b]),
                                splat_f32x8(xd[j, 2 * b + 1]))
        offset_low = mul_f32x8(offset_scale, to_f32x8(offset0))
        offset_high = mul_f32x8(offset_scale, to_f32x8(offset1))
        # (offset_0 - offset_1) by the first half's activation sum, offset_1 by the block's (xsums[2b + 1])
        return (fma_f32x8(halves, d, acc),
                fma_f32x8(add_f32x8(offset_low, negate_f32x8(offset_high)), splat_f32x8(xsums[j, 2 * b]), low_sum),
                fma_f32x8(offset_high, splat_f32x8(xsums[j, 2 * b + 1]), high_sum))

    @njit(inline="always")
    def eight_rows(w, row, stride, xq, j, xd, xsums):
        n_super = xq.shape[1] // 256
        share = 8 * block_bytes  # a constant: the prefetch loop unrolls
        sums = (zeros_f32x8(), zeros_f32x8(), zeros_f32x8())      # (acc, low, high) of make_rows_task
        for i in range(n_super):
            o = row + i * block_bytes
            prefetch_ahead(w, row + 8 * stride + i * share, share)
            d, offset_scale, packed = fields(w, o, stride)
            # the eight sub-blocks written out, so that their shifts are constants
            sums = sub_block(w, o, stride, 0, i, xq, j, xd, xsums, d, offset_scale, packed, sums)
            sums = sub_block(w, o, stride, 1, i, xq, j, xd, xsums, d, offset_scale, packed, sums)
            sums = sub_block(w, o, stride, 2, i, xq, j, xd, xsums, d, offset_scale, packed, sums)
            sums = sub_block(w, o, stride, 3, i, xq, j, xd, xsums, d, offset_scale, packed, sums)
            sums = sub_block(w, o, stride, 4, i, xq, j, xd, xsums, d, offset_scale, packed, sums)
            sums = sub_block(w, o, stride, 5, i, xq, j, xd, xsums, d, offset_scale, packed, sums)
            sums = sub_block(w, o, stride, 6, i, xq, j, xd, xsums, d, offset_scale, packed, sums)
            sums = sub_block(w, o, stride, 7, i, xq, j, xd, xsums, d, offset_scale, packed, sums)
        acc, low_sum, high_sum = sums
        return add_f32x8(acc, add_f32x8(low_sum, high_sum))

    return eight_rows


eight_rows_Q2_K = make_eight_rows_scaled(q2_k_quants, 84, q2_k_fields, q2_k_scales)
eight_rows_Q3_K = make_eight_rows_scaled(q3_k_quants, 110, q3_k_fields, q3_k_scales)
eight_rows_Q6_K = make_eight_rows_scaled(q6_k_quants, 210, q6_k_fields, q6_k_scales)
eight_rows_Q4_K = make_eight_rows_k4(q4_k_quants, 144)
eight_rows_Q5_K = make_eight_rows_k4(q5_k_quants, 176)
