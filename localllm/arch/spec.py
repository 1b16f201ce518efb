"""What an architecture declares: its hyperparameters (ModelConfig) and the features of its block (BlockSpec).

An architecture module (``arch/llama.py``, ``arch/gemma3.py``, ...) reads its
GGUF metadata into a ModelConfig; one ``models.decoder.DecoderModel`` walks
that description in the reference path and the fast path alike. A feature a
file asks for that the engine does not implement is a load error
(UnsupportedModelFeature), never a silent skip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..ops.ref import RopeFrequencies

GATE_ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_STYLES = ("norm", "neox")


class UnsupportedArchitecture(ValueError):
    """The model file names an architecture localllm has no dataflow for."""

    def __init__(self, architecture: str, source: str = "", supported: tuple[str, ...] = ()):
        where = f" in {source}" if source else ""
        known = f" (supported: {', '.join(supported)})" if supported else ""
        super().__init__(f"unsupported model architecture '{architecture}'{where}{known}")
        self.architecture = architecture


class UnsupportedModelFeature(ValueError):
    """The model file uses something (a tensor, a RoPE scaling type, ...) the engine does not implement."""


@dataclass(frozen=True)
class BlockSpec:
    """The features of a decoder block beyond the Llama block (all off: Llama).

    Per layer, the block is::

        h = attn_norm(x); q, k, v = h @ wq, wk, wv [+ bias]
        q, k = q_norm(q), k_norm(k) per head             (qk_norm)
        a = attention(rope(q), rope(k), v) @ wo
        x = x + post_attn_norm(a)                        (post_attn_norm; else x + a)
        h = ffn_norm(x); f = (act(h @ w_gate) * (h @ w_up)) @ w_down
        x = x + post_ffn_norm(f)                         (post_ffn_norm; else x + f)
    """

    qk_norm: bool = False          # RMSNorm over each head of q and k, before RoPE (Gemma 3, Qwen 3)
    qkv_bias: bool = False         # bias vectors on q, k, v (Qwen 2)
    post_attn_norm: bool = False   # RMSNorm on the attention output before the residual add (Gemma 2/3)
    post_ffn_norm: bool = False    # RMSNorm on the feed-forward output before the residual add (Gemma 2/3)
    activation: str = "silu"       # gate activation of the feed-forward: "silu" (SwiGLU), "gelu_tanh" (GeGLU)

    def __post_init__(self):
        if self.activation not in GATE_ACTIVATIONS:
            raise UnsupportedModelFeature(f"feed-forward activation '{self.activation}' is not implemented "
                                          f"(known: {', '.join(GATE_ACTIVATIONS)})")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer and what its blocks do, read from file metadata."""

    architecture: str
    dim: int                  # residual stream width (embedding_length)
    hidden_dim: int           # feed-forward width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_ctx_train: int          # context length the model was trained for
    rope_theta: float = 10000.0
    rope_dim: int = 0         # rotated dimensions per head (0 -> head_dim)
    rope_style: str = "norm"  # "norm": adjacent pairs (GGUF llama); "neox": first/second half
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    block: BlockSpec = field(default_factory=BlockSpec)
    layer_windows: tuple[int, ...] = ()        # per layer: sliding window in positions, 0 = global; () = all global
    layer_rope_theta: tuple[float, ...] = ()   # per layer RoPE base; () = rope_theta on every layer
    embedding_scale: float = 1.0               # token embeddings are multiplied by this (Gemma: sqrt(dim))
    attention_scale: float = 0.0               # scores are q.k * this; 0 -> 1/sqrt(head_dim)
    final_logit_softcap: float = 0.0           # logits -> cap * tanh(logits / cap) when > 0
    attention_softcap: float = 0.0             # attention scores -> cap * tanh(scores / cap) when > 0 (Gemma 2)
    # RoPE stretched for long contexts: pair i turns rope_freq_factors[i] times slower (Llama 3.x ``rope_freqs``,
    # linear scaling, Phi-3 LongRoPE's short factors); LongRoPE's long factors take over when a cache holds more
    # than n_ctx_orig positions (as llama.cpp chooses); cos and sin are scaled by rope_attention_factor
    rope_freq_factors: tuple[float, ...] = ()
    rope_freq_factors_long: tuple[float, ...] = ()
    n_ctx_orig: int = 0
    rope_attention_factor: float = 1.0
    # linear RoPE scaling: positions / factor, on every layer or (rope_linear_on_windows False: Gemma 2/3, as
    # llama.cpp's rope_freq_scale_train_swa = 1 and transformers' per-layer-type rope_parameters) on the global ones
    rope_linear_factor: float = 1.0
    rope_linear_on_windows: bool = True

    def __post_init__(self):
        if self.rope_style not in ROPE_STYLES:
            raise UnsupportedModelFeature(f"RoPE style '{self.rope_style}' is not implemented")
        for name, values in (("layer_windows", self.layer_windows), ("layer_rope_theta", self.layer_rope_theta)):
            if values and len(values) != self.n_layers:
                raise ValueError(f"{name} must have one value per layer ({self.n_layers}), got {len(values)}")

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def window(self, layer: int) -> int:
        """Layer's sliding window (0: it attends to the whole sequence)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def theta(self, layer: int) -> float:
        """Layer's RoPE base."""
        return self.layer_rope_theta[layer] if self.layer_rope_theta else self.rope_theta

    def rope(self, layer: int, n_ctx: int = 0) -> RopeFrequencies:
        """Layer's RoPE frequencies for a cache of n_ctx positions."""
        factors = self.rope_freq_factors
        if self.rope_freq_factors_long and self.n_ctx_orig and n_ctx > self.n_ctx_orig:
            factors = self.rope_freq_factors_long
        if self.rope_linear_factor != 1.0 and (self.rope_linear_on_windows or self.window(layer) == 0):
            factors = tuple(f * self.rope_linear_factor for f in (factors or (1.0,) * (self.n_rot // 2)))
        return RopeFrequencies(self.theta(layer), factors, self.rope_attention_factor)

    @property
    def default_attention_scale(self) -> bool:
        return self.attention_scale == 0.0 or math.isclose(self.attention_scale, 1.0 / math.sqrt(self.head_dim),
                                                           rel_tol=1e-7)


class MetadataKeys:
    """``<arch>.*`` keys of a GGUF file, with errors that name the missing key."""

    def __init__(self, gguf):
        self.gguf = gguf
        self.arch = gguf.architecture

    def required(self, name: str):
        value = self.gguf.arch_key(name, None)
        if value is None:
            from ..formats.gguf import GGUFError
            raise GGUFError(f"{self.gguf.path.name}: missing GGUF metadata key '{self.arch}.{name}'")
        return value

    def get(self, name: str, default=None):
        value = self.gguf.arch_key(name, None)
        return default if value is None else value


def layer_windows(keys: MetadataKeys, n_layers: int, default_pattern: int = 0,
                  default_window: int = 0) -> tuple[int, ...]:
    """Per layer: the sliding window (``attention.sliding_window``), or 0 on the global layers; () when the
    file has no window.

    ``attention.sliding_window_pattern`` is one flag a layer (True: sliding) or, as llama.cpp reads it, a
    number n: layer i is global when (i + 1) % n == 0 (n = 0: every layer slides; Gemma 2: 2, Gemma 3: 6).
    """
    window = int(keys.get("attention.sliding_window", default_window) or 0)
    if window <= 0:
        return ()
    pattern = keys.get("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, (list, tuple)):  # one flag a layer (True: sliding)
        if len(pattern) != n_layers:
            raise UnsupportedModelFeature(f"attention.sliding_window_pattern has {len(pattern)} entries for "
                                          f"{n_layers} layers")
        return tuple(window if flag else 0 for flag in pattern)
    pattern = int(pattern)
    return tuple(0 if pattern and (i + 1) % pattern == 0 else window for i in range(n_layers))


def common_config(gguf, **overrides) -> ModelConfig:
    """The hyperparameters every llama-family GGUF states the same way (``<arch>.embedding_length``, ...),
    with ``overrides`` for what an architecture adds; refuses RoPE scaling it does not implement."""
    keys = MetadataKeys(gguf)
    dim = int(keys.required("embedding_length"))
    n_heads = int(keys.required("attention.head_count"))
    n_kv_heads = int(keys.get("attention.head_count_kv", n_heads))
    head_dim = int(keys.get("attention.key_length", dim // n_heads))
    value_dim = int(keys.get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModelFeature(f"{gguf.path.name}: value heads of {value_dim} with key heads of {head_dim} "
                                      "are not implemented")
    head_rope_dim = int(keys.get("rope.dimension_count", head_dim))
    scaling = str(keys.get("rope.scaling.type", "none"))
    factor = float(keys.get("rope.scaling.factor", 1.0) or 1.0)
    rope_values = {}
    if scaling == "linear" and factor != 1.0:      # positions / factor on the global layers
        rope_values["rope_linear_factor"] = factor
    elif scaling == "longrope":                    # the factors are tensors (rope_factors_short/long)
        pass
    elif scaling not in ("none", "") and factor != 1.0:
        raise UnsupportedModelFeature(f"{gguf.path.name}: RoPE scaling '{scaling}' (factor {factor}) is not "
                                      "implemented")
    rope_values["n_ctx_orig"] = int(keys.get("rope.scaling.original_context_length", 0) or 0)
    rope_values["rope_attention_factor"] = float(keys.get("rope.scaling.attn_factor", 1.0) or 1.0)
    vocab_size = int(keys.get("vocab_size", 0) or len(gguf.metadata.get("tokenizer.ggml.tokens", [])))
    if not vocab_size:
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    values = dict(
        architecture=gguf.architecture,
        dim=dim,
        hidden_dim=int(keys.required("feed_forward_length")),
        n_layers=int(keys.required("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        n_ctx_train=int(keys.required("context_length")),
        rope_theta=float(keys.get("rope.freq_base", 10000.0)),
        rope_dim=head_rope_dim,
        norm_eps=float(keys.required("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in gguf.tensors,
    )
    values["layer_windows"] = layer_windows(keys, values["n_layers"])  # (Mistral 7B v0.1, Phi-3-mini: every layer)
    values.update(rope_values)
    values.update(overrides)
    return ModelConfig(**values)


# ---------------------------------------------------------------------------------------------- Hugging Face
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def hf_rope_parameters(hf: dict) -> dict[str, dict | None]:
    """RoPE settings of a ``config.json`` by layer type: ``{"full_attention": {...}, "sliding_attention": ...}``
    (the sliding layers' own settings, or None where they share the full layers').

    transformers 5 writes ``rope_parameters`` (one dict, or one per layer type); older files have
    ``rope_theta``, ``rope_scaling`` (``type`` or ``rope_type``), ``partial_rotary_factor``, Gemma 3's
    ``rope_local_base_freq`` (unscaled RoPE of the sliding layers) and Phi-3's top-level
    ``original_max_position_embeddings``.
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    nested = "full_attention" in params or "sliding_attention" in params
    full = dict(params.get("full_attention") or {}) if nested else dict(params)
    sliding = dict(params["sliding_attention"]) if nested and params.get("sliding_attention") else None
    if sliding is None and hf.get("rope_local_base_freq") is not None:
        sliding = {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}
    for values in (full, sliding or {}):
        values.setdefault("rope_type", values.get("type") or "default")
        values.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("partial_rotary_factor") is not None:
            values.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
        if hf.get("original_max_position_embeddings") is not None:  # Phi-3 keeps it outside (and it wins)
            values["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return {"full_attention": full, "sliding_attention": sliding}


def llama3_rope_factors(rope: dict, rope_dim: int) -> tuple[float, ...]:
    """Llama 3.x ``rope_type: llama3`` as the divisors of each pair's frequency, computed as llama.cpp's
    converter computes its ``rope_freqs`` tensor: 1 for short wavelengths, ``factor`` for long ones, a smooth
    blend between (frequencies in float32, as the converter's torch code has them)."""
    factor = float(rope.get("factor", 8.0))
    low_freq_factor = float(rope.get("low_freq_factor", 1.0))
    high_freq_factor = float(rope.get("high_freq_factor", 4.0))
    old_context_len = float(rope.get("original_max_position_embeddings", 8192))
    base = np.float32(rope["rope_theta"])
    freqs = np.float32(1.0) / base ** (np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(float(np.float32(f)) for f in factors)  # the converter stores them as float32


def hf_rope_config(hf: dict, rope: dict, head_dim: int, where: str = "config.json") -> dict:
    """ModelConfig's RoPE fields (rope_theta, rope_dim, frequency factors, ...) for one ``hf_rope_parameters``
    entry; UnsupportedModelFeature for a scaling type the engine does not implement."""
    rope_dim = int(head_dim * float(rope.get("partial_rotary_factor") or 1.0))
    values: dict = {"rope_theta": float(rope["rope_theta"]), "rope_dim": rope_dim}
    kind = str(rope.get("rope_type") or "default")
    if kind == "default":
        pass
    elif kind == "linear":
        values["rope_linear_factor"] = float(rope["factor"])
    elif kind == "llama3":
        values["rope_freq_factors"] = llama3_rope_factors(rope, rope_dim)
    elif kind in ("longrope", "su"):
        n_ctx_orig = int(rope["original_max_position_embeddings"])
        short, long = tuple(map(float, rope["short_factor"])), tuple(map(float, rope["long_factor"]))
        for name, factors in (("short_factor", short), ("long_factor", long)):
            if len(factors) != rope_dim // 2:
                raise UnsupportedModelFeature(f"{where}: rope {name} has {len(factors)} values for "
                                              f"{rope_dim // 2} pairs of rotated dims")
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:   # transformers' default (llama.cpp's converter: the same from the ratio)
            scale = float(rope.get("factor") or hf["max_position_embeddings"] / n_ctx_orig)
            attention_factor = math.sqrt(1 + math.log(scale) / math.log(n_ctx_orig)) if scale > 1.0 else 1.0
        values.update(rope_freq_factors=short, rope_freq_factors_long=long, n_ctx_orig=n_ctx_orig,
                      rope_attention_factor=float(attention_factor))
    else:
        raise UnsupportedModelFeature(f"{where}: RoPE scaling '{kind}' is not implemented "
                                      "(implemented: default, linear, llama3, longrope)")
    return values


def hf_layer_windows(hf: dict, n_layers: int, default_layer_types: list[str] | None = None) -> tuple[int, ...]:
    """Per layer: the sliding window, 0 on global layers; () when no layer slides.

    ``use_sliding_window: false`` (Qwen) turns windows off; ``layer_types`` (or ``default_layer_types``, the
    pattern of the architecture's config class) says which layers slide; a window without layer types
    (Mistral, Phi-3) applies to every layer.
    """
    window = hf.get("sliding_window")
    if not window or hf.get("use_sliding_window") is False:
        return ()
    layer_types = hf.get("layer_types") or default_layer_types
    if layer_types is None and "max_window_layers" in hf:   # Qwen 2 configs before layer_types
        layer_types = ["sliding_attention" if i >= hf["max_window_layers"] else "full_attention"
                       for i in range(n_layers)]
    if layer_types is None:
        return (int(window),) * n_layers
    if len(layer_types) != n_layers:
        raise UnsupportedModelFeature(f"config.json: layer_types has {len(layer_types)} entries for {n_layers} "
                                      "layers")
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedModelFeature(f"config.json: layer types {sorted(unknown)} are not implemented")
    windows = tuple(int(window) if kind == "sliding_attention" else 0 for kind in layer_types)
    return windows if any(windows) else ()


def hf_common_config(hf: dict, architecture: str, *, tie_embeddings_default: bool, rope_style: str = "neox",
                     default_layer_types: list[str] | None = None, **overrides) -> ModelConfig:
    """A ModelConfig from the ``config.json`` keys every decoder states alike (``hidden_size``, ...), with
    ``overrides`` for what an architecture adds; refuses RoPE scaling and activations it does not implement.
    ``tie_embeddings_default`` is the architecture's default when the file leaves it out."""
    def required(key: str):
        if hf.get(key) is None:
            raise UnsupportedModelFeature(f"config.json: missing '{key}'")
        return hf[key]

    dim, n_heads = int(required("hidden_size")), int(required("num_attention_heads"))
    n_layers = int(required("num_hidden_layers"))
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if activation not in HF_ACTIVATIONS:
        raise UnsupportedModelFeature(f"config.json: activation '{activation}' is not implemented "
                                      f"(implemented: {', '.join(HF_ACTIVATIONS)})")
    rope = hf_rope_parameters(hf)
    values = dict(
        architecture=architecture,
        dim=dim,
        hidden_dim=int(required("intermediate_size")),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        vocab_size=int(required("vocab_size")),
        n_ctx_train=int(required("max_position_embeddings")),
        rope_style=rope_style,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", tie_embeddings_default)),
        layer_windows=hf_layer_windows(hf, n_layers, default_layer_types),
        **hf_rope_config(hf, rope["full_attention"], head_dim),
    )
    values.update(overrides)
    config = ModelConfig(**values)
    if config.block.activation != HF_ACTIVATIONS[activation]:
        raise UnsupportedModelFeature(f"config.json: activation '{activation}' in a '{architecture}' block, "
                                      f"which uses {config.block.activation}")
    return config
