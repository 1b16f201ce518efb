"""numba twins of ``ops.ref.attention`` and ``ops.ref.attend``: causal GQA attention over the KV cache.

The cache may hold float32 or float16; float16 caches reach numba as
``uint16`` views of their bytes and are read and written with ``ops.vector``
(8 lanes at a time, widened to float32; all arithmetic is float32).

Keys are taken in fixed chunks of KEY_CHUNK positions (0..127, 128..255, ...).
Each chunk gives, per query head, its score maximum m, the sum s of
exp(score - m) and the unnormalized mix o = sum exp(score - m) * value; the
chunks are then merged in order (running maximum, rescaled sums). Decode has
few (token, KV head) pairs, so chunks of one pair run in parallel and are
merged afterwards; prefill runs pairs in parallel and merges as it goes. Both
do the same arithmetic in the same order, which depends only on the token's
position: a token's attention output does not depend on the batch it came in.

Sliding-window layers (``window`` > 0) attend to the last ``window`` positions
only, and may keep them in a ring: position p lives at cache row p % ring, with
ring a multiple of KEY_CHUNK (so a chunk, aligned to positions, never wraps)
and at least ``window`` rows more than the batch holds tokens of one sequence.
A full cache is the ring that never wraps (ring = n_ctx). Chunks stay aligned
to positions, so a ring gives the same bits as a full cache with the window as
a mask.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kv_cache import KEY_CHUNK  # the ring rows of the cache are counted in these chunks
from . import ref
from .kernels import PARALLEL_MIN_ROWS, _as_float32, _as_int64, _rope_row, _rope_table, fast_exp
from .vector import (fma8, horizontal_sum, load1, load8, splat8, store1, store8, store_halves4, sum_lanes8,
                     zeros_f32x8)

PARALLEL_TASKS = 64       # parallel tasks; task t takes work items t, t + 64, ... (balances causal prefill)
SPLIT_BELOW_PAIRS = 8     # fewer (token, KV head) pairs than this: split their keys across threads
_LOWEST = np.float32(-3.0e38)
_ONE = np.float32(1.0)

# status codes of the numba index check (on a problem, ref.check_cache_indices raises the precise exception)
_OK, _BAD_SLOT, _NEGATIVE_POSITION, _POSITION_PAST_CONTEXT = 0, 1, 2, 3


# --------------------------------------------------------------------------- one chunk of keys

@njit(cache=True)
def _chunk_scores(q, i, h0, keys, start, count, scores):
    """scores[hh, l] = q[i, h0 + hh] . keys[start + l] for l < count (keys (n_ctx, head_dim)).

    Heads go in pairs where they can, four keys at a time: each key is loaded (and a float16 one widened) once
    for both. Every score is the same sum either way (one 8-lane accumulator over the dims, its lanes added as
    ``sum_lanes8`` adds them), so pairing does not change a result.
    """
    group, head_dim = scores.shape[0], q.shape[2]
    body = head_dim - head_dim % 8
    paired = group - group % 2
    for hh in range(0, paired, 2):
        query, query_next, row, row_next = q[i, h0 + hh], q[i, h0 + hh + 1], scores[hh], scores[hh + 1]
        l = 0
        while l + 4 <= count:  # four keys x two heads, finished together by sum_lanes8
            at = (start + l) * head_dim
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = zeros_f32x8()
            for d in range(0, body, 8):
                x, y = load8(query, d), load8(query_next, d)
                k0, k1 = load8(keys, at + d), load8(keys, at + head_dim + d)
                k2, k3 = load8(keys, at + 2 * head_dim + d), load8(keys, at + 3 * head_dim + d)
                a0, a1, a2, a3 = fma8(x, k0, a0), fma8(x, k1, a1), fma8(x, k2, a2), fma8(x, k3, a3)
                b0, b1, b2, b3 = fma8(y, k0, b0), fma8(y, k1, b1), fma8(y, k2, b2), fma8(y, k3, b3)
            store_halves4(scores, hh * scores.shape[1] + l, (hh + 1) * scores.shape[1] + l,
                          sum_lanes8(a0, a1, a2, a3, b0, b1, b2, b3))
            l += 4
        _scores_rest(query, keys, start, l, count, row)
        _scores_rest(query_next, keys, start, l, count, row_next)
    for hh in range(paired, group):
        query, row = q[i, h0 + hh], scores[hh]
        l = 0
        while l + 8 <= count:  # eight keys at a time, finished together by sum_lanes8
            at = (start + l) * head_dim
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zeros_f32x8()
            for d in range(0, body, 8):
                x = load8(query, d)
                a0 = fma8(x, load8(keys, at + d), a0)
                a1 = fma8(x, load8(keys, at + head_dim + d), a1)
                a2 = fma8(x, load8(keys, at + 2 * head_dim + d), a2)
                a3 = fma8(x, load8(keys, at + 3 * head_dim + d), a3)
                a4 = fma8(x, load8(keys, at + 4 * head_dim + d), a4)
                a5 = fma8(x, load8(keys, at + 5 * head_dim + d), a5)
                a6 = fma8(x, load8(keys, at + 6 * head_dim + d), a6)
                a7 = fma8(x, load8(keys, at + 7 * head_dim + d), a7)
            store8(row, l, sum_lanes8(a0, a1, a2, a3, a4, a5, a6, a7))
            l += 8
        _scores_rest(query, keys, start, l, count, row)
    for hh in range(group if body < head_dim else 0):  # head_dim not a multiple of 8: the last dims
        query, row = q[i, h0 + hh], scores[hh]
        for l in range(count):
            at = (start + l) * head_dim
            tail = np.float32(0.0)
            for d in range(body, head_dim):
                tail += query[d] * load1(keys, at + d)
            row[l] += tail


@njit(cache=True, inline="always")
def _scores_rest(query, keys, start, l, count, row):
    """row[l:count] of ``_chunk_scores``, one key at a time (the dims that are a multiple of 8)."""
    head_dim = query.shape[0]
    body = head_dim - head_dim % 8
    while l < count:
        at = (start + l) * head_dim
        a0 = zeros_f32x8()
        for d in range(0, body, 8):
            a0 = fma8(load8(query, d), load8(keys, at + d), a0)
        row[l] = horizontal_sum(a0)
        l += 1


@njit(cache=True)  # no fastmath, no libm: every kernel that calls it rounds alike (the step = the per-op path)
def _soft_cap_scores(scores, count, scale, softcap):
    """scores[hh, :count] -> softcap * tanh(scores * scale / softcap), tanh(t) = sign(t) (1 - e) / (1 + e) with
    e = exp(-2 |t|) by ``fast_exp`` (about 1e-7 from numpy's tanh)."""
    for hh in range(scores.shape[0]):
        for l in range(count):
            t = scores[hh, l] * scale / softcap
            e = fast_exp(np.float32(-2.0) * abs(t))
            magnitude = (_ONE - e) / (_ONE + e)
            scores[hh, l] = (magnitude if t >= 0 else -magnitude) * softcap


@njit(cache=True, fastmath=True)
def _chunk_softmax(scores, count, scale, softcap, chunk_max, chunk_sum):
    """scores[hh, :count] * scale [-> softcap * tanh(. / softcap)] -> exp(. - max); chunk_max, chunk_sum per head."""
    taken = scale
    if softcap > 0:  # capped in place, then taken as they are
        taken = _ONE
        _soft_cap_scores(scores, count, scale, softcap)
    for hh in range(scores.shape[0]):
        row = scores[hh]
        best = _LOWEST
        for l in range(count):
            best = max(best, row[l] * taken)
        for l in range(count):
            row[l] = fast_exp(row[l] * taken - best)
        total = np.float32(0.0)
        for l in range(count):
            total += row[l]
        chunk_max[hh], chunk_sum[hh] = best, total


@njit(cache=True)
def _chunk_mix(values, start, count, weights, chunk_out):
    """chunk_out[hh] = sum over l < count of weights[hh, l] * values[start + l].

    Heads go in pairs where they can (each value vector loaded once for two heads). Every lane of every
    head sums in the same order either way, so pairing does not change a result.
    """
    group, head_dim = chunk_out.shape
    body = head_dim - head_dim % 8
    paired = group - group % 2
    for hh in range(0, paired, 2):
        w, v, out, out_next = weights[hh], weights[hh + 1], chunk_out[hh], chunk_out[hh + 1]
        d = 0
        while d + 32 <= body:  # 2 heads x 4 independent accumulators
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = zeros_f32x8()
            for l in range(count):
                p, r, at = splat8(w[l]), splat8(v[l]), (start + l) * head_dim + d
                x0, x1, x2, x3 = load8(values, at), load8(values, at + 8), load8(values, at + 16), load8(values, at + 24)
                a0, a1, a2, a3 = fma8(p, x0, a0), fma8(p, x1, a1), fma8(p, x2, a2), fma8(p, x3, a3)
                b0, b1, b2, b3 = fma8(r, x0, b0), fma8(r, x1, b1), fma8(r, x2, b2), fma8(r, x3, b3)
            _store32(out, d, a0, a1, a2, a3)
            _store32(out_next, d, b0, b1, b2, b3)
            d += 32
        _mix_rest(values, start, count, w, out, d)
        _mix_rest(values, start, count, v, out_next, d)
    for hh in range(paired, group):
        w, out = weights[hh], chunk_out[hh]
        d = 0
        while d + 32 <= body:  # four independent accumulators
            a0 = a1 = a2 = a3 = zeros_f32x8()
            for l in range(count):
                p, at = splat8(w[l]), (start + l) * head_dim + d
                a0 = fma8(p, load8(values, at), a0)
                a1 = fma8(p, load8(values, at + 8), a1)
                a2 = fma8(p, load8(values, at + 16), a2)
                a3 = fma8(p, load8(values, at + 24), a3)
            _store32(out, d, a0, a1, a2, a3)
            d += 32
        _mix_rest(values, start, count, w, out, d)


@njit(cache=True, inline="always")
def _store32(out, d, a0, a1, a2, a3):
    """out[d:d + 32] = the lanes of a0, a1, a2, a3."""
    store8(out, d, a0)
    store8(out, d + 8, a1)
    store8(out, d + 16, a2)
    store8(out, d + 24, a3)


@njit(cache=True, inline="always")
def _mix_rest(values, start, count, w, out, d):
    """The dims from d on of one head's mix: 8 at a time, then one at a time."""
    head_dim = out.shape[0]
    body = head_dim - head_dim % 8
    while d < body:
        a0 = zeros_f32x8()
        for l in range(count):
            a0 = fma8(splat8(w[l]), load8(values, (start + l) * head_dim + d), a0)
        store8(out, d, a0)
        d += 8
    for d in range(body, head_dim):
        total = np.float32(0.0)
        for l in range(count):
            total += w[l] * load1(values, (start + l) * head_dim + d)
        out[d] = total


@njit(cache=True)
def _attend_chunk(q, i, h0, keys, values, start, stop, scale, softcap, scores, chunk_max, chunk_sum, chunk_out):
    """Heads h0 .. h0 + group - 1 of token i over keys[start:stop] -> chunk_max, chunk_sum, chunk_out.

    The cache is read in place (float16 widened in registers): loads interleaved with arithmetic keep
    the memory busy, which matters more than converting each element once per head of the group.
    """
    _chunk_scores(q, i, h0, keys, start, stop - start, scores)
    _chunk_softmax(scores, stop - start, scale, softcap, chunk_max, chunk_sum)
    _chunk_mix(values, start, stop - start, scores, chunk_out)


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


# --------------------------------------------------------------------------- attention

@njit(cache=True, inline="always")
def first_position(position, window):
    """The first position a token at ``position`` attends to (window 0: the whole sequence)."""
    return max(0, position - window + 1) if window > 0 else 0


@njit(cache=True, inline="always")
def chunk_count(position, window):
    """Key chunks (aligned to multiples of KEY_CHUNK positions) a token at ``position`` attends to."""
    return position // KEY_CHUNK - first_position(position, window) // KEY_CHUNK + 1


@njit(cache=True, inline="always")
def chunk_rows(position, window, ring, c):
    """Cache rows [start, stop) of the token's c-th key chunk (stop == start: none)."""
    first = first_position(position, window)
    chunk_start = (first // KEY_CHUNK + c) * KEY_CHUNK
    low, high = max(chunk_start, first), min(chunk_start + KEY_CHUNK, position + 1)
    if low >= high:
        return 0, 0
    start = low % ring
    return start, start + high - low


@njit(cache=True, parallel=True)
def _attention_by_pair(q, k_cache, v_cache, slots, positions, window, softcap, out):
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
            attend_pair(q, k_cache, v_cache, slots, positions, window, softcap, item // n_kv_heads, item % n_kv_heads,
                        scale, scores, chunk_max, chunk_sum, chunk_out, run_max, run_sum, run_out, out)


@njit(cache=True)
def attend_pair(q, k_cache, v_cache, slots, positions, window, softcap, i, g, scale, scores, chunk_max, chunk_sum,
                chunk_out, run_max, run_sum, run_out, out):
    """Token i, KV head g: its key chunks in order, each merged into the running (max, sum, mix) as it comes,
    into ``out[i]`` (scores, chunk_*, run_*: scratch)."""
    group = scores.shape[0]
    keys, values = k_cache[slots[i], g], v_cache[slots[i], g]
    run_max[:] = _LOWEST
    run_sum[:] = 0.0
    run_out[:, :] = 0.0
    for c in range(chunk_count(positions[i], window)):
        start, stop = chunk_rows(positions[i], window, k_cache.shape[2], c)
        _attend_chunk(q, i, g * group, keys, values, start, stop, scale, softcap, scores, chunk_max, chunk_sum,
                      chunk_out)
        for hh in range(group):
            _merge(run_max, run_sum, run_out, hh, chunk_max[hh], chunk_sum[hh], chunk_out[hh])
    _finish(run_sum, run_out, out, i, g * group)


@njit(cache=True, parallel=True)
def _attention_by_chunk(q, k_cache, v_cache, slots, positions, window, softcap, out):
    """One work item per (token, KV head, key chunk), then the chunks merged in order."""
    _, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_heads // n_kv_heads
    part_max, part_sum, part_out = chunk_parts(positions, window, n_kv_heads, group, head_dim)
    n_items = part_max.shape[0] * n_kv_heads * part_max.shape[2]
    for t in prange(min(n_items, PARALLEL_TASKS)):
        scores = np.empty((group, KEY_CHUNK), dtype=np.float32)
        for item in range(t, n_items, PARALLEL_TASKS):
            attend_chunk_item(q, k_cache, v_cache, slots, positions, window, softcap, item, scores, part_max,
                              part_sum, part_out)
    _merge_parts(part_max, part_sum, part_out, positions, window, out)


@njit(cache=True)
def chunk_parts(positions, window, n_kv_heads, group, head_dim):
    """Room for every (token, KV head, key chunk)'s max, sum and mix of scores:
    (n, n_kv_heads, max_chunks, group) twice and (n, n_kv_heads, max_chunks, group, head_dim)."""
    n = positions.shape[0]
    max_chunks = 0
    for i in range(n):
        max_chunks = max(max_chunks, chunk_count(positions[i], window))
    part_max = np.empty((n, n_kv_heads, max_chunks, group), dtype=np.float32)
    part_sum = np.empty((n, n_kv_heads, max_chunks, group), dtype=np.float32)
    part_out = np.empty((n, n_kv_heads, max_chunks, group, head_dim), dtype=np.float32)
    return part_max, part_sum, part_out


@njit(cache=True)
def attend_chunk_item(q, k_cache, v_cache, slots, positions, window, softcap, item, scores, part_max, part_sum,
                      part_out):
    """Work item ``item`` = (token i, KV head g, key chunk c) in that order: its part_* entries (nothing
    when the token has fewer chunks)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv_heads, max_chunks = part_max.shape[1], part_max.shape[2]
    group = n_heads // n_kv_heads
    i, rest = item // (n_kv_heads * max_chunks), item % (n_kv_heads * max_chunks)
    g, c = rest // max_chunks, rest % max_chunks
    if c < chunk_count(positions[i], window):
        start, stop = chunk_rows(positions[i], window, k_cache.shape[2], c)
        _attend_chunk(q, i, g * group, k_cache[slots[i], g], v_cache[slots[i], g], start, stop,
                      _ONE / np.sqrt(np.float32(head_dim)), softcap, scores, part_max[i, g, c], part_sum[i, g, c],
                      part_out[i, g, c])


@njit(cache=True)
def _merge_parts(part_max, part_sum, part_out, positions, window, out):
    """Merge each (token, KV head)'s chunks in order (serial: outside a parallel function, the array
    assignments below would each become a parallel launch)."""
    n, n_kv_heads, _, group, head_dim = part_out.shape
    run_max = np.empty(group, dtype=np.float32)
    run_sum = np.empty(group, dtype=np.float32)
    run_out = np.empty((group, head_dim), dtype=np.float32)
    for i in range(n):
        for g in range(n_kv_heads):
            merge_pair(part_max, part_sum, part_out, positions, window, out, i, g, run_max, run_sum, run_out)


@njit(cache=True)
def merge_pair(part_max, part_sum, part_out, positions, window, out, i, g, run_max, run_sum, run_out):
    """Token i, KV head g: its chunks' (max, sum, mix) merged in order into ``out[i]`` (run_*: scratch)."""
    group = run_out.shape[0]
    run_max[:] = _LOWEST
    run_sum[:] = 0.0
    run_out[:, :] = 0.0
    for c in range(chunk_count(positions[i], window)):
        for hh in range(group):
            _merge(run_max, run_sum, run_out, hh, part_max[i, g, c, hh], part_sum[i, g, c, hh],
                   part_out[i, g, c, hh])
    _finish(run_sum, run_out, out, i, g * group)


@njit(cache=True)
def _check_indices(slots, positions, n_slots, n_ctx, window):
    """_OK, or the first problem found among the tokens' slots and positions (a sliding-window layer's ring,
    window > 0, takes any position)."""
    for i in range(slots.shape[0]):
        if not 0 <= slots[i] < n_slots:
            return _BAD_SLOT
        if positions[i] < 0:
            return _NEGATIVE_POSITION
        if window <= 0 and positions[i] >= n_ctx:
            return _POSITION_PAST_CONTEXT
    return _OK


@njit(cache=True)
def _attend_all(q, k_cache, v_cache, slots, positions, window, softcap, out):
    if q.shape[0] * k_cache.shape[1] < SPLIT_BELOW_PAIRS:
        _attention_by_chunk(q, k_cache, v_cache, slots, positions, window, softcap, out)
    else:
        _attention_by_pair(q, k_cache, v_cache, slots, positions, window, softcap, out)


@njit(cache=True)
def _attention(q, k_cache, v_cache, slots, positions, window, softcap, out):
    status = _check_indices(slots, positions, k_cache.shape[0], k_cache.shape[2], window)
    if status == _OK and q.shape[0]:
        _attend_all(q, k_cache, v_cache, slots, positions, window, softcap, out)
    return status


def _cache_view(cache: np.ndarray, name: str, what: str) -> np.ndarray:
    """The cache as numba takes it: float32 as is, float16 as its uint16 bits (never a copy)."""
    if not (type(cache) is np.ndarray and cache.flags.c_contiguous and cache.ndim == 4):
        raise ValueError(f"{what}: {name} must be a C-contiguous (n_slots, n_kv_heads, n_ctx, head_dim) array")
    if cache.dtype == np.float16:
        return cache.view(np.uint16)
    if cache.dtype == np.float32:
        return cache
    raise ValueError(f"{what}: {name} must be float16 or float32, got {cache.dtype}")


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
              slots: np.ndarray, positions: np.ndarray, window: int = 0, softcap: float = 0.0) -> np.ndarray:
    """Causal grouped-query attention over the KV cache (float16 or float32).

    q (n, n_heads, head_dim); k_cache, v_cache (n_slots, n_kv_heads, ring, head_dim).
    Token i attends to positions ``ref.key_range(positions[i], window)`` of its
    slot, position p at cache row p % ring (its own K/V must already be
    written). Returns (n, n_heads, head_dim) float32. Same contract as ``ref.attention``.
    """
    q = _as_float32(q)
    slots, positions = _as_int64(slots), _as_int64(positions)
    ref.check_attention_shapes("attention", q, k_cache, v_cache, slots, positions)
    check_ring(k_cache.shape[2], window, slots, positions, "attention")
    out = np.empty_like(q)
    status = _attention(q, _cache_view(k_cache, "k_cache", "attention"), _cache_view(v_cache, "v_cache", "attention"),
                        slots, positions, window, np.float32(softcap), out)
    if status != _OK:
        ref.check_cache_indices("attention", slots, positions, k_cache.shape[0], k_cache.shape[2], window)
    return out


