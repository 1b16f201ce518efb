"""Tiny random vision-language models, whole: transformers' Gemma3ForConditionalGeneration and
LlavaForConditionalGeneration (the float oracle) written as llama.cpp runs them, a language-model GGUF plus
an mmproj GGUF (``tiny_vision.write_mmproj``).

The vocabulary (300 ids) is the byte-level one of ``tiny_archs`` (the 256 bytes and the chat formats'
special tokens), unused fillers, and the image tokens at the ids the transformers configs name:
297 ``<start_of_image>``, 298 ``<end_of_image>``, 299 the image placeholder (``<image_soft_token>``).
Gemma 3's text model has two sliding-window layers (window 8, shorter than an image's 16 soft tokens, so
that the window and the bidirectional image attention both show) and a global one.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from localllm.tokenizer import bytes_to_unicode
from tests.tiny_archs import ARCHS, SPECIAL_TOKENS, special_id, write_gguf
from tests.tiny_gemma3 import write_gemma3_gguf
from tests.tiny_vision import GEMMA3_VISION, LLAVA_VISION, _randomize, write_mmproj

VOCAB_SIZE = 300
BOI, EOI, IMAGE = 297, 298, 299
N_EMBD_TEXT = 40

# Gemma 3's own template, reduced to what the tests use: typed content parts, images as <start_of_image>
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
LLAVA_TEMPLATE = (  # LLaVA-1.5's USER/ASSISTANT turns; the image is where the content puts it
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def vocabulary() -> tuple[list[str], list[int]]:
    byte_to_char = bytes_to_unicode()
    tokens = [byte_to_char[b] for b in range(256)] + list(SPECIAL_TOKENS)
    tokens += [f"<unused{i}>" for i in range(BOI - len(tokens))]
    tokens += ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    assert len(tokens) == VOCAB_SIZE
    return tokens, [1] * 256 + [3] * (VOCAB_SIZE - 256)


def add_vlm_tokenizer(writer: gguf.GGUFWriter, bos: str, eos: str, template: str) -> None:
    tokens, token_types = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([])
    writer.add_bos_token_id(special_id(bos))
    writer.add_eos_token_id(special_id(eos))
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)


def _randomize_text(model, gemma: bool, seed: int) -> None:
    """The language model's weights far from their tiny initial values (norms away from the identity)."""
    import torch
    torch.manual_seed(seed + 1000)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "language_model" not in name and "lm_head" not in name:
                continue
            if name.endswith("norm.weight"):
                parameter.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / np.sqrt(parameter.shape[-1]))


def hf_gemma3_vlm(seed: int = 0):
    """A random Gemma3ForConditionalGeneration: 16 soft tokens an image, a 3-layer text model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=N_EMBD_TEXT, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=20, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=512,
        query_pre_attn_scalar=20, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        pad_token_id=special_id("<pad>"), bos_token_id=special_id("<bos>"), eos_token_id=special_id("<eos>"),
        tie_word_embeddings=True)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=SiglipVisionConfig(**GEMMA3_VISION).to_dict(),
                          mm_tokens_per_image=16, boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
                          attn_implementation="eager")
    model = Gemma3ForConditionalGeneration(config).float().eval()
    _randomize(model, seed)
    _randomize_text(model, True, seed)
    return model


def hf_llava_vlm(seed: int = 0):
    """A random LlavaForConditionalGeneration: 16 soft tokens an image, a 2-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=N_EMBD_TEXT, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, bos_token_id=special_id("<|endoftext|>"),
                       eos_token_id=special_id("<|im_end|>"), pad_token_id=None, tie_word_embeddings=False)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig(**LLAVA_VISION).to_dict(),
                         image_token_index=IMAGE, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", attn_implementation="eager")
    model = LlavaForConditionalGeneration(config).float().eval()
    _randomize(model, seed)
    _randomize_text(model, False, seed)
    return model


def _text_model(vlm):
    """The VLM's language model as a stand-alone causal LM with the same weights (what the GGUF holds)."""
    import transformers
    gemma = vlm.config.model_type == "gemma3"
    causal = (transformers.Gemma3ForCausalLM if gemma else transformers.LlamaForCausalLM)(vlm.config.text_config)
    state = {f"model.{k}": v for k, v in vlm.model.language_model.state_dict().items()}
    state["lm_head.weight"] = vlm.lm_head.weight
    causal.load_state_dict(state, strict=True)
    return causal.float().eval()


def write_vlm(vlm, folder: Path, weight_type: str = "F32") -> tuple[Path, Path]:
    """(language-model GGUF, mmproj GGUF) of the VLM in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = _text_model(vlm)
    if vlm.config.model_type == "gemma3":
        model_path = write_gemma3_gguf(text, folder / "model.gguf", weight_type,
                                       add_tokenizer=lambda w: add_vlm_tokenizer(w, "<bos>", "<eos>", GEMMA3_TEMPLATE))
    else:
        model_path = folder / "model.gguf"
        _write_llama(text, model_path, weight_type)
    return model_path, write_mmproj(vlm, folder / "mmproj.gguf")


def _write_llama(text, path: Path, weight_type: str) -> None:
    """``tiny_archs.write_gguf``'s llama layout (Q/K rows permuted) with this vocabulary and the LLaVA template."""
    write_gguf(text, ARCHS["llama3"], path, weight_type,
               tokenizer_keys=lambda writer: add_vlm_tokenizer(writer, "<|endoftext|>", "<|im_end|>", LLAVA_TEMPLATE))


def picture(seed: int, size=(50, 40)):
    """A textured RGB PIL image that differs with ``seed``."""
    from PIL import Image
    from tests.tiny_vision import gradient_image
    rng = np.random.default_rng(seed)
    base = np.asarray(gradient_image(*size), dtype=np.float32)
    noise = rng.normal(0, 40, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def png_bytes(image) -> bytes:
    import io
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_uri(image) -> str:
    import base64
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def hf_vlm_logits(vlm, ids: list[int], pixels: list[np.ndarray]) -> np.ndarray:
    """transformers' logits (n, vocab) for ``ids`` (image positions as negative ids, any) with ``pixels`` (one
    preprocessed (3, H, W) image per image, in order)."""
    import torch
    ids = np.asarray(ids, dtype=np.int64)
    is_image = ids < 0
    input_ids = torch.from_numpy(np.where(is_image, IMAGE, ids))[None]
    kwargs = {}
    if pixels:
        kwargs["pixel_values"] = torch.from_numpy(np.stack(pixels).astype(np.float32))
    if vlm.config.model_type == "gemma3":
        kwargs["token_type_ids"] = torch.from_numpy(is_image.astype(np.int64))[None]
    with torch.no_grad():
        return vlm(input_ids=input_ids, **kwargs).logits[0].float().numpy()


__all__ = ["BOI", "EOI", "IMAGE", "GEMMA3_TEMPLATE", "LLAVA_TEMPLATE", "hf_gemma3_vlm", "hf_llava_vlm",
           "hf_vlm_logits", "data_uri", "picture", "png_bytes", "vocabulary", "write_vlm"]
