"""Numpy reference for the transformer ops: readable, float32, the oracle of ops/kernels.py.

Shapes: ``n`` tokens in a flat batch; every token carries its sequence's
KV-cache slot and its position. One layer's cache is
``(n_slots, n_kv_heads, n_ctx, head_dim)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..kv_cache import ContextLengthExceeded


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (n, dim) -> x / rms(x) * weight."""
    x = x.astype(np.float32, copy=False)
    mean_square = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)  # (n, 1)
    return (x / np.sqrt(mean_square + np.float32(eps)) * weight).astype(np.float32)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """x (n, dim) -> (x - mean) / std * weight + bias."""
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(eps)) * weight
    return (out + bias if bias is not None else out).astype(np.float32)


@dataclass(frozen=True)
class RopeFrequencies:
    """How fast RoPE turns each pair of dims: pair i at position p turns by p * theta^(-2i/rope_dim) / factors[i].

    ``factors`` (rope_dim/2 divisors, () for none) is how Llama 3.x (its ``rope_freqs``) and Phi-3's
    LongRoPE (``rope_factors_short/long``) stretch the slow frequencies; linear scaling is every factor
    equal. ``attention_factor`` multiplies cos and sin (LongRoPE's correction of the attention's sharpness).
    Wherever a RoPE base is taken (``theta``), one of these may stand instead.
    """

    theta: float
    factors: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def inverse_frequencies(self, rope_dim: int) -> np.ndarray:
        """(rope_dim/2,) float64 radians a position (read-only; worked out once per scheme and width)."""
        return _inverse_frequencies(self, rope_dim)

    def _compute(self, rope_dim: int) -> np.ndarray:
        inv_freq = 1.0 / (self.theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim))
        if self.factors:
            if len(self.factors) != rope_dim // 2:
                raise ValueError(f"RoPE: {len(self.factors)} frequency factors for {rope_dim // 2} pairs of dims")
            inv_freq = inv_freq / np.asarray(self.factors, dtype=np.float64)
        inv_freq.flags.writeable = False
        return inv_freq


@lru_cache(maxsize=64)
def _inverse_frequencies(frequencies: RopeFrequencies, rope_dim: int) -> np.ndarray:
    return frequencies._compute(rope_dim)


def rope_frequencies(theta: "float | RopeFrequencies") -> RopeFrequencies:
    """A RoPE base as RopeFrequencies (RopeFrequencies as they are)."""
    return theta if isinstance(theta, RopeFrequencies) else RopeFrequencies(float(theta))


