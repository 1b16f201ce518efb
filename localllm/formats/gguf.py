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

The file is untrusted: every count and length is checked against the bytes left
before anything is allocated or looped over, and every tensor against the data
section (inside it, aligned, not overlapping another) before a view is made, so
a broken file is a :class:`GGUFError` naming it and what is wrong, never a
MemoryError, a hang or a read outside the mapping. The checks follow llama.cpp's
``gguf.cpp`` (which also refuses arrays of arrays, duplicate keys and tensor names,
and an alignment that is not a power of two).
"""
from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..quants import GGML_BLOCK_SIZES, QTensor, UnsupportedTensorType
from .errors import ModelFormatError
from .resident import read_spans

# ggml_type enum value -> name (ggml.h), for every type a GGUF file may hold.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# ggml type name -> (elements per block, bytes per block) for every type above (ggml's type traits), so a
# tensor's size is checked against the file even when localllm cannot compute with its type.
GGML_TYPE_SIZES: dict[str, tuple[int, int]] = {
    **GGML_BLOCK_SIZES,
    "Q8_1": (32, 40), "Q8_K": (256, 292), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ3_XXS": (256, 98),
    "IQ1_S": (256, 50), "IQ4_NL": (32, 18), "IQ3_S": (256, 110), "IQ2_S": (256, 82), "IQ4_XS": (256, 136),
    "I8": (1, 1), "I16": (1, 2), "I32": (1, 4), "I64": (1, 8), "F64": (1, 8), "IQ1_M": (256, 56),
    "TQ1_0": (256, 54), "TQ2_0": (256, 66), "MXFP4": (32, 17),
}

# GGUF metadata value types: id -> struct format (scalars), 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                                 # GGML_MAX_DIMS
MAX_DIM = (1 << 63) - 1                      # ggml keeps dimensions as int64
_STRING_HEADER_BYTES = 8                     # a string is its u64 length, then its bytes
_MIN_KV_BYTES = _STRING_HEADER_BYTES + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = _STRING_HEADER_BYTES + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


class GGUFError(ModelFormatError):
    """The file is not a readable GGUF (truncated, corrupt, wrong magic, tensors outside the data)."""


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
            raise GGUFError(f"{self.path.name}: missing GGUF metadata key '{key}'", self.path)
        return self.metadata[key]


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]   # ggml order (ne0, the row length, first)
    type_name: str
    offset: int             # from the start of the data section


class _HeaderParser:
    """Sequential reader over the header bytes; every read is checked against the bytes left."""

    def __init__(self, buffer: memoryview, path: Path):
        self.buffer = buffer
        self.offset = 0
        self.path = path

    @property
    def remaining(self) -> int:
        return len(self.buffer) - self.offset

    def truncated(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path.name} is truncated: the header ends inside {what} (byte {self.offset})",
                         self.path)

    def corrupt(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path.name} is corrupt: {problem}", self.path)

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if size > self.remaining:
            raise self.truncated(what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items that take at least ``min_item_bytes`` each: refused when they cannot fit."""
        n = self.take("<Q", what)
        if n * min_item_bytes > self.remaining:
            raise self.corrupt(f"{what} is {n}, but {n} items need at least {n * min_item_bytes} bytes and "
                               f"{self.remaining} are left (byte {self.offset})")
        return n

    def string(self, what: str) -> str:
        length = self.take("<Q", f"the length of {what}")
        if length > self.remaining:
            raise self.corrupt(f"{what} is {length} bytes long, past the end of the file (byte {self.offset})")
        raw = bytes(self.buffer[self.offset:self.offset + length])
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int, key: str) -> Any:
        what = f"the value of '{key}'"
        if value_type in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[value_type], what)
        if value_type == _STRING:
            return self.string(what)
        if value_type != _ARRAY:
            raise self.corrupt(f"key '{key}' has unknown GGUF value type {value_type}")
        item_type = self.take("<I", f"the item type of '{key}'")
        if item_type == _ARRAY:
            raise self.corrupt(f"key '{key}' is an array of arrays (GGUF readers do not support nested arrays)")
        if item_type in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[item_type])
            n = self.count(f"the length of array '{key}'", dtype.itemsize)
            items = np.frombuffer(self.buffer, dtype, n, self.offset).tolist()
            self.offset += n * dtype.itemsize
            return items
        if item_type == _STRING:
            n = self.count(f"the length of array '{key}'", _STRING_HEADER_BYTES)
            return [self.string(f"item {i} of '{key}'") for i in range(n)]
        raise self.corrupt(f"array '{key}' has unknown GGUF item type {item_type}")


