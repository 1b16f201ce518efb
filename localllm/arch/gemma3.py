"""Gemma 3 (text): Llama's block with Gemma's additions.

* token embeddings scaled by sqrt(dim);
* per-head RMSNorm on q and k before RoPE; RMSNorm on the attention output and on
  the feed-forward output before each residual add (llama.cpp's converter stores
  every Gemma norm scale with its +1 already added, so they are plain RMSNorms);
* GELU(tanh)-gated feed-forward;
* sliding-window attention on most layers: layer i is global when
  (i + 1) % pattern == 0 (pattern 6: five local layers, then one global), local
  layers use their own RoPE base;
* NEOX RoPE (first/second half of each head), tied output.

Numbers come from the GGUF metadata. Where Gemma 3 files leave a key out,
the value is the one llama.cpp's loader takes for ``gemma3``: local RoPE base
10,000 (``rope.freq_base_swa``), pattern 6 (``attention.sliding_window_pattern``),
and attention scores scaled by 1/sqrt(head_dim) (1/sqrt(dim / n_heads) for the
62-layer 27B model).
"""
from __future__ import annotations

import math
from dataclasses import replace

from .spec import (BlockSpec, MetadataKeys, ModelConfig, UnsupportedModelFeature, common_config, hf_common_config,
                   hf_rope_config, hf_rope_parameters, layer_windows)

NAMES = ("gemma3",)
BLOCK = BlockSpec(qk_norm=True, post_attn_norm=True, post_ffn_norm=True, activation="gelu_tanh")
LOCAL_ROPE_BASE = 10000.0
SLIDING_WINDOW_PATTERN = 6
LAYERS_OF_27B = 62

# Gemma's turn format (as Ollama's library serves it for Gemma 3), for files that carry no template.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def config_from_gguf(gguf) -> ModelConfig:
    """ModelConfig from the ``gemma3.*`` GGUF metadata keys."""
    keys = MetadataKeys(gguf)
    n_layers = int(keys.required("block_count"))
    dim, n_heads = int(keys.required("embedding_length")), int(keys.required("attention.head_count"))
    head_dim = int(keys.get("attention.key_length", dim // n_heads))
    keys.required("attention.sliding_window")
    windows = layer_windows(keys, n_layers, SLIDING_WINDOW_PATTERN)
    global_base = float(keys.get("rope.freq_base", 1000000.0))
    local_base = float(keys.get("rope.freq_base_swa", LOCAL_ROPE_BASE))
    query_scale = dim / n_heads if n_layers == LAYERS_OF_27B else head_dim
    return common_config(
        gguf,
        rope_style="neox",
        block=BLOCK,
        layer_windows=windows,
        layer_rope_theta=tuple(local_base if window else global_base for window in windows),
        embedding_scale=math.sqrt(dim),
        attention_scale=1.0 / math.sqrt(query_scale),
        final_logit_softcap=float(keys.get("final_logit_softcapping", 0.0) or 0.0),
        rope_linear_on_windows=False,
    )


def config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` (Gemma3ForCausalLM, the text model). The loader adds
    Gemma's +1 to the norm scales; ``layer_types`` (else ``sliding_window_pattern``) set the windows, the
    sliding layers' RoPE base is their own (``rope_parameters.sliding_attention``, or ``rope_local_base_freq``);
    ``query_pre_attn_scalar`` sets the attention scale."""
    dim = int(config["hidden_size"])
    n_layers = int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or dim // int(config["num_attention_heads"]))
    pattern = int(config.get("sliding_window_pattern") or SLIDING_WINDOW_PATTERN)
    rope = hf_rope_parameters(config)
    local = hf_rope_config(config, rope["sliding_attention"] or {**rope["full_attention"], "rope_type": "default",
                                                                    "rope_theta": LOCAL_ROPE_BASE}, head_dim)
    gemma = hf_common_config(
        config, "gemma3", tie_embeddings_default=True, block=BLOCK,
        default_layer_types=["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)],
        embedding_scale=math.sqrt(dim),
        attention_scale=float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        attention_softcap=float(config.get("attn_logit_softcapping") or 0.0),
        final_logit_softcap=float(config.get("final_logit_softcapping") or 0.0),
        rope_linear_on_windows=False,
    )
    windows = gemma.layer_windows
    if any(windows) and (gemma.rope_freq_factors or "rope_freq_factors" in local or "rope_linear_factor" in local):
        raise UnsupportedModelFeature("config.json: RoPE scaling other than linear on the global layers is not "
                                      "implemented for Gemma 3")
    if not any(windows):
        return gemma
    return replace(gemma, layer_rope_theta=tuple(local["rope_theta"] if window else gemma.rope_theta
                                                 for window in windows))
