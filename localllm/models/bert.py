"""BERT encoder dataflow (all-MiniLM, bge, e5, ...): the embedding models' backbone.

word + learned position + token-type embeddings -> LayerNorm -> n_layers post-norm
blocks, each:

    x = LayerNorm(x + Attention(x))      bidirectional self-attention, Q/K/V/O with bias
    x = LayerNorm(x + Down(GELU(Up(x)))) GELU with erf (the exact form)

Unlike the decoder models (``forward(tokens, positions, slots)`` over a KV cache)
an encoder sees whole sentences at once: ``encode`` takes token id lists,
``forward`` a padded batch ``(b, L)`` plus its attention mask; both pack the
real tokens into one ``(n, dim)`` matrix (no work is spent on padding) and let
each sentence attend to itself.

Batch invariance: a sentence's hidden states are the same bits whatever else
is in the batch. The fast backend gets this from its kernels: F32 matrices go
through ``ops.encoder.linear`` (packed once at load), other ggml types through
the backend's ``matmul``, and both give each row the same arithmetic whatever
the number of rows; the other ops work row by row or sentence by sentence. The
ref backend takes the numpy twins (``ops.encoder.*_ref``; GELU stays the kernel,
single-threaded: its twin calls ``math.erf`` element by element) and BLAS
rounds a row differently by the shape of the call, so it runs the blocks one
sentence at a time.

Weights are named as llama.cpp's GGUF ``bert`` architecture names them
(``token_embd``, ``blk.N.attn_q`` ...); ``weights_from_hf`` renames a Hugging
Face checkpoint into that scheme.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from ..formats.errors import ModelFormatError
from ..formats.gguf import GGUFError, GGUFFile, check_hyperparameters
from ..ops import encoder as encoder_ops
from ..ops import get_backend
from ..quants import QTensor
from ..quants import ref as quants_ref
from ..arch.spec import UnsupportedArchitecture

ARCHITECTURES = ("bert",)
HIDDEN_ACTIVATIONS = ("gelu", "gelu_tanh")
# the encoder ops each backend runs (the ref backend stays off numba's threads: they would spin beside BLAS')
_ENCODER_OPS = {
    "fast": SimpleNamespace(layer_norm=encoder_ops.layer_norm, add_layer_norm=encoder_ops.add_layer_norm,
                            attention=encoder_ops.attention, gelu=encoder_ops.gelu),
    "ref": SimpleNamespace(layer_norm=encoder_ops.layer_norm_ref, add_layer_norm=encoder_ops.add_layer_norm_ref,
                           attention=encoder_ops.attention_ref,
                           gelu=lambda x, kind: encoder_ops.gelu(x, kind, threads=False)),
}


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder."""

    dim: int                  # hidden_size / embedding_length
    hidden_dim: int           # intermediate_size / feed_forward_length
    n_layers: int
    n_heads: int
    vocab_size: int
    n_ctx_train: int          # learned positions (max_position_embeddings / context_length)
    n_token_types: int = 2    # type_vocab_size
    norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # "gelu" (erf) or "gelu_tanh"
    architecture: str = "bert"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"BertConfig: dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"BertConfig: hidden_act '{self.hidden_act}' is not supported "
                             f"(supported: {', '.join(HIDDEN_ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# --------------------------------------------------------------------------- configs

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def config_from_hf(config: dict[str, Any]) -> BertConfig:
    """BertConfig from a Hugging Face ``config.json`` (``model_type == "bert"``)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(str(model_type), "config.json")
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"config.json: position_embedding_type '{position_type}' is not supported (only 'absolute')")
    act = config.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act '{act}' is not supported "
                         f"(supported: {', '.join(_HF_ACTIVATIONS)})")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size", "max_position_embeddings") if k not in config]
    if missing:
        raise ValueError(f"config.json: missing {', '.join(missing)}")
    return BertConfig(
        dim=int(config["hidden_size"]),
        hidden_dim=int(config["intermediate_size"]),
        n_layers=int(config["num_hidden_layers"]),
        n_heads=int(config["num_attention_heads"]),
        vocab_size=int(config["vocab_size"]),
        n_ctx_train=int(config["max_position_embeddings"]),
        n_token_types=int(config.get("type_vocab_size", 2)),
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        hidden_act=_HF_ACTIVATIONS[act],
    )


def config_from_gguf(gguf: GGUFFile) -> BertConfig:
    """BertConfig from the ``bert.*`` GGUF metadata keys llama.cpp's converter writes."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitecture(arch, gguf.path.name)

    def key(name):
        value = gguf.arch_key(name)
        if value is None:
            raise GGUFError(f"{gguf.path.name}: missing GGUF metadata key '{arch}.{name}'")
        return value

    check_hyperparameters(gguf)              # sizes positive integers, block_count within the file's tensors
    if "token_embd.weight" not in gguf.tensors:
        raise GGUFError(f"{gguf.path.name}: missing tensor 'token_embd.weight'")
    token_types = gguf.tensors.get("token_types.weight")
    return BertConfig(
        dim=int(key("embedding_length")),
        hidden_dim=int(key("feed_forward_length")),
        n_layers=int(key("block_count")),
        n_heads=int(key("attention.head_count")),
        vocab_size=gguf.tensors["token_embd.weight"].shape[0],
        n_ctx_train=int(key("context_length")),
        n_token_types=int(gguf.metadata.get("tokenizer.ggml.token_type_count",
                                            token_types.shape[0] if token_types is not None else 1)),
        norm_eps=float(key("attention.layer_norm_epsilon")),
    )


