"""The layers of the Llama forward pass for a few tokens (decode) as one parallel launch.

Through the per-op path, decoding one token takes five parallel launches a
layer (Q/K/V, attention, output projection, gate/up, down): 150 launches a
token for SmolLM2, each paying the omp fork/join plus the Python calls around
it (about 12 us), 1.5-2 ms of an 8-10 ms step. Here all layers are one
launch. Every worker runs the same program of phases, layer by layer::

    Q/K/V    rms_norm(x) @ [wq, wk, wv]           (each worker quantizes the activations itself)
    rope     RoPE on q and k, k and v into the cache, one token an item
    chunks   attention over 128-key chunks, one (token, KV head, chunk) an item
    merge    the chunks merged in order, one (token, KV head) an item
    wo       x += attended @ wo                   (in place: the rows are disjoint)
    gate/up  rms_norm(x) @ [w_gate, w_up]
    down     x += swiglu(gate, up) @ w_down

A phase's work items are claimed from an atomic counter; a worker goes on to
the next phase once every item of this one is done (a second counter). No
worker waits for another worker to arrive, only for claimed items to finish,
so the program is right with any number of workers actually running (one
worker does everything if it is alone). The arithmetic is the per-op path's,
function for function (row tasks of ``quants.kernels_avx2``, ``_attend_chunk``,
``merge_pair``, ``_rope_write_row``): results are bit for bit those of the
layer loop in ``LlamaModel.forward``, its reference (``tests/test_llama_step.py``).

One entry per weight type (``llama_layers_Q4_1`` ...), like the matmul entries,
and per pair of types that files mix (``llama_layers_Q4_K_Q6_K`` for Q4_K_M,
``llama_layers_Q5_K_Q6_K`` for Q5_K_M): numba then compiles, and caches, only
the row tasks a model uses. Other mixes take the per-op path.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..quants import kernels_avx2
from ..quants.intrinsics import atomic_add, atomic_load, spin_pause
from ..quants.portable import NO_PROLOGUE, RMS_NORM, SWIGLU, prepare_activations_serial
from . import ref
from .attention_kernels import (_OK, KEY_CHUNK, _check_indices, _rope_write_row, attend_chunk_item,
                                chunk_parts, merge_pair)
from .kernels import _rope_table

ROWS_PER_TASK = kernels_avx2.ROWS_PER_TASK
MATRICES_PER_LAYER = 7   # wq, wk, wv, wo, w_gate, w_up, w_down: their order in ``weights``
PHASES_PER_LAYER = 7     # Q/K/V, rope, chunks, merge, wo, gate/up, down
ITEMS_PER_WORKER = 12    # work items a matmul phase is cut into, per worker (fewer for small matrices)
MIN_TASKS_PER_ITEM = 4   # ... but at least this many row tasks of ROWS_PER_TASK rows each
MAX_TOKENS = 16          # larger batches (prefill) go through the per-op path


# --------------------------------------------------------------------------- phases

@njit(inline="always")
def claim(counters, phase, n_items):
    """The next unclaimed item of ``phase``, or -1 when all are taken."""
    item = atomic_add(counters, 2 * phase, 1)
    return item if item < n_items else -1


@njit(inline="always")
def unclaimed(counters, phase, n_items):
    return atomic_load(counters, 2 * phase) < n_items


@njit(inline="always")
def finish(counters, phase):
    atomic_add(counters, 2 * phase + 1, 1)


@njit(inline="always")
def wait_for_phase(counters, phase, n_items):
    """Spin until every item of ``phase`` is done (their results visible to this worker)."""
    while atomic_load(counters, 2 * phase + 1) < n_items:
        spin_pause()


@njit(inline="always")
def _task_count(rows):
    return (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK


@njit(inline="always")
def _task_location(tasks0, tasks1, t):
    """Row task t over up to three matrices of tasks0, tasks1, ... tasks (ROWS_PER_TASK rows each, matrices
    in order) -> (matrix index, first row)."""
    if t < tasks0:
        return 0, t * ROWS_PER_TASK
    if t < tasks0 + tasks1:
        return 1, (t - tasks0) * ROWS_PER_TASK
    return 2, (t - tasks0 - tasks1) * ROWS_PER_TASK


@njit
def _as_matrix(flat, n, cols):
    """The first n * cols items of a per-worker scratch vector as a C-contiguous (n, cols) matrix."""
    return flat[:n * cols].reshape((n, cols))


@njit
def matmul_phase(rows_first, rows_second, second_type, counters, phase, n_workers, weights, first, outs, x,
                 prologue, norm_weight, eps, up, accumulate, scratch):
    """outs[m] (+)= prologue(x) @ weights[first + m].T for m < len(outs) <= 3, rows claimed in items; a matrix's
    rows go through ``rows_second`` where ``second_type`` says so, else through ``rows_first``."""
    n, cols = x.shape
    scratch_h, scratch_q, scratch_d, scratch_d16, scratch_d_t, scratch_d16_t, offset_table = scratch
    # the matrices taken out of the list once: every access to the list changes shared reference counts
    count = len(outs)
    w0, w1, w2 = weights[first], weights[first + min(1, count - 1)], weights[first + min(2, count - 1)]
    second0, second1 = second_type[first], second_type[first + min(1, count - 1)]
    second2 = second_type[first + min(2, count - 1)]
    tasks0 = _task_count(w0.shape[0])
    tasks1 = _task_count(w1.shape[0]) if count > 1 else 0
    tasks2 = _task_count(w2.shape[0]) if count > 2 else 0
    n_tasks = tasks0 + tasks1 + tasks2
    n_items = max(1, min(n_tasks // MIN_TASKS_PER_ITEM, ITEMS_PER_WORKER * n_workers))
    if unclaimed(counters, phase, n_items):  # this worker quantizes the activations itself
        n_blocks = cols // 32
        xq = _as_matrix(scratch_q, n, cols)                       # (n, cols) int16
        xd = _as_matrix(scratch_d, n, n_blocks)                   # (n, n_blocks)
        xds16 = _as_matrix(scratch_d16, n, 2 * n_blocks)          # (n, 2 * n_blocks)
        xd_by_block = _as_matrix(scratch_d_t, n_blocks, n)        # (n_blocks, n)
        xds16_by_block = _as_matrix(scratch_d16_t, 2 * n_blocks, n)
        prepare_activations_serial(x, prologue, norm_weight, eps, up, _as_matrix(scratch_h, n, cols),
                                   xq, xd, xds16, xd_by_block, xds16_by_block)
        item = claim(counters, phase, n_items)
        while item >= 0:
            for t in range(item * n_tasks // n_items, (item + 1) * n_tasks // n_items):
                m, r = _task_location(tasks0, tasks1, t)
                if m == 0:
                    w, second = w0, second0
                elif m == 1:
                    w, second = w1, second1
                else:
                    w, second = w2, second2
                if second:
                    rows_second(w, r, xq, xd, xds16, xd_by_block, xds16_by_block, outs[m], offset_table, accumulate)
                else:
                    rows_first(w, r, xq, xd, xds16, xd_by_block, xds16_by_block, outs[m], offset_table, accumulate)
            finish(counters, phase)
            item = claim(counters, phase, n_items)
    wait_for_phase(counters, phase, n_items)


@njit
def attention_phases(counters, phase, q, k, v, positions, slots, cos, sin, neox, k_cache, v_cache, q_rotated,
                     k_rotated, part_max, part_sum, part_out, attended, scores, run_max, run_sum, run_out):
    """RoPE and cache write (phase), attention by key chunk (phase + 1), the chunks merged (phase + 2)."""
    n = q.shape[0]
    n_kv_heads = k_cache.shape[1]
    item = claim(counters, phase, n)
    while item >= 0:
        _rope_write_row(q, k, v, cos, sin, neox, slots, positions, k_cache, v_cache, q_rotated, k_rotated, item)
        finish(counters, phase)
        item = claim(counters, phase, n)
    wait_for_phase(counters, phase, n)

    n_items = n * n_kv_heads * part_max.shape[2]
    item = claim(counters, phase + 1, n_items)
    while item >= 0:
        attend_chunk_item(q_rotated, k_cache, v_cache, slots, positions, 0, item, scores, part_max, part_sum,
                          part_out)
        finish(counters, phase + 1)
        item = claim(counters, phase + 1, n_items)
    wait_for_phase(counters, phase + 1, n_items)

    item = claim(counters, phase + 2, n * n_kv_heads)
    while item >= 0:
        merge_pair(part_max, part_sum, part_out, positions, 0, attended, item // n_kv_heads, item % n_kv_heads,
                   run_max, run_sum, run_out)
        finish(counters, phase + 2)
        item = claim(counters, phase + 2, n * n_kv_heads)
    wait_for_phase(counters, phase + 2, n * n_kv_heads)


# --------------------------------------------------------------------------- the pass

@njit
def shared_buffers(weights, x, positions, k_cache, n_heads, n_layers):
    """What the workers share: the phase counters and the intermediate activations."""
    n = x.shape[0]
    n_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[4]
    group = n_heads // n_kv_heads
    hidden_dim = weights[4].shape[0]
    counters = np.zeros(2 * n_layers * PHASES_PER_LAYER, dtype=np.int64)
    q = np.empty((n, n_heads * head_dim), dtype=np.float32)
    k = np.empty((n, n_kv_heads * head_dim), dtype=np.float32)
    v = np.empty((n, n_kv_heads * head_dim), dtype=np.float32)
    q_rotated = np.empty((n, n_heads, head_dim), dtype=np.float32)
    k_rotated = np.empty((n, n_kv_heads, head_dim), dtype=np.float32)
    attended = np.empty((n, n_heads * head_dim), dtype=np.float32)
    gate = np.empty((n, hidden_dim), dtype=np.float32)
    up = np.empty((n, hidden_dim), dtype=np.float32)
    part_max, part_sum, part_out = chunk_parts(positions, 0, n_kv_heads, group, head_dim)
    return counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out


@njit
def worker_program(rows_first, rows_second, second_type, weights, attn_norms, ffn_norms, x, positions, slots, cos,
                   sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared):
    """One worker's run through every phase of every layer (x updated in place)."""
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = shared
    n, dim = x.shape
    n_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[4]
    group = n_heads // n_kv_heads
    widest = max(dim, q.shape[1], gate.shape[1])
    # this worker's scratch: the activations of a matmul phase and attention's partial results
    scratch = (np.empty(n * widest, dtype=np.float32),        # prologue output
               np.empty(n * widest, dtype=np.int16),          # quantized activations
               np.empty(n * widest // 32, dtype=np.float32),  # their scales
               np.empty(n * widest // 16, dtype=np.float32),  # scaled sums per 16
               np.empty(n * widest // 32, dtype=np.float32),  # the same two by block
               np.empty(n * widest // 16, dtype=np.float32),
               np.empty((widest // 16, 8), dtype=np.float32))  # offset table of K-quant row tasks
    scores = np.empty((group, KEY_CHUNK), dtype=np.float32)
    run_max = np.empty(group, dtype=np.float32)
    run_sum = np.empty(group, dtype=np.float32)
    run_out = np.empty((group, head_dim), dtype=np.float32)
    no_weight, no_up = np.empty(0, dtype=np.float32), np.empty((0, 0), dtype=np.float32)
    for layer in range(attn_norms.shape[0]):
        phase, first = layer * PHASES_PER_LAYER, layer * MATRICES_PER_LAYER
        # attention block
        matmul_phase(rows_first, rows_second, second_type, counters, phase, n_workers, weights, first, (q, k, v),
                     x, RMS_NORM, attn_norms[layer], eps, no_up, False, scratch)
        attention_phases(counters, phase + 1, q.reshape((n, n_heads, head_dim)),
                         k.reshape((n, n_kv_heads, head_dim)), v.reshape((n, n_kv_heads, head_dim)),
                         positions, slots, cos, sin, neox, k_cache[layer], v_cache[layer], q_rotated, k_rotated,
                         part_max, part_sum, part_out, attended.reshape((n, n_heads, head_dim)),
                         scores, run_max, run_sum, run_out)
        matmul_phase(rows_first, rows_second, second_type, counters, phase + 4, n_workers, weights, first + 3,
                     (x,), attended, NO_PROLOGUE, no_weight, eps, no_up, True, scratch)
        # feed-forward block
        matmul_phase(rows_first, rows_second, second_type, counters, phase + 5, n_workers, weights, first + 4,
                     (gate, up), x, RMS_NORM, ffn_norms[layer], eps, no_up, False, scratch)
        matmul_phase(rows_first, rows_second, second_type, counters, phase + 6, n_workers, weights, first + 6,
                     (x,), gate, SWIGLU, no_weight, eps, up, True, scratch)


# One parallel entry per weight type, and per pair of types that files mix (Q4_K_M, Q5_K_M: Q6_K for some
# matrices), module-level so that each has its own cache entry. Arguments: weights, a typed list of the
# layers' matrices (MATRICES_PER_LAYER a layer); second_type (len(weights),) bool, True for the matrices
# of a pair's second type; attn_norms, ffn_norms (n_layers, dim); x (n, dim) float32, updated in place;
# positions, slots (n,) int64; cos, sin (n, rope_dim / 2) of the positions; k_cache, v_cache (n_layers,
# n_slots, n_kv_heads, n_ctx, head_dim) float32 or float16 bits; n_workers: numba's thread count (asked in
# Python: asked inside a kernel, it keeps the kernel out of the cache).

@njit(parallel=True, cache=True)
def llama_layers_Q4_0(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q4_0, kernels_avx2.rows_Q4_0, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q4_1(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q4_1, kernels_avx2.rows_Q4_1, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q5_0(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q5_0, kernels_avx2.rows_Q5_0, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q5_1(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q5_1, kernels_avx2.rows_Q5_1, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q8_0(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q8_0, kernels_avx2.rows_Q8_0, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q2_K(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q2_K, kernels_avx2.rows_Q2_K, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q3_K(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q3_K, kernels_avx2.rows_Q3_K, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q4_K(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q4_K, kernels_avx2.rows_Q4_K, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q5_K(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q5_K, kernels_avx2.rows_Q5_K, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q6_K(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                      v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q6_K, kernels_avx2.rows_Q6_K, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q4_K_Q6_K(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                           v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q4_K, kernels_avx2.rows_Q6_K, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


@njit(parallel=True, cache=True)
def llama_layers_Q5_K_Q6_K(weights, second_type, attn_norms, ffn_norms, x, positions, slots, cos, sin, neox, k_cache,
                           v_cache, n_heads, eps, n_workers):
    counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out = \
        shared_buffers(weights, x, positions, k_cache, n_heads, attn_norms.shape[0])
    for _ in prange(n_workers):  # (the shared arrays go into the parallel region one by one, then as a tuple)
        shared = (counters, q, k, v, attended, gate, up, q_rotated, k_rotated, part_max, part_sum, part_out)
        worker_program(kernels_avx2.rows_Q5_K, kernels_avx2.rows_Q6_K, second_type, weights, attn_norms, ffn_norms,
                       x, positions, slots, cos, sin, neox, k_cache, v_cache, n_heads, eps, n_workers, shared)


LAYER_ENTRIES = {
    ('Q4_0',): llama_layers_Q4_0,
    ('Q4_1',): llama_layers_Q4_1,
    ('Q5_0',): llama_layers_Q5_0,
    ('Q5_1',): llama_layers_Q5_1,
    ('Q8_0',): llama_layers_Q8_0,
    ('Q2_K',): llama_layers_Q2_K,
    ('Q3_K',): llama_layers_Q3_K,
    ('Q4_K',): llama_layers_Q4_K,
    ('Q5_K',): llama_layers_Q5_K,
    ('Q6_K',): llama_layers_Q6_K,
    ('Q4_K', 'Q6_K'): llama_layers_Q4_K_Q6_K,
    ('Q5_K', 'Q6_K'): llama_layers_Q5_K_Q6_K,
}


# --------------------------------------------------------------------------- from Python

class LlamaLayersStep:
    """The layer loop of ``LlamaModel.forward`` for batches of up to MAX_TOKENS tokens, as one launch.

    ``for_model`` returns None where it does not apply: kernels other than AVX2, or layer
    matrices of a type, or a mix of types, without an entry in LAYER_ENTRIES (F32, F16, BF16).
    """

    max_tokens = MAX_TOKENS

    def __init__(self, model, entry, weights, second_type):
        self.config = model.config
        self.entry = entry                                                       # llama_layers_<types>
        self.weights = weights                                                   # typed list, 7 a layer
        self.second_type = second_type                                           # (7 * n_layers,) bool
        self.attn_norms = np.stack([layer.attn_norm for layer in model.layers])  # (n_layers, dim)
        self.ffn_norms = np.stack([layer.ffn_norm for layer in model.layers])    # (n_layers, dim)

    @classmethod
    def for_model(cls, model) -> "LlamaLayersStep | None":
        from numba import typed, types

        from ..arch.spec import BlockSpec
        from ..quants import kernels
        c = model.config
        if kernels.KERNELS != "avx2" or c.block != BlockSpec() or c.layer_windows or c.layer_rope_theta:
            return None  # the plain Llama block only (other blocks take the per-op path)
        matrices = [w for layer in model.layers for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate,
                                                          layer.w_up, layer.w_down)]
        layer_types = tuple(sorted({w.ggml_type for w in matrices}))
        if layer_types not in LAYER_ENTRIES:
            return None
        weights = typed.List.empty_list(types.Array(types.uint8, 2, "C", readonly=True))
        for w in matrices:
            weights.append(kernels._kernel_view(w))
        second_type = np.array([len(layer_types) == 2 and w.ggml_type == layer_types[1] for w in matrices])
        return cls(model, LAYER_ENTRIES[layer_types], weights, second_type)

    def run(self, x: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache) -> None:
        """Every layer on x (n, dim) float32 C-contiguous, in place (the residual stream); positions,
        slots (n,) int64; K/V written into ``cache``."""
        c = self.config
        if not (x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable and x.shape[1:] == (c.dim,)):
            raise ValueError(f"LlamaLayersStep.run: x must be a writeable C-contiguous float32 (n, {c.dim}) array")
        if len(cache.groups) != 1:
            raise ValueError("LlamaLayersStep.run: the cache must hold every layer in one array (no rings)")
        _, k_cache, v_cache = cache.groups[0]
        n_slots, n_ctx = k_cache.shape[1], k_cache.shape[3]
        if _check_indices(slots, positions, n_slots, n_ctx, 0) != _OK:
            ref.check_cache_indices("attend", slots, positions, n_slots, n_ctx)
        if c.rope_style not in ("norm", "neox"):
            raise ValueError(f"unknown rope style '{c.rope_style}'")
        cos, sin = _rope_table(positions, c.rope_theta, c.n_rot)
        if k_cache.dtype == np.float16:
            k_cache, v_cache = k_cache.view(np.uint16), v_cache.view(np.uint16)
        self.entry(self.weights, self.second_type, self.attn_norms, self.ffn_norms, x, positions, slots, cos, sin,
                   c.rope_style == "neox", k_cache, v_cache, c.n_heads, np.float32(c.norm_eps),
                   numba.get_num_threads())
