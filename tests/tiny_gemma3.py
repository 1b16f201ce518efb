"""A tiny random Gemma 3 built with transformers (the float oracle) and written to GGUF as llama.cpp's
converter lays it out: norm scales stored with Gemma's +1 added, NEOX RoPE (no Q/K row permutation),
tied embeddings, per-layer sliding windows from the layer types."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tests.tiny_models import _store, add_byte_level_tokenizer, byte_level_vocab, hf_logits  # noqa: F401


def hf_tiny_gemma3(*, dim: int = 64, hidden_dim: int = 96, n_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2,
                   head_dim: int = 32, window: int = 8, n_ctx: int = 512, seed: int = 0):
    """A random ``Gemma3ForCausalLM`` in float32 (eval mode): layers 0 and 1 sliding, layer 2 global."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    vocab_size = len(byte_level_vocab()[0])
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=hidden_dim, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim, sliding_window=window,
        layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(n_layers)],
        max_position_embeddings=n_ctx, query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        pad_token_id=0, bos_token_id=256, eos_token_id=258, tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):   # Gemma norms scale by (1 + weight): make them non-trivial
                parameter.copy_(0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / np.sqrt(parameter.shape[-1]))
    return model


GGUF_NAMES = {  # transformers' names in a layer -> llama.cpp's
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_gemma3_gguf(model, path: str | Path, weight_type: str = "F32", add_tokenizer=add_byte_level_tokenizer) -> Path:
    """The transformers model as a GGUF ``gemma3`` file; ``weight_type`` applies to 2-D matrices;
    ``add_tokenizer(writer)`` writes the tokenizer keys (the byte-level vocabulary by default)."""
    path = Path(path)
    c = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny-gemma3")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_sliding_window(c.sliding_window)
    writer.add_uint32("gemma3.attention.sliding_window_pattern", 3)
    writer.add_float32("gemma3.rope.freq_base_swa", c.rope_parameters["sliding_attention"]["rope_theta"])
    add_tokenizer(writer)
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}

    def add(gguf_name: str, array: np.ndarray, norm: bool = False) -> None:
        if norm:
            writer.add_tensor(gguf_name, (array + 1.0).astype(np.float32))  # the converter's +1
        else:
            _store(writer, gguf_name, array, weight_type)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"], norm=True)
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in GGUF_NAMES.items():
            add(f"blk.{i}.{gguf_name}.weight", state[f"model.layers.{i}.{hf_name}.weight"],
                norm=hf_name.endswith(("layernorm", "norm")))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
