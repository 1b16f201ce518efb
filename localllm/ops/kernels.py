"""numba twins of ``ops.ref``: RMSNorm, RoPE, SwiGLU and attention over the KV cache.

Same names, signatures and shapes as ``ops.ref`` (read it first: it is the
readable version). Differences are float32 rounding only, plus ``fast_exp``:
a vectorizable exp (Cephes polynomial, about 2 ulp) used by the softmax and by
SiLU, since LLVM calls libm's scalar ``expf`` once per element otherwise.

Parallel loops run only when there is enough work (prefill, large batches);
decode-sized calls stay on the calling thread to avoid a launch.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..quants.intrinsics import float32_from_bits
from . import ref

PARALLEL_MIN_ROWS = 16  # rows (tokens) from which rms_norm / rope / swiglu use threads

_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)
_LN2_LOW = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.3)
_EXP_MAX = np.float32(88.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@njit(cache=True, fastmath=True, inline="always")
def fast_exp(x):
    """exp(x) for float32 x: 2^k * e^f with |f| <= ln2/2, e^f by a degree-7 polynomial (Cephes expf).

    Inputs are clamped to [-87.3, 88.0] (results stay finite and normal).
    """
    x = min(max(x, _EXP_MIN), _EXP_MAX)
    k = np.floor(x * _LOG2E + _HALF)
    f = x - k * _LN2_HIGH - k * _LN2_LOW
    p = ((((_P0 * f + _P1) * f + _P2) * f + _P3) * f + _P4) * f + _P5
    p = p * (f * f) + f + _ONE
    return p * float32_from_bits((np.int64(k) + 127) << 23)


# --------------------------------------------------------------------------- rms_norm

@njit(cache=True, fastmath=True)
def _sum_of_squares(x, i):
    total = np.float32(0.0)
    for k in range(x.shape[1]):
        total += x[i, k] * x[i, k]
    return total


@njit(cache=True, inline="always")  # no fastmath: scalar tails and vector bodies must round alike
def _rms_norm_row(x, weight, eps, out, i):
    scale = _ONE / np.sqrt(_sum_of_squares(x, i) / np.float32(x.shape[1]) + eps)
    for k in range(x.shape[1]):
        out[i, k] = x[i, k] * scale * weight[k]


@njit(cache=True)
def _rms_norm_serial(x, weight, eps, out):
    for i in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, i)


@njit(cache=True, parallel=True)
def _rms_norm_parallel(x, weight, eps, out):
    for i in prange(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, i)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (n, dim) -> x / rms(x) * weight."""
    x = _as_float32(x)
    weight = _as_float32(weight)
    if x.ndim != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: x must be (n, dim) and weight (dim,), got {x.shape} and {weight.shape}")
    out = np.empty_like(x)
    kernel = _rms_norm_parallel if x.shape[0] >= PARALLEL_MIN_ROWS else _rms_norm_serial
    kernel(x, weight, np.float32(eps), out)
    return out


# --------------------------------------------------------------------------- swiglu

# No reciprocal approximations ("arcp", "afn"): the vectorized and the scalar loop must agree bit for bit.
_EXACT_DIVISION = {"nnan", "ninf", "nsz", "contract"}


@njit(cache=True, fastmath=_EXACT_DIVISION, inline="always")
def _swiglu_row(gate, up, out, i):
    for k in range(gate.shape[1]):
        g = gate[i, k]
        out[i, k] = g / (_ONE + fast_exp(-g)) * up[i, k]


@njit(cache=True, fastmath=_EXACT_DIVISION)
def _swiglu_serial(gate, up, out):
    for i in range(gate.shape[0]):
        _swiglu_row(gate, up, out, i)