def rope_angles(positions: np.ndarray, theta: "float | RopeFrequencies", rope_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of pos * theta^(-2i/rope_dim) [/ factors[i]] [* attention_factor], each (n, rope_dim // 2)."""
    frequencies = rope_frequencies(theta)
    inv_freq = frequencies.inverse_frequencies(rope_dim)                                   # (rope_dim/2,)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]                   # (n, rope_dim/2)
    cos, sin = np.cos(angles), np.sin(angles)
    if frequencies.attention_factor != 1.0:
        cos, sin = cos * frequencies.attention_factor, sin * frequencies.attention_factor
    return cos.astype(np.float32), sin.astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, theta: "float | RopeFrequencies", rope_dim: int,
         style: str = "norm") -> np.ndarray:
    """Rotary position embedding on the first ``rope_dim`` dims of each head.

    x (n, n_heads, head_dim). ``norm`` rotates adjacent pairs (x[2i], x[2i+1])
    (GGUF llama: the converter permutes Q/K for it); ``neox`` rotates
    (x[i], x[i + rope_dim/2]). theta: the RoPE base, or RopeFrequencies.
    """
    cos, sin = rope_angles(positions, theta, rope_dim)
    cos, sin = cos[:, None, :], sin[:, None, :]             # (n, 1, rope_dim/2)
    out = x.astype(np.float32, copy=True)
    if style == "norm":
        first, second = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
        out[..., 0:rope_dim:2] = first * cos - second * sin
        out[..., 1:rope_dim:2] = first * sin + second * cos
    elif style == "neox":
        half = rope_dim // 2
        first, second = x[..., :half], x[..., half:rope_dim]
        out[..., :half] = first * cos - second * sin
        out[..., half:rope_dim] = first * sin + second * cos
    else:
        raise ValueError(f"unknown rope style '{style}'")
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def key_range(position: int, window: int) -> tuple[int, int]:
    """The positions [first, position] a token at ``position`` attends to: all earlier ones, or the last
    ``window`` (itself included) on a sliding-window layer (window > 0)."""
    first = max(0, position - window + 1) if window > 0 else 0
    return first, position


def soft_cap(scores: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(scores / cap): scores squashed into (-cap, cap) (Gemma 2's attention and logits)."""
    cap = np.float32(cap)
    return (np.tanh(scores / cap) * cap).astype(np.float32)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
              slots: np.ndarray, positions: np.ndarray, window: int = 0, softcap: float = 0.0,
              visible_until: np.ndarray | None = None) -> np.ndarray:
    """Causal grouped-query attention over the KV cache.

    q (n, n_heads, head_dim); k_cache, v_cache (n_slots, n_kv_heads, ring, head_dim).
    Position p of a sequence lives at cache row p % ring: a full cache (ring = n_ctx)
    holds every position, a sliding-window layer's ring only the latest ones.
    Token i attends to positions ``key_range(positions[i], window)`` of slot
    slots[i] (its own K/V must already be written). Returns (n, n_heads, head_dim).
    ``visible_until`` (n,): token i sees up to that position instead of its own (the later
    positions of one image for Gemma 3's bidirectional image attention; their K/V written too).
    """
    n, n_heads, head_dim = q.shape
    n_kv_heads, ring = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / np.sqrt(head_dim))
    out = np.empty_like(q, dtype=np.float32)
    for i in range(n):
        first, last = key_range(int(positions[i]), window)
        if visible_until is not None:
            last = max(last, int(visible_until[i]))
        rows = np.arange(first, last + 1) % ring                          # (L,) cache rows of those positions
        keys = k_cache[slots[i]][:, rows].astype(np.float32)              # (n_kv_heads, L, head_dim)
        values = v_cache[slots[i]][:, rows].astype(np.float32)            # (n_kv_heads, L, head_dim)
        qs = q[i].reshape(n_kv_heads, group, head_dim)                    # (n_kv_heads, group, head_dim)
        scores = np.einsum("kgd,kld->kgl", qs, keys) * scale              # (n_kv_heads, group, L)
        if softcap > 0:
            scores = soft_cap(scores, softcap)
        mixed = np.einsum("kgl,kld->kgd", softmax(scores, axis=-1), values)
        out[i] = mixed.reshape(n_heads, head_dim)
    return out


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, slots: np.ndarray,
           k_cache: np.ndarray, v_cache: np.ndarray, theta: "float | RopeFrequencies", rope_dim: int,
           style: str = "norm", window: int = 0, softcap: float = 0.0) -> np.ndarray:
    """RoPE on q and k, k and v written into one layer's cache, then causal GQA attention.

    q (n, n_heads, head_dim), k and v (n, n_kv_heads, head_dim) before RoPE;
    k_cache, v_cache (n_slots, n_kv_heads, ring, head_dim) float16 or float32,
    written at (slots[i], :, positions[i] % ring) (rounded to the cache's dtype).
    Token i attends to positions ``key_range(positions[i], window)`` of its
    slot, this batch's earlier tokens included. A sliding-window layer
    (window > 0) may keep a ring shorter than the context; the ring must then
    hold ``window`` positions more than the batch has tokens of one slot.
    Returns (n, n_heads, head_dim) float32.
    """
    positions, slots = np.asarray(positions, dtype=np.int64), np.asarray(slots, dtype=np.int64)
    check_attend_arguments(q, k, v, positions, slots, k_cache, v_cache, rope_dim, style)
    check_cache_indices("attend", slots, positions, k_cache.shape[0], k_cache.shape[2], window)
    q = rope(q, positions, theta, rope_dim, style)                        # (n, n_heads, head_dim)
    k = rope(k, positions, theta, rope_dim, style)                        # (n, n_kv_heads, head_dim)
    ring = k_cache.shape[2]
    k_cache[slots, :, positions % ring] = k
    v_cache[slots, :, positions % ring] = v
    return attention(q, k_cache, v_cache, slots, positions, window, softcap)


