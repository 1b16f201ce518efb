"""Numpy reference for the transformer ops: readable, float32, the oracle of ops/kernels.py.

Shapes: ``n`` tokens in a flat batch; every token carries its sequence's
KV-cache slot and its position. One layer's cache is
``(n_slots, n_kv_heads, n_ctx, head_dim)``.
"""
from __future__ import annotations

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


def rope_angles(positions: np.ndarray, theta: float, rope_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of pos * theta^(-2i/rope_dim), each (n, rope_dim // 2)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim))  # (rope_dim/2,)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]                   # (n, rope_dim/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, theta: float, rope_dim: int, style: str = "norm") -> np.ndarray:
    """Rotary position embedding on the first ``rope_dim`` dims of each head.

    x (n, n_heads, head_dim). ``norm`` rotates adjacent pairs (x[2i], x[2i+1])
    (GGUF llama: the converter permutes Q/K for it); ``neox`` rotates
    (x[i], x[i + rope_dim/2]).
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


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
              slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Causal grouped-query attention over the KV cache.

    q (n, n_heads, head_dim); k_cache, v_cache (n_slots, n_kv_heads, n_ctx, head_dim).
    Token i attends to cache[slots[i], :, :positions[i] + 1] (its own K/V must
    already be written). Returns (n, n_heads, head_dim).
    """
    n, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / np.sqrt(head_dim))
    out = np.empty_like(q, dtype=np.float32)
    for slot in np.unique(slots):
        rows = np.nonzero(slots == slot)[0]                               # tokens of this sequence
        pos = positions[rows]                                             # (m,)
        length = int(pos.max()) + 1
        keys = k_cache[slot, :, :length]                                  # (n_kv_heads, L, head_dim)
        values = v_cache[slot, :, :length]                                # (n_kv_heads, L, head_dim)
        qs = q[rows].reshape(len(rows), n_kv_heads, group, head_dim)      # (m, n_kv_heads, group, head_dim)
        scores = np.einsum("mkgd,kld->kgml", qs, keys) * scale            # (n_kv_heads, group, m, L)
        future = np.arange(length)[None, :] > pos[:, None]                # (m, L)
        scores = np.where(future, -np.inf, scores)
        weights = softmax(scores, axis=-1)
        mixed = np.einsum("kgml,kld->mkgd", weights, values)              # (m, n_kv_heads, group, head_dim)
        out[rows] = mixed.reshape(len(rows), n_heads, head_dim)
    return out


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, slots: np.ndarray,
           k_cache: np.ndarray, v_cache: np.ndarray, theta: float, rope_dim: int, style: str = "norm") -> np.ndarray:
    """RoPE on q and k, k and v written into one layer's cache, then causal GQA attention.

    q (n, n_heads, head_dim), k and v (n, n_kv_heads, head_dim) before RoPE;
    k_cache, v_cache (n_slots, n_kv_heads, n_ctx, head_dim) float16 or float32,
    written at (slots[i], :, positions[i]) (rounded to the cache's dtype). Token
    i attends to positions 0..positions[i] of its slot, this batch's earlier
    tokens included. Returns (n, n_heads, head_dim) float32.
    """
    positions, slots = np.asarray(positions, dtype=np.int64), np.asarray(slots, dtype=np.int64)
    check_attend_arguments(q, k, v, positions, slots, k_cache, v_cache, rope_dim, style)
    check_cache_indices("attend", slots, positions, k_cache.shape[0], k_cache.shape[2])
    q = rope(q, positions, theta, rope_dim, style)                        # (n, n_heads, head_dim)
    k = rope(k, positions, theta, rope_dim, style)                        # (n, n_kv_heads, head_dim)
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v
    return attention(q, k_cache, v_cache, slots, positions)


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


def check_cache_indices(what: str, slots: np.ndarray, positions: np.ndarray, n_slots: int, n_ctx: int) -> None:
    """IndexError for a slot outside the cache or a negative position; ContextLengthExceeded past n_ctx."""
    if slots.size and (slots.min() < 0 or slots.max() >= n_slots):
        raise IndexError(f"{what}: slots must lie in the cache's slots 0..{n_slots - 1}, got {slots.tolist()}")
    if positions.size and positions.min() < 0:
        raise IndexError(f"{what}: positions must not be negative, got {positions.min()}")
    if positions.size and positions.max() >= n_ctx:
        raise ContextLengthExceeded(int(positions.max()) + 1, n_ctx, "sequence")


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, both (n, hidden_dim)."""
    return (silu(gate.astype(np.float32)) * up).astype(np.float32)
