"""Quantized tensors: ggml block formats kept as the file stores them.

A ``QTensor`` is a view over the memory-mapped file: for a weight matrix of
``shape == (rows, cols)`` (numpy order: ``rows`` output features, ``cols``
input features) ``data`` holds one row of blocks per matrix row:

* quantized types and BF16: ``uint8`` array ``(rows, row_bytes)``
* F32 / F16: the native dtype, ``(rows, cols)``

``quants.ref`` turns any of them back into float32 (the readable oracle);
``quants.kernels`` multiplies by them without dequantizing the whole matrix.
"""
from __future__ import annotations

from ..kernel_cache import configure as _configure_kernel_cache

_configure_kernel_cache()  # before any kernel module is imported

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# ggml type name -> (elements per block, bytes per block), as ggml defines them.
GGML_BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
SUPPORTED_TYPES = frozenset(GGML_BLOCK_SIZES)


class UnsupportedTensorType(ValueError):
    """A tensor is stored in a ggml type localllm cannot compute with."""

    def __init__(self, ggml_type: str, tensor_name: str):
        super().__init__(
            f"tensor '{tensor_name}' has ggml type {ggml_type}, which localllm does not support "
            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})"
        )
        self.ggml_type = ggml_type
        self.tensor_name = tensor_name


@dataclass(frozen=True, eq=False)
class QTensor:
    """A (possibly quantized) tensor in its file format; see the module docstring."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]  # numpy order, e.g. (out_features, in_features)
    data: np.ndarray

    def __post_init__(self):
        if self.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedTensorType(self.ggml_type, self.name)
        block_elems, block_bytes = GGML_BLOCK_SIZES[self.ggml_type]
        cols = self.shape[-1]
        if cols % block_elems:
            raise ValueError(
                f"tensor '{self.name}': row length {cols} is not a multiple of the "
                f"{self.ggml_type} block size {block_elems}"
            )

    @cached_property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def row_slice(self, start: int, stop: int) -> "QTensor":
        """Rows ``start:stop`` of a 2-D tensor, still in file format (no copy)."""
        return QTensor(self.name, self.ggml_type, (stop - start, self.cols), self.data[start:stop])

    def checked_token_ids(self, token_ids) -> np.ndarray:
        """``token_ids`` as an integer array of row indices, or a TypeError / IndexError naming the tensor."""
        ids = np.asarray(token_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token_ids for '{self.name}' must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise IndexError(f"token_ids for '{self.name}' must lie in 0:{self.rows}, got {ids.min()}..{ids.max()}")
        return ids

    @classmethod
    def from_float(cls, name: str, array: np.ndarray) -> "QTensor":
        """Wrap a float32 array (tests, HF weights)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        return cls(name, "F32", tuple(array.shape), array)
