"""A tiny random BERT written as a Hugging Face folder, and an independent numpy oracle for it.

The oracle works on the Hugging Face tensor names and a padded batch with an
additive mask, the way ``transformers``' BertModel computes, so it checks the
renaming to GGUF names, the packing of real tokens and the kernels at once.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from localllm.wordpiece import wordpiece_tokenizer

TINY_CONFIG = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 40,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "pad_token_id": 0,
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "fish", "run", "##s", "##ing", "##ed", ".", ","]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def tiny_vocab() -> list[str]:
    vocab = SPECIALS + WORDS + LETTERS + ["##" + c for c in LETTERS]
    return list(dict.fromkeys(vocab))  # unique, first occurrence wins


def tiny_bert_tensors(config: dict, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named BERT weights (scaled so activations stay in a realistic range)."""
    rng = np.random.default_rng(seed)
    dim, hidden = config["hidden_size"], config["intermediate_size"]

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": rand(vocab_size, dim, scale=1.0),
        "embeddings.position_embeddings.weight": rand(config["max_position_embeddings"], dim, scale=0.5),
        "embeddings.token_type_embeddings.weight": rand(config["type_vocab_size"], dim, scale=0.5),
        "embeddings.LayerNorm.weight": 1 + rand(dim, scale=0.1),
        "embeddings.LayerNorm.bias": rand(dim, scale=0.1),
        "embeddings.position_ids": np.arange(config["max_position_embeddings"], dtype=np.int64)[None],
        "pooler.dense.weight": rand(dim, dim),
        "pooler.dense.bias": rand(dim),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (rows, cols) in {
            "attention.self.query": (dim, dim), "attention.self.key": (dim, dim),
            "attention.self.value": (dim, dim), "attention.output.dense": (dim, dim),
            "intermediate.dense": (hidden, dim), "output.dense": (dim, hidden),
        }.items():
            t[p + name + ".weight"] = rand(rows, cols, scale=1.0 / math.sqrt(cols))
            t[p + name + ".bias"] = rand(rows, scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"] = 1 + rand(dim, scale=0.1)
            t[p + name + ".bias"] = rand(dim, scale=0.1)
    return t


def write_tiny_bert(folder: Path, pooling: str | None = "mean", normalize: bool = True,
                    max_seq_length: int | None = 24, config_overrides: dict | None = None,
                    dtype=np.float32, seed: int = 0) -> Path:
    """A sentence-transformers folder: config.json, model.safetensors, tokenizer.json, modules.json, pooling."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**TINY_CONFIG, **(config_overrides or {})}
    vocab = tiny_vocab()
    config["vocab_size"] = len(vocab)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = tiny_bert_tensors(config, len(vocab), seed)
    save_file({k: (v.astype(dtype) if v.dtype == np.float32 else v) for k, v in tensors.items()},
              str(folder / "model.safetensors"))
    tokenizer = wordpiece_tokenizer({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", cls_token="[CLS]",
                                    sep_token="[SEP]", special_tokens=SPECIALS, lowercase=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        flags = {"word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": pooling == "cls",
                 "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
                 "pooling_mode_mean_sqrt_len_tokens": pooling == "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": pooling == "weightedmean",
                 "pooling_mode_lasttoken": pooling == "lasttoken"}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(flags))
        if max_seq_length is not None:
            (folder / "sentence_bert_config.json").write_text(
                json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    return folder


# --------------------------------------------------------------------------- oracle

def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def oracle_forward(tensors: dict[str, np.ndarray], config: dict, input_ids: np.ndarray,
                   mask: np.ndarray) -> np.ndarray:
    """BERT in float64 over a padded batch with an additive -inf mask on padding keys: (b, L, dim)."""
    t = {k: v.astype(np.float64) for k, v in tensors.items() if v.dtype.kind == "f"}
    eps = config["layer_norm_eps"]
    n_heads = config["num_attention_heads"]
    b, L = input_ids.shape
    dim = config["hidden_size"]
    head_dim = dim // n_heads
    x = (t["embeddings.word_embeddings.weight"][input_ids] + t["embeddings.position_embeddings.weight"][:L]
         + t["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    bias = np.where(mask.astype(bool), 0.0, -np.inf)[:, None, None, :]                  # (b, 1, 1, L)

    def linear(h, name):
        return h @ t[name + ".weight"].T + t[name + ".bias"]

    def heads(h):
        return h.reshape(b, L, n_heads, head_dim).transpose(0, 2, 1, 3)

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (heads(linear(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, L, dim)
        x = _layer_norm(x + linear(ctx, p + "attention.output.dense"),
                        t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"], eps)
        h = _gelu(linear(x, p + "intermediate.dense"))
        x = _layer_norm(x + linear(h, p + "output.dense"),
                        t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    return x
