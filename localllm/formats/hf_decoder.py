"""Hugging Face decoder folders: ``config.json`` + ``*.safetensors`` + tokenizer files -> ModelConfig + GGUF-named
tensors, ready for ``models.decoder.DecoderModel``.

* the architecture comes from ``config.json``'s ``architectures`` (``HF_ARCHITECTURES``); an unknown one is
  ``UnsupportedArchitecture`` naming it and the supported ones, raised before any weight is mapped;
* hyperparameters: the architecture module's ``config_from_hf`` (``localllm/arch``);
* weights: memory-mapped views (``formats.safetensors``), renamed to llama.cpp's GGUF names by gguf-py's
  ``TensorNameMap`` for that architecture, so the decoder reads a folder as it reads a GGUF file. Two
  differences from what llama.cpp's converter writes, both exact: q and k rows stay in transformers' layout
  (the config says NEOX RoPE, so no permutation), and Gemma's norm scales get their +1 here (small vectors,
  copied to float32), as the converter adds it;
* ``tokenizer.json`` / ``tokenizer_config.json`` (template, special tokens) through ``Tokenizer.from_hf_folder``,
  and sampling defaults from ``generation_config.json`` (``generation_defaults``).

Vision-language folders (``Gemma3ForConditionalGeneration``, ``LlavaForConditionalGeneration``: a ``config.json``
with ``text_config`` and ``vision_config``) are read as their language model: the hyperparameters come from
``text_config`` (``text_config_of``), the weights from ``model.language_model.*`` + ``lm_head.*`` (transformers
4.52 and later) or ``language_model.model.*`` + ``language_model.lm_head.*`` (older checkpoints), named as the
stand-alone causal LM names them; the vision tower and projector (``[model.]vision_tower.*``,
``[model.]multi_modal_projector.*``) are left to ``localllm.vision`` (``VisionEncoder.from_hf`` reads them from
the same folder, and ``localllm.load`` attaches it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .. import arch
from ..arch.spec import ModelConfig, UnsupportedArchitecture, UnsupportedModelFeature
from ..quants import QTensor
from .safetensors import HF_MODEL_TYPES, HFFolderError, read_safetensors, safetensors_files

# config.json "architectures" -> the localllm (GGUF) architecture that runs it
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
# vision-language folders: the language model inside is described by "text_config"
VISION_LANGUAGE_ARCHITECTURES = ("Gemma3ForConditionalGeneration", "LlavaForConditionalGeneration")
# text_config "model_type" -> the causal LM class it stands for, when text_config names no "architectures"
TEXT_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                    "gemma3_text": "Gemma3ForCausalLM"}
# a vision-language folder's tensor name prefix -> the stand-alone causal LM's (None: the vision side's)
VISION_LANGUAGE_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                            ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
                            ("model.vision_tower.", None), ("vision_tower.", None),
                            ("model.multi_modal_projector.", None), ("multi_modal_projector.", None))
NORM_PLUS_ONE = ("gemma2", "gemma3")                # RMSNorm scales by (1 + weight)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)        # buffers older checkpoints saved; recomputed from the config
GENERATION_KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float}  # generation_config.json


@dataclass
class HFDecoderFolder:
    """A Hugging Face decoder folder, read: its ModelConfig and its weights under GGUF names."""

    path: Path
    hf_config: dict[str, Any]           # the language model's config.json keys (a VLM's text_config)
    config: ModelConfig
    tensors: dict[str, QTensor] = field(repr=False)
    has_vision: bool = False            # a vision-language folder: its vision encoder is in it too

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @cached_property
    def tokenizer(self):
        from ..tokenizer import Tokenizer
        return Tokenizer.from_hf_folder(self.path)

    @cached_property
    def generation_defaults(self) -> dict[str, Any]:
        return generation_defaults(self.path)

    @property
    def metadata(self) -> dict[str, Any]:
        """What a GGUF file would say about the model at a glance (``general.*``, the chat template)."""
        values = {"general.architecture": self.architecture, "general.name": self.path.name}
        if self.tokenizer.chat_template is not None:
            values["tokenizer.chat_template"] = self.tokenizer.chat_template
        return values


def supported_architectures() -> tuple[str, ...]:
    """config.json ``architectures`` values localllm loads as decoders (vision-language ones: their language model)."""
    return (*HF_ARCHITECTURES, *VISION_LANGUAGE_ARCHITECTURES)


def read_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder; FileNotFoundError / HFFolderError when missing or bad."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder at {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face model folder needs one)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFFolderError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict):
        raise HFFolderError(f"{config_file}: expected a JSON object")
    return config


def is_vision_language_config(config: dict[str, Any]) -> bool:
    """A vision-language folder (Gemma 3 or LLaVA with a ``vision_config``): a language model and its vision
    encoder in one."""
    return (any(name in VISION_LANGUAGE_ARCHITECTURES for name in config.get("architectures") or [])
            and isinstance(config.get("vision_config"), dict))


def text_config_of(config: dict[str, Any], where: str | Path = "config.json") -> dict[str, Any]:
    """The language model's configuration: a vision-language folder's ``text_config`` (with the causal LM class its
    ``model_type`` stands for, and the folder's ``tie_word_embeddings`` when it states none), else ``config``.
    HFFolderError when a vision-language config has no ``text_config`` object."""
    if not is_vision_language_config(config):
        return config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise HFFolderError(f"{where}: a {config['architectures'][0]} config needs a 'text_config' object", where)
    text = dict(text)
    if not text.get("architectures") and text.get("model_type") in TEXT_MODEL_TYPES:
        text["architectures"] = [TEXT_MODEL_TYPES[text["model_type"]]]
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return text


def language_model_tensors(hf_tensors: dict[str, QTensor]) -> dict[str, QTensor]:
    """A vision-language folder's language-model tensors under the stand-alone causal LM's names
    (``model.language_model.layers.0...`` / ``language_model.model.layers.0...`` -> ``model.layers.0...``); the
    vision tower's and projector's are left out. A name of no known prefix is kept (the name map refuses it)."""
    out: dict[str, QTensor] = {}
    for name, tensor in hf_tensors.items():
        for prefix, replacement in VISION_LANGUAGE_PREFIXES:
            if name.startswith(prefix):
                if replacement is not None:
                    out[replacement + name[len(prefix):]] = tensor
                break
        else:
            out[name] = tensor
    return out


def is_encoder_config(config: dict[str, Any]) -> bool:
    """An encoder (BERT family) folder, served by ``localllm.embeddings`` rather than the decoder."""
    return config.get("model_type") in HF_MODEL_TYPES


def architecture_of(config: dict[str, Any], where: str | Path = "config.json") -> str:
    """The localllm architecture of a decoder ``config.json``; UnsupportedArchitecture naming it otherwise."""
    names = config.get("architectures") or []
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    named = names[0] if names else f"model_type={config.get('model_type')!r}"
    supported = (*supported_architectures(), *(f"model_type={t}" for t in HF_MODEL_TYPES))
    raise UnsupportedArchitecture(str(named), str(where), supported)


def read_hf_decoder(folder: str | Path) -> HFDecoderFolder:
    """Read a decoder folder: config (checked first), then the weights as memory-mapped GGUF-named tensors.

    Raises FileNotFoundError for a missing folder, ``config.json`` or ``tokenizer.json``,
    UnsupportedArchitecture for an architecture localllm does not run, UnsupportedModelFeature for a
    config or tensor it would have to ignore, HFFolderError for unreadable files.
    """
    folder = Path(folder)
    folder_config = read_config(folder)
    has_vision = is_vision_language_config(folder_config)
    hf_config = text_config_of(folder_config, folder / "config.json")
    architecture = architecture_of(hf_config, folder / "config.json")
    module = arch.lookup(architecture)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (localllm reads the tokenizer from it)")
    hf_tensors: dict[str, QTensor] = {}
    for path in safetensors_files(folder):
        hf_tensors.update(read_safetensors(path))
    if has_vision:
        hf_tensors = language_model_tensors(hf_tensors)
    check_config_sizes(hf_config, len(hf_tensors), folder / "config.json")
    config = module.config_from_hf(hf_config)
    return HFDecoderFolder(folder, hf_config, config, gguf_named_tensors(hf_tensors, config), has_vision)


# config.json sizes a decoder reads: positive integers when given (JSON numbers without a fraction)
CONFIG_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def check_config_sizes(hf_config: dict[str, Any], n_tensors: int, where: str | Path = "config.json") -> None:
    """The sizes of a decoder ``config.json`` are positive integers, ``sliding_window`` null or an integer
    >= 0, and ``num_hidden_layers`` no more than the folder's tensors (each layer has several): HFFolderError
    naming the key otherwise, before any loop or allocation takes its length from them."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key in CONFIG_SIZES:
        value = hf_config.get(key)
        if value is not None and (not is_int(value) or value < 1):
            raise HFFolderError(f"{where}: '{key}' is {value!r}, expected a positive integer", where)
    window = hf_config.get("sliding_window")
    if window is not None and (not is_int(window) or window < 0):
        raise HFFolderError(f"{where}: 'sliding_window' is {window!r}, expected null or an integer >= 0", where)
    n_layers = hf_config.get("num_hidden_layers")
    if n_layers is not None and n_layers > n_tensors:
        raise HFFolderError(f"{where}: 'num_hidden_layers' is {n_layers}, more layers than the folder's "
                            f"{n_tensors} tensors", where)


def gguf_named_tensors(hf_tensors: dict[str, QTensor], config: ModelConfig) -> dict[str, QTensor]:
    """transformers' tensor names -> llama.cpp's (gguf-py's TensorNameMap for the architecture), views kept.

    ``lm_head.weight`` is dropped when the config ties it to the embeddings (transformers then uses the
    embeddings); Gemma's norm scales get +1. A tensor the map does not know is UnsupportedModelFeature.
    """
    import gguf

    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    name_map = gguf.get_tensor_name_map(arch_ids[config.architecture], config.n_layers)
    renamed: dict[str, QTensor] = {}
    sources: dict[str, str] = {}
    unknown = []
    for hf_name, tensor in hf_tensors.items():
        if hf_name.endswith(IGNORED_SUFFIXES) or (hf_name == "lm_head.weight" and config.tie_embeddings):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf_name)
            continue
        if name in renamed:
            raise UnsupportedModelFeature(f"tensors '{sources[name]}' and '{hf_name}' both map to '{name}'")
        if config.architecture in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            from ..quants.ref import dequantize
            scale = np.asarray(dequantize(tensor), dtype=np.float32).reshape(tensor.shape) + np.float32(1.0)
            renamed[name] = QTensor.from_float(name, scale)
        else:
            renamed[name] = QTensor(name, tensor.ggml_type, tensor.shape, tensor.data)
        sources[name] = hf_name
    if unknown:
        shown = ", ".join(sorted(unknown)[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        raise UnsupportedModelFeature(f"tensors the '{config.architecture}' dataflow does not know: {shown}")
    return renamed


def generation_defaults(folder: str | Path) -> dict[str, Any]:
    """Sampling defaults from ``generation_config.json`` as Modelfile parameters (temperature, top_p, top_k,
    min_p); ``do_sample: false`` means greedy, as in transformers (temperature 0). End-of-generation ids are
    the tokenizer's business (``Tokenizer.from_hf_folder`` reads them from the same file)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFFolderError(f"cannot read {path}: {exc}") from None
    if values.get("do_sample") is False:
        return {"temperature": 0.0}
    return {key: kind(values[key]) for key, kind in GENERATION_KEYS.items() if values.get(key) is not None}
