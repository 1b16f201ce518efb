"""Tiny random vision-language models built with transformers (the float oracle) and written as llama.cpp lays
out a projector file (mmproj GGUF), plus the images the preprocessing tests decode.

Gemma 3: SigLIP 64 px, patch 8 (an 8x8 grid) pooled 2x2 to 16 soft tokens, written as ``convert_hf_to_gguf.py
--mmproj`` does (``fc1`` -> ``ffn_up``, the soft-embedding norm with Gemma's +1 added). LLaVA-1.5: CLIP 32 px,
patch 8 (16 patches and the class token), 3 layers with features after the second, written as the older
``convert_image_encoder_to_gguf.py`` does (``fc1`` named ``ffn_down`` and ``fc2`` ``ffn_up``, the last layer
and the post-LayerNorm dropped, ``block_count`` = 2).
"""
from __future__ import annotations

import io
from pathlib import Path

import gguf
import numpy as np
from PIL import Image

GEMMA3_VISION = dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, layer_norm_eps=1e-6, vision_use_head=False)
LLAVA_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, layer_norm_eps=1e-5, projection_dim=16, hidden_act="quick_gelu")
N_EMBD_TEXT = 40


def _randomize(model, seed: int) -> None:
    """Weights large enough that every op matters: norms away from 1 and 0, matrices ~ 1/sqrt(fan-in)."""
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "language_model" in name or "lm_head" in name:
                continue
            if "soft_emb_norm" in name:                      # Gemma's RMSNorm scales by 1 + weight
                parameter.copy_(0.3 * torch.randn_like(parameter))
            elif ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif name.endswith("bias") or "embedding" in name:
                parameter.copy_(0.2 * torch.randn_like(parameter))
            elif name.endswith("mm_input_projection_weight"):
                parameter.copy_(torch.randn_like(parameter) / np.sqrt(parameter.shape[0]))
            else:
                fan_in = int(np.prod(parameter.shape[1:]))
                parameter.copy_(torch.randn_like(parameter) / np.sqrt(fan_in))


def hf_tiny_gemma3_vision(seed: int = 0):
    """A random ``Gemma3ForConditionalGeneration`` (float32, eval) with a 2-layer SigLIP tower."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=300, hidden_size=N_EMBD_TEXT, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=20)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=SiglipVisionConfig(**GEMMA3_VISION).to_dict(),
                          mm_tokens_per_image=16, boi_token_index=297, eoi_token_index=298, image_token_index=299)
    model = Gemma3ForConditionalGeneration(config).float().eval()
    _randomize(model, seed)
    return model


def hf_tiny_llava(seed: int = 0):
    """A random ``LlavaForConditionalGeneration`` (float32, eval) with a 3-layer CLIP tower (features after 2)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=300, hidden_size=N_EMBD_TEXT, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig(**LLAVA_VISION).to_dict(),
                         image_token_index=299, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).float().eval()
    _randomize(model, seed)
    return model


def hf_image_processor(model):
    """The PIL-backend image processor a real checkpoint of this family ships, at the tiny tower's size."""
    size = model.config.vision_config.image_size
    if model.config.model_type == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
        return Gemma3ImageProcessorPil(size={"height": size, "width": size}, resample=2,
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 resample=3)


def save_hf_vision_folder(model, folder: Path) -> Path:
    """The model and its image processor as a Hugging Face folder; for Gemma 3 also the processor's
    ``image_seq_length`` (the soft tokens per image, which llama.cpp's converter reads to size the pooling)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    hf_image_processor(model).save_pretrained(folder)
    if model.config.model_type == "gemma3":
        (folder / "processor_config.json").write_text(json.dumps(
            {"image_seq_length": model.config.mm_tokens_per_image, "processor_class": "Gemma3Processor"}))
    return folder


def hf_image_features(model, pixels: np.ndarray) -> np.ndarray:
    """transformers' ``get_image_features`` for one preprocessed image (3, H, W): (n_tokens, n_embd_text)."""
    import torch
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(pixels[None].astype(np.float32)))
    features = out.pooler_output
    features = features[0] if isinstance(features, (list, tuple)) else features[0]
    return features.float().numpy().reshape(-1, features.shape[-1])


# ---------------------------------------------------------------------------- our mmproj writer
def _vision_state(model) -> dict[str, np.ndarray]:
    """The tower's and projector's tensors, names without the ``model.`` / ``vision_model.`` prefixes."""
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("model.").replace("vision_tower.vision_model.", "vision_tower.")
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            state[name] = tensor.float().numpy()
    return state


