"""The decoder forward pass, written once for every registered architecture.

``DecoderModel`` holds a model's weights (memory-mapped, in their file types)
and walks its ``ModelConfig`` / ``BlockSpec`` (see ``arch/spec.py``): Llama,
Gemma 3 and the rest differ only in which steps of the block they switch on.

The forward pass works on a flat batch of tokens, each with its position and
the KV-cache slot of the sequence it belongs to: prefill of one prompt,
decode of one sequence and decode of many sequences are the same call.

Vision-language models put images into that batch as rows whose input is an
embedding (an image's soft tokens, ``ImageRows``) instead of a token's; on
Gemma 3 the rows of one image also see each other (bidirectional attention
among them, as transformers and llama.cpp do), the rest of the prompt stays causal.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

import numpy as np

from ..arch import lookup
from ..arch.spec import ModelConfig, UnsupportedModelFeature
from ..formats.errors import ModelFormatError
from ..formats.gguf import GGUFError, GGUFFile, check_hyperparameters
from ..kv_cache import ContextLengthExceeded, KVCache
from ..ops import get_backend
from ..ops import ref as ops_ref
from ..ops.ref import soft_cap
from ..progress import slow_step
from ..quants import QTensor

MAX_BATCH_TOKENS = 128


@dataclass(frozen=True)
class ImageRows:
    """The rows of a batch whose input is an embedding rather than a token (an image's soft tokens).

    rows: (m,) indices into the batch; vectors: (m, dim) float32, the language model's input there
    (not scaled by ``embedding_scale``: transformers and llama.cpp scale token embeddings only).
    visible_until: None (causal), or (m,) the position each of those rows sees up to (the last
    position of its image: bidirectional attention among one image's rows).
    """

    rows: np.ndarray
    vectors: np.ndarray
    visible_until: np.ndarray | None = None

    def check(self, n: int, dim: int) -> None:
        if self.rows.ndim != 1 or self.vectors.shape != (self.rows.shape[0], dim):
            raise ValueError(f"image rows: {self.rows.shape[0]} rows need vectors of shape "
                             f"({self.rows.shape[0]}, {dim}), got {self.vectors.shape}")
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n):
            raise IndexError(f"image rows must lie in the batch's rows 0..{n - 1}")
        if self.visible_until is not None and self.visible_until.shape != self.rows.shape:
            raise ValueError("image rows: visible_until must have one entry per row")

    def piece(self, start: int, stop: int) -> "ImageRows | None":
        """The rows in batch rows [start, stop), renumbered from 0 (None when there are none)."""
        keep = (self.rows >= start) & (self.rows < stop)
        if not keep.any():
            return None
        until = None if self.visible_until is None else self.visible_until[keep]
        return ImageRows(self.rows[keep] - start, self.vectors[keep], until)


@dataclass
class DecoderLayer:
    attn_norm: np.ndarray            # (dim,)
    wq: QTensor                      # (q_dim, dim)
    wk: QTensor                      # (kv_dim, dim)
    wv: QTensor                      # (kv_dim, dim)
    wo: QTensor                      # (dim, q_dim)
    ffn_norm: np.ndarray             # (dim,)
    w_gate: QTensor                  # (hidden_dim, dim)
    w_up: QTensor                    # (hidden_dim, dim)
    w_down: QTensor                  # (dim, hidden_dim)
    q_norm: np.ndarray | None = None          # (head_dim,)   qk_norm
    k_norm: np.ndarray | None = None          # (head_dim,)   qk_norm
    q_bias: np.ndarray | None = None          # (q_dim,)      qkv_bias
    k_bias: np.ndarray | None = None          # (kv_dim,)     qkv_bias
    v_bias: np.ndarray | None = None          # (kv_dim,)     qkv_bias
    post_attn_norm: np.ndarray | None = None  # (dim,)        post_attn_norm
    post_ffn_norm: np.ndarray | None = None   # (dim,)        post_ffn_norm


class _Weights:
    """The file's tensors, handed out by name; remembers which were taken (the rest must not exist)."""

    def __init__(self, tensors: dict[str, QTensor]):
        self.tensors = tensors
        self.taken: set[str] = set()

    def matrix(self, name: str) -> QTensor:
        if name not in self.tensors:
            raise GGUFError(f"model file has no tensor '{name}'")
        self.taken.add(name)
        return self.tensors[name]

    def vector(self, name: str) -> np.ndarray:
        from ..quants.ref import dequantize
        return np.ascontiguousarray(dequantize(self.matrix(name)), dtype=np.float32).reshape(-1)

    def optional_matrix(self, name: str) -> QTensor | None:
        return self.matrix(name) if name in self.tensors else None

    def optional_factors(self, name: str) -> tuple[float, ...]:
        return tuple(float(f) for f in self.vector(name)) if name in self.tensors else ()

    def row_blocks(self, name: str, heights: tuple[int, ...]) -> list[QTensor]:
        """A matrix stored as several stacked on top of each other (Phi-3's ``attn_qkv``), as row views."""
        fused = self.matrix(name)
        if fused.shape[0] != sum(heights):
            raise GGUFError(f"tensor '{name}' has {fused.shape[0]} rows, expected {' + '.join(map(str, heights))}")
        views, start = [], 0
        for height in heights:
            views.append(QTensor(f"{name}[{start}:{start + height}]", fused.ggml_type, (height, fused.shape[1]),
                                 fused.data[start:start + height]))
            start += height
        return views

    def check_all_taken(self, architecture: str) -> None:
        unused = sorted(set(self.tensors) - self.taken)
        if unused:
            shown = ", ".join(unused[:6]) + (f" and {len(unused) - 6} more" if len(unused) > 6 else "")
            raise UnsupportedModelFeature(
                f"the model file has tensors the '{architecture}' dataflow does not use ({shown}); "
                "running without them would give wrong answers")


_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def expected_shapes(config: ModelConfig, layer_names: set[str]) -> tuple[dict[str, tuple[int, ...]],
                                                                           dict[str, tuple[int, ...]]]:
    """(model-wide, per-layer) tensor name -> the shape the config asks for (numpy order: rows first).

    Per-layer names are without their ``blk.N.`` prefix; ``layer_names`` (the suffixes present) says whether
    ``ffn_up`` is the up matrix beside a separate ``ffn_gate`` or the fused gate + up rows (Phi-3).
    """
    c = config
    dim, hidden_dim, q_dim, kv_dim = c.dim, c.hidden_dim, c.q_dim, c.kv_dim
    pairs = (c.n_rot // 2,)
    model = {"token_embd.weight": (c.vocab_size, dim), "output.weight": (c.vocab_size, dim),
             "output_norm.weight": (dim,), "rope_freqs.weight": pairs, "rope_factors_short.weight": pairs,
             "rope_factors_long.weight": pairs}
    fused_gate_up = "ffn_gate.weight" not in layer_names
    layer = {
        "attn_norm.weight": (dim,), "ffn_norm.weight": (dim,),
        "attn_q.weight": (q_dim, dim), "attn_k.weight": (kv_dim, dim), "attn_v.weight": (kv_dim, dim),
        "attn_qkv.weight": (q_dim + 2 * kv_dim, dim), "attn_output.weight": (dim, q_dim),
        "ffn_gate.weight": (hidden_dim, dim), "ffn_up.weight": ((2 if fused_gate_up else 1) * hidden_dim, dim),
        "ffn_down.weight": (dim, hidden_dim),
        "attn_q_norm.weight": (c.head_dim,), "attn_k_norm.weight": (c.head_dim,),
        "attn_q.bias": (q_dim,), "attn_k.bias": (kv_dim,), "attn_v.bias": (kv_dim,),
        "post_attention_norm.weight": (dim,), "post_ffw_norm.weight": (dim,),
    }
    return model, layer


def check_config(config: ModelConfig, source: str = "model") -> None:
    """The hyperparameters hold together (sizes positive, heads grouped evenly, RoPE within a head, finite
    numbers), or ModelFormatError saying which does not: the kernels index by these numbers."""
    c = config

    def refuse(problem: str) -> ModelFormatError:
        return ModelFormatError(f"{source}: {problem}")

    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "n_ctx_train"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 1:
            raise refuse(f"{name} is {value!r}, expected a positive integer")
    if c.n_heads % c.n_kv_heads:
        raise refuse(f"{c.n_heads} attention heads cannot share {c.n_kv_heads} key/value heads evenly")
    if c.n_rot % 2 or not 0 < c.n_rot <= c.head_dim:
        raise refuse(f"RoPE over {c.n_rot} dims of {c.head_dim}-wide heads (an even number up to the head width)")
    if any(not isinstance(w, int) or w < 0 for w in c.layer_windows):
        raise refuse(f"sliding windows {c.layer_windows} (each an integer >= 0)")
    numbers = {"rope_theta": c.rope_theta, "norm_eps": c.norm_eps, "embedding_scale": c.embedding_scale,
               "attention_scale": c.attention_scale, "attention_softcap": c.attention_softcap,
               "final_logit_softcap": c.final_logit_softcap, "rope_attention_factor": c.rope_attention_factor,
               "rope_linear_factor": c.rope_linear_factor}
    numbers.update({f"layer_rope_theta[{i}]": theta for i, theta in enumerate(c.layer_rope_theta)})
    for name, value in numbers.items():
        if not math.isfinite(value) or value < 0:
            raise refuse(f"{name} is {value}, expected a finite number >= 0")
    if c.rope_theta <= 0 or any(theta <= 0 for theta in c.layer_rope_theta):
        raise refuse("a RoPE base of 0")
    for name in ("rope_freq_factors", "rope_freq_factors_long"):
        factors = getattr(c, name)
        if factors and len(factors) != c.n_rot // 2:
            raise refuse(f"{name} has {len(factors)} values for {c.n_rot // 2} pairs of rotated dims")
        if any(not math.isfinite(f) or f <= 0 for f in factors):
            raise refuse(f"{name} holds values that are not finite numbers > 0")


def check_tensor_shapes(config: ModelConfig, tensors: dict[str, QTensor], source: str = "model") -> None:
    """Every tensor the dataflow reads has the shape the config asks for (``expected_shapes``), checked before
    any kernel runs: a wrong width or height is a ModelFormatError naming the tensor, not a read past its
    end. Names the dataflow does not read are left for ``_Weights.check_all_taken``; missing ones for
    ``_Weights.matrix``."""
    layer_names = {match.group(2) for match in map(_LAYER_TENSOR.fullmatch, tensors) if match}
    model_shapes, layer_shapes = expected_shapes(config, layer_names)
    for name, tensor in tensors.items():
        match = _LAYER_TENSOR.fullmatch(name)
        if match and int(match.group(1)) < config.n_layers:
            expected = layer_shapes.get(match.group(2))
        else:
            expected = model_shapes.get(name)
        if expected is not None and tuple(tensor.shape) != expected:
            why = (f"RoPE frequency factors, one for each of {config.n_rot // 2} pairs of rotated dims"
                   if name.startswith("rope_") else
                   f"dim {config.dim}, hidden_dim {config.hidden_dim}, {config.n_heads} heads / "
                   f"{config.n_kv_heads} kv heads of {config.head_dim}, vocab_size {config.vocab_size}")
            raise ModelFormatError(f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, the model's "
                                   f"config asks for {expected} ({why})")


class DecoderModel:
    """Weights (memory-mapped QTensors) + the forward pass. Stateless apart from the cache it is given."""

    def __init__(self, config: ModelConfig, tensors: dict[str, QTensor], backend: str = "auto",
                 source: str = "model"):
        """``source`` names the file or folder in errors. Checks the config and every tensor's shape first."""
        check_config(config, source)
        check_tensor_shapes(config, tensors, source)
        self.backend = get_backend(backend)
        block = config.block
        weights = _Weights(tensors)
        # RoPE frequency factors any llama.cpp architecture may carry (Llama 3.x, Phi-3 LongRoPE)
        rope_freqs = weights.optional_factors("rope_freqs.weight")
        short, long = (weights.optional_factors(f"rope_factors_{kind}.weight") for kind in ("short", "long"))
        if rope_freqs or short or long:
            config = replace(config, rope_freq_factors=rope_freqs or short, rope_freq_factors_long=long)
            config.rope(0).inverse_frequencies(config.n_rot)  # checks the factors' length
        self.config = config
        self.token_embd = weights.matrix("token_embd.weight")                 # (vocab_size, dim)
        self.output_norm = weights.vector("output_norm.weight")               # (dim,)
        self.output = weights.optional_matrix("output.weight") or self.token_embd  # (vocab_size, dim)

        def layer(i: int) -> DecoderLayer:
            name = f"blk.{i}."
            optional = {}
            if block.qk_norm:
                optional.update(q_norm=weights.vector(name + "attn_q_norm.weight"),
                                k_norm=weights.vector(name + "attn_k_norm.weight"))
            if block.qkv_bias:
                optional.update(q_bias=weights.vector(name + "attn_q.bias"), k_bias=weights.vector(name + "attn_k.bias"),
                                v_bias=weights.vector(name + "attn_v.bias"))
            if block.post_attn_norm:
                optional["post_attn_norm"] = weights.vector(name + "post_attention_norm.weight")
            if block.post_ffn_norm:
                optional["post_ffn_norm"] = weights.vector(name + "post_ffw_norm.weight")
            if name + "attn_qkv.weight" in weights.tensors:      # fused (Phi-3): row views of one matrix
                wq, wk, wv = weights.row_blocks(name + "attn_qkv.weight", (config.q_dim, config.kv_dim, config.kv_dim))
            else:
                wq, wk, wv = (weights.matrix(name + f"attn_{x}.weight") for x in "qkv")
            if name + "ffn_gate.weight" in weights.tensors:
                w_gate, w_up = weights.matrix(name + "ffn_gate.weight"), weights.matrix(name + "ffn_up.weight")
            else:                                                  # fused (Phi-3): gate rows, then up rows
                w_gate, w_up = weights.row_blocks(name + "ffn_up.weight", (config.hidden_dim, config.hidden_dim))
            return DecoderLayer(
                attn_norm=weights.vector(name + "attn_norm.weight"),
                wq=wq, wk=wk, wv=wv,
                wo=weights.matrix(name + "attn_output.weight"),
                ffn_norm=weights.vector(name + "ffn_norm.weight"),
                w_gate=w_gate, w_up=w_up,
                w_down=weights.matrix(name + "ffn_down.weight"),
                **optional,
            )

        self.layers = [layer(i) for i in range(config.n_layers)]
        weights.check_all_taken(config.architecture)
        # Scores are q.k / sqrt(head_dim) in the attention kernels; another scale is applied to q beforehand.
        self.query_scale = None if config.default_attention_scale else \
            np.float32(config.attention_scale * np.sqrt(config.head_dim))
        # tokens per pass through the layers: longer batches (prefill) go in pieces of this many, which
        # bounds the activations' memory (about 45 KB a token for SmolLM2) at no cost in speed
        self.max_batch_tokens = MAX_BATCH_TOKENS
        self.max_image_tokens = 0   # the soft tokens of one image, when a vision encoder feeds this model
        self._step = None  # the one-launch forward pass for small batches (ops.decoder_step), made on first use
        self._step_checked = False
        self._paths_run: set[str] = set()  # "one-launch" / "per-op layers": run once (their kernels compiled)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, backend: str = "auto") -> "DecoderModel":
        """The model of a GGUF file whose architecture is registered (``localllm.arch``)."""
        module = lookup(gguf.architecture, gguf.path.name)
        check_hyperparameters(gguf)
        config = module.config_from_gguf(gguf)
        tokens = gguf.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and len(tokens) != config.vocab_size:
            raise GGUFError(f"{gguf.path.name} is corrupt: {len(tokens)} tokens in tokenizer.ggml.tokens for a "
                            f"vocabulary of {config.vocab_size}", gguf.path)
        return cls(config, gguf.tensors, backend, source=gguf.path.name)

    def new_cache(self, n_slots: int, n_ctx: int, dtype=None) -> KVCache:
        """An empty KV cache for ``n_slots`` sequences of up to ``n_ctx`` tokens (rings on sliding-window layers).

        dtype: np.float16 or np.float32 for K/V; None picks float16 with the fast
        backend (like llama.cpp) and float32 with the numpy reference (the float oracle).
        """
        c = self.config
        if dtype is None:
            dtype = np.float32 if self.backend.name == "ref" else np.float16
        # a batch piece may run past max_batch_tokens to the end of an image (see _piece_end): the rings hold that
        return KVCache(c.n_layers, n_slots, n_ctx, c.n_kv_heads, c.head_dim, dtype, c.layer_windows,
                       self.max_batch_tokens + self.max_image_tokens)

    def forward(self, tokens, positions, slots, cache: KVCache, logits_for=None,
                images: ImageRows | None = None) -> np.ndarray:
        """Run a flat batch of tokens through the model, writing their K/V into ``cache``.

        tokens, positions, slots: (n,) ints. Every token's earlier positions in
        its slot must already be in the cache (or in this batch, before it).
        logits_for: indices into the batch whose logits to return (None: all).
        images: rows whose input is an embedding (their ``tokens`` entries are ignored);
        with ``visible_until`` all the positions each one sees must be in the cache or this batch.
        Returns logits (len(logits_for), vocab_size) float32.
        """
        c, ops = self.config, self.backend
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        n = tokens.shape[0]
        if images is not None:
            images.check(n, c.dim)
            tokens = tokens.copy()
            tokens[images.rows] = 0                      # any valid id: the embedding lookup is replaced
        if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= c.vocab_size:
            raise ValueError(f"token ids must be in [0, {c.vocab_size})")
        if positions.shape == (n,) and positions.max(initial=-1) >= cache.n_ctx:
            raise ContextLengthExceeded(int(positions.max()) + 1, cache.n_ctx, "sequence")
        if n > self.max_batch_tokens:
            return self._forward_in_chunks(tokens, positions, slots, cache, logits_for, images)

        step = None if images is not None else self._one_launch_layers(n)
        path = "one-launch" if step is not None else "per-op layers"
        if path in self._paths_run or self.backend.name != "fast":
            return self._forward(tokens, positions, slots, cache, logits_for, step, images)
        # numba compiles a path's kernels on its first call (a fresh install: tens of seconds) and loads them
        # from its cache after: a slow first call says what it is doing
        with slow_step(f"preparing the {path} kernels for {self._weight_types()} weights (compiled on the first "
                       "run, loaded from the kernel cache after)"):
            logits = self._forward(tokens, positions, slots, cache, logits_for, step, images)
        self._paths_run.add(path)
        return logits

    def _weight_types(self) -> str:
        return "/".join(sorted({w.ggml_type for layer in self.layers
                                for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up,
                                          layer.w_down)}))

    def _forward(self, tokens, positions, slots, cache: KVCache, logits_for, step,
                 images: ImageRows | None = None) -> np.ndarray:
        """``forward`` of a batch of at most max_batch_tokens tokens (``step``: the one-launch layers or None)."""
        c, ops = self.config, self.backend
        if step is not None:
            step.prepare(cache)                       # its kernels first: a fresh install compiles them in parallel
        x = ops.embedding_rows(self.token_embd, tokens)                         # (n, dim)
        if c.embedding_scale != 1.0:
            x *= np.float32(c.embedding_scale)
        if images is not None:
            x[images.rows] = images.vectors                                      # an image's soft tokens
        if step is not None:  # decode: the layer loop (and the head) as one parallel launch (same ops, same bits)
            rows = np.arange(x.shape[0])
            if logits_for is not None:
                rows = rows[np.asarray(logits_for, dtype=np.int64)]              # numpy's checks and negative indices
            logits = step.run(x, positions, slots, cache, rows)                  # x updated in place
            x = x[rows]
        else:
            x = self._layers(x, positions, slots, cache, images)                 # (n, dim)
            logits = None
            if logits_for is not None:
                x = x[np.asarray(logits_for, dtype=np.int64)]
        if logits is None:
            x = ops.rms_norm(x, self.output_norm, c.norm_eps)                    # (m, dim)
            logits = ops.matmul(self.output, x)                                  # (m, vocab_size)
        if c.final_logit_softcap > 0:
            logits = soft_cap(logits, c.final_logit_softcap)
        return logits

    def _layers(self, x: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache: KVCache,
                images: ImageRows | None = None) -> np.ndarray:
        """Every layer on the residual stream x (n, dim), one op at a time; returns the new x."""
        c, ops, block = self.config, self.backend, self.config.block
        n = x.shape[0]
        seeing = images if images is not None and images.visible_until is not None else None
        for i, layer in enumerate(self.layers):
            # attention block (the norm and the gating are applied inside the matmul launches that consume them)
            q, k, v = ops.rms_norm_matmul_many((layer.wq, layer.wk, layer.wv), x,
                                               layer.attn_norm, c.norm_eps)      # Q, K, V of rms_norm(x)
            if block.qkv_bias:
                q, k, v = q + layer.q_bias, k + layer.k_bias, v + layer.v_bias
            if block.qk_norm:                                                    # RMSNorm over each head
                q = ops.rms_norm(q.reshape(n * c.n_heads, c.head_dim), layer.q_norm, c.norm_eps)
                k = ops.rms_norm(k.reshape(n * c.n_kv_heads, c.head_dim), layer.k_norm, c.norm_eps)
            q = q.reshape(n, c.n_heads, c.head_dim)                              # (n, n_heads, head_dim)
            k = k.reshape(n, c.n_kv_heads, c.head_dim)                           # (n, n_kv_heads, head_dim)
            v = v.reshape(n, c.n_kv_heads, c.head_dim)                           # (n, n_kv_heads, head_dim)
            if self.query_scale is not None:
                q = q * self.query_scale
            # RoPE on q and k, k and v into the cache, causal (sliding-window) attention: one call
            attended = ops.attend(q, k, v, positions, slots, cache.k[i], cache.v[i], c.rope(i, cache.n_ctx), c.n_rot,
                                  c.rope_style, c.window(i), c.attention_softcap).reshape(n, c.q_dim)  # (n, q_dim)
            if seeing is not None:   # an image's rows again, now seeing its later rows too (their K/V are written)
                attended[seeing.rows] = self._image_attention(i, q, seeing, positions, slots, cache)
            if block.post_attn_norm:
                x = x + ops.rms_norm(ops.matmul(layer.wo, attended), layer.post_attn_norm, c.norm_eps)
            else:
                x = ops.matmul_add(layer.wo, attended, x)                        # x + attended @ wo.T (n, dim)
            # feed-forward block
            gate, up = ops.rms_norm_matmul_many((layer.w_gate, layer.w_up), x,
                                                layer.ffn_norm, c.norm_eps)      # (n, hidden_dim) each
            if block.post_ffn_norm:
                down = ops.gated_matmul(layer.w_down, gate, up, block.activation)  # act(gate) * up @ w_down.T
                x = x + ops.rms_norm(down, layer.post_ffn_norm, c.norm_eps)
            else:
                x = ops.gated_matmul(layer.w_down, gate, up, block.activation, x)  # x + act(gate) * up @ w_down.T
        return x

    def _image_attention(self, layer: int, q: np.ndarray, seeing: ImageRows, positions: np.ndarray,
                         slots: np.ndarray, cache: KVCache) -> np.ndarray:
        """The attention of image rows that see up to ``visible_until`` (numpy: a few hundred rows an image).
        q (n, n_heads, head_dim) before RoPE -> (m, q_dim)."""
        c = self.config
        rows = seeing.rows
        q_rows = ops_ref.rope(q[rows], positions[rows], c.rope(layer, cache.n_ctx), c.n_rot, c.rope_style)
        out = ops_ref.attention(q_rows, cache.k[layer], cache.v[layer], slots[rows], positions[rows], c.window(layer),
                                c.attention_softcap, visible_until=seeing.visible_until)
        return out.reshape(rows.shape[0], c.q_dim)

    def _forward_in_chunks(self, tokens, positions, slots, cache: KVCache, logits_for,
                           images: ImageRows | None = None) -> np.ndarray:
        """``forward`` of a long batch as consecutive pieces of up to max_batch_tokens tokens (a token's
        earlier positions are then in the cache or earlier in its piece, as ``forward`` asks). The kernels
        give every token the same result in any batch, so the logits are those of one pass; the
        activations' memory is that of one piece. An image whose rows see each other stays in one
        piece (a longer one)."""
        n = tokens.shape[0]
        if positions.shape != (n,) or slots.shape != (n,):
            raise ValueError(f"forward: tokens, positions and slots must have one length, got {tokens.shape}, "
                             f"{positions.shape} and {slots.shape}")
        wanted = np.arange(n) if logits_for is None else np.asarray(logits_for, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < -n or wanted.max() >= n):
            raise IndexError(f"logits_for: indices must lie in [0, {n}), got {wanted.tolist()}")
        wanted = wanted % n if wanted.size else wanted
        logits = np.empty((wanted.shape[0], self.config.vocab_size), dtype=np.float32)
        start = 0
        while start < n:
            stop = _piece_end(start, min(start + self.max_batch_tokens, n), images, n)
            here = np.nonzero((wanted >= start) & (wanted < stop))[0]              # rows of logits from this piece
            piece = self._forward_piece(tokens[start:stop], positions[start:stop], slots[start:stop], cache,
                                        wanted[here] - start, None if images is None else images.piece(start, stop))
            logits[here] = piece
            start = stop
        return logits

    def _forward_piece(self, tokens, positions, slots, cache, logits_for, images) -> np.ndarray:
        if tokens.shape[0] <= self.max_batch_tokens:
            return self.forward(tokens, positions, slots, cache, logits_for=logits_for, images=images)
        return self._forward(tokens, positions, slots, cache, logits_for, None, images)   # one whole image

    def _one_launch_layers(self, n: int):
        """``ops.decoder_step.DecoderLayersStep`` when it applies to a batch of n tokens (fast backend, AVX2
        kernels, weight types with row tasks, n <= its max_tokens), else None.
        ``LOCALLLM_ONE_LAUNCH=0`` turns it off (the per-op loop then runs every batch)."""
        if not self._step_checked:
            self._step_checked = True
            if self.backend.name == "fast" and os.environ.get("LOCALLLM_ONE_LAUNCH", "1") != "0":
                from ..ops import decoder_step
                self._step = decoder_step.DecoderLayersStep.for_model(self)
        if self._step is not None and 0 < n <= self._step.max_tokens:
            return self._step
        return None


def _piece_end(start: int, stop: int, images: ImageRows | None, n: int) -> int:
    """Where a piece of a long batch that starts at ``start`` ends: ``stop``, or later so that the rows of an
    image that see each other (same ``visible_until``) are not cut apart."""
    if images is None or images.visible_until is None or stop >= n:
        return stop
    until = dict(zip(images.rows.tolist(), images.visible_until.tolist()))
    while stop < n and stop - 1 in until and until.get(stop) == until[stop - 1]:
        stop += 1
    return stop
