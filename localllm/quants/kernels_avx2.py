"""AVX2 matmul kernels for the quantized ggml types (x86-64 with AVX2, F16C and FMA).

Same form as ``quants.portable`` (read its docstring): a decoder (``decoders_avx2``) turns the
32-element block ``b`` of a weight row into 32 small integers (one ``I8x32``
register, unsigned but for Q8_0) and ``(scale_0, scale_1, d, offset_0, offset_1)``.
``vpmaddubsw`` multiplies them with the int8 activations and adds pairs into 16 bits
(``intrinsics.dot_u8_i8``; a signed type's weights go in as |q| against the activations
with q's sign), and ``vpmaddwd`` by the per-16 scales (ones for types without them) adds
pairs into 32 bits: an exact integer per 16-half of a block, turned into float once and
scaled by that half's activation scale.

The row kernel puts eight dot products in the lanes of one vector: eight
weight rows of a token. From 16 tokens on (prefill, large batched decode) a
task first decodes its eight rows once into a per-group scratch strip,
interleaved so that one vector holds four consecutive elements of all eight rows
(``fill_strip``), then streams the tokens through it four at a time: per four
elements, one broadcast activation word and one ``vpmaddubsw`` per token, rows in
the lanes, no horizontal sums (ik_llama.cpp's interleaved eight-row strips). In
decode the eight rows are read side by side straight from the weights. Every path
does the same arithmetic per (row, token), and leftovers one at a time too: a
token's result does not depend on the batch it came in (chunked prefill equals
one-shot prefill bit for bit).

Decode reads eight weight rows side by side, which the hardware prefetcher
follows poorly: each task prefetches the next task's rows (``decoders_avx2.prefetch_ahead``).
K types have an eight-row decode form of their own (``eight_rows_<TYPE>``):
scale fields unpacked for eight rows at once, the same arithmetic.
Tasks run in up to ``TASK_GROUPS`` parallel groups of consecutive tasks.
"""
from __future__ import annotations

import warnings

import numpy as np
from numba import njit, prange, types
from numba.core.errors import NumbaExperimentalFeatureWarning
from numba.core.types.function_type import CompileResultWAP

from .intrinsics import (abs_i8, add_f32x8, add_i16x16, add_i32x8, dot_pairs_i16, dot_u8_i8, fma_f32, fma_f32x8,
                         halves_i16x16, lane_f32, load_f16_pairs_x8_strided, load_f16x8_strided, load_f32x8, load_i8x32,
                         load_i16x16, mul_f32x8, pack_f32x8, pairs_i16x16, sign_i8, splat_f32x8,
                         splat_quad_i8, store_vector, sum_halves_by8, sum_halves_i32, transpose_words, zeros_f32x8)
from .decoders_avx2 import (decode_Q2_K, decode_Q3_K, decode_Q4_0, decode_Q4_1, decode_Q4_K, decode_Q5_0, decode_Q5_1,
                            decode_Q5_K, decode_Q6_K, decode_Q8_0, eight_rows_Q2_K, eight_rows_Q3_K, eight_rows_Q4_K,
                            eight_rows_Q5_K, eight_rows_Q6_K, prefetch_ahead, scaled_halves)
from .portable import BLOCK, count_tasks, njit_named, prepare_activations, store, task_location

# the row ranges are called through numba's first-class function pointers (an "experimental" feature it warns
# about on every compile that uses one)
warnings.filterwarnings("ignore", message="First-class function type feature is experimental",
                        category=NumbaExperimentalFeatureWarning)

ROWS_PER_TASK = 8   # weight rows per task: the eight lanes of the decode path and of the prefill tile
TASK_GROUPS = 96    # parallel work items; each runs consecutive tasks with one scratch table
# The strip (``fill_strip``), in rows of eight float32 (32 bytes) per 32-block: 2 offsets and 1 scale, then the
# block's quant area of QUANT_ROWS: 8 interleaved quads of quants, 8 more for a signed type (the quants' signs,
# from byte SIGNS_AT of the area), 2 for a type with per-16 scales (its scales as int16 pairs, from SCALES_AT)
QUANT_ROWS = 18
SIGNS_AT, SCALES_AT = 32 * 8, 32 * 16
STRIP_ROWS_PER_BLOCK = 3 + QUANT_ROWS
TILE_MIN_TOKENS = 8        # from this many tokens on, a task's rows are interleaved into a strip (the tile path).
                           # With the strip fill prefetching the next task's rows, an 8-sequence SmolLM2 step takes
                           # 18.9-19.7 ms this way against 21.8-25.6 ms from 16 tokens (the eight-token path);
                           # at 4 sequences neither wins, so the strip starts at 8
TILE_TOKENS = 4            # tokens per pass over the strip: each strip vector load serves four
ACTIVATION_LIMIT = 127     # |xq|: with weights of at most 128, a vpmaddubsw pair stays below 2^15


