"""Reading a vision encoder: llama.cpp's projector GGUF (mmproj) or a Hugging Face folder -> a VisionConfig, the
ImagePreprocessing and the tensors under llama.cpp's mmproj names (``v.*`` tower, ``mm.*`` projector).

mmproj files (``general.architecture = clip``; written by ``convert_hf_to_gguf.py --mmproj`` or, for
LLaVA-1.5, by the older ``convert_image_encoder_to_gguf.py``) say what they hold in ``clip.*`` keys:
``clip.projector_type`` (``gemma3``, ``mlp``), ``clip.vision.{image_size, patch_size, embedding_length,
feed_forward_length, block_count, attention.head_count, attention.layer_norm_epsilon, image_mean,
image_std}``, ``clip.use_gelu`` / ``clip.use_silu`` (else quick GELU), ``clip.vision.feature_layer``
(LLaVA), ``clip.vision.projector.scale_factor`` (Gemma 3's pooling, default 4).

Two quirks of the older LLaVA files are undone here. Their converter named CLIP's ``fc1`` ``ffn_down`` and
``fc2`` ``ffn_up``: the MLP matrix that reads the tower's width is taken as the up projection, whatever its
name (llama.cpp does the same). And it stored only the layers up to the feature layer (``block_count =
num_hidden_layers - 1``): all of them are run, as transformers does with ``vision_feature_layer = -2``
(llama.cpp runs one layer fewer, its issue #25817).

A tensor the encoder would not use is refused, never ignored; so is a projector or a feature (LLaVA-NeXT
grids, several feature layers) that is not implemented.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..arch.spec import UnsupportedModelFeature
from ..formats.errors import ModelFormatError
from ..formats.gguf import read_gguf
from ..formats.safetensors import read_safetensors, safetensors_files
from ..quants import QTensor
from .encoder import ImagePreprocessing, VisionConfig

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MMPROJ_PROJECTORS = {"gemma3": "gemma3", "mlp": "llava"}     # clip.projector_type -> our projector
HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
                  "quick_gelu": "quick_gelu", "silu": "silu"}
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}                  # PIL's numbers in preprocessor_config.json


class VisionModelError(ModelFormatError):
    """A projector file or folder that is broken: missing or malformed metadata, tensors missing or of the
    wrong shape."""


# --------------------------------------------------------------------------- mmproj GGUF

def read_mmproj(path: str | Path) -> tuple[VisionConfig, ImagePreprocessing, dict[str, QTensor]]:
    """The configuration, preprocessing and tensors of a llama.cpp mmproj GGUF (see the module docstring)."""
    gguf = read_gguf(path)
    path, md = Path(path), gguf.metadata

    def fail(message: str) -> VisionModelError:
        return VisionModelError(f"{path.name}: {message}", path)

    if gguf.architecture != "clip":
        raise fail(f"not a projector (mmproj) file: general.architecture is '{gguf.architecture}', expected 'clip'")
    if not md.get("clip.has_vision_encoder", False):
        raise UnsupportedModelFeature(f"{path.name} has no vision encoder (clip.has_vision_encoder is not true)")
    projector_type = md.get("clip.vision.projector_type", md.get("clip.projector_type"))
    if projector_type is None and md.get("clip.has_llava_projector"):
        projector_type = "mlp"
    if projector_type not in MMPROJ_PROJECTORS:
        raise UnsupportedModelFeature(f"{path.name}: projector type '{projector_type}' is not supported "
                                      f"(supported: {', '.join(MMPROJ_PROJECTORS)})")
    for key in ("clip.vision.image_grid_pinpoints", "clip.vision.mm_patch_merge_type"):
        if key in md and md[key] not in ("flat", None):
            raise UnsupportedModelFeature(f"{path.name}: {key} (LLaVA-NeXT image tiling) is not supported")

    def count(key: str, default: int | None = None) -> int:
        value = md.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise fail(f"metadata key '{key}' is {value!r} (expected a positive integer)")
        return value

    def floats(key: str, n: int, default=None) -> tuple[float, ...]:
        value = md.get(key, default)
        if not isinstance(value, (list, tuple)) or len(value) != n \
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
            raise fail(f"metadata key '{key}' is {value!r} (expected {n} numbers)")
        return tuple(float(v) for v in value)

    projector = MMPROJ_PROJECTORS[projector_type]
    image_size, block_count = count("clip.vision.image_size"), count("clip.vision.block_count")
    eps = md.get("clip.vision.attention.layer_norm_epsilon", 1e-6)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise fail(f"metadata key 'clip.vision.attention.layer_norm_epsilon' is {eps!r}")
    if md.get("clip.use_gelu") and md.get("clip.use_silu"):
        raise fail("clip.use_gelu and clip.use_silu are both true")
    activation = "gelu_tanh" if md.get("clip.use_gelu") else "silu" if md.get("clip.use_silu") else "quick_gelu"
    n_layers = block_count
    if projector == "llava" and "clip.vision.feature_layer" in md:
        layers = md["clip.vision.feature_layer"]
        layers = layers if isinstance(layers, list) else [layers]
        if len(layers) != 1:
            raise UnsupportedModelFeature(f"{path.name}: several feature layers {layers} (Granite Vision) are not "
                                          "supported")
        n_layers = layers[0]
        if not isinstance(n_layers, int) or not 0 <= n_layers <= block_count:
            raise fail(f"feature layer {n_layers!r} is outside 0..{block_count}")
    tensors = gguf.tensors
    config = VisionConfig(
        projector=projector, image_size=image_size, patch_size=count("clip.vision.patch_size"),
        dim=count("clip.vision.embedding_length"), hidden_dim=count("clip.vision.feed_forward_length"),
        n_layers=n_layers, n_heads=count("clip.vision.attention.head_count"), eps=float(eps),
        activation=activation, n_embd_text=_n_embd_text(projector, tensors, fail),
        pool=count("clip.vision.projector.scale_factor", 4) if projector == "gemma3" else 1)
    mean = floats("clip.vision.image_mean", 3, SIGLIP_MEAN if projector == "gemma3" else CLIP_MEAN)
    std = floats("clip.vision.image_std", 3, SIGLIP_STD if projector == "gemma3" else CLIP_STD)
    preprocessing = _default_preprocessing(projector, image_size, mean, std)
    tensors = _untangle_mlp(dict(tensors), config)
    check_tensors(config, tensors, path.name, fail, stored_layers=block_count)
    return config, preprocessing, tensors


def _n_embd_text(projector: str, tensors: dict[str, QTensor], fail) -> int:
    """The language model's width, from the projector's output matrix."""
    name = "mm.input_projection.weight" if projector == "gemma3" else "mm.2.weight"
    if name not in tensors or len(tensors[name].shape) != 2:
        raise fail(f"the projector tensor '{name}' is missing or not a matrix")
    return tensors[name].shape[1] if projector == "gemma3" else tensors[name].shape[0]


def _untangle_mlp(tensors: dict[str, QTensor], config: VisionConfig) -> dict[str, QTensor]:
    """Older converters named the MLP's matrices the other way round: the one reading ``dim`` is ``ffn_up``."""
    for layer in range(config.n_layers):
        up, down = f"v.blk.{layer}.ffn_up", f"v.blk.{layer}.ffn_down"
        if f"{down}.weight" in tensors and tensors[f"{down}.weight"].shape == (config.hidden_dim, config.dim) \
                and config.hidden_dim != config.dim:
            for kind in (".weight", ".bias"):
                a, b = tensors.pop(up + kind, None), tensors.pop(down + kind, None)
                if b is not None:
                    tensors[up + kind] = b
                if a is not None:
                    tensors[down + kind] = a
    return tensors