@njit(cache=True, fastmath=_EXACT_DIVISION, parallel=True)
def _swiglu_parallel(gate, up, out):
    for i in prange(gate.shape[0]):
        _swiglu_row(gate, up, out, i)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, both (n, hidden_dim)."""
    gate, up = _as_float32(gate), _as_float32(up)
    if gate.ndim != 2 or gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must be the same (n, hidden_dim), got {gate.shape} and {up.shape}")
    out = np.empty_like(gate)
    kernel = _swiglu_parallel if gate.shape[0] >= PARALLEL_MIN_ROWS else _swiglu_serial
    kernel(gate, up, out)
    return out


# --------------------------------------------------------------------------- rope

@njit(cache=True, inline="always")
def _rope_row(x, cos, sin, neox, out, i):
    n_heads, head_dim = x.shape[1], x.shape[2]
    half = cos.shape[1]
    rope_dim = 2 * half
    for h in range(n_heads):
        for k in range(half):
            a_at, b_at = (k, k + half) if neox else (2 * k, 2 * k + 1)
            a, b = x[i, h, a_at], x[i, h, b_at]
            out[i, h, a_at] = a * cos[i, k] - b * sin[i, k]
            out[i, h, b_at] = a * sin[i, k] + b * cos[i, k]
        for k in range(rope_dim, head_dim):
            out[i, h, k] = x[i, h, k]


@njit(cache=True)
def _rope_serial(x, cos, sin, neox, out):
    for i in range(x.shape[0]):
        _rope_row(x, cos, sin, neox, out, i)


@njit(cache=True, parallel=True)
def _rope_parallel(x, cos, sin, neox, out):
    for i in prange(x.shape[0]):
        _rope_row(x, cos, sin, neox, out, i)


_angle_cache: dict = {}


def _rope_table(positions: np.ndarray, theta: float, rope_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``ref.rope_angles`` for these positions, remembered: every layer of a forward pass asks again."""
    key = (float(theta), int(rope_dim), positions.tobytes())
    table = _angle_cache.get(key)
    if table is None:
        if len(_angle_cache) >= 8:
            _angle_cache.clear()
        table = _angle_cache[key] = ref.rope_angles(positions, theta, rope_dim)
    return table


def rope(x: np.ndarray, positions: np.ndarray, theta: float, rope_dim: int, style: str = "norm") -> np.ndarray:
    """Rotary position embedding on the first ``rope_dim`` dims of each head; x (n, n_heads, head_dim).

    ``norm`` rotates adjacent pairs (x[2i], x[2i+1]), ``neox`` rotates (x[i], x[i + rope_dim/2]).
    """
    if style not in ("norm", "neox"):
        raise ValueError(f"unknown rope style '{style}'")
    x = _as_float32(x)
    positions = _as_int64(positions)
    if x.ndim != 3 or positions.shape != (x.shape[0],):
        raise ValueError(f"rope: x must be (n, n_heads, head_dim) with positions (n,), got {x.shape}, {positions.shape}")
    if rope_dim % 2 or not 0 < rope_dim <= x.shape[2]:
        raise ValueError(f"rope: rope_dim must be even and in 1..{x.shape[2]}, got {rope_dim}")
    cos, sin = _rope_table(positions, theta, rope_dim)
    out = np.empty_like(x)
    kernel = _rope_parallel if x.shape[0] >= PARALLEL_MIN_ROWS else _rope_serial
    kernel(x, cos, sin, style == "neox", out)
    return out


# --------------------------------------------------------------------------- attention
#
# Keys are taken in fixed chunks of KEY_CHUNK positions (0..127, 128..255, ...).
# Each chunk gives, per query head, its score maximum m, the sum s of
# exp(score - m) and the unnormalized mix o = sum exp(score - m) * value; the
# chunks are then merged in order (running maximum, rescaled sums). Decode has
# few (token, KV head) pairs, so chunks of one pair run in parallel and are
# merged afterwards; prefill runs pairs in parallel and merges as it goes. Both
# do the same arithmetic in the same order: a token's attention output does not
# depend on the batch it came in.

KEY_CHUNK = 128
PARALLEL_TASKS = 64       # parallel tasks; task t takes work items t, t + 64, ... (balances causal prefill)
SPLIT_BELOW_PAIRS = 8     # fewer (token, KV head) pairs than this: split their keys across threads
_LOWEST = np.float32(-3.0e38)


