"""Llama dataflow (Llama 2/3, SmolLM2, Mistral, ...): RMSNorm, RoPE, grouped-query
attention over a KV cache, SwiGLU feed-forward, optionally tied output embedding.

The forward pass works on a flat batch of tokens, each with its position and
the KV-cache slot of the sequence it belongs to: prefill of one prompt,
decode of one sequence and decode of many sequences are the same call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..formats.gguf import GGUFError, GGUFFile
from ..kv_cache import KVCache
from ..ops import get_backend
from ..quants import QTensor
from .base import ModelConfig, UnsupportedArchitecture

ARCHITECTURES = ("llama",)
MAX_BATCH_TOKENS = 128


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """ModelConfig from the ``llama.*`` GGUF metadata keys."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitecture(arch, gguf.path.name)

    def key(name, default=None):
        value = gguf.arch_key(name, default)
        if value is None:
            raise GGUFError(f"{gguf.path.name}: missing GGUF metadata key '{arch}.{name}'")
        return value

    dim = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv_heads = int(key("attention.head_count_kv", n_heads))
    head_dim = int(gguf.arch_key("attention.key_length", dim // n_heads))
    vocab_size = int(gguf.arch_key("vocab_size", 0) or len(gguf.metadata.get("tokenizer.ggml.tokens", [])))
    if not vocab_size:
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    return ModelConfig(
        architecture=arch,
        dim=dim,
        hidden_dim=int(key("feed_forward_length")),
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        n_ctx_train=int(key("context_length")),
        rope_theta=float(gguf.arch_key("rope.freq_base", 10000.0)),
        rope_dim=int(gguf.arch_key("rope.dimension_count", head_dim)),
        rope_style="norm",
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in gguf.tensors,
    )


@dataclass
class LlamaLayer:
    attn_norm: np.ndarray   # (dim,)
    wq: QTensor             # (q_dim, dim)
    wk: QTensor             # (kv_dim, dim)
    wv: QTensor             # (kv_dim, dim)
    wo: QTensor             # (dim, q_dim)
    ffn_norm: np.ndarray    # (dim,)
    w_gate: QTensor         # (hidden_dim, dim)
    w_up: QTensor           # (hidden_dim, dim)
    w_down: QTensor         # (dim, hidden_dim)


def _norm_weight(tensors: dict[str, QTensor], name: str) -> np.ndarray:
    from ..quants.ref import dequantize
    return np.ascontiguousarray(dequantize(_tensor(tensors, name)), dtype=np.float32)


def _tensor(tensors: dict[str, QTensor], name: str) -> QTensor:
    if name not in tensors:
        raise GGUFError(f"model file has no tensor '{name}'")
    return tensors[name]


class LlamaModel:
    """Weights (memory-mapped QTensors) + the forward pass. Stateless apart from the cache it is given."""

    def __init__(self, config: ModelConfig, tensors: dict[str, QTensor], backend: str = "auto"):
        self.config = config
        self.backend = get_backend(backend)
        self.token_embd = _tensor(tensors, "token_embd.weight")                  # (vocab_size, dim)
        self.output_norm = _norm_weight(tensors, "output_norm.weight")           # (dim,)
        self.output = tensors.get("output.weight", self.token_embd)              # (vocab_size, dim)
        self.layers = [
            LlamaLayer(
                attn_norm=_norm_weight(tensors, f"blk.{i}.attn_norm.weight"),
                wq=_tensor(tensors, f"blk.{i}.attn_q.weight"),
                wk=_tensor(tensors, f"blk.{i}.attn_k.weight"),
                wv=_tensor(tensors, f"blk.{i}.attn_v.weight"),
                wo=_tensor(tensors, f"blk.{i}.attn_output.weight"),
                ffn_norm=_norm_weight(tensors, f"blk.{i}.ffn_norm.weight"),
                w_gate=_tensor(tensors, f"blk.{i}.ffn_gate.weight"),
                w_up=_tensor(tensors, f"blk.{i}.ffn_up.weight"),
                w_down=_tensor(tensors, f"blk.{i}.ffn_down.weight"),
            )
            for i in range(config.n_layers)
        ]
        # tokens per pass through the layers: longer batches (prefill) go in pieces of this many, which
        # bounds the activations' memory (about 45 KB a token for SmolLM2) at no cost in speed
        self.max_batch_tokens = MAX_BATCH_TOKENS
        self._step = None  # the one-launch forward pass for small batches (ops.llama_step), made on first use
        self._step_checked = False

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, backend: str = "auto") -> "LlamaModel":
        return cls(config_from_gguf(gguf), gguf.tensors, backend)

    def new_cache(self, n_slots: int, n_ctx: int, dtype=None) -> KVCache:
        """An empty KV cache for ``n_slots`` sequences of up to ``n_ctx`` tokens.

        dtype: np.float16 or np.float32 for K/V; None picks float16 with the fast
        backend (like llama.cpp) and float32 with the numpy reference (the float oracle).
        """
        c = self.config
        if dtype is None:
            dtype = np.float32 if self.backend.name == "ref" else np.float16
        return KVCache(c.n_layers, n_slots, n_ctx, c.n_kv_heads, c.head_dim, dtype)

    def forward(self, tokens, positions, slots, cache: KVCache, logits_for=None) -> np.ndarray:
        """Run a flat batch of tokens through the model, writing their K/V into ``cache``.

        tokens, positions, slots: (n,) ints. Every token's earlier positions in
        its slot must already be in the cache (or in this batch, before it).
        logits_for: indices into the batch whose logits to return (None: all).
        Returns logits (len(logits_for), vocab_size) float32.
        """
        c, ops = self.config, self.backend
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        n = tokens.shape[0]
        if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= c.vocab_size:
            raise ValueError(f"token ids must be in [0, {c.vocab_size})")
        if n > self.max_batch_tokens:
            return self._forward_in_chunks(tokens, positions, slots, cache, logits_for)

        x = ops.embedding_rows(self.token_embd, tokens)                         # (n, dim)
        step = self._one_launch_layers(n)
        if step is not None:  # decode: the layer loop as one parallel launch (same ops, same bits)
            step.run(x, positions, slots, cache)                                 # x updated in place
        else:
            x = self._layers(x, positions, slots, cache)                         # (n, dim)

        if logits_for is not None:
            x = x[np.asarray(logits_for, dtype=np.int64)]
        x = ops.rms_norm(x, self.output_norm, c.norm_eps)                        # (m, dim)
        return ops.matmul(self.output, x)                                        # (m, vocab_size)

    def _layers(self, x: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache: KVCache) -> np.ndarray:
        """Every layer on the residual stream x (n, dim), one op at a time; returns the new x."""
        c, ops = self.config, self.backend
        n = x.shape[0]
        for layer_index, layer in enumerate(self.layers):
            # attention block (the norms and SwiGLU are applied inside the matmul launches that consume them)
            q, k, v = ops.rms_norm_matmul_many((layer.wq, layer.wk, layer.wv), x,
                                               layer.attn_norm, c.norm_eps)      # Q, K, V of rms_norm(x)
            q = q.reshape(n, c.n_heads, c.head_dim)                              # (n, n_heads, head_dim)
            k = k.reshape(n, c.n_kv_heads, c.head_dim)                           # (n, n_kv_heads, head_dim)
            v = v.reshape(n, c.n_kv_heads, c.head_dim)                           # (n, n_kv_heads, head_dim)
            # RoPE on q and k, k and v into the cache, causal attention: one call
            attended = ops.attend(q, k, v, positions, slots, cache.k[layer_index], cache.v[layer_index],
                                  c.rope_theta, c.n_rot, c.rope_style)          # (n, n_heads, head_dim)
            x = ops.matmul_add(layer.wo, attended.reshape(n, c.q_dim), x)        # x + attended @ wo.T (n, dim)
            # feed-forward block
            gate, up = ops.rms_norm_matmul_many((layer.w_gate, layer.w_up), x,
                                                layer.ffn_norm, c.norm_eps)      # (n, hidden_dim) each
            x = ops.swiglu_matmul_add(layer.w_down, gate, up, x)                 # x + swiglu(gate, up) @ w_down.T
        return x

    def _forward_in_chunks(self, tokens, positions, slots, cache: KVCache, logits_for) -> np.ndarray:
        """``forward`` of a long batch as consecutive pieces of up to max_batch_tokens tokens (a token's
        earlier positions are then in the cache or earlier in its piece, as ``forward`` asks). The kernels
        give every token the same result in any batch, so the logits are those of one pass; the
        activations' memory is that of one piece."""
        n = tokens.shape[0]
        if positions.shape != (n,) or slots.shape != (n,):
            raise ValueError(f"forward: tokens, positions and slots must have one length, got {tokens.shape}, "
                             f"{positions.shape} and {slots.shape}")
        wanted = np.arange(n) if logits_for is None else np.asarray(logits_for, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < -n or wanted.max() >= n):
            raise IndexError(f"logits_for: indices must lie in [0, {n}), got {wanted.tolist()}")
        wanted = wanted % n if wanted.size else wanted
        logits = np.empty((wanted.shape[0], self.config.vocab_size), dtype=np.float32)
        for start in range(0, n, self.max_batch_tokens):
            stop = min(start + self.max_batch_tokens, n)
            here = np.nonzero((wanted >= start) & (wanted < stop))[0]              # rows of logits from this piece
            piece = self.forward(tokens[start:stop], positions[start:stop], slots[start:stop], cache,
                                 logits_for=wanted[here] - start)
            logits[here] = piece
        return logits

    def _one_launch_layers(self, n: int):
        """``ops.llama_step.LlamaLayersStep`` when it applies to a batch of n tokens (fast backend, AVX2
        kernels, layer weights of one quantized type, n <= its max_tokens), else None.
        ``LOCALLLM_ONE_LAUNCH=0`` turns it off (the per-op loop then runs every batch)."""
        if not self._step_checked:
            self._step_checked = True
            if self.backend.name == "fast" and os.environ.get("LOCALLLM_ONE_LAUNCH", "1") != "0":
                from ..ops import llama_step
                self._step = llama_step.LlamaLayersStep.for_model(self)
        if self._step is not None and 0 < n <= self._step.max_tokens:
            return self._step
        return None
