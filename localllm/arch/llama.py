"""Llama (Llama 2, SmolLM2, Mistral without a window, ...): the plain block.

RMSNorm, RoPE on adjacent pairs (llama.cpp's converter permutes Q and K rows
for it), grouped-query attention, SwiGLU feed-forward, optionally tied output.
"""
from __future__ import annotations

from .spec import BlockSpec, ModelConfig, common_config

NAMES = ("llama",)
BLOCK = BlockSpec()
DEFAULT_CHAT_TEMPLATE = None  # llama GGUFs carry their own


def config_from_gguf(gguf) -> ModelConfig:
    """ModelConfig from the ``llama.*`` GGUF metadata keys."""
    return common_config(gguf, rope_style="norm", block=BLOCK)
