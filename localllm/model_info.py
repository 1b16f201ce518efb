"""Validate a model file or folder and describe it: Ollama ``details`` and ``model_info``.

Used by the store when a model enters it (pull, ``add_local``): a GGUF must open with
:func:`localllm.formats.gguf.read_gguf` (every tensor inside the file, of a type localllm
runs); an HF folder needs a ``config.json`` and readable ``*.safetensors`` whose tensors
lie inside their files.
Only headers are read; weights are never loaded.
"""
from __future__ import annotations

import functools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

MAX_INFO_ARRAY = 64  # longer GGUF arrays (vocabularies, merges) are left out of model_info


class InvalidModelFile(ValueError):
    """A file or folder that cannot be a model: corrupt, truncated, or missing its parts."""


def describe(path: Path, format: str) -> tuple[dict, dict]:
    """(details, model_info) of a ``gguf`` file or a ``safetensors`` HF folder; raises InvalidModelFile."""
    if format == "gguf":
        return describe_gguf(path)
    if format == "safetensors":
        return describe_hf_folder(path)
    raise InvalidModelFile(f"unknown model format {format!r} (expected 'gguf' or 'safetensors')")


def human_count(n: int) -> str:
    """Parameter counts as model cards write them: 134515008 -> '135M', 22713216 -> '22.7M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def describe_gguf(path: Path) -> tuple[dict, dict]:
    from .formats.gguf import GGUFError, read_gguf
    from .quants import UnsupportedTensorType

    path = Path(path)
    try:
        gguf_file = read_gguf(path)  # checks the header and that every tensor lies inside the file
    except GGUFError as exc:  # its message names the file and what is wrong with it
        raise InvalidModelFile(str(exc)) from exc
    except UnsupportedTensorType as exc:
        raise InvalidModelFile(f"{path.name}: {exc}") from exc
    if not gguf_file.tensors:
        raise InvalidModelFile(f"{path.name} holds no tensors")

    model_info: dict[str, Any] = {key: value for key, value in gguf_file.metadata.items()
                                  if not (isinstance(value, list) and len(value) > MAX_INFO_ARRAY)}
    n_params = 0
    elements_by_type = Counter()
    for tensor in gguf_file.tensors.values():
        n_elements = math.prod(tensor.shape)
        n_params += n_elements
        if len(tensor.shape) >= 2:
            elements_by_type[tensor.ggml_type] += n_elements
    model_info["general.parameter_count"] = n_params

    family = gguf_file.architecture or "unknown"
    details = {
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": human_count(n_params),
        "quantization_level": _gguf_file_type(model_info.get("general.file_type"))
        or (elements_by_type.most_common(1)[0][0] if elements_by_type else "unknown"),
    }
    return details, model_info


def _gguf_file_type(file_type: Any) -> str | None:
    """``general.file_type`` as Ollama shows it: 3 -> 'Q4_1', 0 -> 'F32', 15 -> 'Q4_K_M'."""
    import gguf

    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except (TypeError, ValueError):
        return None
    if name == "GUESSED":
        return None
    return name.replace("ALL_", "").replace("MOSTLY_", "")


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a ``.safetensors`` file (``__metadata__`` dropped), checked against the file size."""
    from .formats.safetensors_header import read_safetensors_header as read_header
    return read_header(Path(path), InvalidModelFile)[0]


def describe_hf_folder(folder: Path) -> tuple[dict, dict]:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidModelFile(f"{folder} is not a model folder: no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFile(f"{config_path} is not valid JSON: {exc}") from exc
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise InvalidModelFile(f"{folder} has no *.safetensors weights")

    n_params = 0
    elements_by_dtype = Counter()
    for weight_file in weight_files:
        for info in read_safetensors_header(weight_file).values():
            n_elements = 1
            for dim in info["shape"]:
                n_elements *= int(dim)
            n_params += n_elements
            elements_by_dtype[info["dtype"]] += n_elements

    family = str(config.get("model_type") or "unknown")
    model_info = {
        "general.architecture": family,
        "general.parameter_count": n_params,
        f"{family}.context_length": config.get("max_position_embeddings"),
        f"{family}.embedding_length": config.get("hidden_size"),
        f"{family}.block_count": config.get("num_hidden_layers"),
        f"{family}.attention.head_count": config.get("num_attention_heads"),
    }
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            model_info["tokenizer.chat_template"] = json.loads(tokenizer_config.read_text(encoding="utf-8")).get(
                "chat_template")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidModelFile(f"{tokenizer_config} is not valid JSON: {exc}") from exc
    model_info = {key: value for key, value in model_info.items() if value is not None}
    details = {
        "format": "safetensors",
        "family": family,
        "families": [family],
        "parameter_size": human_count(n_params),
        "quantization_level": elements_by_dtype.most_common(1)[0][0] if elements_by_dtype else "unknown",
    }
    return details, model_info


def supports_insert(path: Path, format: str) -> bool:
    """Whether the model has fill-in-the-middle tokens (``suffix`` on /api/generate and /v1/completions):
    Ollama's ``insert`` capability. Read from the GGUF's vocabulary once per file (cached)."""
    if format != "gguf":
        return False
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return False
    return _gguf_supports_insert(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _gguf_supports_insert(path: str, size: int, mtime_ns: int) -> bool:
    from .formats.gguf import read_gguf
    from .tokenizer_build import gguf_fim_ids

    return gguf_fim_ids(read_gguf(path).metadata) is not None
