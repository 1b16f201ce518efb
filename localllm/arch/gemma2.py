"""Gemma 2: the Gemma block with soft-capped attention scores and logits, sliding window on alternate layers.

* token embeddings scaled by sqrt(dim); RMSNorms before and after attention and
  feed-forward (scales stored with their +1 by the converter); GELU(tanh)-gated
  feed-forward; NEOX RoPE with one base; tied output;
* layers 0, 2, 4, ... attend to the last ``attention.sliding_window`` positions
  (4096 where the file leaves it out), the others to the whole sequence;
* attention scores go through cap * tanh(s / cap) (``attn_logit_softcapping``, 50 by
  default) before the softmax and the logits through the same with
  ``final_logit_softcapping`` (30 by default);
* queries are scaled by 1/sqrt(head_dim), by 1/sqrt(dim / n_heads) on the 46-layer
  27B model (HF's ``query_pre_attn_scalar``), as llama.cpp does.
"""
from __future__ import annotations

import math

from .gemma3 import DEFAULT_CHAT_TEMPLATE  # Gemma's turns (no system turn: it opens the first user turn)
from .spec import BlockSpec, MetadataKeys, ModelConfig, common_config, hf_common_config, layer_windows

NAMES = ("gemma2",)
BLOCK = BlockSpec(post_attn_norm=True, post_ffn_norm=True, activation="gelu_tanh")
SLIDING_WINDOW = 4096
SLIDING_WINDOW_PATTERN = 2
ATTENTION_SOFTCAP = 50.0
FINAL_LOGIT_SOFTCAP = 30.0
LAYERS_OF_27B = 46


def config_from_gguf(gguf) -> ModelConfig:
    """ModelConfig from the ``gemma2.*`` GGUF metadata keys."""
    keys = MetadataKeys(gguf)
    n_layers = int(keys.required("block_count"))
    dim, n_heads = int(keys.required("embedding_length")), int(keys.required("attention.head_count"))
    head_dim = int(keys.get("attention.key_length", dim // n_heads))
    query_scale = dim / n_heads if n_layers == LAYERS_OF_27B else head_dim
    return common_config(
        gguf,
        rope_style="neox",
        block=BLOCK,
        layer_windows=layer_windows(keys, n_layers, SLIDING_WINDOW_PATTERN, SLIDING_WINDOW),
        embedding_scale=math.sqrt(dim),
        attention_scale=1.0 / math.sqrt(query_scale),
        attention_softcap=float(keys.get("attn_logit_softcapping", ATTENTION_SOFTCAP) or 0.0),
        final_logit_softcap=float(keys.get("final_logit_softcapping", FINAL_LOGIT_SOFTCAP) or 0.0),
        rope_linear_on_windows=False,
    )


def config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` (Gemma2ForCausalLM). The loader adds Gemma's +1 to the
    norm scales; ``query_pre_attn_scalar`` sets the attention scale; ``layer_types`` (else every other layer)
    the windows."""
    dim = int(config["hidden_size"])
    n_layers = int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or dim // int(config["num_attention_heads"]))
    return hf_common_config(
        config, "gemma2", tie_embeddings_default=True, block=BLOCK,
        default_layer_types=["sliding_attention" if (i + 1) % SLIDING_WINDOW_PATTERN else "full_attention"
                             for i in range(n_layers)],
        embedding_scale=math.sqrt(dim),
        attention_scale=float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        attention_softcap=float(config.get("attn_logit_softcapping") or 0.0),
        final_logit_softcap=float(config.get("final_logit_softcapping") or 0.0),
        rope_linear_on_windows=False,
    )