@njit(cache=True, fastmath=True)
def _attend_chunk(q, i, h0, keys, values, start, stop, scale, scores, chunk_max, chunk_sum, chunk_out):
    """Heads h0 .. h0 + group - 1 of token i over keys[start:stop] -> chunk_max, chunk_sum, chunk_out."""
    group, head_dim = chunk_max.shape[0], q.shape[2]
    count = stop - start
    l = 0
    while l + 4 <= count:  # four keys at a time: each head's query row is read once for four dot products
        k = start + l
        for hh in range(group):
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for d in range(head_dim):
                qd = q[i, h0 + hh, d]
                s0 += qd * keys[k, d]
                s1 += qd * keys[k + 1, d]
                s2 += qd * keys[k + 2, d]
                s3 += qd * keys[k + 3, d]
            scores[hh, l], scores[hh, l + 1], scores[hh, l + 2], scores[hh, l + 3] = \
                s0 * scale, s1 * scale, s2 * scale, s3 * scale
        l += 4
    while l < count:
        for hh in range(group):
            s0 = np.float32(0.0)
            for d in range(head_dim):
                s0 += q[i, h0 + hh, d] * keys[start + l, d]
            scores[hh, l] = s0 * scale
        l += 1
    for hh in range(group):
        best = _LOWEST
        for l in range(count):
            best = max(best, scores[hh, l])
        total = np.float32(0.0)
        for l in range(count):
            e = fast_exp(scores[hh, l] - best)
            scores[hh, l] = e
            total += e
        chunk_max[hh], chunk_sum[hh] = best, total
    chunk_out[:, :] = 0.0
    l = 0
    while l + 4 <= count:
        k = start + l
        for hh in range(group):
            p0, p1, p2, p3 = scores[hh, l], scores[hh, l + 1], scores[hh, l + 2], scores[hh, l + 3]
            for d in range(head_dim):
                chunk_out[hh, d] += p0 * values[k, d] + p1 * values[k + 1, d] \
                    + p2 * values[k + 2, d] + p3 * values[k + 3, d]
        l += 4
    while l < count:
        for hh in range(group):
            p0 = scores[hh, l]
            for d in range(head_dim):
                chunk_out[hh, d] += p0 * values[start + l, d]
        l += 1


@njit(cache=True, fastmath=True, inline="always")
def _merge(run_max, run_sum, run_out, hh, chunk_max, chunk_sum, chunk_out):
    """Fold one chunk's (max, sum, out) of head hh into the running ones."""
    new_max = max(run_max[hh], chunk_max)
    old_weight = fast_exp(run_max[hh] - new_max)
    chunk_weight = fast_exp(chunk_max - new_max)
    run_sum[hh] = run_sum[hh] * old_weight + chunk_sum * chunk_weight
    for d in range(run_out.shape[1]):
        run_out[hh, d] = run_out[hh, d] * old_weight + chunk_out[d] * chunk_weight
    run_max[hh] = new_max


@njit(cache=True, fastmath=True, inline="always")
def _finish(run_sum, run_out, out, i, h0):
    for hh in range(run_out.shape[0]):
        inverse = _ONE / run_sum[hh]
        for d in range(run_out.shape[1]):
            out[i, h0 + hh, d] = run_out[hh, d] * inverse


@njit(cache=True, fastmath=True, parallel=True)
def _attention_by_pair(q, k_cache, v_cache, slots, positions, out):
    """One work item per (token, KV head): its chunks in order, merged as they come."""
    n, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_heads // n_kv_heads
    scale = _ONE / np.sqrt(np.float32(head_dim))
    n_items = n * n_kv_heads
    for t in prange(min(n_items, PARALLEL_TASKS)):
        scores = np.empty((group, KEY_CHUNK), dtype=np.float32)
        chunk_max = np.empty(group, dtype=np.float32)
        chunk_sum = np.empty(group, dtype=np.float32)
        chunk_out = np.empty((group, head_dim), dtype=np.float32)
        run_max = np.empty(group, dtype=np.float32)
        run_sum = np.empty(group, dtype=np.float32)
        run_out = np.empty((group, head_dim), dtype=np.float32)
        for item in range(t, n_items, PARALLEL_TASKS):
            i, g = item // n_kv_heads, item % n_kv_heads
            keys, values = k_cache[slots[i], g], v_cache[slots[i], g]
            run_max[:] = _LOWEST
            run_sum[:] = 0.0
            run_out[:, :] = 0.0
            length = positions[i] + 1
            for start in range(0, length, KEY_CHUNK):
                _attend_chunk(q, i, g * group, keys, values, start, min(start + KEY_CHUNK, length), scale,
                              scores, chunk_max, chunk_sum, chunk_out)
                for hh in range(group):
                    _merge(run_max, run_sum, run_out, hh, chunk_max[hh], chunk_sum[hh], chunk_out[hh])
            _finish(run_sum, run_out, out, i, g * group)


