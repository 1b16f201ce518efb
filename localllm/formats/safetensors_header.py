"""The header of a ``.safetensors`` file, read and checked with the standard library only (no numpy):
``formats.safetensors`` maps the tensors it describes, ``model_info`` lists them for ``show``."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# bytes per element of the dtypes whose sizes are checked against the header's offsets
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1}


def read_safetensors_header(path: Path, error: type[Exception] = ValueError) -> tuple[dict[str, dict], int]:
    """The tensor table of a ``.safetensors`` file (``__metadata__`` dropped) and where its data starts.

    Layout: an 8-byte little-endian header length n, n bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets from the end of the header),
    then the tensor bytes. Every tensor is checked to lie inside the file; a problem raises ``error``.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise error(f"{path.name} is not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise error(f"{path.name} is truncated: its header claims {header_len} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise error(f"{path.name} has an unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise error(f"{path.name} has an unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise error(f"{path.name}: tensor '{name}' has a malformed header entry") from None
        if not 0 <= begin <= end or data_start + end > file_size:
            raise error(f"{path.name} is truncated: tensor '{name}' ends past the end of the file")
        itemsize = ITEM_SIZES.get(dtype)
        if itemsize is not None and end - begin != itemsize * math.prod(shape):
            raise error(f"{path.name}: tensor '{name}' holds {end - begin} bytes for shape {shape} of "
                                f"{dtype}")
    return header, data_start