def read_gguf(path: str | Path, resident: bool = False) -> GGUFFile:
    """Open a GGUF file: plain-Python metadata and zero-copy tensors (``resident``: the tensors' bytes read
    into memory in huge pages instead, ``formats.resident``; what inference loads use where they help).

    Raises :class:`GGUFError` for unreadable files (wrong magic, truncated, counts or lengths past the end,
    unknown value or tensor types, tensors outside the data section, misaligned or overlapping) and
    :class:`~localllm.quants.UnsupportedTensorType` naming the tensor for well-formed tensors of a ggml type
    localllm cannot compute with.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if path.stat().st_size < 24:
        raise GGUFError(f"{path.name} is not a GGUF file (too short)", path)
    mapping = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(mapping[:4]) != b"GGUF":
        raise GGUFError(f"{path.name} is not a GGUF file (bad magic {bytes(mapping[:4])!r})", path)
    parser = _HeaderParser(memoryview(mapping), path)
    parser.offset = 4
    version = parser.take("<I", "the version")
    if version not in (2, 3):
        raise GGUFError(f"{path.name}: unsupported GGUF version {version} (big-endian files are not supported)",
                        path)
    tensor_count = parser.take("<Q", "the tensor count")
    kv_count = parser.count("the key/value count", _MIN_KV_BYTES)
    if tensor_count * _MIN_TENSOR_INFO_BYTES > parser.remaining:
        raise parser.corrupt(f"the tensor count is {tensor_count}, more tensor infos than the file can hold")

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(kv_count):
        key = parser.string(f"key {i}")
        if not key:
            raise parser.corrupt(f"key {i} is empty")
        if key in metadata:
            raise parser.corrupt(f"key '{key}' appears twice")
        value_types[key] = parser.take("<I", f"the value type of '{key}'")
        metadata[key] = parser.value(value_types[key], key)

    infos = [_read_tensor_info(parser, i) for i in range(tensor_count)]
    names = [info.name for info in infos]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise parser.corrupt(f"tensor '{twice}' appears twice")

    alignment = _alignment(metadata, value_types, parser)
    data_start = -(-parser.offset // alignment) * alignment
    spans = _tensor_spans(infos, data_start, alignment, len(mapping), path)
    for info in infos:
        if info.type_name not in GGML_BLOCK_SIZES:
            raise UnsupportedTensorType(info.type_name, info.name)
    data = None
    if resident:
        try:
            data = dict(zip(names, read_spans(path, [spans[name] for name in names])))
        except (OSError, MemoryError) as exc:   # no room for an anonymous copy (overcommit off, a cgroup limit)
            warnings.warn(f"{path.name}: the weights stay mapped from the file (reading them into memory failed: "
                          f"{exc})", ResourceWarning, stacklevel=2)
    if data is not None:
        tensors = {info.name: _tensor_view(data[info.name], info) for info in infos}
    else:
        tensors = {info.name: _tensor_view(mapping[slice(*spans[info.name])], info) for info in infos}
    return GGUFFile(path, metadata, tensors)


def _read_tensor_info(parser: _HeaderParser, index: int) -> _TensorInfo:
    name = parser.string(f"the name of tensor {index}")
    n_dims = parser.take("<I", f"the dimension count of tensor '{name}'")
    if not 1 <= n_dims <= MAX_DIMS:
        raise parser.corrupt(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = tuple(parser.take("<Q", f"the dimensions of tensor '{name}'") for _ in range(n_dims))
    if not all(1 <= d <= MAX_DIM for d in dims):
        raise parser.corrupt(f"tensor '{name}' has dimensions {list(dims)} (each must be 1 to 2^63 - 1)")
    type_id = parser.take("<I", f"the type of tensor '{name}'")
    if type_id not in GGML_TYPE_NAMES:
        raise parser.corrupt(f"tensor '{name}' has unknown ggml type id {type_id}")
    offset = parser.take("<Q", f"the data offset of tensor '{name}'")
    return _TensorInfo(name, dims, GGML_TYPE_NAMES[type_id], offset)


def _alignment(metadata: dict[str, Any], value_types: dict[str, int], parser: _HeaderParser) -> int:
    """``general.alignment``: a u32 power of two (32 when absent), as llama.cpp requires."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    alignment = metadata["general.alignment"]
    if value_types["general.alignment"] != _UINT32:
        raise parser.corrupt(f"general.alignment has value type {value_types['general.alignment']}, not u32")
    if alignment <= 0 or alignment & (alignment - 1):
        raise parser.corrupt(f"general.alignment {alignment} is not a power of two")
    return alignment