@njit(cache=True, fastmath=True, parallel=True)
def _attention_by_chunk(q, k_cache, v_cache, slots, positions, out):
    """One work item per (token, KV head, key chunk), then the chunks merged in order."""
    n, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_heads // n_kv_heads
    scale = _ONE / np.sqrt(np.float32(head_dim))
    max_chunks = 0
    for i in range(n):
        max_chunks = max(max_chunks, (positions[i] + KEY_CHUNK) // KEY_CHUNK)
    part_max = np.empty((n, n_kv_heads, max_chunks, group), dtype=np.float32)
    part_sum = np.empty((n, n_kv_heads, max_chunks, group), dtype=np.float32)
    part_out = np.empty((n, n_kv_heads, max_chunks, group, head_dim), dtype=np.float32)
    n_items = n * n_kv_heads * max_chunks
    for t in prange(min(n_items, PARALLEL_TASKS)):
        scores = np.empty((group, KEY_CHUNK), dtype=np.float32)
        for item in range(t, n_items, PARALLEL_TASKS):
            i, rest = item // (n_kv_heads * max_chunks), item % (n_kv_heads * max_chunks)
            g, c = rest // max_chunks, rest % max_chunks
            length = positions[i] + 1
            if c * KEY_CHUNK < length:
                _attend_chunk(q, i, g * group, k_cache[slots[i], g], v_cache[slots[i], g], c * KEY_CHUNK,
                              min(c * KEY_CHUNK + KEY_CHUNK, length), scale, scores, part_max[i, g, c],
                              part_sum[i, g, c], part_out[i, g, c])
    run_max = np.empty(group, dtype=np.float32)
    run_sum = np.empty(group, dtype=np.float32)
    run_out = np.empty((group, head_dim), dtype=np.float32)
    for i in range(n):
        for g in range(n_kv_heads):
            run_max[:] = _LOWEST
            run_sum[:] = 0.0
            run_out[:, :] = 0.0
            for c in range((positions[i] + KEY_CHUNK) // KEY_CHUNK):
                for hh in range(group):
                    _merge(run_max, run_sum, run_out, hh, part_max[i, g, c, hh], part_sum[i, g, c, hh],
                           part_out[i, g, c, hh])
            _finish(run_sum, run_out, out, i, g * group)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
              slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Causal grouped-query attention over the KV cache.

    q (n, n_heads, head_dim); k_cache, v_cache (n_slots, n_kv_heads, n_ctx, head_dim).
    Token i attends to cache[slots[i], :, :positions[i] + 1] (its own K/V must
    already be written). Returns (n, n_heads, head_dim).
    """
    q = _as_float32(q)
    slots, positions = _as_int64(slots), _as_int64(positions)
    n, n_heads, head_dim = q.shape
    n_slots, n_kv_heads, n_ctx, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or cache_head_dim != head_dim or n_heads % n_kv_heads:
        raise ValueError(f"attention: q {q.shape} does not fit caches {k_cache.shape} / {v_cache.shape}")
    if slots.shape != (n,) or positions.shape != (n,):
        raise ValueError(f"attention: slots and positions must be ({n},), got {slots.shape}, {positions.shape}")
    _check_cache_indices(slots, positions, n_slots, n_ctx)
    out = np.empty_like(q)
    if n:
        kernel = _attention_by_chunk if n * n_kv_heads < SPLIT_BELOW_PAIRS else _attention_by_pair
        kernel(q, _as_float32(k_cache), _as_float32(v_cache), slots, positions, out)
    return out


def _as_float32(a) -> np.ndarray:
    """a as a C-contiguous float32 array (no copy when it already is one)."""
    if type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_int64(a) -> np.ndarray:
    if type(a) is np.ndarray and a.dtype == np.int64 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.int64)


@njit(cache=True)
def _check_cache_indices(slots, positions, n_slots, n_ctx):
    for i in range(slots.shape[0]):
        if not (0 <= slots[i] < n_slots and 0 <= positions[i] < n_ctx):
            raise IndexError("attention: every token's slot must lie in the cache's slots "
                             "and its position below the cache's n_ctx (slots / positions out of range)")