@njit(cache=True)
def scratch_rows(n, cols):
    """Rows (of eight float32) of the per-group scratch table the row tasks of n tokens against a matrix with
    ``cols`` columns need: the offset table, and from TILE_MIN_TOKENS tokens on the interleaved strip around it
    (``make_rows_task``)."""
    n_blocks = cols // BLOCK
    return STRIP_ROWS_PER_BLOCK * n_blocks if n >= TILE_MIN_TOKENS else 2 * n_blocks


# --------------------------------------------------------------------------- row kernels

@njit(inline="always")
def store_eight(strip, at, vectors):
    """The eight vectors of a transpose (``transpose_words``) one after another from byte ``at``."""
    v0, v1, v2, v3, v4, v5, v6, v7 = vectors
    store_vector(strip, at, v0)
    store_vector(strip, at + 32, v1)
    store_vector(strip, at + 64, v2)
    store_vector(strip, at + 96, v3)
    store_vector(strip, at + 128, v4)
    store_vector(strip, at + 160, v5)
    store_vector(strip, at + 192, v6)
    store_vector(strip, at + 224, v7)


@njit(inline="always")
def quant_area(n_blocks, b):
    """Byte offset of block b's quant area in a strip of n_blocks blocks (after all blocks' offsets and scales)."""
    return 32 * (3 * n_blocks + QUANT_ROWS * b)


@njit(inline="always")
def _no_eight_rows(w, row, stride, xq, j, xd, xsums):
    return zeros_f32x8()


