"""Qwen 2 and 2.5 (and the DeepSeek-R1 Qwen distills): Llama's block with biases on q, k and v.

RoPE rotates the first and second half of each head (NEOX; the converter does
not permute Q/K rows for it); the output matrix is tied to the embeddings on
the small models and separate on the large ones (the file says which).
"""
from __future__ import annotations

from .spec import BlockSpec, ModelConfig, common_config, hf_common_config

NAMES = ("qwen2",)
BLOCK = BlockSpec(qkv_bias=True)
DEFAULT_CHAT_TEMPLATE = None  # Qwen GGUFs carry their ChatML template


def config_from_gguf(gguf) -> ModelConfig:
    """ModelConfig from the ``qwen2.*`` GGUF metadata keys."""
    return common_config(gguf, rope_style="neox", block=BLOCK)


def config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` (Qwen2ForCausalLM); windows only with
    ``use_sliding_window`` (off on every released Qwen 2 / 2.5)."""
    return hf_common_config(config, "qwen2", tie_embeddings_default=False, block=BLOCK)
