"""Tiny random Hugging Face decoder folders built at test time: a transformers model (float32, eval, seeded,
norms non-trivial) saved with ``save_pretrained`` + a byte-level BPE ``tokenizer.json`` made with the
tokenizers library + ``tokenizer_config.json`` (chat template, BOS/EOS) + ``generation_config.json``.

Each architecture exercises what sets it apart: Llama 3 RoPE scaling (rope_type llama3, tied output),
Mistral (window on every layer, linear RoPE scaling), Qwen 2 (q/k/v biases, tied), Qwen 3 (q/k norms,
head_dim != dim / n_heads), Phi-3 (fused qkv and gate/up, LongRoPE, partial rotary, window), Gemma 2
(soft-caps, alternate windows, query_pre_attn_scalar != head_dim), Gemma 3 (layer types, two RoPE bases).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from localllm.arch.gemma3 import DEFAULT_CHAT_TEMPLATE as GEMMA_TEMPLATE
from tests.tiny_models import CHATML_TEMPLATE, byte_level_vocab, hf_logits  # noqa: F401

WINDOW = 8
PROMPT_LENGTH = 24          # longer than any window
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=256,
              eos_token_id=258, pad_token_id=256, attn_implementation="eager")


def _configs() -> dict[str, tuple[str, dict]]:
    """name -> (transformers class prefix, config keyword arguments)."""
    rng = np.random.default_rng(7)
    pairs = int(16 * 0.75) // 2                          # Phi-3: 3/4 of each 16-wide head rotates
    return {
        "llama": ("Llama", dict(tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "mistral": ("Mistral", dict(sliding_window=WINDOW, head_dim=16, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
        "qwen2": ("Qwen2", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 1000000.0})),
        "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=False)),
        "phi3": ("Phi3", dict(sliding_window=WINDOW, original_max_position_embeddings=64, partial_rotary_factor=0.75,
                              rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.75,
                                               "short_factor": (1 + rng.random(pairs)).tolist(),
                                               "long_factor": (1 + 4 * rng.random(pairs)).tolist()})),
        "gemma2": ("Gemma2", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                  hidden_activation="gelu_pytorch_tanh")),
        "gemma3": ("Gemma3", dict(head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=20,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  rope_parameters={
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                      "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    }


ARCHITECTURES = tuple(_configs())
GGUF_ARCHITECTURE = {"mistral": "llama"}


def hf_tiny_model(kind: str, seed: int = 0, **overrides):
    """A random transformers causal LM of architecture ``kind`` (see ARCHITECTURES), float32, eval mode;
    ``overrides`` replace config values."""
    import torch
    import transformers

    prefix, extra = _configs()[kind]
    config_class = getattr(transformers, f"{prefix}TextConfig" if kind == "gemma3" else f"{prefix}Config")
    model_class = getattr(transformers, f"{prefix}ForCausalLM")
    config = config_class(**{"vocab_size": len(byte_level_vocab()[0]), **COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                if kind.startswith("gemma"):    # Gemma scales by (1 + weight)
                    parameter.copy_(0.2 * torch.randn_like(parameter))
                else:
                    parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.copy_(0.5 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / np.sqrt(parameter.shape[-1]))
    return model


def write_byte_level_tokenizer(folder: Path, chat_template: str, generation: dict | None = None) -> None:
    """tokenizer.json (byte-level BPE over the 256 bytes + <|endoftext|>, <|im_start|>, <|im_end|>),
    tokenizer_config.json (template, BOS <|endoftext|>, EOS <|im_end|>) and generation_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, token_types = byte_level_vocab()
    vocab = {text: i for i, (text, kind) in enumerate(zip(tokens, token_types)) if kind == 1}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                  for text, kind in zip(tokens, token_types) if kind == 3])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": chat_template, "model_max_length": 256}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    generation = {"bos_token_id": 256, "eos_token_id": [258, 256], **(generation or {})}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1))


def save_folder(model, folder: str | Path, dtype=None, max_shard_size: str | None = None,
                generation: dict | None = None) -> Path:
    """``model`` as a Hugging Face folder (safetensors, optionally sharded or cast to ``dtype``) + tokenizer."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    to_save = model if dtype is None else _cast_copy(model, dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    to_save.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    if dtype is not None:
        assert dtype in (torch.bfloat16, torch.float16)
    template = GEMMA_TEMPLATE if model.config.model_type.startswith("gemma") else CHATML_TEMPLATE
    write_byte_level_tokenizer(folder, template, generation)
    return folder


def _cast_copy(model, dtype):
    import copy
    return copy.deepcopy(model).to(dtype)