# HF BertModel tensor names -> GGUF names (llama.cpp's tensor map for MODEL_ARCH.BERT).
_HF_GLOBAL_NAMES = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_HF_LAYER_NAMES = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_HF_IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


def weights_from_hf(tensors: dict[str, QTensor]) -> dict[str, QTensor]:
    """Rename a Hugging Face BERT checkpoint's tensors to the GGUF scheme.

    Accepts the ``bert.`` prefix of ``BertFor*`` checkpoints and the old
    ``gamma``/``beta`` LayerNorm names; drops the pooler and MLM heads.
    """
    renamed: dict[str, QTensor] = {}
    for hf_name, tensor in tensors.items():
        name = hf_name.removeprefix("bert.")
        if name.endswith(".gamma"):
            name = name[: -len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[: -len(".beta")] + ".bias"
        if name.startswith(_HF_IGNORED_PREFIXES):
            continue
        if name in _HF_GLOBAL_NAMES:
            gguf_name = _HF_GLOBAL_NAMES[name]
        elif name.startswith("encoder.layer."):
            layer, _, rest = name[len("encoder.layer."):].partition(".")
            module, _, kind = rest.rpartition(".")
            if module not in _HF_LAYER_NAMES or kind not in ("weight", "bias"):
                raise ValueError(f"unexpected BERT tensor '{hf_name}'")
            gguf_name = f"blk.{layer}.{_HF_LAYER_NAMES[module]}.{kind}"
        else:
            raise ValueError(f"unexpected BERT tensor '{hf_name}'")
        renamed[gguf_name] = QTensor(gguf_name, tensor.ggml_type, tensor.shape, tensor.data)
    return renamed


# --------------------------------------------------------------------------- model

class _Linear:
    """``y = x @ W.T + b``. F32 weights: ``ops.encoder.linear`` on the fast backend (packed here, once),
    ``linear_ref`` (BLAS) on the ref backend; other types through the backend's ``matmul``."""

    def __init__(self, weight: QTensor, bias: np.ndarray | None, backend):
        self.weight = weight
        self.bias = bias
        self.matmul = backend.matmul
        self.packed = None
        if weight.ggml_type == "F32" and backend.name == "fast":
            self.packed = encoder_ops.pack_linear(np.asarray(weight.data).reshape(weight.shape), bias)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.packed is not None:
            return encoder_ops.linear(x, self.packed)                                      # (n, out)
        if self.weight.ggml_type == "F32":
            return encoder_ops.linear_ref(x, np.asarray(self.weight.data).reshape(self.weight.shape), self.bias)
        y = self.matmul(self.weight, x)                                                    # (n, out)
        if self.bias is not None:
            y += self.bias
        return y


class _LinearGroup:
    """Several ``_Linear`` over one input (Q, K, V of a quantized model) through one ``matmul_many`` launch."""

    def __init__(self, linears: list[_Linear], matmul_many):
        self.linears = linears
        self.matmul_many = matmul_many

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        outs = self.matmul_many([lin.weight for lin in self.linears], x)                  # each (n, out)
        for out, lin in zip(outs, self.linears):
            out += lin.bias
        return outs


def _fuse_rows(name: str, parts: list[QTensor]) -> QTensor:
    """Stack matrices that share an input (Q, K, V) into one: one matmul instead of three."""
    data = np.concatenate([np.asarray(p.data) for p in parts], axis=0)
    return QTensor(name, parts[0].ggml_type, (sum(p.shape[0] for p in parts), parts[0].shape[1]), data)


class BertModel:
    """A BERT encoder over named weights (GGUF names); see the module docstring."""

    def __init__(self, config: BertConfig, weights: dict[str, QTensor], backend: str = "auto"):
        self.config = config
        self.backend = get_backend(backend)
        self.ops = _ENCODER_OPS[self.backend.name]
        self._weights = weights
        self._used: set[str] = set()
        c = config
        self.token_embd = self._tensor("token_embd.weight", (c.vocab_size, c.dim))
        self.position_embd = self._float("position_embd.weight", (c.n_ctx_train, c.dim))   # (n_ctx, dim)
        if "token_types.weight" in weights:
            self.token_types = self._float("token_types.weight", (weights["token_types.weight"].shape[0], c.dim))
        else:
            self.token_types = np.zeros((1, c.dim), np.float32)                            # (n_types, dim)
        self.embd_norm = self._norm("token_embd_norm")
        self.layers = [self._layer(i) for i in range(c.n_layers)]
        extra = set(weights) - self._used
        if extra:
            raise ValueError(f"unexpected BERT tensors: {', '.join(sorted(extra)[:5])}")

    # ---- weight loading

    def _tensor(self, name: str, shape: tuple[int, ...]) -> QTensor:
        if name not in self._weights:
            raise ModelFormatError(f"BERT weights: missing tensor '{name}'")
        t = self._weights[name]
        if tuple(t.shape) != shape:             # checked before any kernel reads it
            raise ModelFormatError(f"BERT weights: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
        self._used.add(name)
        return t

    def _float(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return quants_ref.dequantize(self._tensor(name, shape))

    def _norm(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        dim = self.config.dim
        return self._float(f"{prefix}.weight", (dim,)), self._float(f"{prefix}.bias", (dim,))

    def _linear(self, prefix: str, n_out: int, n_in: int) -> _Linear:
        return _Linear(self._tensor(f"{prefix}.weight", (n_out, n_in)),
                       self._float(f"{prefix}.bias", (n_out,)), self.backend)

    def _layer(self, i: int) -> dict[str, Any]:
        c, p = self.config, f"blk.{i}"
        if f"{p}.attn_qkv.weight" in self._weights:
            qkv = self._linear(f"{p}.attn_qkv", 3 * c.dim, c.dim)
        else:
            q, k, v = (self._linear(f"{p}.attn_{x}", c.dim, c.dim) for x in "qkv")
            if q.weight.ggml_type == k.weight.ggml_type == v.weight.ggml_type == "F32":
                fused = _fuse_rows(f"{p}.attn_qkv.weight", [q.weight, k.weight, v.weight])
                qkv = _Linear(fused, np.concatenate([q.bias, k.bias, v.bias]), self.backend)
            else:
                qkv = _LinearGroup([q, k, v], self.backend.matmul_many)
        return {
            "qkv": qkv,
            "attn_output": self._linear(f"{p}.attn_output", c.dim, c.dim),
            "attn_output_norm": self._norm(f"{p}.attn_output_norm"),
            "ffn_up": self._linear(f"{p}.ffn_up", c.hidden_dim, c.dim),
            "ffn_down": self._linear(f"{p}.ffn_down", c.dim, c.hidden_dim),
            "layer_output_norm": self._norm(f"{p}.layer_output_norm"),
        }

    # ---- forward

    def encode(self, sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Hidden states of sentences given as token id lists (positions from 0, token type 0), packed.

        Returns float32 x (n, dim), n the total number of tokens, and offsets
        (b + 1,): sentence s is rows ``offsets[s]:offsets[s + 1]``. Each
        sentence's rows are the same bits whatever the other sentences are.
        """
        c = self.config
        lengths = np.array([len(s) for s in sequences], np.int64)
        if lengths.size and lengths.max() > c.n_ctx_train:
            raise ValueError(f"a sequence of {lengths.max()} tokens exceeds the model's {c.n_ctx_train} positions")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)                # (b + 1,)
        n = int(offsets[-1])
        if n == 0:
            return np.zeros((0, c.dim), np.float32), offsets
        ids = np.fromiter(chain.from_iterable(sequences), np.int64, n)                      # (n,)
        positions = np.arange(n) - np.repeat(offsets[:-1], lengths)                         # (n,) from 0 each
        return self._encode(ids, positions, np.zeros(n, np.int64), offsets), offsets

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """Hidden states of a padded batch.

        input_ids (b, L) int; attention_mask (b, L), 1 for real tokens and 0 for
        padding (default: all real); token_type_ids (b, L) (default: all 0).
        Token j has position j whatever the padding. Returns float32
        (b, L, dim), zeros at padding positions.

        Inside, only the real tokens are computed: they are packed into one
        (n, dim) matrix, and attention keeps each sentence to itself.
        """
        c = self.config
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2 or (input_ids.size and input_ids.dtype.kind not in "iu"):
            raise ValueError(f"input_ids must be a (batch, length) integer array, got {input_ids.dtype} {input_ids.shape}")
        b, L = input_ids.shape
        if L > c.n_ctx_train:
            raise ValueError(f"input_ids length {L} exceeds the model's {c.n_ctx_train} positions")
        mask = np.ones((b, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != (b, L):
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {(b, L)}")
        types = np.zeros((b, L), np.int64) if token_type_ids is None else np.asarray(token_type_ids)
        if types.shape != (b, L) or (types.size and (types.min() < 0 or types.max() >= len(self.token_types))):
            raise ValueError(f"token_type_ids must be ({b}, {L}) with values in 0:{len(self.token_types)}")

        # pack the real tokens: sentence s is rows offsets[s]:offsets[s+1] of x
        flat = np.flatnonzero(mask)                                                        # (n,) into b*L
        offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])                       # (b + 1,)
        out = np.zeros((b * L, c.dim), np.float32)
        if flat.size:
            out[flat] = self._encode(input_ids.reshape(-1)[flat], flat % L, types.reshape(-1)[flat], offsets)
        return out.reshape(b, L, c.dim)

    __call__ = forward

    def _encode(self, ids: np.ndarray, positions: np.ndarray, token_types: np.ndarray,
                offsets: np.ndarray) -> np.ndarray:
        """Packed tokens (n,) ids, positions, token types; sentences at ``offsets`` -> hidden states (n, dim)."""
        c = self.config
        x = self.backend.embedding_rows(self.token_embd, ids)                              # (n, dim)
        x += self.position_embd[positions]
        x += self.token_types[token_types]
        x = self.ops.layer_norm(x, *self.embd_norm, c.norm_eps)                            # (n, dim)
        if self.backend.name == "ref":  # numpy (BLAS) rounds a row by the shape of its call: one sentence at a time
            return np.concatenate([self._blocks(x[start:stop], np.array([0, stop - start]))
                                   for start, stop in zip(offsets[:-1], offsets[1:])])
        return self._blocks(x, offsets)

    def _blocks(self, x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = self._block(layer, x, offsets)
        return x

    def _block(self, layer: dict[str, Any], x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        c = self.config

        # self-attention: every token attends to every token of its own sentence
        if isinstance(layer["qkv"], _LinearGroup):
            q, k, v = layer["qkv"](x)                                                      # 3 x (n, dim)
        else:
            qkv = layer["qkv"](x)                                                          # (n, 3*dim)
            q, k, v = qkv[:, :c.dim], qkv[:, c.dim:2 * c.dim], qkv[:, 2 * c.dim:]
        mixed = self.ops.attention(q, k, v, offsets, c.n_heads)                            # (n, dim)
        attn_out = layer["attn_output"](mixed)                                             # (n, dim)
        x = self.ops.add_layer_norm(x, attn_out, *layer["attn_output_norm"], c.norm_eps)

        # feed-forward
        up = layer["ffn_up"](x)                                                            # (n, hidden_dim)
        up = self.ops.gelu(up, c.hidden_act)
        down = layer["ffn_down"](up)                                                       # (n, dim)
        return self.ops.add_layer_norm(x, down, *layer["layer_output_norm"], c.norm_eps)
