"""Validate a model file or folder and describe it: Ollama ``details`` and ``model_info``.

Used by the store when a model enters it (pull, ``add_local``): a GGUF must open with
:func:`localllm.formats.gguf.read_gguf` (every tensor inside the file, of a type localllm
runs); an HF folder needs a ``config.json`` and readable ``*.safetensors`` whose tensors
lie inside their files. A vision projector (llama.cpp's mmproj GGUF, or a Hugging Face folder
with a ``vision_config``) is described by :func:`describe_projector` (Ollama's ``projector_info``)
and checked against its model by :func:`check_projector_fits`.
Only headers are read; weights are never loaded.
"""
from __future__ import annotations

import functools
import json
import math
from collections import Counter
from dataclasses import dataclass
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
    text = _text_config(config)            # a vision-language folder's language model: its text_config
    model_info = {
        "general.architecture": family,
        "general.parameter_count": n_params,
        f"{family}.context_length": text.get("max_position_embeddings"),
        f"{family}.embedding_length": text.get("hidden_size"),
        f"{family}.block_count": text.get("num_hidden_layers"),
        f"{family}.attention.head_count": text.get("num_attention_heads"),
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


def _text_config(config: dict) -> dict:
    """The keys of the language model in a ``config.json``: a vision-language folder's ``text_config``."""
    from .formats.hf_decoder import is_vision_language_config
    text = config.get("text_config")
    return text if is_vision_language_config(config) and isinstance(text, dict) else config


# ---- vision projectors ---------------------------------------------------------------------------------

PROJECTOR_TYPES = {"gemma3": "gemma3", "llava": "mlp"}     # localllm.vision's projector -> clip.projector_type


class ProjectorMismatch(InvalidModelFile):
    """A vision projector that does not belong to the model it is given to: its embeddings are of another width,
    or the model's vocabulary lacks the tokens its images are wrapped in."""


@dataclass(frozen=True)
class ProjectorDescription:
    """A vision projector, read from its headers and tensor shapes (no weight is loaded)."""

    path: Path
    format: str                 # "gguf" (llama.cpp's mmproj file) | "safetensors" (a Hugging Face folder)
    projector: str              # localllm.vision's kind: "gemma3" | "llava"
    n_embd_text: int            # the width of the embeddings it makes: its language model's width
    info: dict                  # Ollama's projector_info: the mmproj's metadata, or the same keys for a folder


def is_projector_file(path: Path) -> bool:
    """A llama.cpp projector GGUF: ``general.architecture`` ``clip`` (or ``clip.has_vision_encoder`` set).
    False for anything else, including files that are not readable GGUFs (their own checks name the fault)."""
    from .formats.gguf import read_gguf

    path = Path(path)
    if not path.is_file():
        return False
    try:
        gguf_file = read_gguf(path)
    except (ValueError, OSError):
        return False
    return gguf_file.architecture == "clip" or bool(gguf_file.metadata.get("clip.has_vision_encoder"))


def is_vision_folder(path: Path) -> bool:
    """A Hugging Face folder whose ``config.json`` holds a vision-language model (Gemma 3, LLaVA)."""
    from .formats.hf_decoder import is_vision_language_config

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and is_vision_language_config(config)


def describe_projector(path: Path) -> ProjectorDescription:
    """Read a vision projector: an mmproj GGUF or a vision-language Hugging Face folder. Its configuration and
    every tensor's shape are checked (``localllm.vision``); a broken or unsupported one is InvalidModelFile."""
    from .arch.spec import UnsupportedModelFeature
    from .formats.errors import ModelFormatError
    from .quants import UnsupportedTensorType
    from .vision import VisionEncoder

    path = Path(path)
    try:
        if path.is_dir():
            encoder, format = VisionEncoder.from_hf(path), "safetensors"
        elif path.is_file():
            encoder, format = VisionEncoder.from_mmproj(path), "gguf"
        else:
            raise InvalidModelFile(f"no projector file or folder at {path}")
    except (ModelFormatError, UnsupportedModelFeature, UnsupportedTensorType, FileNotFoundError) as exc:
        raise InvalidModelFile(f"{path.name}: not a usable vision projector: {exc}") from exc
    except ValueError as exc:              # VisionConfig.check: a configuration the encoder cannot run
        raise InvalidModelFile(str(exc)) from exc
    n_params = sum(math.prod(tensor.shape) for tensor in encoder.tensors.values())
    if format == "gguf":
        from .formats.gguf import read_gguf
        info = {key: value for key, value in read_gguf(path).metadata.items()
                if not (isinstance(value, list) and len(value) > MAX_INFO_ARRAY)}
    else:
        c, pre = encoder.config, encoder.preprocessing
        info = {"general.architecture": "clip", "clip.has_vision_encoder": True,
                "clip.projector_type": PROJECTOR_TYPES[c.projector],
                "clip.vision.image_size": c.image_size, "clip.vision.patch_size": c.patch_size,
                "clip.vision.embedding_length": c.dim, "clip.vision.feed_forward_length": c.hidden_dim,
                "clip.vision.block_count": c.n_layers, "clip.vision.attention.head_count": c.n_heads,
                "clip.vision.attention.layer_norm_epsilon": c.eps, "clip.vision.projection_dim": c.n_embd_text,
                "clip.vision.image_mean": list(pre.mean), "clip.vision.image_std": list(pre.std)}
    info["general.parameter_count"] = n_params
    return ProjectorDescription(path, format, encoder.projector, encoder.config.n_embd_text, info)


def check_projector_fits(model_path: Path, format: str, projector: ProjectorDescription) -> None:
    """:class:`ProjectorMismatch` naming both when ``projector`` cannot serve the model at ``model_path`` (a GGUF
    file or a Hugging Face folder): embeddings of another width than the model's, or wrapping tokens (Gemma 3's
    ``<start_of_image>``, ``<end_of_image>``) its vocabulary lacks. Headers only."""
    from .vision.prompt import WRAPPING

    model_path = Path(model_path)
    width, tokens = _model_width_and_tokens(model_path, format)
    if width is not None and width != projector.n_embd_text:
        raise ProjectorMismatch(f"the vision projector {projector.path.name} makes embeddings of width "
                                f"{projector.n_embd_text}, but the model {model_path.name} is {width} wide: "
                                "they do not belong together")
    wrapping = WRAPPING[projector.projector]
    for text in (wrapping.before.strip(), wrapping.after.strip()):
        if text and tokens is not None and text not in tokens:
            raise ProjectorMismatch(f"the model {model_path.name} has no {text} token, which "
                                    f"{projector.projector} images are wrapped in: the vision projector "
                                    f"{projector.path.name} does not belong to it")


def _model_width_and_tokens(path: Path, format: str) -> tuple[int | None, set[str] | None]:
    """(embedding width, vocabulary texts) of a model from its headers; None for what it does not say."""
    if format == "gguf":
        from .formats.gguf import read_gguf
        metadata = read_gguf(path).metadata
        width = metadata.get(f"{metadata.get('general.architecture')}.embedding_length")
        tokens = metadata.get("tokenizer.ggml.tokens")
        return (int(width) if isinstance(width, int) else None), (set(tokens) if isinstance(tokens, list) else None)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFile(f"{path / 'config.json'} is not readable: {exc}") from exc
    width = _text_config(config).get("hidden_size")
    return (width if isinstance(width, int) else None), _hf_vocabulary(path / "tokenizer.json")


def _hf_vocabulary(path: Path) -> set[str] | None:
    """The token texts of a ``tokenizer.json`` (its model's vocabulary and its added tokens); None without one."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    vocab = (spec.get("model") or {}).get("vocab") if isinstance(spec, dict) else None
    texts = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab or [] if isinstance(entry, list)}
    return texts | {entry.get("content") for entry in spec.get("added_tokens") or [] if isinstance(entry, dict)}