def write_mmproj(model, path: str | Path, weight_type: str = "F32", feature_layer: bool = True) -> Path:
    """The model's vision tower and projector as a llama.cpp mmproj GGUF (layout: see the module docstring).
    ``weight_type`` (F32 / F16) applies to matrices; the patch convolution is F16 when it is F16 (as the
    converters write it). ``feature_layer`` (LLaVA): write ``clip.vision.feature_layer`` as the older converter
    does when the config names one."""
    path = Path(path)
    vision = model.config.vision_config
    llava = model.config.model_type == "llava"
    state = _vision_state(model)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type("mmproj")
    writer.add_file_type(1 if weight_type == "F16" else 0)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_uint32("clip.vision.image_size", vision.image_size)
    writer.add_uint32("clip.vision.patch_size", vision.patch_size)
    writer.add_uint32("clip.vision.embedding_length", vision.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", vision.intermediate_size)
    writer.add_uint32("clip.vision.attention.head_count", vision.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.layer_norm_eps)
    processor = hf_image_processor(model)
    writer.add_array("clip.vision.image_mean", list(processor.image_mean))
    writer.add_array("clip.vision.image_std", list(processor.image_std))
    n_layers = vision.num_hidden_layers - 1 if llava else vision.num_hidden_layers
    writer.add_uint32("clip.vision.block_count", n_layers)
    if llava:
        writer.add_bool("clip.has_llava_projector", True)
        writer.add_string("clip.projector_type", "mlp")
        writer.add_bool("clip.use_gelu", False)
        writer.add_uint32("clip.vision.projection_dim", vision.projection_dim)
        if feature_layer:
            writer.add_array("clip.vision.feature_layer", [n_layers])
    else:
        writer.add_string("clip.projector_type", "gemma3")
        writer.add_bool("clip.use_gelu", True)
        writer.add_uint32("clip.vision.projection_dim", model.config.text_config.hidden_size)
        side = vision.image_size // vision.patch_size
        writer.add_uint32("clip.vision.projector.scale_factor", side // int(model.config.mm_tokens_per_image ** 0.5))

    def add(name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if weight_type == "F16" and array.ndim >= 2:
            array = array.astype(np.float16)
        writer.add_tensor(name, array)

    tower = "vision_tower."
    add("v.patch_embd.weight", state[f"{tower}embeddings.patch_embedding.weight"])
    if f"{tower}embeddings.patch_embedding.bias" in state:
        add("v.patch_embd.bias", state[f"{tower}embeddings.patch_embedding.bias"])
    add("v.position_embd.weight", state[f"{tower}embeddings.position_embedding.weight"])
    if llava:
        add("v.class_embd", state[f"{tower}embeddings.class_embedding"])
        for kind in ("weight", "bias"):
            add(f"v.pre_ln.{kind}", state[f"{tower}pre_layrnorm.{kind}"])
            add(f"mm.0.{kind}", state[f"multi_modal_projector.linear_1.{kind}"])
            add(f"mm.2.{kind}", state[f"multi_modal_projector.linear_2.{kind}"])
    else:
        for kind in ("weight", "bias"):
            add(f"v.post_ln.{kind}", state[f"{tower}post_layernorm.{kind}"])
        add("mm.soft_emb_norm.weight", state["multi_modal_projector.mm_soft_emb_norm.weight"] + 1.0)
        add("mm.input_projection.weight", state["multi_modal_projector.mm_input_projection_weight"])
    mlp = {"mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"} if llava else {"mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    layer_names = {"layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "attn_q",
                   "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out",
                   **mlp}
    for layer in range(n_layers):
        for hf_name, gguf_name in layer_names.items():
            for kind in ("weight", "bias"):
                add(f"v.blk.{layer}.{gguf_name}.{kind}", state[f"{tower}encoder.layers.{layer}.{hf_name}.{kind}"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------- images
def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Smooth ramps in every channel with a little texture: resampling differences show, nothing is flat."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 127.5 + 127.5 * np.sin(x / 3.0) * np.cos(y / 5.0)
    rgb = np.stack([red, green, blue], axis=-1).round().clip(0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = (255 * (x + y) / (width + height - 2)).round().astype(np.uint8)
        image.putalpha(Image.fromarray(alpha, "L"))
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def exif_rotated_jpeg(width: int, height: int, orientation: int = 6) -> bytes:
    """A JPEG whose EXIF says to rotate it (6: 90 degrees clockwise to display)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(gradient_image(width, height), "JPEG", quality=95, exif=exif)


def two_frame_gif(width: int, height: int) -> bytes:
    """An animated GIF: the first frame a gradient, the second its negative."""
    first = gradient_image(width, height).convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.eval(gradient_image(width, height), lambda v: 255 - v).convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return buffer.getvalue()


def use_checkpoint_names(folder: Path) -> Path:
    """Rename the tensors of a saved folder as the published checkpoints (and llama.cpp's converter) name them:
    ``vision_tower.vision_model.*`` and ``language_model.*`` (transformers 5 saves ``vision_tower.*`` and
    ``language_model.*`` without the inner ``vision_model``)."""
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    renamed = {}
    for name, array in load_file(path).items():
        name = name.removeprefix("model.")
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        renamed[name] = array
    save_file(renamed, path, metadata={"format": "pt"})
    return folder
