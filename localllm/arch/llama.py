"""Llama (Llama 2, SmolLM2, Mistral without a window, ...): the plain block.

RMSNorm, RoPE on adjacent pairs (llama.cpp's converter permutes Q and K rows
for it), grouped-query attention, SwiGLU feed-forward, optionally tied output.
"""
from __future__ import annotations

from .spec import BlockSpec, ModelConfig, common_config, hf_common_config

NAMES = ("llama",)
BLOCK = BlockSpec()
DEFAULT_CHAT_TEMPLATE = None  # llama GGUFs carry their own


def config_from_gguf(gguf) -> ModelConfig:
    """ModelConfig from the ``llama.*`` GGUF metadata keys."""
    return common_config(gguf, rope_style="norm", block=BLOCK)


def config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` (LlamaForCausalLM, MistralForCausalLM).

    transformers keeps the q and k rows in the NEOX layout (it rotates the halves of each head; llama.cpp's
    converter permutes them for adjacent pairs), so a folder's weights run as they are with NEOX RoPE.
    Llama 3.x ``rope_type: llama3`` and linear scaling become frequency factors; Mistral's
    ``sliding_window`` applies to every layer.
    """
    return hf_common_config(config, "llama", tie_embeddings_default=False, rope_style="neox", block=BLOCK)