def check_attention_shapes(what: str, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                           slots: np.ndarray, positions: np.ndarray) -> None:
    """ValueError naming the tensor unless q (n, n_heads, head_dim) fits the caches and slots, positions are (n,)."""
    if q.ndim != 3:
        raise ValueError(f"{what}: q must be (n, n_heads, head_dim), got shape {q.shape}")
    n, n_heads, head_dim = q.shape
    if (k_cache.ndim != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != head_dim
            or n_heads % k_cache.shape[1]):
        raise ValueError(f"{what}: q {q.shape} does not fit caches k_cache {k_cache.shape} / v_cache {v_cache.shape}"
                         " (n_slots, n_kv_heads, n_ctx, head_dim) with n_heads a multiple of n_kv_heads")
    if k_cache.dtype not in (np.float16, np.float32) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{what}: k_cache and v_cache must both be float16 or float32, "
                         f"got {k_cache.dtype} and {v_cache.dtype}")
    if slots.shape != (n,) or positions.shape != (n,):
        raise ValueError(f"{what}: slots and positions must be ({n},), got {slots.shape}, {positions.shape}")


def check_attend_arguments(q, k, v, positions, slots, k_cache, v_cache, rope_dim: int, style: str) -> None:
    """The shape checks of ``attend``: ValueError naming the parameter."""
    check_attention_shapes("attend", q, k_cache, v_cache, slots, positions)
    n, _, head_dim = q.shape
    kv_shape = (n, k_cache.shape[1], head_dim)
    if k.shape != kv_shape or v.shape != kv_shape:
        raise ValueError(f"attend: k {k.shape} and v {v.shape} must be (n, n_kv_heads, head_dim) = {kv_shape}")
    if style not in ("norm", "neox"):
        raise ValueError(f"unknown rope style '{style}'")
    if rope_dim % 2 or not 0 < rope_dim <= head_dim:
        raise ValueError(f"attend: rope_dim must be even and in 1..{head_dim}, got {rope_dim}")


def check_cache_indices(what: str, slots: np.ndarray, positions: np.ndarray, n_slots: int, n_ctx: int,
                        window: int = 0) -> None:
    """IndexError for a slot outside the cache or a negative position; ContextLengthExceeded past n_ctx
    (the ring of a sliding-window layer, window > 0, holds any position: its model checks the context)."""
    if slots.size and (slots.min() < 0 or slots.max() >= n_slots):
        raise IndexError(f"{what}: slots must lie in the cache's slots 0..{n_slots - 1}, got {slots.tolist()}")
    if positions.size and positions.min() < 0:
        raise IndexError(f"{what}: positions must not be negative, got {positions.min()}")
    if window <= 0 and positions.size and positions.max() >= n_ctx:
        raise ContextLengthExceeded(int(positions.max()) + 1, n_ctx, "sequence")


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, both (n, hidden_dim)."""
    return (silu(gate.astype(np.float32)) * up).astype(np.float32)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    x = x.astype(np.float32)
    return (0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x ** 3))))


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu_tanh(gate) * up, both (n, hidden_dim) (Gemma's gated feed-forward)."""
    return (gelu_tanh(gate) * up).astype(np.float32)


GATED_ACTIVATIONS = {"silu": swiglu, "gelu_tanh": geglu}


def gated(activation: str, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """activation(gate) * up for a gated feed-forward; activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"unknown feed-forward activation '{activation}' (known: {sorted(GATED_ACTIVATIONS)})")
    return GATED_ACTIVATIONS[activation](gate, up)
