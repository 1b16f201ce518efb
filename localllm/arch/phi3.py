"""Phi-3, Phi-3.5 and Phi-4-mini: Llama's block, stored fused, with LongRoPE on the long-context models.

* q, k and v rows are one ``attn_qkv`` matrix and the gate and up rows one ``ffn_up``
  matrix twice as tall (gate first): the loader (``models.decoder``) takes row views
  of them, so the dataflow is Llama's;
* NEOX RoPE over ``rope.dimension_count`` dims (Phi-4-mini rotates 3/4 of each head);
* the 128k models carry ``rope_factors_short`` / ``rope_factors_long`` and
  ``rope.scaling.attn_factor``: the short factors serve caches of up to
  ``rope.scaling.original_context_length`` positions, the long ones longer caches
  (llama.cpp's choice);
* ``attention.sliding_window`` (Phi-3-mini: 2047) is applied on every layer as the
  model was trained (llama.cpp ignores it and warns); 0 (Phi-4) means none.
"""
from __future__ import annotations

from .spec import BlockSpec, ModelConfig, common_config, hf_common_config

NAMES = ("phi3",)
BLOCK = BlockSpec()
DEFAULT_CHAT_TEMPLATE = None  # Phi GGUFs carry their template


def config_from_gguf(gguf) -> ModelConfig:
    """ModelConfig from the ``phi3.*`` GGUF metadata keys."""
    return common_config(gguf, rope_style="neox", block=BLOCK)


def config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` (Phi3ForCausalLM): fused ``qkv_proj`` and
    ``gate_up_proj`` (row views in the decoder), ``partial_rotary_factor``, LongRoPE's short/long factors
    with attention factor sqrt(1 + log(scale) / log(original_max_position_embeddings)), and
    ``sliding_window`` on every layer."""
    return hf_common_config(config, "phi3", tie_embeddings_default=False, block=BLOCK)
