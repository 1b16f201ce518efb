"""The header of a ``.safetensors`` file, read and checked with the standard library only (no numpy):
``formats.safetensors`` maps the tensors it describes, ``model_info`` lists them for ``show``.

The header is untrusted: its length is bounded (the safetensors library's own 100 MB limit) before it is
read, its JSON must be one object without repeated names, and every entry must name a known dtype, a shape
of non-negative integers and two offsets inside the data buffer that hold exactly the shape's bytes, no two
entries overlapping. Anything else raises the caller's error class naming the file and the entry.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import ModelFormatError

# bits per element of every dtype the safetensors format defines
ITEM_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
             "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32,
             "U16": 16, "U8": 8, "BOOL": 8, "C64": 64}
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: Path, error: type[Exception] = ModelFormatError) -> tuple[dict[str, dict], int]:
    """The tensor table of a ``.safetensors`` file (``__metadata__`` dropped) and where its data starts.

    Layout: an 8-byte little-endian header length n, n bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets from the end of the header),
    then the tensor bytes. Every entry is checked (see the module docstring); a problem raises ``error``
    (given the path too when it is a ModelFormatError). Entries come back as dicts with ``dtype`` (str),
    ``shape`` (list of int) and ``data_offsets`` ([begin, end] ints).
    """
    path = Path(path)

    def refuse(message: str) -> Exception:
        return error(message, path) if issubclass(error, ModelFormatError) else error(message)

    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise refuse(f"{path.name} is not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise refuse(f"{path.name} is truncated: its header claims {header_len} bytes")
        if header_len > MAX_HEADER_BYTES:
            raise refuse(f"{path.name} is corrupt: its header claims {header_len} bytes (at most "
                         f"{MAX_HEADER_BYTES} allowed)")
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_unique_names)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _RepeatedName) as exc:
            raise refuse(f"{path.name} has an unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise refuse(f"{path.name} has an unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_size = file_size - data_start
    spans = []
    for name, info in header.items():
        dtype, shape, (begin, end) = _entry(info, lambda problem: refuse(f"{path.name}: tensor '{name}' {problem}"))
        if end > data_size:
            raise refuse(f"{path.name} is truncated: tensor '{name}' ends past the end of the file")
        bits = ITEM_BITS[dtype] * math.prod(shape)
        if bits % 8 or end - begin != bits // 8:
            raise refuse(f"{path.name}: tensor '{name}' holds {end - begin} bytes for shape {shape} of {dtype}")
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise refuse(f"{path.name} is corrupt: the data of tensors '{name_a}' and '{name_b}' overlap")
    return header, data_start


class _RepeatedName(ValueError):
    pass


def _unique_names(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict, refusing a name given twice (json keeps the last one silently)."""
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise _RepeatedName(f"the name {next(n for n in names if names.count(n) > 1)!r} appears twice in an object")
    return dict(pairs)


def _entry(info, refuse) -> tuple[str, list[int], tuple[int, int]]:
    """(dtype, shape, (begin, end)) of one header entry, each of its kind, or ``refuse(problem)`` raised."""
    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise refuse("has a malformed header entry (expected dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_BITS:
        raise refuse(f"has unknown dtype {dtype!r} (safetensors dtypes: {', '.join(ITEM_BITS)})")
    if not isinstance(shape, list) or not all(map(is_count, shape)):
        raise refuse(f"has shape {shape!r} (expected a list of integers >= 0)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_count, offsets)) \
            or offsets[0] > offsets[1]:
        raise refuse(f"has data_offsets {offsets!r} (expected [begin, end], 0 <= begin <= end)")
    return dtype, shape, (offsets[0], offsets[1])
