"""Readable numpy dequantizers for every ggml type localllm supports: the oracle.

Each ``dequantize_<TYPE>`` takes raw blocks, ``uint8 (n_blocks, block_bytes)``,
and returns ``float32 (n_blocks, block_elems)``. The block layouts follow ggml
(``ggml-common.h`` structs, ``dequantize_row_*`` in ``ggml-quants.c``); every
multi-byte field is little-endian, ``f16`` is IEEE half precision.

On top of them: ``dequantize`` (a whole ``QTensor``), ``dequantize_rows``,
``embedding_rows`` (token lookup) and ``matmul`` (``x @ W.T`` in bounded-memory
row chunks), the numpy twin of ``quants.kernels.matmul``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import GGML_BLOCK_SIZES, QTensor, UnsupportedTensorType

# matmul dequantizes at most this many weights at a time.
MATMUL_CHUNK_WEIGHTS = 4 * 1024 * 1024


# --------------------------------------------------------------------------- field readers

def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 field at byte ``offset`` of every block, as float32 ``(n_blocks, 1)``."""
    raw = np.ascontiguousarray(blocks[:, offset:offset + 2])
    return raw.view("<f2").astype(np.float32)


def _u32(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian uint32 field at byte ``offset``, ``(n_blocks, 1)``."""
    raw = np.ascontiguousarray(blocks[:, offset:offset + 4])
    return raw.view("<u4").astype(np.uint32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 packed bytes -> 32 values: element j is the low nibble of byte j, element j+16 its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits_32(qh: np.ndarray) -> np.ndarray:
    """A uint32 ``(n, 1)`` -> its 32 bits ``(n, 32)``, bit j for element j."""
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _as_blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"raw blocks must be uint8, got {raw.dtype}")
    return raw.reshape(-1, block_bytes)


# --------------------------------------------------------------------------- float types

def dequantize_F32(raw: np.ndarray) -> np.ndarray:
    """F32 (a float32 array of any shape, or its raw bytes) -> ``(n, 1)``."""
    raw = np.asarray(raw)
    values = np.ascontiguousarray(raw).view("<f4") if raw.dtype == np.uint8 else raw
    return values.astype(np.float32).reshape(-1, 1)


def dequantize_F16(raw: np.ndarray) -> np.ndarray:
    """F16 (a float16 array of any shape, or its raw bytes) -> ``(n, 1)``."""
    raw = np.asarray(raw)
    values = np.ascontiguousarray(raw).view("<f2") if raw.dtype == np.uint8 else raw
    return values.astype(np.float32).reshape(-1, 1)


def dequantize_BF16(raw: np.ndarray) -> np.ndarray:
    """BF16: 2 bytes per value, the upper half of a float32 -> ``(n, 1)``."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        raw = np.ascontiguousarray(raw).view("<u2")
    upper = raw.astype(np.uint32).reshape(-1, 1)
    return (upper << 16).view(np.float32)


# --------------------------------------------------------------------------- 32-element blocks

def dequantize_Q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0, 18 bytes / 32 values.

    offset 0  f16 d       scale
    offset 2  u8 qs[16]   element j = low nibble of qs[j], element j+16 = high nibble
    value = d * (q - 8)
    """
    blocks = _as_blocks(raw, 18)
    d = _f16(blocks, 0)
    q = _nibbles_32(blocks[:, 2:18]).astype(np.float32) - 8
    return d * q


def dequantize_Q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1, 20 bytes / 32 values.

    offset 0  f16 d       scale
    offset 2  f16 m       minimum
    offset 4  u8 qs[16]   nibbles as in Q4_0
    value = d * q + m
    """
    blocks = _as_blocks(raw, 20)
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles_32(blocks[:, 4:20]).astype(np.float32)
    return d * q + m


def dequantize_Q5_0(raw: np.ndarray) -> np.ndarray:
    """Q5_0, 22 bytes / 32 values.

    offset 0  f16 d       scale
    offset 2  u32 qh      bit j = 5th (high) bit of element j
    offset 6  u8 qs[16]   low 4 bits, nibbles as in Q4_0
    value = d * (q - 16)
    """
    blocks = _as_blocks(raw, 22)
    d = _f16(blocks, 0)
    high = _bits_32(_u32(blocks, 2))
    q = _nibbles_32(blocks[:, 6:22]) | (high << 4)
    return d * (q.astype(np.float32) - 16)


def dequantize_Q5_1(raw: np.ndarray) -> np.ndarray:
    """Q5_1, 24 bytes / 32 values.

    offset 0  f16 d       scale
    offset 2  f16 m       minimum
    offset 4  u32 qh      bit j = 5th (high) bit of element j
    offset 8  u8 qs[16]   low 4 bits, nibbles as in Q4_0
    value = d * q + m
    """
    blocks = _as_blocks(raw, 24)
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    high = _bits_32(_u32(blocks, 4))
    q = _nibbles_32(blocks[:, 8:24]) | (high << 4)
    return d * q.astype(np.float32) + m


def dequantize_Q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0, 34 bytes / 32 values.

    offset 0  f16 d       scale
    offset 2  i8 qs[32]   one signed byte per element
    value = d * q
    """
    blocks = _as_blocks(raw, 34)
    d = _f16(blocks, 0)
    q = np.ascontiguousarray(blocks[:, 2:34]).view(np.int8).astype(np.float32)
    return d * q


# --------------------------------------------------------------------------- 256-element "K" super-blocks
#
# A K super-block holds 256 values in sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32
# (Q4_K, Q5_K) values, each with its own small integer scale (and minimum), all
# multiplied by one f16 super-scale d (and dmin).

def _crumbs_2x4x32(qs: np.ndarray) -> np.ndarray:
    """64 bytes of 2-bit values -> ``(n, 2, 4, 32)`` = element ``h*128 + j*32 + l``.

    For half h (bytes ``qs[h*32 : h*32+32]``) and j = 0..3, element
    ``h*128 + j*32 + l`` is bits ``2j, 2j+1`` of ``qs[h*32 + l]``.
    """
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (qs.reshape(-1, 2, 1, 32) >> shifts) & 3


def dequantize_Q2_K(raw: np.ndarray) -> np.ndarray:
    """Q2_K, 84 bytes / 256 values, 16 sub-blocks of 16.

    offset 0   u8 scales[16]  sub-block i: low nibble = scale, high nibble = min
    offset 16  u8 qs[64]      2-bit values, see ``_crumbs_2x4x32``
    offset 80  f16 d          super-scale for the scales
    offset 82  f16 dmin       super-scale for the mins
    value (element e, sub-block i = e // 16) = d * scale_i * q - dmin * min_i
    """
    blocks = _as_blocks(raw, 84)
    scales = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    q = _crumbs_2x4x32(blocks[:, 16:80]).reshape(-1, 16, 16).astype(np.float32)
    sub_scale = (d * (scales & 0x0F).astype(np.float32))[:, :, None]
    sub_min = (dmin * (scales >> 4).astype(np.float32))[:, :, None]
    return (sub_scale * q - sub_min).reshape(-1, 256)


def dequantize_Q3_K(raw: np.ndarray) -> np.ndarray:
    """Q3_K, 110 bytes / 256 values, 16 sub-blocks of 16, symmetric.

    offset 0    u8 hmask[32]   high bit: element h*128 + j*32 + l has it at bit (4h + j) of hmask[l]
    offset 32   u8 qs[64]      low 2 bits, see ``_crumbs_2x4x32``
    offset 96   u8 scales[12]  16 six-bit scales: low 4 bits of scale i are the low nibble of
                               byte i (i < 8) or the high nibble of byte i-8 (i >= 8); its high
                               2 bits are bits 2*(i//4), +1 of byte 8 + i%4; stored with +32 bias
    offset 108  f16 d          super-scale
    q = low2 - (0 if high bit set else 4)   (range -4..3)
    value (element e, sub-block i = e // 16) = d * (scale_i - 32) * q
    """
    blocks = _as_blocks(raw, 110)
    hmask, qs, packed = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)

    scale_low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1)  # (n, 16)
    high_shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    scale_high = ((packed[:, None, 8:12] >> high_shifts) & 3).reshape(-1, 16)  # i = 4*(i//4) + i%4
    scales = (scale_low | (scale_high << 4)).astype(np.float32) - 32

    low2 = _crumbs_2x4x32(qs).astype(np.int16)  # (n, 2, 4, 32)
    bit_index = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)
    high = (hmask[:, None, None, :] >> bit_index) & 1
    q = (low2 - 4 * (1 - high.astype(np.int16))).reshape(-1, 16, 16).astype(np.float32)
    return ((d * scales)[:, :, None] * q).reshape(-1, 256)


def _scales_mins_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each ``(n, 8)``.

    sub-block j < 4:  scale = b[j] & 63,                         min = b[j+4] & 63
    sub-block j >= 4: scale = (b[j+4] & 15) | (b[j-4] >> 6) << 4,  min = (b[j+4] >> 4) | (b[j] >> 6) << 4
    """
    b0, b4, b8 = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([b0 & 63, (b8 & 0x0F) | ((b0 >> 6) << 4)], axis=1)
    mins = np.concatenate([b4 & 63, (b8 >> 4) | ((b4 >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _nibbles_4x2x32(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> ``(n, 8, 32)``: sub-block ``2c`` is the low nibbles of ``qs[32c : 32c+32]``,
    sub-block ``2c+1`` their high nibbles."""
    shifts = np.array([0, 4], dtype=np.uint8)[None, None, :, None]
    return ((qs.reshape(-1, 4, 1, 32) >> shifts) & 0x0F).reshape(-1, 8, 32)


def dequantize_Q4_K(raw: np.ndarray) -> np.ndarray:
    """Q4_K, 144 bytes / 256 values, 8 sub-blocks of 32.

    offset 0   f16 d          super-scale for the scales
    offset 2   f16 dmin       super-scale for the mins
    offset 4   u8 scales[12]  6-bit scales and mins, see ``_scales_mins_k4``
    offset 16  u8 qs[128]     4-bit values, see ``_nibbles_4x2x32``
    value (sub-block s) = d * scale_s * q - dmin * min_s
    """
    blocks = _as_blocks(raw, 144)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _scales_mins_k4(blocks[:, 4:16])
    q = _nibbles_4x2x32(blocks[:, 16:144]).astype(np.float32)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, 256)


def dequantize_Q5_K(raw: np.ndarray) -> np.ndarray:
    """Q5_K, 176 bytes / 256 values, 8 sub-blocks of 32.

    offset 0   f16 d          super-scale for the scales
    offset 2   f16 dmin       super-scale for the mins
    offset 4   u8 scales[12]  6-bit scales and mins, see ``_scales_mins_k4``
    offset 16  u8 qh[32]      5th bit: element 32s + l has it at bit s of qh[l]
    offset 48  u8 qs[128]     low 4 bits, see ``_nibbles_4x2x32``
    value (sub-block s) = d * scale_s * q - dmin * min_s
    """
    blocks = _as_blocks(raw, 176)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _scales_mins_k4(blocks[:, 4:16])
    bit_index = np.arange(8, dtype=np.uint8)[None, :, None]
    high = (blocks[:, None, 16:48] >> bit_index) & 1  # (n, 8, 32)
    q = (_nibbles_4x2x32(blocks[:, 48:176]) | (high << 4)).astype(np.float32)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, 256)


def dequantize_Q6_K(raw: np.ndarray) -> np.ndarray:
    """Q6_K, 210 bytes / 256 values, 16 sub-blocks of 16, symmetric.

    offset 0    u8 ql[128]     low 4 bits: element h*128 + k*32 + l is nibble k//2
                               (0 = low, 1 = high) of ql[h*64 + (k%2)*32 + l]
    offset 128  u8 qh[64]      high 2 bits: bits 2k, 2k+1 of qh[h*32 + l]
    offset 192  i8 scales[16]  signed scale per sub-block of 16
    offset 208  f16 d          super-scale
    value (element e, sub-block i = e // 16) = d * scale_i * (q - 32)
    """
    blocks = _as_blocks(raw, 210)
    d = _f16(blocks, 208)
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)

    nibble_shift = np.array([0, 4], dtype=np.uint8)[None, None, :, None, None]
    low4 = ((blocks[:, 0:128].reshape(-1, 2, 1, 2, 32) >> nibble_shift) & 0x0F).reshape(-1, 2, 4, 32)
    pair_shift = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    high2 = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> pair_shift) & 3  # (n, 2, 4, 32)
    q = (low4 | (high2 << 4)).reshape(-1, 16, 16).astype(np.float32) - 32
    return ((d * scales)[:, :, None] * q).reshape(-1, 256)


DEQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": dequantize_F32,
    "F16": dequantize_F16,
    "BF16": dequantize_BF16,
    "Q4_0": dequantize_Q4_0,
    "Q4_1": dequantize_Q4_1,
    "Q5_0": dequantize_Q5_0,
    "Q5_1": dequantize_Q5_1,
    "Q8_0": dequantize_Q8_0,
    "Q2_K": dequantize_Q2_K,
    "Q3_K": dequantize_Q3_K,
    "Q4_K": dequantize_Q4_K,
    "Q5_K": dequantize_Q5_K,
    "Q6_K": dequantize_Q6_K,
}


# --------------------------------------------------------------------------- QTensor level

def _row_data(t: QTensor) -> np.ndarray:
    """``t.data`` as ``(rows, row_bytes)`` (or ``(rows, cols)`` for F32/F16), checked against ``t.shape``."""
    if t.ggml_type not in DEQUANTIZERS:
        raise UnsupportedTensorType(t.ggml_type, t.name)
    block_elems, block_bytes = GGML_BLOCK_SIZES[t.ggml_type]
    rows, cols = t.rows, t.cols
    if t.ggml_type in ("F32", "F16"):
        expected = (np.float32 if t.ggml_type == "F32" else np.float16, cols)
    else:
        expected = (np.uint8, cols // block_elems * block_bytes)
    dtype, row_len = expected
    data = np.asarray(t.data)
    if data.dtype != dtype or data.size != rows * row_len:
        raise ValueError(
            f"tensor '{t.name}': {t.ggml_type} data of shape {t.shape} must be {np.dtype(dtype).name} "
            f"with {rows}x{row_len} items, got {data.dtype} {data.shape}"
        )
    return data.reshape(rows, row_len)


def _dequantize_row_data(ggml_type: str, row_data: np.ndarray, cols: int) -> np.ndarray:
    return DEQUANTIZERS[ggml_type](row_data).reshape(row_data.shape[0], cols)


def dequantize(t: QTensor) -> np.ndarray:
    """The whole tensor as float32 of shape ``t.shape``."""
    row_data = _row_data(t)
    return _dequantize_row_data(t.ggml_type, row_data, t.cols).reshape(t.shape)


def dequantize_rows(t: QTensor, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` as float32 ``(stop - start, cols)``; only those rows are decoded."""
    row_data = _row_data(t)
    if not 0 <= start <= stop <= t.rows:
        raise IndexError(f"tensor '{t.name}': row range {start}:{stop} is outside 0:{t.rows}")
    return _dequantize_row_data(t.ggml_type, row_data[start:stop], t.cols)


def embedding_rows(w: QTensor, token_ids) -> np.ndarray:
    """Embedding lookup: rows ``token_ids`` of ``w`` as float32 ``(*token_ids.shape, cols)``."""
    row_data = _row_data(w)
    ids = w.checked_token_ids(token_ids)
    flat = ids.reshape(-1)
    return _dequantize_row_data(w.ggml_type, row_data[flat], w.cols).reshape(*ids.shape, w.cols)


def matmul(w: QTensor, x: np.ndarray) -> np.ndarray:
    """``x @ dequantize(w).T``: x float32 ``(n, cols)`` -> ``(n, rows)`` (x ``(cols,)`` -> ``(rows,)``).

    Rows of ``w`` are dequantized in chunks of at most ``MATMUL_CHUNK_WEIGHTS``
    weights, so memory stays bounded whatever the matrix size.
    """
    row_data = _row_data(w)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2) or x.shape[-1] != w.cols:
        raise ValueError(f"matmul with '{w.name}' {w.shape}: x must be (n, {w.cols}), got {x.shape}")
    x2 = x.reshape(-1, w.cols)
    out = np.empty((x2.shape[0], w.rows), dtype=np.float32)  # (n, rows)
    chunk_rows = max(1, MATMUL_CHUNK_WEIGHTS // w.cols)
    for start in range(0, w.rows, chunk_rows):
        stop = min(start + chunk_rows, w.rows)
        w_chunk = _dequantize_row_data(w.ggml_type, row_data[start:stop], w.cols)  # (chunk, cols)
        out[:, start:stop] = x2 @ w_chunk.T
    return out.reshape(*x.shape[:-1], w.rows)


# --------------------------------------------------------------------------- fused forms (what the model calls)
# The fast path does each in one launch; here they are the plain compositions.

def rms_norm_matmul_many(ws, x: np.ndarray, norm_weight: np.ndarray, eps: float) -> list[np.ndarray]:
    """``[matmul(w, rms_norm(x, norm_weight, eps)) for w in ws]``: x (n, cols) -> one (n, rows) per w."""
    from ..ops import ref as ops_ref
    h = ops_ref.rms_norm(x, norm_weight, eps)                                  # (n, cols)
    return [matmul(w, h) for w in ws]


def matmul_add(w: QTensor, x: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """``residual + matmul(w, x)``: x (n, cols), residual (n, rows) -> a new (n, rows) array."""
    return (np.asarray(residual, dtype=np.float32) + matmul(w, x)).astype(np.float32)


def swiglu_matmul_add(w: QTensor, gate: np.ndarray, up: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """``residual + matmul(w, swiglu(gate, up))``: gate, up (n, cols), residual (n, rows)."""
    from ..ops import ref as ops_ref
    return matmul_add(w, ops_ref.swiglu(gate, up), residual)


def gated_matmul(w: QTensor, gate: np.ndarray, up: np.ndarray, activation: str,
                 residual: np.ndarray | None = None) -> np.ndarray:
    """``[residual +] matmul(w, activation(gate) * up)``: gate, up (n, cols), residual (n, rows) or None."""
    from ..ops import ref as ops_ref
    product = matmul(w, ops_ref.gated(activation, gate, up))
    return product if residual is None else (residual + product).astype(np.float32)
