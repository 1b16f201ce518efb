"""Random weights of any ggml type as the kernels see real ones: random quant bytes, sane f16 scales.

For tests and benchmarks (speed on real shapes without the real weights). Random bytes alone would put
f16 infinities and NaNs in the scale fields; those are overwritten with values in ``scale_range``.
"""
from __future__ import annotations

import numpy as np

from . import GGML_BLOCK_SIZES, QTensor

# byte offsets of the f16 scale fields inside one block of each quantized type (the rest are quants or packed
# 6-bit scales, any bytes valid)
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(out: np.ndarray, ggml_type: str, rng: np.random.Generator,
                  scale_range: tuple[float, float] = (0.001, 0.05)) -> np.ndarray:
    """``out`` uint8 (..., n_blocks, block_bytes) filled with random blocks of ``ggml_type``; returns it."""
    out[...] = rng.integers(0, 256, out.shape, dtype=np.uint8)
    for offset in F16_FIELDS[ggml_type]:
        scales = rng.uniform(*scale_range, out.shape[:-1]).astype(np.float16)
        out[..., offset:offset + 2] = scales.view(np.uint8).reshape(*out.shape[:-1], 2)
    return out


def random_weight(ggml_type: str, rows: int, cols: int, seed: int = 0, name: str = "w") -> QTensor:
    """A (rows, cols) QTensor of ``ggml_type`` (F32, F16, BF16 or a quantized type; cols a multiple of its
    block), the same for the same seed."""
    rng = np.random.default_rng(seed)
    if ggml_type == "F32":
        return QTensor(name, "F32", (rows, cols), rng.standard_normal((rows, cols)).astype(np.float32))
    if ggml_type == "F16":
        return QTensor(name, "F16", (rows, cols), rng.standard_normal((rows, cols)).astype(np.float16))
    if ggml_type == "BF16":
        bits = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype("<u2")
        return QTensor(name, "BF16", (rows, cols), bits.view(np.uint8).reshape(rows, 2 * cols))
    block_elems, block_bytes = GGML_BLOCK_SIZES[ggml_type]
    n_blocks = cols // block_elems
    raw = random_blocks(np.empty((rows, n_blocks, block_bytes), dtype=np.uint8), ggml_type, rng)
    return QTensor(name, ggml_type, (rows, cols), raw.reshape(rows, n_blocks * block_bytes))
