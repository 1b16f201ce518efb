"""Qwen 3 (dense): Llama's block with an RMSNorm over each head of q and k before RoPE.

No q/k/v biases; the head width is its own hyperparameter (``attention.key_length``,
128 on Qwen3-0.6B where dim / n_heads is 64); NEOX RoPE.
"""
from __future__ import annotations

from .spec import BlockSpec, ModelConfig, common_config, hf_common_config

NAMES = ("qwen3",)
BLOCK = BlockSpec(qk_norm=True)
DEFAULT_CHAT_TEMPLATE = None  # Qwen GGUFs carry their ChatML template


def config_from_gguf(gguf) -> ModelConfig:
    """ModelConfig from the ``qwen3.*`` GGUF metadata keys."""
    return common_config(gguf, rope_style="neox", block=BLOCK)


def config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` (Qwen3ForCausalLM; ``head_dim`` is its own key)."""
    return hf_common_config(config, "qwen3", tie_embeddings_default=False, block=BLOCK)
