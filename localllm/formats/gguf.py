"""GGUF files -> metadata + memory-mapped QTensors (no dequantization at load).

``read_gguf`` parses the GGUF header (key/value metadata and tensor infos)
directly with ``struct`` and wraps every tensor as a
:class:`~localllm.quants.QTensor` view over one read-only ``np.memmap``.
``gguf.GGUFReader`` reads the same files but spends about 3 s building numpy
views for the 98k vocabulary strings of SmolLM2; this parser takes a few tens
of milliseconds, and the tests check it against ``GGUFReader``.

Layout (little-endian): magic ``GGUF``, version u32, tensor_count u64,
kv_count u64, kv pairs (key string, value type u32, value), tensor infos
(name, n_dims u32, dims u64 x n_dims in ggml order, ggml type u32, offset u64),
padding to ``general.alignment`` (default 32), tensor data.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..quants import GGML_BLOCK_SIZES, QTensor, UnsupportedTensorType

# ggml_type enum value -> name (ggml.h); names of types we cannot compute with are kept for error messages.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}

# GGUF metadata value types: id -> struct format (scalars), 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a readable GGUF (truncated, corrupt, wrong magic)."""


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, QTensor] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str, default: Any = None) -> Any:
        """``metadata["<arch>.<key>"]``, e.g. ``arch_key("block_count")``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path.name}: missing GGUF metadata key '{key}'")
        return self.metadata[key]


class _HeaderParser:
    """Sequential reader over the header bytes."""

    def __init__(self, buffer: memoryview, name: str):
        self.buffer = buffer
        self.offset = 0
        self.name = name

    def take(self, fmt: str):
        try:
            values = struct.unpack_from(fmt, self.buffer, self.offset)
        except struct.error:
            raise GGUFError(f"{self.name} is truncated or corrupt (header ends early)") from None
        self.offset += struct.calcsize(fmt)
        return values[0]

    def string(self) -> str:
        length = self.take("<Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise GGUFError(f"{self.name} is truncated or corrupt (string past end of file)")
        raw = bytes(self.buffer[self.offset:end])
        self.offset = end
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.take("<I")
            count = self.take("<Q")
            if item_type in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[item_type])
                end = self.offset + count * dtype.itemsize
                if end > len(self.buffer):
                    raise GGUFError(f"{self.name} is truncated or corrupt (array past end of file)")
                items = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
                self.offset = end
                return items
            return [self.value(item_type) for _ in range(count)]
        raise GGUFError(f"{self.name}: unknown GGUF metadata value type {value_type}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file: plain-Python metadata and zero-copy tensors.

    Raises :class:`GGUFError` for unreadable files (wrong magic, truncated,
    tensors past the end) and :class:`~localllm.quants.UnsupportedTensorType`
    naming the tensor for types localllm cannot compute with.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if path.stat().st_size < 24:
        raise GGUFError(f"{path.name} is not a GGUF file (too short)")
    mapping = np.memmap(path, dtype=np.uint8, mode="r")
    parser = _HeaderParser(memoryview(mapping), path.name)
    if bytes(mapping[:4]) != b"GGUF":
        raise GGUFError(f"{path.name} is not a GGUF file (bad magic {bytes(mapping[:4])!r})")
    parser.offset = 4
    version = parser.take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path.name}: unsupported GGUF version {version} (big-endian files are not supported)")
    tensor_count = parser.take("<Q")
    kv_count = parser.take("<Q")
    if tensor_count > 1 << 24 or kv_count > 1 << 24:
        raise GGUFError(f"{path.name} is corrupt (implausible tensor or key count)")

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = parser.string()
        metadata[key] = parser.value(parser.take("<I"))

    infos = []
    for _ in range(tensor_count):
        name = parser.string()
        n_dims = parser.take("<I")
        if n_dims > 4:
            raise GGUFError(f"{path.name} is corrupt (tensor '{name}' has {n_dims} dimensions)")
        dims = [parser.take("<Q") for _ in range(n_dims)]
        type_id = parser.take("<I")
        offset = parser.take("<Q")
        infos.append((name, dims, type_id, offset))

    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-parser.offset // alignment) * alignment
    tensors = {name: _tensor_view(mapping, path.name, name, dims, type_id, data_start + offset)
               for name, dims, type_id, offset in infos}
    return GGUFFile(path, metadata, tensors)


def _tensor_view(mapping: np.memmap, file_name: str, name: str, dims: list[int], type_id: int,
                 start: int) -> QTensor:
    type_name = GGML_TYPE_NAMES.get(type_id, f"type {type_id}")
    if type_name not in GGML_BLOCK_SIZES:
        raise UnsupportedTensorType(type_name, name)
    block_elems, block_bytes = GGML_BLOCK_SIZES[type_name]
    shape = tuple(int(d) for d in reversed(dims))  # ggml order (ne0 first) -> numpy order
    cols = shape[-1] if shape else 1
    if cols % block_elems:
        raise GGUFError(f"{file_name}: tensor '{name}' row length {cols} is not a multiple of {block_elems}")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = cols // block_elems * block_bytes
    end = start + rows * row_bytes
    if end > mapping.shape[0]:
        raise GGUFError(f"{file_name} is truncated: tensor '{name}' ends past the end of the file")
    raw = mapping[start:end]
    if type_name in ("F32", "F16"):
        data = raw.view(np.float32 if type_name == "F32" else np.float16)
        data = data.reshape(shape if len(shape) == 1 else (rows, cols))
    else:
        data = raw.reshape((row_bytes,) if len(shape) == 1 else (rows, row_bytes))
    return QTensor(name, type_name, shape, data)
