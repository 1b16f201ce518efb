"""Tiny random models written at test time with gguf.GGUFWriter."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from localllm.tokenizer import bytes_to_unicode

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_vocab() -> tuple[list[str], list[int]]:
    """GPT-2 byte-level alphabet (256 tokens) + <|endoftext|>, <|im_start|>, <|im_end|>."""
    byte_to_char = bytes_to_unicode()
    tokens = [byte_to_char[b] for b in range(256)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    token_types = [1] * 256 + [3, 3, 3]  # NORMAL, CONTROL
    return tokens, token_types


def add_byte_level_tokenizer(writer: gguf.GGUFWriter, chat_template: str | None = CHATML_TEMPLATE,
                             extra_tokens: tuple[str, ...] = ()) -> None:
    """The byte-level vocabulary's tokenizer keys (BOS <|endoftext|>, EOS <|im_end|>) and a chat template;
    ``extra_tokens`` are appended as CONTROL tokens (e.g. fill-in-the-middle ones)."""
    tokens, token_types = byte_level_vocab()
    tokens, token_types = tokens + list(extra_tokens), token_types + [3] * len(extra_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(258)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _store(writer: gguf.GGUFWriter, name: str, array: np.ndarray, weight_type: str) -> None:
    array = array.astype(np.float32)
    if weight_type == "F32" or array.ndim == 1:
        writer.add_tensor(name, array)
        return
    qtype = gguf.GGMLQuantizationType[weight_type]
    if weight_type == "F16":
        writer.add_tensor(name, array.astype(np.float16))
        return
    raw = gguf.quants.quantize(array, qtype)
    writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)


def write_tiny_llama(path: str | Path, *, dim: int = 64, hidden_dim: int = 96, n_layers: int = 2,
                     n_heads: int = 4, n_kv_heads: int = 2, n_ctx: int = 256, weight_type: str = "F32",
                     tie_embeddings: bool = True, seed: int = 0, rope_theta: float = 10000.0,
                     chat_template: str | None = CHATML_TEMPLATE, extra_tokens: tuple[str, ...] = ()) -> Path:
    """Write a random llama model; returns the path. ``weight_type`` applies to 2-D matrices."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    vocab_size = len(byte_level_vocab()[0]) + len(extra_tokens)
    head_dim = dim // n_heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden_dim)
    writer.add_block_count(n_layers)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    add_byte_level_tokenizer(writer, chat_template, extra_tokens)

    def matrix(rows, cols, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(cols)
        return rng.standard_normal((rows, cols)).astype(np.float32) * scale

    _store(writer, "token_embd.weight", matrix(vocab_size, dim, 0.25), weight_type)
    if not tie_embeddings:
        _store(writer, "output.weight", matrix(vocab_size, dim), weight_type)
    writer.add_tensor("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        _store(writer, f"blk.{i}.attn_q.weight", matrix(n_heads * head_dim, dim), weight_type)
        _store(writer, f"blk.{i}.attn_k.weight", matrix(n_kv_heads * head_dim, dim), weight_type)
        _store(writer, f"blk.{i}.attn_v.weight", matrix(n_kv_heads * head_dim, dim), weight_type)
        _store(writer, f"blk.{i}.attn_output.weight", matrix(dim, n_heads * head_dim), weight_type)
        _store(writer, f"blk.{i}.ffn_gate.weight", matrix(hidden_dim, dim), weight_type)
        _store(writer, f"blk.{i}.ffn_up.weight", matrix(hidden_dim, dim), weight_type)
        _store(writer, f"blk.{i}.ffn_down.weight", matrix(dim, hidden_dim), weight_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_logits(model, tokens) -> np.ndarray:
    """(n, vocab) float32 logits of a transformers model on one sequence of token ids (the float oracle)."""
    import torch
    with torch.no_grad():
        return model(torch.tensor([list(map(int, tokens))])).logits[0].float().numpy()