def check_ring(ring: int, window: int, slots: np.ndarray, positions: np.ndarray, what: str) -> None:
    """ValueError unless a cache of ``ring`` rows can serve this batch: it holds every position, or it is a
    sliding-window ring (window > 0) of a multiple of KEY_CHUNK rows, ``window`` more than the batch's
    tokens of any one sequence."""
    if not positions.size or int(positions.max()) < ring:
        return
    if window <= 0:
        return  # positions past a full cache: the index check raises ContextLengthExceeded
    per_sequence = int(np.bincount(slots - slots.min()).max())
    if ring % KEY_CHUNK or ring < window + per_sequence:
        raise ValueError(f"{what}: a ring of {ring} rows cannot hold a window of {window} positions and "
                         f"{per_sequence} new tokens of one sequence (it must be a multiple of {KEY_CHUNK} and at "
                         f"least {window + per_sequence})")


# --------------------------------------------------------------------------- attend: rope + cache write + attention

@njit(cache=True, inline="always")
def _store_row(x, i, cache, slot, position):
    """cache[slot, g, position % ring] = x[i, g] for every KV head g (rounded to the cache's dtype)."""
    n_kv_heads, head_dim = x.shape[1], x.shape[2]
    body = head_dim - head_dim % 8
    for g in range(n_kv_heads):
        source, destination = x[i, g], cache[slot, g]
        at = (position % cache.shape[2]) * head_dim
        for d in range(0, body, 8):
            store8(destination, at + d, load8(source, d))
        for d in range(body, head_dim):
            store1(destination, at + d, source[d])