def _default_preprocessing(projector: str, image_size: int, mean, std) -> ImagePreprocessing:
    """Gemma 3: bilinear to the square, no crop. LLaVA-1.5 (CLIP's processor): bicubic, the shortest edge to
    the image size, then the central square."""
    if projector == "gemma3":
        return ImagePreprocessing("square", image_size, None, "bilinear", tuple(mean), tuple(std))
    return ImagePreprocessing("shortest_edge", image_size, image_size, "bicubic", tuple(mean), tuple(std))


# --------------------------------------------------------------------------- shapes

def expected_shapes(config: VisionConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """mmproj tensor name -> (numpy shape, required) for every tensor the encoder may read."""
    c = config
    d, p = c.dim, c.patch_size
    n_pos = c.n_patches + (1 if c.projector == "llava" else 0)
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {
        "v.patch_embd.weight": ((d, 3, p, p), True), "v.patch_embd.bias": ((d,), False),
        "v.position_embd.weight": ((n_pos, d), True),
        "v.pre_ln.weight": ((d,), c.projector == "llava"), "v.pre_ln.bias": ((d,), False),
        "v.post_ln.weight": ((d,), c.projector == "gemma3"), "v.post_ln.bias": ((d,), False),
    }
    if c.projector == "llava":
        shapes["v.class_embd"] = ((d,), True)
        shapes.update({"mm.0.weight": ((c.n_embd_text, d), True), "mm.0.bias": ((c.n_embd_text,), False),
                       "mm.2.weight": ((c.n_embd_text, c.n_embd_text), True),
                       "mm.2.bias": ((c.n_embd_text,), False)})
    else:
        shapes.update({"mm.soft_emb_norm.weight": ((d,), True),
                       "mm.input_projection.weight": ((d, c.n_embd_text), True)})
    for layer in range(c.n_layers):
        blk = f"v.blk.{layer}"
        for name, shape in (("ln1", (d,)), ("ln2", (d,))):
            shapes[f"{blk}.{name}.weight"] = (shape, True)
            shapes[f"{blk}.{name}.bias"] = (shape, False)
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            shapes[f"{blk}.{name}.weight"] = ((d, d), True)
            shapes[f"{blk}.{name}.bias"] = ((d,), False)
        shapes[f"{blk}.ffn_up.weight"] = ((c.hidden_dim, d), True)
        shapes[f"{blk}.ffn_up.bias"] = ((c.hidden_dim,), False)
        shapes[f"{blk}.ffn_down.weight"] = ((d, c.hidden_dim), True)
        shapes[f"{blk}.ffn_down.bias"] = ((d,), False)
    return shapes


def check_tensors(config: VisionConfig, tensors: dict[str, QTensor], where: str, fail, stored_layers: int) -> None:
    """Every required tensor present with its shape (else ``fail(message)`` raised), every present one known
    (else UnsupportedModelFeature naming ``where``); layers past the ones run, up to ``stored_layers``, may be
    there unused."""
    shapes = expected_shapes(config)
    for name, (shape, required) in shapes.items():
        if name not in tensors:
            if required:
                raise fail(f"tensor '{name}' is missing")
            continue
        if tuple(tensors[name].shape) != shape:
            raise fail(f"tensor '{name}' has shape {tuple(tensors[name].shape)}, expected {shape}")
    for name in tensors:
        if name in shapes:
            continue
        match = re.fullmatch(r"v\.blk\.(\d+)\..+", name)
        if match and config.n_layers <= int(match.group(1)) < stored_layers:
            continue
        raise UnsupportedModelFeature(f"{where}: tensor '{name}' is not used by the "
                                      f"{config.projector} vision encoder")


# --------------------------------------------------------------------------- Hugging Face folders

HF_LAYER_NAMES = {"layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "attn_q",
                  "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out",
                  "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
HF_NAMES = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
            "pre_layrnorm": "v.pre_ln", "post_layernorm": "v.post_ln"}
HF_PROJECTOR_NAMES = {"mm_input_projection_weight": "mm.input_projection.weight",
                      "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight",
                      "linear_1.weight": "mm.0.weight", "linear_1.bias": "mm.0.bias",
                      "linear_2.weight": "mm.2.weight", "linear_2.bias": "mm.2.bias"}


def read_hf_vision(folder: str | Path) -> tuple[VisionConfig, ImagePreprocessing, dict[str, QTensor]]:
    """The vision encoder of a transformers ``Gemma3ForConditionalGeneration`` or ``LlavaForConditionalGeneration``
    folder: ``config.json`` (its ``vision_config``), ``preprocessor_config.json`` when present (else the
    processor's defaults), the ``vision_tower.*`` and ``multi_modal_projector.*`` safetensors."""
    folder = Path(folder)
    config_file = folder / "config.json"

    def fail(message: str) -> VisionModelError:
        return VisionModelError(f"{folder}: {message}", config_file)

    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    hf = _json(config_file, fail)
    model_type = hf.get("model_type")
    if model_type not in ("gemma3", "llava"):
        raise UnsupportedModelFeature(f"{folder}: model_type '{model_type}' has no supported vision encoder "
                                      "(supported: gemma3, llava)")
    vision = hf.get("vision_config")
    if not isinstance(vision, dict):
        raise fail("config.json has no vision_config")
    if model_type == "llava" and vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UnsupportedModelFeature(f"{folder}: a LLaVA vision tower '{vision.get('model_type')}' is not "
                                      "supported (supported: clip_vision_model)")

    def count(key: str, source: dict = vision, default=None) -> int:
        value = source.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise fail(f"'{key}' is {value!r} (expected a positive integer)")
        return value

    image_size, patch_size = count("image_size"), count("patch_size")
    n_hidden_layers = count("num_hidden_layers")
    act = vision.get("hidden_act", "gelu_pytorch_tanh" if model_type == "gemma3" else "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise UnsupportedModelFeature(f"{folder}: vision activation '{act}' is not supported")
    eps = vision.get("layer_norm_eps", 1e-6 if model_type == "gemma3" else 1e-5)
    # n_embd_text is read from the projector's matrix below (text_config may leave hidden_size to its default)
    common = dict(image_size=image_size, patch_size=patch_size, dim=count("hidden_size"),
                  hidden_dim=count("intermediate_size"), n_heads=count("num_attention_heads"),
                  eps=float(eps), activation=HF_ACTIVATIONS[act], n_embd_text=1)
    if model_type == "gemma3":
        n_tokens, side = count("mm_tokens_per_image", hf, 256), image_size // patch_size
        tokens_per_side = math.isqrt(n_tokens)
        if tokens_per_side ** 2 != n_tokens or not tokens_per_side or side % tokens_per_side:
            raise fail(f"mm_tokens_per_image {n_tokens} is not a square dividing the {side}x{side} patch grid")
        config = VisionConfig(projector="gemma3", n_layers=n_hidden_layers, pool=side // tokens_per_side, **common)
    else:
        feature_layer = hf.get("vision_feature_layer", -2)
        if not isinstance(feature_layer, int):
            raise UnsupportedModelFeature(f"{folder}: several vision feature layers {feature_layer} are not supported")
        n_layers = feature_layer if feature_layer >= 0 else n_hidden_layers + 1 + feature_layer
        if not 0 <= n_layers <= n_hidden_layers:
            raise fail(f"vision_feature_layer {feature_layer} is outside the {n_hidden_layers} layers")
        strategy = hf.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise UnsupportedModelFeature(f"{folder}: vision_feature_select_strategy '{strategy}'")
        projector_act = hf.get("projector_hidden_act", "gelu")
        if projector_act not in HF_ACTIVATIONS:
            raise UnsupportedModelFeature(f"{folder}: projector activation '{projector_act}' is not supported")
        config = VisionConfig(projector="llava", n_layers=n_layers, keep_class_token=strategy == "full",
                              projector_activation=HF_ACTIVATIONS[projector_act], **common)
    tensors = _hf_tensors(folder, config, fail)
    config = replace(config, n_embd_text=_n_embd_text(config.projector, tensors, fail))
    check_tensors(config, tensors, str(folder), fail, stored_layers=n_hidden_layers)
    return config, _hf_preprocessing(folder, config, fail), tensors


def _hf_tensors(folder: Path, config: VisionConfig, fail) -> dict[str, QTensor]:
    """The vision tower's and projector's tensors under mmproj names (the language model's are not read)."""
    tensors: dict[str, QTensor] = {}
    for path in safetensors_files(folder):
        for hf_name, tensor in read_safetensors(path).items():
            name = re.sub(r"^model\.", "", hf_name)
            if name.startswith(("language_model.", "lm_head.")):
                continue
            ours = _hf_to_mmproj(name, config)
            if ours is None:
                continue
            if ours == "mm.soft_emb_norm.weight":       # Gemma's RMSNorm scales by 1 + weight: stored as GGUF does
                tensor = QTensor.from_float(ours, _to_float(tensor) + 1.0)
            tensors[ours] = tensor
    return tensors


def _hf_to_mmproj(name: str, config: VisionConfig) -> str | None:
    """A transformers tensor name (``model.`` already stripped) -> its mmproj name; None for tensors the encoder
    does not read by design (SigLIP's pooling head, LLaVA's post-LayerNorm, layers past the feature layer,
    ``position_ids`` buffers); the name itself (refused later) for anything unknown."""
    tower = re.match(r"vision_tower\.(?:vision_model\.)?(.+)", name)
    if tower:
        rest = tower.group(1)
        if rest.startswith("head.") or rest == "embeddings.position_ids":
            return None
        if rest == "embeddings.class_embedding":
            return "v.class_embd"
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        if layer:
            index, part, kind = int(layer.group(1)), layer.group(2), layer.group(3)
            if index >= config.n_layers:
                return None
            return f"v.blk.{index}.{HF_LAYER_NAMES[part]}.{kind}" if part in HF_LAYER_NAMES else name
        module, _, kind = rest.rpartition(".")
        if module == "post_layernorm" and config.projector == "llava":
            return None
        return f"{HF_NAMES[module]}.{kind}" if module in HF_NAMES else name
    projector = re.match(r"multi_modal_projector\.(.+)", name)
    if projector:
        return HF_PROJECTOR_NAMES.get(projector.group(1), name)
    return name


def _to_float(tensor: QTensor) -> np.ndarray:
    from ..quants import ref as quants_ref
    return quants_ref.dequantize(tensor)


def _hf_preprocessing(folder: Path, config: VisionConfig, fail) -> ImagePreprocessing:
    """From ``preprocessor_config.json`` (or ``processor_config.json``'s ``image_processor``) when the folder has
    one, else the Gemma 3 / CLIP processors' defaults at the tower's image size."""
    settings: dict[str, Any] = {}
    if (folder / "preprocessor_config.json").is_file():
        settings = _json(folder / "preprocessor_config.json", fail)
    elif (folder / "processor_config.json").is_file():
        settings = _json(folder / "processor_config.json", fail).get("image_processor") or {}
    gemma = config.projector == "gemma3"
    mean = tuple(settings.get("image_mean", SIGLIP_MEAN if gemma else CLIP_MEAN))
    std = tuple(settings.get("image_std", SIGLIP_STD if gemma else CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise fail(f"image_mean {mean} / image_std {std} must have 3 values")
    resample = PIL_RESAMPLE.get(settings.get("resample", 2 if gemma else 3))
    if resample is None:
        raise UnsupportedModelFeature(f"{folder}: resample {settings.get('resample')} (supported: 2 bilinear, "
                                      "3 bicubic)")
    if settings.get("do_pan_and_scan"):
        raise UnsupportedModelFeature(f"{folder}: Gemma 3's pan and scan is not supported")
    rescale = float(settings.get("rescale_factor", 1 / 255))
    size = settings.get("size") or {}
    crop = settings.get("crop_size") or {}
    if "shortest_edge" in size and settings.get("do_center_crop", True):
        side = crop.get("height", config.image_size)
        out = ImagePreprocessing("shortest_edge", int(size["shortest_edge"]), int(side), resample, mean, std, rescale)
    else:
        side = size.get("height", config.image_size)
        out = ImagePreprocessing("square", int(side), None, resample, mean, std, rescale)
    if out.output_size != config.image_size:
        raise fail(f"the image processor makes {out.output_size}-pixel images, the tower reads {config.image_size}")
    return out


def _json(path: Path, fail) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read {path.name}: {exc}") from None
    if not isinstance(value, dict):
        raise fail(f"{path.name} is not a JSON object")
    return value