def _tensor_spans(infos: list[_TensorInfo], data_start: int, alignment: int, file_size: int,
                  path: Path) -> dict[str, tuple[int, int]]:
    """name -> (start, end) byte range in the file of each tensor's data, checked: a whole number of blocks a
    row, aligned, inside the file, no two overlapping."""
    spans = {}
    for info in infos:
        block_elems, block_bytes = GGML_TYPE_SIZES[info.type_name]
        row_length = info.dims[0]
        if row_length % block_elems:
            raise GGUFError(f"{path.name}: tensor '{info.name}' row length {row_length} is not a multiple of "
                            f"{block_elems} ({info.type_name} block size)", path)
        n_bytes = math.prod(info.dims) // block_elems * block_bytes     # Python ints: no overflow
        if info.offset % alignment:
            raise GGUFError(f"{path.name} is corrupt: tensor '{info.name}' data offset {info.offset} is not a "
                            f"multiple of the alignment {alignment}", path)
        start = data_start + info.offset
        if start + n_bytes > file_size:
            raise GGUFError(f"{path.name} is truncated: tensor '{info.name}' ends past the end of the file "
                            f"({n_bytes} bytes at byte {start} of {file_size})", path)
        spans[info.name] = (start, start + n_bytes)
    by_start = sorted(spans.items(), key=lambda item: item[1])
    for (name_a, (_, end_a)), (name_b, (start_b, _)) in zip(by_start, by_start[1:]):
        if start_b < end_a:
            raise GGUFError(f"{path.name} is corrupt: the data of tensors '{name_a}' and '{name_b}' overlap", path)
    return spans


def _tensor_view(raw: np.ndarray, info: _TensorInfo) -> QTensor:
    """The QTensor over a tensor's checked bytes (float data not aligned to its elements is copied)."""
    block_elems, block_bytes = GGML_BLOCK_SIZES[info.type_name]
    shape = tuple(int(d) for d in reversed(info.dims))  # ggml order (ne0 first) -> numpy order
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    row_bytes = cols // block_elems * block_bytes
    if info.type_name in ("F32", "F16"):
        dtype = np.dtype(np.float32 if info.type_name == "F32" else np.float16)
        if raw.ctypes.data % dtype.itemsize:
            raw = np.array(raw)     # a fresh (aligned) copy: kernels read floats at their natural alignment
        data = raw.view(dtype)
        data = data.reshape(shape if len(shape) == 1 else (rows, cols))
    else:
        data = raw.reshape((row_bytes,) if len(shape) == 1 else (rows, row_bytes))
    return QTensor(info.name, info.type_name, shape, data)


# <arch>.<key> hyperparameters (GGUF spec, "LLM" section) the architecture modules read, by the values they
# may take: checked before a ModelConfig is made of them, so a corrupt value is a GGUFError naming the key
# instead of a division by zero, a float that is not a number or a loop as long as a corrupt count.
_POSITIVE_INTS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                  "attention.head_count", "attention.head_count_kv", "attention.key_length",
                  "attention.value_length", "rope.dimension_count")
_NON_NEGATIVE_INTS = ("vocab_size", "attention.sliding_window", "rope.scaling.original_context_length")
_POSITIVE_FLOATS = ("rope.freq_base", "rope.freq_base_swa")
_NON_NEGATIVE_FLOATS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.scaling.factor", "rope.scaling.attn_factor",
                        "attn_logit_softcapping", "final_logit_softcapping")
_STRINGS = ("rope.scaling.type",)


def check_hyperparameters(gguf: GGUFFile) -> None:
    """The ``<arch>.*`` hyperparameters of a decoder file, checked: integers where the spec has integers (and
    positive where a size), finite non-negative floats, ``block_count`` no more than the file's tensors (every
    block has some), ``attention.sliding_window_pattern`` a number or one flag a layer. GGUFError otherwise."""
    def corrupt(key: str, value: Any, expected: str) -> GGUFError:
        shown = f"a list of {len(value)} values" if isinstance(value, list) else repr(value)
        return GGUFError(f"{gguf.path.name} is corrupt: metadata '{gguf.architecture}.{key}' is {shown}, "
                         f"expected {expected}", gguf.path)

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def present(keys: tuple[str, ...]):
        return ((key, gguf.arch_key(key)) for key in keys if gguf.arch_key(key) is not None)

    for key, value in present(_POSITIVE_INTS):
        if not is_int(value) or value < 1:
            raise corrupt(key, value, "a positive integer")
    for key, value in present(_NON_NEGATIVE_INTS):
        if not is_int(value) or value < 0:
            raise corrupt(key, value, "an integer >= 0")
    for key, value in present(_POSITIVE_FLOATS + _NON_NEGATIVE_FLOATS):
        positive = key in _POSITIVE_FLOATS
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (positive and value == 0):
            raise corrupt(key, value, "a finite number " + ("> 0" if positive else ">= 0"))
    for key, value in present(_STRINGS):
        if not isinstance(value, str):
            raise corrupt(key, value, "a string")
    pattern = gguf.arch_key("attention.sliding_window_pattern")
    if pattern is not None and not (is_int(pattern) and pattern >= 0) and not (
            isinstance(pattern, list) and all(isinstance(flag, (bool, int)) for flag in pattern)):
        raise corrupt("attention.sliding_window_pattern", pattern, "an integer >= 0 or one flag a layer")
    n_layers = gguf.arch_key("block_count")
    if n_layers is not None and n_layers > len(gguf.tensors):
        raise corrupt("block_count", n_layers, f"at most the file's {len(gguf.tensors)} tensors")
