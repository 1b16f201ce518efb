"""Hugging Face model folders: config.json + *.safetensors + tokenizer (+ sentence-transformers files).

``read_hf_folder`` gathers what a folder holds without interpreting the
architecture: the parsed ``config.json``, every tensor as a
:class:`~localllm.quants.QTensor` (F32 / F16 / BF16 views over a read-only
memory map of the file: ``read_safetensors`` parses the header itself), where the tokenizer lives, and the
sentence-transformers pipeline (``modules.json``, the Pooling module's
``config.json``, ``sentence_bert_config.json``, a ``Normalize`` module).
``hf_architecture`` names the localllm dataflow for the config, or raises.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ..quants import QTensor, UnsupportedTensorType
from .errors import ModelFormatError
from .safetensors_header import read_safetensors_header as _read_header

# model_type in config.json -> localllm dataflow (models/<name>.py)
HF_MODEL_TYPES = {"bert": "bert"}

# sentence-transformers pooling modes (its own names), and the legacy config flag of each
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

_ITEM_SIZES = {"F32": 4, "F16": 2, "BF16": 2}        # safetensors dtypes read as weights (ggml names alike)
_SKIPPED_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")


class HFFolderError(ModelFormatError):
    """A Hugging Face folder is missing a file or holds something unreadable."""


@dataclass
class SentenceTransformersConfig:
    """The parts of a sentence-transformers pipeline that change the embedding."""

    pooling: str | None = None        # one of POOLING_MODES
    max_seq_length: int | None = None
    normalize: bool = False           # a Normalize module follows the pooling
    do_lower_case: bool = False       # sentence_bert_config.json: lowercase the text before tokenizing


@dataclass
class HFFolder:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, QTensor] = field(repr=False)
    tokenizer_file: Path | None                  # tokenizer.json
    vocab_file: Path | None                      # vocab.txt (WordPiece folders without tokenizer.json)
    tokenizer_config: dict[str, Any]
    sentence_transformers: SentenceTransformersConfig | None

    @property
    def architecture(self) -> str:
        return hf_architecture(self.config, self.path)


def hf_architecture(config: dict[str, Any], where: str | Path = "config.json") -> str:
    """The localllm dataflow for a ``config.json``; ValueError naming ``architectures``/``model_type`` if none."""
    model_type = config.get("model_type")
    if model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    raise ValueError(
        f"{where}: unsupported architecture (architectures={config.get('architectures')!r}, "
        f"model_type={model_type!r}); localllm reads Hugging Face folders of model_type "
        f"{', '.join(repr(t) for t in HF_MODEL_TYPES)}"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HFFolderError(f"cannot read {path}: {exc}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: ``model.safetensors``, or the shards named by its index."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing or not shards:
            raise HFFolderError(f"{index}: shard file(s) {', '.join(missing) or '(none listed)'} not in {folder}")
        return shards
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise HFFolderError(f"{folder}: no model.safetensors (or sharded *.safetensors) found")
    return found


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """``safetensors_header.read_safetensors_header`` raising HFFolderError."""
    return _read_header(path, HFFolderError)


def read_safetensors(path: str | Path) -> dict[str, QTensor]:
    """Every tensor of one ``.safetensors`` file as a QTensor over a read-only memory map (no copy).

    F32 and F16 become arrays of their dtype; BF16 becomes a ggml ``BF16`` QTensor (uint8 rows,
    two bytes a value, as GGUF stores it). Integer buffers (``embeddings.position_ids``) are skipped;
    other types raise UnsupportedTensorType naming the tensor.
    """
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    tensors: dict[str, QTensor] = {}
    if not header:
        return tensors
    mapping = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        if dtype in _SKIPPED_DTYPES:
            continue  # buffers such as embeddings.position_ids
        if dtype not in _ITEM_SIZES:
            raise UnsupportedTensorType(dtype, name)
        begin, end = info["data_offsets"]
        raw = mapping[data_start + begin:data_start + end]
        if (data_start + begin) % _ITEM_SIZES[dtype]:
            raw = np.array(raw)     # a fresh (aligned) copy: kernels read floats at their natural alignment
        cols = shape[-1] if shape else 1
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        if dtype == "BF16":
            data = raw.reshape((rows, cols * 2) if len(shape) > 1 else (cols * 2,))
        else:
            data = raw.view(np.float32 if dtype == "F32" else np.float16)
            data = data.reshape((rows, cols) if len(shape) > 1 else (cols,))
        tensors[name] = QTensor(name, dtype, shape or (1,), data)
    return tensors


def read_sentence_transformers(folder: Path) -> SentenceTransformersConfig | None:
    """The sentence-transformers pipeline of a folder, or None when it has no ``modules.json``."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    st = SentenceTransformersConfig()
    for module in _read_json(modules_file):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling_file = folder / module.get("path", "") / "config.json"
            if pooling_file.is_file():
                st.pooling = pooling_from_config(_read_json(pooling_file), pooling_file)
        elif kind == "Normalize":
            st.normalize = True
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        values = _read_json(bert_config)
        if values.get("max_seq_length") is not None:
            st.max_seq_length = int(values["max_seq_length"])
        st.do_lower_case = bool(values.get("do_lower_case", False))
    return st


def pooling_from_config(config: dict[str, Any], where: str | Path = "1_Pooling/config.json") -> str:
    """The pooling mode of a sentence-transformers Pooling ``config.json``.

    Newer files name it (``"pooling_mode": "mean"``), older ones set one of the
    ``pooling_mode_*`` flags; several modes at once (concatenated vectors) are
    not supported.
    """
    named = config.get("pooling_mode")
    if isinstance(named, list) and len(named) == 1:
        named = named[0]
    if isinstance(named, str):
        modes = [named]
    elif named is not None:
        modes = list(named)
    else:
        modes = [mode for flag, mode in POOLING_FLAGS.items() if config.get(flag)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise HFFolderError(f"{where}: expected exactly one pooling mode of {', '.join(POOLING_MODES)}; "
                            f"got {modes or 'none'}")
    return modes[0]


def read_hf_folder(folder: str | Path) -> HFFolder:
    """Read a Hugging Face model folder (see the module docstring); weights are loaded, not interpreted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder at {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HFFolderError(f"{folder}: no config.json")
    config = _read_json(config_file)
    hf_architecture(config, config_file)
    tensors: dict[str, QTensor] = {}
    for path in safetensors_files(folder):
        tensors.update(read_safetensors(path))
    tokenizer_config_file = folder / "tokenizer_config.json"
    tokenizer_file, vocab_file = folder / "tokenizer.json", folder / "vocab.txt"
    return HFFolder(
        path=folder,
        config=config,
        tensors=tensors,
        tokenizer_file=tokenizer_file if tokenizer_file.is_file() else None,
        vocab_file=vocab_file if vocab_file.is_file() else None,
        tokenizer_config=_read_json(tokenizer_config_file) if tokenizer_config_file.is_file() else {},
        sentence_transformers=read_sentence_transformers(folder),
    )