def make_rows_task(decode, signed: bool, scaled: bool, max_quant: int, offsets: bool = True,
                   f16_scale_block_bytes: int = 0, f16_min_at: int = 0, offset_per_scale: float = 0.0,
                   eight_rows=None):
    """``rows_task(w, r_start, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table)``:
    ``out[:, r] = x @ W[r]`` for ROWS_PER_TASK weight rows from ``r_start``.

    Each weight block (quants at most ``max_quant``; signed ones when
    ``signed``, their scales per 16 when ``scaled``) is dotted with the int8
    activations, an exact integer per 16-half (``block_dots``). Every
    (row, token) result is the same arithmetic on every path, so it does not
    depend on the batch::

        acc = low = high = 0                                    # three chains: no FMA waits on another
        for each block b:
            acc = fma(float(s_b0) * dx_b0 + float(s_b1) * dx_b1, d_b, acc)   # s_bh: the exact dot of half h
            high = fma(offset_1, xsums[2b + 1], high)           # only for types with offsets (xsums[2b + 1]:
            low = fma(offset_0 - offset_1, xsums[2b], low)      # the block's), low only where they differ (scaled)
        out = acc + (low + high)                                # (out = acc + high where they do not)

    The paths differ only in where the weights come from and what the lanes
    hold. From TILE_MIN_TOKENS tokens on, a full task (eight rows) is decoded
    once into its strip (``fill_strip``) and ``tile_four_tokens`` gives four
    tokens x eight rows per pass, rows in the lanes; a partial task (< 8 rows),
    or a full one below TILE_MIN_TOKENS tokens, puts eight tokens of one weight row in the lanes (each weight
    block decoded once for eight tokens, two rows share every activation load); one token
    (decode, leftover tokens) gets eight weight rows in the lanes straight from
    the weights, and leftover rows go one at a time. For types whose block
    starts with its scale ``d`` as a plain half (``f16_scale_block_bytes`` = the
    block size), decode reads the eight rows' scales into one vector at once, and
    their offsets too: the half at byte ``f16_min_at`` of the block (Q4_1, Q5_1)
    or ``offset_per_scale * d`` (Q4_0, Q5_0). Types with an ``eight_rows`` form
    (K types: ``eight_rows(w, row, stride, xq, j, xd, xsums)`` -> the eight lanes)
    decode that way; the others decode the offsets of a task's rows once into a table.
    """
    # how many vpmaddubsw results (each lane at most 2 * max_quant * 127) an int16 lane holds before vpmaddwd
    terms = min(4, 32767 // (2 * max_quant * ACTIVATION_LIMIT))
    has_eight_rows = eight_rows is not None
    if not has_eight_rows:
        eight_rows = _no_eight_rows
    vector_offsets = bool(f16_scale_block_bytes and (f16_min_at or offset_per_scale))
    split_offsets = offsets and scaled  # a scale per 16: an offset per 16 too (else one per block)
    assert f16_min_at in (0, 2)  # m, if any, is the half after d: one 32-bit load per row reads both
    # the bytes of the next task's rows that one block's step fetches ahead (8 rows of a block each)
    prefetch_share = 8 * f16_scale_block_bytes

    @njit(inline="always")
    def add_offsets(acc, low, high):
        """The dot lanes plus the offset chains: ``acc + (low + high)``, or ``acc + high`` where a block has one
        offset (the low chain, of offset_0 - offset_1, is then zero and not computed)."""
        if not offsets:
            return acc
        if split_offsets:
            return add_f32x8(acc, add_f32x8(low, high))
        return add_f32x8(acc, high)

    @njit(inline="always")
    def products(q, x):
        """vpmaddubsw of a weight vector with an activation vector (q's signs moved onto x when signed)."""
        if signed:
            return dot_u8_i8(abs_i8(q), sign_i8(x, q))
        return dot_u8_i8(q, x)

    @njit(inline="always")
    def block_dots(q, scale0, scale1, x):
        """The int32x8 dots of one weight block with one activation block: lanes 0-3 sum to the first 16-half's
        exact integer (times scale_0), lanes 4-7 to the second's."""
        return dot_pairs_i16(products(q, x), halves_i16x16(scale0, scale1) if scaled else halves_i16x16(1, 1))

    @njit(inline="always")
    def row_block_dots(w, row, b, x):
        """(``block_dots`` of block b of the weight row at byte ``row`` with the activation block x, its d)."""
        q, scale0, scale1, d, _, _ = decode(w, row, b)
        return block_dots(q, scale0, scale1, x), d

    @njit(inline="always")
    def decoded_eight_rows(w, row, stride, xq, j, xd, xsums, offset_table, fill_table):
        """Float32 lanes = the dots of the eight rows from byte ``row`` with token j, each block of each row
        through the decoder; the offsets of types without a vector form are first put into ``offset_table``
        (when ``fill_table``: once per task)."""
        n_blocks = xq.shape[1] // BLOCK
        if offsets and not vector_offsets and fill_table:  # offsets side by side, once per task
            # (a task has ROWS_PER_TASK == 8 rows: one table)
            for lane in range(8):
                for b in range(n_blocks):
                    _, _, _, _, offset0, offset1 = decode(w, row + lane * stride, b)
                    offset_table[2 * b, lane], offset_table[2 * b + 1, lane] = offset0 - offset1, offset1
        acc, low_sum, high_sum = zeros_f32x8(), zeros_f32x8(), zeros_f32x8()
        for b in range(n_blocks):  # the next eight rows (this thread's next task) fetched ahead, a share a block
            prefetch_ahead(w, row + 8 * stride + b * prefetch_share, prefetch_share)  # a constant: unrolled
            x = load_i8x32(xq, j * xq.shape[1] + b * BLOCK)
            s0, d0 = row_block_dots(w, row, b, x)
            s1, d1 = row_block_dots(w, row + stride, b, x)
            s2, d2 = row_block_dots(w, row + 2 * stride, b, x)
            s3, d3 = row_block_dots(w, row + 3 * stride, b, x)
            s4, d4 = row_block_dots(w, row + 4 * stride, b, x)
            s5, d5 = row_block_dots(w, row + 5 * stride, b, x)
            s6, d6 = row_block_dots(w, row + 6 * stride, b, x)
            s7, d7 = row_block_dots(w, row + 7 * stride, b, x)
            low, high = sum_halves_by8(s0, s1, s2, s3, s4, s5, s6, s7)
            if f16_min_at:  # d and m (the half after it), one load per row
                row_scales, row_mins = load_f16_pairs_x8_strided(w, row + b * f16_scale_block_bytes, stride)
            elif f16_scale_block_bytes:
                row_scales = row_mins = load_f16x8_strided(w, row + b * f16_scale_block_bytes, stride)
            else:
                row_scales = row_mins = pack_f32x8(d0, d1, d2, d3, d4, d5, d6, d7)
            acc = fma_f32x8(scaled_halves(low, high, splat_f32x8(xd[j, 2 * b]), splat_f32x8(xd[j, 2 * b + 1])),
                            row_scales, acc)
            if offsets:
                if f16_min_at:
                    offset1 = row_mins
                elif offset_per_scale:
                    offset1 = mul_f32x8(splat_f32x8(np.float32(offset_per_scale)), row_scales)
                else:
                    offset1 = load_f32x8(offset_table, 4 * 8 * (2 * b + 1))
                    if split_offsets:
                        low_sum = fma_f32x8(load_f32x8(offset_table, 4 * 8 * (2 * b)), splat_f32x8(xsums[j, 2 * b]),
                                            low_sum)
                high_sum = fma_f32x8(offset1, splat_f32x8(xsums[j, 2 * b + 1]), high_sum)
        return add_offsets(acc, low_sum, high_sum)

    @njit(inline="always")
    def fill_strip(w, row, stride, n_blocks, strip):
        """The eight weight rows from byte ``row`` (``stride`` apart), decoded once, into ``strip`` (float32
        (STRIP_ROWS_PER_BLOCK * n_blocks, 8), 32 bytes a row; row i of the task in lane i of every row)::

            strip[2b], strip[2b + 1]            (8,) float32   offset_0 - offset_1, offset_1 of block b (the offset
                                                               table; the first only where they differ)
            strip[2 nb + b]                     (8,) float32   d of block b
            strip[3 nb + 18 b + k]              (8, 4) uint8   elements 4k..4k + 3 of block b (k < 8): the quants,
                                                               |q| for a signed type (``quant_area``)
            strip[3 nb + 18 b + 8 + k]          (8, 4) int8    a signed type's q (its signs; SIGNS_AT)
            strip[3 nb + 18 b + 16 + h]         (8, 2) int16   a scaled type's scale_h, twice (SCALES_AT)

        (nb = n_blocks, 18 = QUANT_ROWS): an 8 x 8 transpose of 32-bit words per block."""
        # the next task's rows fetched ahead, as in ``decoded_eight_rows`` (a K type's share: its super-block)
        share = prefetch_share if prefetch_share else 8 * stride // n_blocks
        for b in range(n_blocks):
            prefetch_ahead(w, row + 8 * stride + b * share, share)
            q0, scale00, scale01, d0, offset00, offset01 = decode(w, row, b)
            q1, scale10, scale11, d1, offset10, offset11 = decode(w, row + stride, b)
            q2, scale20, scale21, d2, offset20, offset21 = decode(w, row + 2 * stride, b)
            q3, scale30, scale31, d3, offset30, offset31 = decode(w, row + 3 * stride, b)
            q4, scale40, scale41, d4, offset40, offset41 = decode(w, row + 4 * stride, b)
            q5, scale50, scale51, d5, offset50, offset51 = decode(w, row + 5 * stride, b)
            q6, scale60, scale61, d6, offset60, offset61 = decode(w, row + 6 * stride, b)
            q7, scale70, scale71, d7, offset70, offset71 = decode(w, row + 7 * stride, b)
            at = quant_area(n_blocks, b)
            if signed:
                store_eight(strip, at, transpose_words(abs_i8(q0), abs_i8(q1), abs_i8(q2), abs_i8(q3), abs_i8(q4),
                                                       abs_i8(q5), abs_i8(q6), abs_i8(q7)))
                store_eight(strip, at + SIGNS_AT, transpose_words(q0, q1, q2, q3, q4, q5, q6, q7))
            else:
                store_eight(strip, at, transpose_words(q0, q1, q2, q3, q4, q5, q6, q7))
            if scaled:
                store_vector(strip, at + SCALES_AT, pairs_i16x16(scale00, scale10, scale20, scale30, scale40, scale50,
                                                           scale60, scale70))
                store_vector(strip, at + SCALES_AT + 32, pairs_i16x16(scale01, scale11, scale21, scale31, scale41, scale51,
                                                           scale61, scale71))
            store_vector(strip, 32 * (2 * n_blocks + b), pack_f32x8(d0, d1, d2, d3, d4, d5, d6, d7))
            if split_offsets:
                store_vector(strip, 32 * (2 * b), pack_f32x8(offset00 - offset01, offset10 - offset11,
                                                            offset20 - offset21, offset30 - offset31,
                                                            offset40 - offset41, offset50 - offset51,
                                                            offset60 - offset61, offset70 - offset71))
            if offsets:
                store_vector(strip, 32 * (2 * b + 1), pack_f32x8(offset01, offset11, offset21, offset31, offset41,
                                                                offset51, offset61, offset71))

    @njit(inline="always")
    def quad_products(strip, at, k, xq, x, cols):
        """vpmaddubsw of strip quad k (from byte ``at``; loaded once) with the broadcast activation words of four
        tokens (at byte x of the first, ``cols`` apart)."""
        q = load_i8x32(strip, at + 32 * k)
        if signed:
            signs = load_i8x32(strip, at + SIGNS_AT + 32 * k)
            return (dot_u8_i8(q, sign_i8(splat_quad_i8(xq, x), signs)),
                    dot_u8_i8(q, sign_i8(splat_quad_i8(xq, x + cols), signs)),
                    dot_u8_i8(q, sign_i8(splat_quad_i8(xq, x + 2 * cols), signs)),
                    dot_u8_i8(q, sign_i8(splat_quad_i8(xq, x + 3 * cols), signs)))
        return (dot_u8_i8(q, splat_quad_i8(xq, x)), dot_u8_i8(q, splat_quad_i8(xq, x + cols)),
                dot_u8_i8(q, splat_quad_i8(xq, x + 2 * cols)), dot_u8_i8(q, splat_quad_i8(xq, x + 3 * cols)))

    @njit(inline="always")
    def summed(a, b):
        """Token-wise int16 sums of two quads' products (``terms`` allows it)."""
        return (add_i16x16(a[0], b[0]), add_i16x16(a[1], b[1]), add_i16x16(a[2], b[2]), add_i16x16(a[3], b[3]))

    @njit(inline="always")
    def widened(p, scales):
        """Token-wise vpmaddwd of int16 pair sums by ``scales``: int32 dots."""
        return (dot_pairs_i16(p[0], scales), dot_pairs_i16(p[1], scales), dot_pairs_i16(p[2], scales),
                dot_pairs_i16(p[3], scales))

    @njit(inline="always")
    def added(a, b):
        return add_i32x8(a[0], b[0]), add_i32x8(a[1], b[1]), add_i32x8(a[2], b[2]), add_i32x8(a[3], b[3])

    @njit(inline="always")
    def half_dots(strip, at, k, xq, x, cols, scales):
        """The exact int32 dots of the eight strip rows' 16-half made of quads k..k + 3 (rows in the lanes) with
        four tokens' activations (byte x of the first): the products summed in 16 bits ``terms`` at a time, then
        by ``scales``."""
        p0, p1 = quad_products(strip, at, k, xq, x, cols), quad_products(strip, at, k + 1, xq, x + 4, cols)
        p2, p3 = quad_products(strip, at, k + 2, xq, x + 8, cols), quad_products(strip, at, k + 3, xq, x + 12, cols)
        if terms >= 4:
            return widened(summed(summed(p0, p1), summed(p2, p3)), scales)
        if terms >= 2:
            return added(widened(summed(p0, p1), scales), widened(summed(p2, p3), scales))
        return added(added(widened(p0, scales), widened(p1, scales)), added(widened(p2, scales), widened(p3, scales)))

    @njit(inline="always")
    def store_lanes(out, j, r, acc, accumulate):
        """out[j, r:r + 8] = acc, or out[j, r:r + 8] + acc (``store`` for eight consecutive rows)."""
        at = 4 * (j * out.shape[1] + r)
        if accumulate:
            acc = add_f32x8(load_f32x8(out, at), acc)
        store_vector(out, at, acc)

    @njit(inline="always")
    def strip_scales(strip, at, h):
        """What half h's vpmaddubsw pairs are multiplied by in ``half_dots``: a scaled type's row scales, else ones."""
        if scaled:
            return load_i16x16(strip, at + SCALES_AT + 32 * h)
        return halves_i16x16(1, 1)

    @njit(inline="always")
    def tile_four_tokens(strip, n_blocks, xq, j, xd, xsums, out, r, accumulate):
        """out[j:j + 4, r:r + 8] from the strip: the arithmetic of ``rows_task`` per (row, token), rows in the
        lanes (d and offsets row vectors, the activation scales splats), so no horizontal sums. The offset chains
        are a second pass over the blocks (registers: four tokens' dots and accumulators in the first)."""
        cols = xq.shape[1]
        acc0, acc1, acc2, acc3 = zeros_f32x8(), zeros_f32x8(), zeros_f32x8(), zeros_f32x8()
        for b in range(n_blocks):
            at = quant_area(n_blocks, b)
            x = j * cols + b * BLOCK
            low0, low1, low2, low3 = half_dots(strip, at, 0, xq, x, cols, strip_scales(strip, at, 0))
            high0, high1, high2, high3 = half_dots(strip, at, 4, xq, x + 16, cols, strip_scales(strip, at, 1))
            d = load_f32x8(strip, 32 * (2 * n_blocks + b))
            acc0 = fma_f32x8(scaled_halves(low0, high0, splat_f32x8(xd[j, 2 * b]), splat_f32x8(xd[j, 2 * b + 1])),
                             d, acc0)
            acc1 = fma_f32x8(scaled_halves(low1, high1, splat_f32x8(xd[j + 1, 2 * b]),
                                           splat_f32x8(xd[j + 1, 2 * b + 1])), d, acc1)
            acc2 = fma_f32x8(scaled_halves(low2, high2, splat_f32x8(xd[j + 2, 2 * b]),
                                           splat_f32x8(xd[j + 2, 2 * b + 1])), d, acc2)
            acc3 = fma_f32x8(scaled_halves(low3, high3, splat_f32x8(xd[j + 3, 2 * b]),
                                           splat_f32x8(xd[j + 3, 2 * b + 1])), d, acc3)
        if offsets:
            low0, low1, low2, low3 = zeros_f32x8(), zeros_f32x8(), zeros_f32x8(), zeros_f32x8()
            high0, high1, high2, high3 = zeros_f32x8(), zeros_f32x8(), zeros_f32x8(), zeros_f32x8()
            for b in range(n_blocks):
                offset1 = load_f32x8(strip, 32 * (2 * b + 1))
                high0 = fma_f32x8(offset1, splat_f32x8(xsums[j, 2 * b + 1]), high0)
                high1 = fma_f32x8(offset1, splat_f32x8(xsums[j + 1, 2 * b + 1]), high1)
                high2 = fma_f32x8(offset1, splat_f32x8(xsums[j + 2, 2 * b + 1]), high2)
                high3 = fma_f32x8(offset1, splat_f32x8(xsums[j + 3, 2 * b + 1]), high3)
                if split_offsets:
                    offset_difference = load_f32x8(strip, 32 * (2 * b))
                    low0 = fma_f32x8(offset_difference, splat_f32x8(xsums[j, 2 * b]), low0)
                    low1 = fma_f32x8(offset_difference, splat_f32x8(xsums[j + 1, 2 * b]), low1)
                    low2 = fma_f32x8(offset_difference, splat_f32x8(xsums[j + 2, 2 * b]), low2)
                    low3 = fma_f32x8(offset_difference, splat_f32x8(xsums[j + 3, 2 * b]), low3)
            acc0, acc1 = add_offsets(acc0, low0, high0), add_offsets(acc1, low1, high1)
            acc2, acc3 = add_offsets(acc2, low2, high2), add_offsets(acc3, low3, high3)
        store_lanes(out, j, r, acc0, accumulate)
        store_lanes(out, j + 1, r, acc1, accumulate)
        store_lanes(out, j + 2, r, acc2, accumulate)
        store_lanes(out, j + 3, r, acc3, accumulate)

    @njit(inline="always")
    def eight_token_dots(q, scale0, scale1, xq, x, cols):
        """(low, high) int32x8: lane t = the exact dot of the weight block with token t's block at byte
        x + t * cols (of eight tokens), first and second 16-half."""
        return sum_halves_by8(block_dots(q, scale0, scale1, load_i8x32(xq, x)),
                              block_dots(q, scale0, scale1, load_i8x32(xq, x + cols)),
                              block_dots(q, scale0, scale1, load_i8x32(xq, x + 2 * cols)),
                              block_dots(q, scale0, scale1, load_i8x32(xq, x + 3 * cols)),
                              block_dots(q, scale0, scale1, load_i8x32(xq, x + 4 * cols)),
                              block_dots(q, scale0, scale1, load_i8x32(xq, x + 5 * cols)),
                              block_dots(q, scale0, scale1, load_i8x32(xq, x + 6 * cols)),
                              block_dots(q, scale0, scale1, load_i8x32(xq, x + 7 * cols)))

    @njit_named(f"rows_task_of_{decode.py_func.__name__}")  # no fastmath: every path must round alike
    def rows_task(w, r_start, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
        n, cols = xq.shape
        n_blocks = cols // BLOCK
        stride = w.shape[1]
        r_stop = min(r_start + ROWS_PER_TASK, w.shape[0])
        j = 0
        if n >= TILE_MIN_TOKENS and r_stop - r_start == ROWS_PER_TASK:  # the tile: eight rows in the lanes
            fill_strip(w, r_start * stride, stride, n_blocks, offset_table)
            while j + TILE_TOKENS <= n:
                tile_four_tokens(offset_table, n_blocks, xq, j, xd, xsums, out, r_start, accumulate)
                j += TILE_TOKENS
        while j + 8 <= n:  # eight tokens in the lanes: each weight block decoded once for all eight
            r = r_start
            while r < r_stop:  # two weight rows at a time (one if one is left)
                second = min(r + 1, r_stop - 1)
                acc0, acc1 = zeros_f32x8(), zeros_f32x8()
                low_sum0, high_sum0, low_sum1, high_sum1 = zeros_f32x8(), zeros_f32x8(), zeros_f32x8(), zeros_f32x8()
                for b in range(n_blocks):
                    q0, scale00, scale01, d0, offset00, offset01 = decode(w, r * stride, b)
                    q1, scale10, scale11, d1, offset10, offset11 = decode(w, second * stride, b)
                    x = j * cols + b * BLOCK
                    x_low = load_f32x8(xd_by_block, 4 * (2 * b * n + j))
                    x_high = load_f32x8(xd_by_block, 4 * ((2 * b + 1) * n + j))
                    low, high = eight_token_dots(q0, scale00, scale01, xq, x, cols)
                    acc0 = fma_f32x8(scaled_halves(low, high, x_low, x_high), splat_f32x8(d0), acc0)
                    low, high = eight_token_dots(q1, scale10, scale11, xq, x, cols)
                    acc1 = fma_f32x8(scaled_halves(low, high, x_low, x_high), splat_f32x8(d1), acc1)
                    if offsets:
                        x_block_sums = load_f32x8(xsums_by_block, 4 * ((2 * b + 1) * n + j))
                        high_sum0 = fma_f32x8(splat_f32x8(offset01), x_block_sums, high_sum0)
                        high_sum1 = fma_f32x8(splat_f32x8(offset11), x_block_sums, high_sum1)
                        if split_offsets:
                            x_low_sums = load_f32x8(xsums_by_block, 4 * (2 * b * n + j))
                            low_sum0 = fma_f32x8(splat_f32x8(offset00 - offset01), x_low_sums, low_sum0)
                            low_sum1 = fma_f32x8(splat_f32x8(offset10 - offset11), x_low_sums, low_sum1)
                acc0, acc1 = add_offsets(acc0, low_sum0, high_sum0), add_offsets(acc1, low_sum1, high_sum1)
                for lane in range(8):
                    store(out, j + lane, r, lane_f32(acc0, lane), accumulate)
                    if second != r:
                        store(out, j + lane, second, lane_f32(acc1, lane), accumulate)
                r += 2
            j += 8
        first_single = j
        while j < n:  # one token: eight weight rows in the lanes, then the leftover rows
            r = r_start
            while r + 8 <= r_stop:
                row = r * stride
                if has_eight_rows:  # the type's own eight-row form (K types)
                    acc = eight_rows(w, row, stride, xq, j, xd, xsums)
                else:
                    acc = decoded_eight_rows(w, row, stride, xq, j, xd, xsums, offset_table, j == first_single)
                for lane in range(8):
                    store(out, j, r + lane, lane_f32(acc, lane), accumulate)
                r += 8
            while r < r_stop:
                total = low_total = high_total = np.float32(0.0)
                for b in range(n_blocks):
                    q, scale0, scale1, d, offset0, offset1 = decode(w, r * stride, b)
                    low, high = sum_halves_i32(block_dots(q, scale0, scale1, load_i8x32(xq, j * cols + b * BLOCK)))
                    halves = fma_f32(np.float32(high), xd[j, 2 * b + 1], np.float32(low) * xd[j, 2 * b])
                    total = fma_f32(halves, d, total)
                    if offsets:
                        high_total = fma_f32(offset1, xsums[j, 2 * b + 1], high_total)
                        if split_offsets:
                            low_total = fma_f32(offset0 - offset1, xsums[j, 2 * b], low_total)
                if offsets:  # as ``add_offsets``
                    total = total + (low_total + high_total) if split_offsets else total + high_total
                store(out, j, r, total, accumulate)
                r += 1
            j += 1

    return rows_task


rows_Q4_0 = make_rows_task(decode_Q4_0, signed=False, scaled=False, max_quant=15, f16_scale_block_bytes=18,
                            offset_per_scale=-8.0)
rows_Q4_1 = make_rows_task(decode_Q4_1, signed=False, scaled=False, max_quant=15, f16_scale_block_bytes=20,
                            f16_min_at=2)
rows_Q5_0 = make_rows_task(decode_Q5_0, signed=False, scaled=False, max_quant=31, f16_scale_block_bytes=22,
                            offset_per_scale=-16.0)
rows_Q5_1 = make_rows_task(decode_Q5_1, signed=False, scaled=False, max_quant=31, f16_scale_block_bytes=24,
                            f16_min_at=2)
rows_Q8_0 = make_rows_task(decode_Q8_0, signed=True, scaled=False, max_quant=128, offsets=False,
                            f16_scale_block_bytes=34)
rows_Q2_K = make_rows_task(decode_Q2_K, signed=False, scaled=True, max_quant=3, eight_rows=eight_rows_Q2_K)
rows_Q3_K = make_rows_task(decode_Q3_K, signed=False, scaled=True, max_quant=7, eight_rows=eight_rows_Q3_K)
rows_Q4_K = make_rows_task(decode_Q4_K, signed=False, scaled=False, max_quant=15, eight_rows=eight_rows_Q4_K)
rows_Q5_K = make_rows_task(decode_Q5_K, signed=False, scaled=False, max_quant=31, eight_rows=eight_rows_Q5_K)
rows_Q6_K = make_rows_task(decode_Q6_K, signed=False, scaled=True, max_quant=63, eight_rows=eight_rows_Q6_K)


# --------------------------------------------------------------------------- row ranges: one compiled function per type
# rows_range_<TYPE>(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
# the row tasks of rows r_start..r_stop of w (r_start a multiple of ROWS_PER_TASK), out (n, rows) float32.
# They are the only code that depends on the weight type. Every caller (``matmul_rows`` below, the one-launch
# decode step of ``ops.decoder_step``) calls them through a function pointer (``row_function``), so that each is
# compiled once, on its own, and only for the types a model has; the callers are compiled once for every type.


@njit(cache=True)
def rows_range_Q4_0(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q4_0(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q4_1(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q4_1(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q5_0(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q5_0(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q5_1(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q5_1(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q8_0(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q8_0(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q2_K(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q2_K(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q3_K(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q3_K(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q4_K(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q4_K(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q5_K(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q5_K(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


@njit(cache=True)
def rows_range_Q6_K(w, r_start, r_stop, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate):
    for r in range(r_start, r_stop, ROWS_PER_TASK):
        rows_Q6_K(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, accumulate)


ROWS_RANGES = {
    "Q4_0": rows_range_Q4_0, "Q4_1": rows_range_Q4_1, "Q5_0": rows_range_Q5_0, "Q5_1": rows_range_Q5_1,
    "Q8_0": rows_range_Q8_0, "Q2_K": rows_range_Q2_K, "Q3_K": rows_range_Q3_K, "Q4_K": rows_range_Q4_K,
    "Q5_K": rows_range_Q5_K, "Q6_K": rows_range_Q6_K,
}
_MATRIX = types.Array(types.float32, 2, "C")
ROWS_RANGE_SIGNATURE = types.void(types.Array(types.uint8, 2, "C", readonly=True), types.int64, types.int64,
                                  types.Array(types.int8, 2, "C"), _MATRIX, _MATRIX, _MATRIX, _MATRIX, _MATRIX,
                                  _MATRIX, types.boolean)
_row_functions: dict[str, CompileResultWAP] = {}


def row_function(ggml_type: str) -> CompileResultWAP:
    """``rows_range_<ggml_type>`` as a first-class function (numba ``FunctionType(ROWS_RANGE_SIGNATURE)``):
    compiled for that one signature (or loaded from the kernel cache) on first use."""
    function = _row_functions.get(ggml_type)
    if function is None:
        kernel = ROWS_RANGES[ggml_type]
        kernel.compile(ROWS_RANGE_SIGNATURE.args)
        function = _row_functions[ggml_type] = CompileResultWAP(kernel.overloads[ROWS_RANGE_SIGNATURE.args])
    return function


@njit(cache=True)
def launch_inputs(ws, x, prologue, norm_weight, eps, up):
    """What ``matmul_rows`` hands its row ranges: the quantized activations of prologue(x), their scales and
    sums laid out by block (eight tokens side by side), the task and group counts, and one offset table per group."""
    xq, xd, xsums = prepare_activations(x, prologue, norm_weight, eps, up)
    xd_by_block = np.ascontiguousarray(xd.T)        # (n_blocks, n)
    xsums_by_block = np.ascontiguousarray(xsums.T)  # (2 * n_blocks, n)
    n_tasks = count_tasks(ws, ROWS_PER_TASK)
    n_groups = min(n_tasks, TASK_GROUPS)
    # scratch: one offset table and strip per group (``scratch_rows``)
    offset_tables = np.empty((n_groups, scratch_rows(xq.shape[0], xq.shape[1]), 8), dtype=np.float32)
    return xq, xd, xsums, xd_by_block, xsums_by_block, n_tasks, n_groups, offset_tables


@njit(parallel=True, cache=True)
def matmul_rows(rows, ws, x, outs, prologue, norm_weight, eps, up, accumulate):
    """outs[m] (+)= prologue(x) @ ws[m].T for the matrices of the tuple ws (uint8 (rows_m, row_bytes)), all of the
    type whose row ranges ``rows`` computes (a ``row_function``); x float32 (n, cols), outs float32 (n, rows_m).
    The row tasks of all matrices, in order, are cut into up to TASK_GROUPS parallel groups of consecutive tasks."""
    xq, xd, xsums, xd_by_block, xsums_by_block, n_tasks, n_groups, offset_tables = \
        launch_inputs(ws, x, prologue, norm_weight, eps, up)
    for g in prange(n_groups):
        t, t_stop = g * n_tasks // n_groups, (g + 1) * n_tasks // n_groups
        while t < t_stop:  # the group's tasks in each matrix: one call
            m, r = task_location(ws, t, ROWS_PER_TASK)
            rows_m = ws[m].shape[0]
            tasks_here = min(t_stop - t, (rows_m - r + ROWS_PER_TASK - 1) // ROWS_PER_TASK)
            rows(ws[m], r, min(r + tasks_here * ROWS_PER_TASK, rows_m), xq, xd, xsums, xd_by_block, xsums_by_block,
                 outs[m], offset_tables[g], accumulate)
            t += tasks_here


class TypeMatmul:
    """The parallel matmul of one weight type, called as the ``quants.kernels`` launches call a kernel:
    ``(ws, x, outs, prologue, norm_weight, eps, up, accumulate)`` -> ``matmul_rows`` with that type's row ranges."""

    def __init__(self, ggml_type: str):
        self.ggml_type = ggml_type
        self.rows = None

    def __call__(self, ws, x, outs, prologue, norm_weight, eps, up, accumulate):
        if self.rows is None:
            self.rows = row_function(self.ggml_type)
        matmul_rows(self.rows, ws, x, outs, prologue, norm_weight, eps, up, accumulate)


MATMULS = {ggml_type: TypeMatmul(ggml_type) for ggml_type in ROWS_RANGES}