@njit(cache=True, inline="always")
def _rope_write_row(q, k, v, cos, sin, neox, slots, positions, k_cache, v_cache, q_rotated, k_rotated, i):
    _rope_row(q, cos, sin, neox, q_rotated, i)
    _rope_row(k, cos, sin, neox, k_rotated, i)
    _store_row(k_rotated, i, k_cache, slots[i], positions[i])
    _store_row(v, i, v_cache, slots[i], positions[i])


@njit(cache=True, parallel=True)
def _rope_write_parallel(q, k, v, cos, sin, neox, slots, positions, k_cache, v_cache, q_rotated, k_rotated):
    for i in prange(q.shape[0]):
        _rope_write_row(q, k, v, cos, sin, neox, slots, positions, k_cache, v_cache, q_rotated, k_rotated, i)


@njit(cache=True)
def _attend(q, k, v, cos, sin, neox, slots, positions, k_cache, v_cache, window, softcap, out):
    """Check, rotate and write every token first (later tokens read earlier ones), then attend."""
    status = _check_indices(slots, positions, k_cache.shape[0], k_cache.shape[2], window)
    if status != _OK or q.shape[0] == 0:
        return status
    q_rotated, k_rotated = np.empty_like(q), np.empty_like(k)
    if q.shape[0] >= PARALLEL_MIN_ROWS:
        _rope_write_parallel(q, k, v, cos, sin, neox, slots, positions, k_cache, v_cache, q_rotated, k_rotated)
    else:
        for i in range(q.shape[0]):
            _rope_write_row(q, k, v, cos, sin, neox, slots, positions, k_cache, v_cache, q_rotated, k_rotated, i)
    _attend_all(q_rotated, k_cache, v_cache, slots, positions, window, softcap, out)
    return status


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, slots: np.ndarray,
           k_cache: np.ndarray, v_cache: np.ndarray, theta: "float | ref.RopeFrequencies", rope_dim: int,
           style: str = "norm", window: int = 0, softcap: float = 0.0) -> np.ndarray:
    """RoPE on q and k, k and v written into one layer's cache, then causal GQA attention: one numba call.

    q (n, n_heads, head_dim), k and v (n, n_kv_heads, head_dim) before RoPE;
    k_cache, v_cache (n_slots, n_kv_heads, ring, head_dim) float16 or float32,
    written at (slots[i], :, positions[i] % ring). Token i attends to positions
    ``ref.key_range(positions[i], window)`` of its slot (this batch's earlier
    tokens included). Returns (n, n_heads, head_dim) float32. Same contract as ``ref.attend``.
    """
    q, k, v = _as_float32(q), _as_float32(k), _as_float32(v)
    positions, slots = _as_int64(positions), _as_int64(slots)
    ref.check_attend_arguments(q, k, v, positions, slots, k_cache, v_cache, rope_dim, style)
    check_ring(k_cache.shape[2], window, slots, positions, "attend")
    cos, sin = _rope_table(positions, theta, rope_dim)
    out = np.empty_like(q)
    status = _attend(q, k, v, cos, sin, style == "neox", slots, positions, _cache_view(k_cache, "k_cache", "attend"),
                     _cache_view(v_cache, "v_cache", "attend"), window, np.float32(softcap), out)
    if status != _OK:
        ref.check_cache_indices("attend", slots, positions, k_cache.shape[0], k_cache.shape[2], window)
    return out
