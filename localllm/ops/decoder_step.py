"""The layers of the decoder forward pass (and its output head) as one parallel launch.

Through the per-op path (``DecoderModel._layers``), decoding one token takes
five to nine parallel launches a layer, each paying the omp fork/join plus the
Python calls around it (about 12 us): 1.5-2 ms of an 8-10 ms step for a 135M
model. Here all layers are one launch. Every worker runs the same program of
phases, layer by layer; which phases run is the architecture's BlockSpec
(``arch/spec.py``), passed in as flags, so one program serves every registered
decoder::

    Q/K/V       rms_norm(x) @ [wq, wk, wv]        (each worker quantizes the activations itself; from 16
                                                   tokens on, the workers do it together, a token an item)
    rope        per token: [q/k/v bias, q/k head norms, query scale], RoPE on q and k, k and v into the cache
    chunks      attention over 128-key chunks (the layer's window and ring, [score soft-cap]), one
                (token, KV head, chunk) an item; from 8 (token, KV head) pairs on, a pair an item
    merge       the chunks merged in order, one (token, KV head) an item (fewer than 8 pairs only)
    wo          x += attended @ wo   or, with post_attn_norm, o = attended @ wo
    post-attn   per token: x += rms_norm(o)                              (post_attn_norm only)
    gate/up     rms_norm(x) @ [w_gate, w_up]
    down        x += act(gate) * up @ w_down   or, with post_ffn_norm, o = ... @ w_down
    post-ffn    per token: x += rms_norm(o)                              (post_ffn_norm only)

and after the last layer, when the batch wants logits and the output matrix's type has a slot::

    head        logits = rms_norm(x[rows]) @ output     (the per-op path's ``rms_norm`` then ``matmul``)

A phase's work items are claimed from an atomic counter; a worker goes on to
the next phase once every item of this one is done (a second counter). The
matmul phases claim runs of items (``claim_run``: a share of what is left,
long and contiguous first) and count what a worker did once: per item, the two
workers' atomic updates of one cache line cost SmolLM2 about an eighth of its
decode time. No
worker waits for another worker to arrive, only for claimed items to finish,
so the program is right with any number of workers actually running (one
worker does everything if it is alone). The arithmetic is the per-op path's,
function for function (row tasks of ``quants.kernels_avx2``, ``_rms_norm_row``,
``_rope_write_row``, ``attend_chunk_item``, ``merge_pair``, ``attend_pair``): results are bit for
bit those of the per-op layer loop, its reference (``tests/test_decoder_step.py``). Batches of
up to 128 tokens (prefill pieces too) take this launch; the per-op path stays for what it cannot
take (images, float weights, CPUs without AVX2).

Weight types: a model's layer matrices and its output matrix use up to four ggml
types (Gemma 3's Q4_K_M file: Q5_0, Q8_0, Q4_K and Q6_K); each matrix names the row ranges of its
type by a slot number, and the row ranges are first-class functions
(``quants.kernels_avx2.row_function``): numba compiles the program once for every
model, and only the row ranges of the types a model has. The workers are
started by ``run_workers``, which calls ``worker_program`` through a function
pointer too: the parallel launch compiles to a few lines instead of a copy of
the whole program (numba links the code a function calls into its own and
optimizes it again, once per parallel wrapper), and so does ``worker_program``
with its phases. Each of these compiled forms has explicit types and a name
(``compile_unit``), so that a fresh install can compile them in two processes at once
(``localllm.parallel_compile``): for SmolLM2 on two cores, a first answer 10 s after an empty kernel cache
instead of 35 s (``benchmarks/bench_compile.py``).
"""
from __future__ import annotations

import threading
import time
from functools import lru_cache

import numba
import numpy as np
from numba import njit, prange, types
from numba.typed import List
from numba.core.types.function_type import CompileResultWAP

from ..quants.intrinsics import atomic_add, atomic_load, borrowed, cycles, spin_pause
from ..quants.decoders_avx2 import prefetch_ahead
from ..quants.kernels_avx2 import ROWS_RANGE_SIGNATURE, row_function, scratch_rows
from ..quants.portable import (GATED_PROLOGUES, NO_PROLOGUE, RMS_NORM, prepare_activations_row,
                               prepare_activations_serial)
from . import ref
from .attention_kernels import (_OK, KEY_CHUNK, SPLIT_BELOW_PAIRS, _check_indices, _rope_write_row, attend_chunk_item,
                                attend_pair, merge_pair)
from .kernels import _rms_norm_row, _rope_table

ROWS_PER_TASK = 8        # kernels_avx2.ROWS_PER_TASK (rows of one row task)
MATRICES_PER_LAYER = 7   # wq, wk, wv, wo, w_gate, w_up, w_down: their order in ``weights``
PHASES_PER_LAYER = 9     # Q/K/V, rope, chunks, merge, wo, post-attn, gate/up, down, post-ffn
MAX_TYPE_SLOTS = 4       # ggml types among a model's layer matrices (and its output matrix)
ITEMS_PER_WORKER = 12    # work items a matmul phase is cut into, per worker (fewer for small matrices) ...
ITEM_BYTES = 1 << 19     # ... or more, of at most this many bytes of weights a token each
MIN_TASKS_PER_ITEM = 4   # ... but at least this many row tasks of ROWS_PER_TASK rows each
FIRST_ROWS_AHEAD = 8     # rows of its first run a worker fetches before preparing a matmul phase's activations
SHARED_PREPARE_TOKENS = 16  # from this many tokens on, a matmul phase's activations are prepared by all workers
MAX_TOKENS = 128         # DecoderModel.max_batch_tokens: decode, batched decode and prefill pieces alike

# the time each worker spends in each kind of phase (time-stamp counter cycles, a row of TIMING_SLOTS per worker;
# a matmul phase's time includes its activations' preparation and its wait for the other workers)
QKV_TIME, ROPE_TIME, ATTENTION_TIME, OUTPUT_TIME, GATE_UP_TIME, DOWN_TIME, POST_NORM_TIME, HEAD_TIME, WORKER_TIME = \
    range(9)
TIMING_SLOTS = 16        # a worker's row: 128 bytes, its own cache lines
PHASE_TIME_NAMES = ("qkv_matmul", "rope", "attention", "output_matmul", "gate_up_matmul", "down_matmul",
                    "post_norms", "head_matmul", "worker_total")

# flags (an int64 array) describing the block: what the BlockSpec says, as numbers the program reads
QK_NORM, POST_ATTN_NORM, POST_FFN_NORM, GATE_PROLOGUE, QUERY_SCALED, QKV_BIAS, N_FLAGS = 0, 1, 2, 3, 4, 5, 6


# --------------------------------------------------------------------------- phases

@njit(inline="always")
def claim(counters, phase, n_items):
    """The next unclaimed item of ``phase``, or -1 when all are taken."""
    item = atomic_add(counters, 2 * phase, 1)
    return item if item < n_items else -1


@njit(inline="always")
def finish(counters, phase):
    atomic_add(counters, 2 * phase + 1, 1)


@njit(inline="always")
def claim_run(counters, phase, n_items, n_workers):
    """The next run of unclaimed items of ``phase``: (first, stop), or (-1, -1) when all are taken. Guided: a run
    is a share of what is left (1 / n_workers), so a worker's first runs are long and contiguous (its rows
    stream through the prefetchers as one range) and the last ones single items (the workers finish together),
    with a few claims a phase instead of one an item. Every run starts cold (its first rows are not fetched
    ahead): with two workers and a share of 1 / (2 n_workers), a decode token made 1,400 row calls and spent
    10% more in the row kernels than with 1 / n_workers (600 calls)."""
    size = max(1, (n_items - atomic_load(counters, 2 * phase)) // n_workers)
    first = atomic_add(counters, 2 * phase, size)
    if first >= n_items:
        return -1, -1
    return first, min(first + size, n_items)


@njit(inline="always")
def finish_many(counters, phase, count):
    """``count`` items of ``phase`` done (one update for all the items a worker did)."""
    if count > 0:
        atomic_add(counters, 2 * phase + 1, count)


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


@njit(cache=True)
def matmul_phase(rows, type_slots, counters, phase, n_workers, weights, first, count, outs, x, prologue, norm_weight,
                 eps, up, accumulate, scratch, shared_scratch):
    """outs[m] (+)= prologue(x) @ weights[first + m].T for m < count <= 3 (outs: a 3-tuple, the entries past
    count unused), rows claimed in items; a matrix's rows go through the row ranges of its type (rows[slot],
    as ``type_slots`` says). One signature for every call: the four matmul phases share one compiled form.

    The quantized activations: for a few tokens, each worker that takes items makes its own (in ``scratch``:
    no wait); from SHARED_PREPARE_TOKENS tokens on, the workers make them together, a token an item, into
    ``shared_scratch`` (its own counter, after the phases' ones), then take items. Same functions, same bits."""
    n, cols = x.shape
    w0, w1, w2 = weights[first], weights[first + min(1, count - 1)], weights[first + min(2, count - 1)]
    slot0, slot1 = type_slots[first], type_slots[first + min(1, count - 1)]
    slot2 = type_slots[first + min(2, count - 1)]
    tasks0 = _task_count(w0.shape[0])
    tasks1 = _task_count(w1.shape[0]) if count > 1 else 0
    tasks2 = _task_count(w2.shape[0]) if count > 2 else 0
    n_tasks = tasks0 + tasks1 + tasks2
    # items of at most ITEM_BYTES of weights per token: the last item is done by one worker while the others
    # wait (Gemma 3's 180 MB output head came in 7.5 MB items; a 128-token prefill piece's gate/up matrices in
    # items of 120 us)
    phase_bytes = ROWS_PER_TASK * (tasks0 * w0.shape[1] + tasks1 * w1.shape[1] + tasks2 * w2.shape[1])
    n_items = max(1, min(n_tasks // MIN_TASKS_PER_ITEM,
                         max(ITEMS_PER_WORKER * n_workers, phase_bytes * n // ITEM_BYTES)))
    together = n >= SHARED_PREPARE_TOKENS
    scratch_h, scratch_q, scratch_d, scratch_sums, scratch_d_t, scratch_sums_t, _ = shared_scratch if together \
        else scratch
    # views of the scratch buffers, borrowed (``intrinsics.borrowed``: the buffers outlive this phase), so that
    # handing them to a row range per item costs no reference counting
    offset_table = borrowed(scratch[6])
    n_halves = cols // 16
    h = borrowed(_as_matrix(scratch_h, n, cols))                  # (n, cols) the prologue's output
    xq = borrowed(_as_matrix(scratch_q, n, cols))                 # (n, cols) int8
    xd = borrowed(_as_matrix(scratch_d, n, n_halves))             # (n, cols / 16)
    xsums = borrowed(_as_matrix(scratch_sums, n, n_halves))        # (n, cols / 16)
    xd_by_block = borrowed(_as_matrix(scratch_d_t, n_halves, n))  # (cols / 16, n)
    xsums_by_block = borrowed(_as_matrix(scratch_sums_t, n_halves, n))
    out0, out1, out2 = borrowed(outs[0]), borrowed(outs[1]), borrowed(outs[2])
    if together:
        prepare = phase + counters.shape[0] // 4
        j = claim(counters, prepare, n)
        while j >= 0:
            prepare_activations_row(x, prologue, norm_weight, eps, up, h, xq, xd, xsums, xd_by_block, xsums_by_block,
                                    j)
            finish(counters, prepare)
            j = claim(counters, prepare, n)
        wait_for_phase(counters, prepare, n)
    first, stop = claim_run(counters, phase, n_items, n_workers)
    if first >= 0:
        # the run's first rows are fetched while the activations are prepared (a run starts cold: the row
        # kernels fetch each task's successor, not their first task)
        m, r = _task_location(tasks0, tasks1, first * n_tasks // n_items)
        w = w0 if m == 0 else (w1 if m == 1 else w2)
        prefetch_ahead(w, r * w.shape[1], min(FIRST_ROWS_AHEAD, w.shape[0] - r) * w.shape[1])
        if not together:  # this worker quantizes the activations itself
            prepare_activations_serial(x, prologue, norm_weight, eps, up, h, xq, xd, xsums, xd_by_block,
                                       xsums_by_block)
        done = 0
        while first >= 0:
            t, t_stop = first * n_tasks // n_items, stop * n_tasks // n_items
            while t < t_stop:  # the run's tasks in each matrix: one call
                m, r = _task_location(tasks0, tasks1, t)
                if m == 0:
                    w, slot, tasks_before, o = w0, slot0, 0, out0
                elif m == 1:
                    w, slot, tasks_before, o = w1, slot1, tasks0, out1
                else:
                    w, slot, tasks_before, o = w2, slot2, tasks0 + tasks1, out2
                tasks_here = min(t_stop, tasks_before + _task_count(w.shape[0])) - t
                rows[slot](w, r, min(r + tasks_here * ROWS_PER_TASK, w.shape[0]), xq, xd, xsums, xd_by_block,
                           xsums_by_block, o, offset_table, accumulate)
                t += tasks_here
            done += stop - first
            first, stop = claim_run(counters, phase, n_items, n_workers)
        finish_many(counters, phase, done)
    wait_for_phase(counters, phase, n_items)


@njit(cache=True)
def rope_phase(counters, phase, n_workers, q, k, v, positions, slots, cos, sin, neox, k_cache, v_cache, q_rotated,
               k_rotated, q_norm, k_norm, qkv_bias, eps, flags, query_scale):
    """Per token: [q/k/v bias, RMSNorm over each head of q and k, the query scale], RoPE on q and k, k and v into
    the cache. qkv_bias (q_dim + 2 kv_dim,): the biases of q, k and v one after the other. Tokens are claimed
    in runs (``claim_run``): a token's work is a fraction of a microsecond, about what a contended claim costs."""
    n, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    q_heads, k_heads = q.reshape((n * n_heads, head_dim)), k.reshape((n * n_kv_heads, head_dim))
    v_heads = v.reshape((n * n_kv_heads, head_dim))
    done = 0
    first, stop = claim_run(counters, phase, n, n_workers)
    while first >= 0:
        for item in range(first, stop):
            if flags[QKV_BIAS]:  # the same float32 adds as ``q + q_bias``
                for j in range(q_dim):
                    q_heads[item * n_heads + j // head_dim, j % head_dim] += qkv_bias[j]
                for j in range(kv_dim):
                    k_heads[item * n_kv_heads + j // head_dim, j % head_dim] += qkv_bias[q_dim + j]
                    v_heads[item * n_kv_heads + j // head_dim, j % head_dim] += qkv_bias[q_dim + kv_dim + j]
            if flags[QK_NORM]:  # in place: _rms_norm_row reads a row's sum of squares before writing it
                for h in range(item * n_heads, (item + 1) * n_heads):
                    _rms_norm_row(q_heads, q_norm, eps, q_heads, h)
                for h in range(item * n_kv_heads, (item + 1) * n_kv_heads):
                    _rms_norm_row(k_heads, k_norm, eps, k_heads, h)
            if flags[QUERY_SCALED]:
                for h in range(n_heads):
                    for d in range(head_dim):
                        q[item, h, d] = q[item, h, d] * query_scale
            _rope_write_row(q, k, v, cos, sin, neox, slots, positions, k_cache, v_cache, q_rotated, k_rotated, item)
        done += stop - first
        first, stop = claim_run(counters, phase, n, n_workers)
    finish_many(counters, phase, done)
    wait_for_phase(counters, phase, n)


@njit(cache=True)
def attention_phases(counters, phase, n_workers, q_rotated, positions, slots, window, softcap, k_cache, v_cache,
                     part_max, part_sum, part_out, attended, scores, run_max, run_sum, run_out):
    """Attention by key chunk (phase), the chunks merged (phase + 1); or, from SPLIT_BELOW_PAIRS (token, KV head)
    pairs on, a pair an item, its chunks merged as they come (phase; the per-op path's choice, the same bits).
    Items are claimed in runs (``claim_run``)."""
    n = q_rotated.shape[0]
    n_kv_heads = k_cache.shape[1]
    if n * n_kv_heads >= SPLIT_BELOW_PAIRS:
        group, head_dim = run_out.shape
        chunk_max, chunk_sum = np.empty(group, dtype=np.float32), np.empty(group, dtype=np.float32)
        chunk_out = np.empty((group, head_dim), dtype=np.float32)
        scale = np.float32(1.0) / np.sqrt(np.float32(head_dim))
        n_items = n * n_kv_heads
        done = 0
        first, stop = claim_run(counters, phase, n_items, n_workers)
        while first >= 0:
            for item in range(first, stop):
                attend_pair(q_rotated, k_cache, v_cache, slots, positions, window, softcap, item // n_kv_heads,
                            item % n_kv_heads, scale, scores, chunk_max, chunk_sum, chunk_out, run_max, run_sum,
                            run_out, attended)
            done += stop - first
            first, stop = claim_run(counters, phase, n_items, n_workers)
        finish_many(counters, phase, done)
        wait_for_phase(counters, phase, n_items)
        return
    n_items = n * n_kv_heads * part_max.shape[2]
    item = claim(counters, phase, n_items)
    while item >= 0:
        attend_chunk_item(q_rotated, k_cache, v_cache, slots, positions, window, softcap, item, scores, part_max,
                          part_sum, part_out)
        finish(counters, phase)
        item = claim(counters, phase, n_items)
    wait_for_phase(counters, phase, n_items)

    item = claim(counters, phase + 1, n * n_kv_heads)
    while item >= 0:
        merge_pair(part_max, part_sum, part_out, positions, window, attended, item // n_kv_heads, item % n_kv_heads,
                   run_max, run_sum, run_out)
        finish(counters, phase + 1)
        item = claim(counters, phase + 1, n * n_kv_heads)
    wait_for_phase(counters, phase + 1, n * n_kv_heads)


@njit(cache=True)
def post_norm_phase(counters, phase, n_workers, x, out, norm_weight, eps, normed):
    """Per token: x += rms_norm(out) (the same float32 add as numpy's ``x + rms_norm(out)``); tokens claimed in
    runs."""
    n, dim = x.shape
    done = 0
    first, stop = claim_run(counters, phase, n, n_workers)
    while first >= 0:
        for item in range(first, stop):
            _rms_norm_row(out, norm_weight, eps, normed, item)
            for d in range(dim):
                x[item, d] = x[item, d] + normed[item, d]
        done += stop - first
        first, stop = claim_run(counters, phase, n, n_workers)
    finish_many(counters, phase, done)
    wait_for_phase(counters, phase, n)


@njit(inline="always")
def lap(timings, slot, since):
    """timings[slot] += the cycles since ``since``; returns now (the start of the next lap)."""
    now = cycles()
    timings[slot] += now - since
    return now


@njit(cache=True)
def read_cycles():
    return cycles()


@lru_cache(maxsize=1)
def cycles_per_second() -> float:
    """The time-stamp counter's rate, measured once (against ``time.perf_counter`` over 50 ms)."""
    read_cycles()
    start, started = read_cycles(), time.perf_counter()
    time.sleep(0.05)
    return (read_cycles() - start) / (time.perf_counter() - started)


# --------------------------------------------------------------------------- the pass

@njit(cache=True)
def worker_program(rows, phases, args):
    """One worker's run through every phase of every layer (x updated in place). rows: the row ranges of the
    type slots; phases: matmul_phase, rope_phase, attention_phases and post_norm_phase as first-class functions
    (each compiled on its own: a fresh install compiles them in two processes, and this program's own compile
    does not take a copy of theirs); args: what ``DecoderLayersStep.run`` hands every worker (the model's arrays,
    the batch, the caches, the buffers the workers share: one flat tuple, as numba's parallel launch passes tuples
    only one level deep)."""
    type_slots, weights, norms, head_norms, qkv_bias, flags, layer_windows, layer_cache, layer_rope, x, positions, \
        slots, cos, sin, neox, k_full, v_full, k_ring, v_ring, n_heads, eps, query_scale, softcap, n_workers, \
        head_rows, output_norm, logits, counters, q, k, v, attended, gate, up, out, normed, q_rotated, k_rotated, \
        part_max, part_sum, part_out, shared_h, shared_q, shared_d, shared_sums, shared_d_t, shared_sums_t, \
        timings = args
    # the arrays every worker shares, borrowed (no reference counts: both workers would update the same ones, an
    # atomic cache-line transfer per update; the caller, ``run``, holds them until the launch returns)
    type_slots, norms, head_norms, qkv_bias, flags = borrowed(type_slots), borrowed(norms), borrowed(head_norms), \
        borrowed(qkv_bias), borrowed(flags)
    layer_windows, layer_cache, layer_rope, x = borrowed(layer_windows), borrowed(layer_cache), \
        borrowed(layer_rope), borrowed(x)
    positions, slots, cos, sin = borrowed(positions), borrowed(slots), borrowed(cos), borrowed(sin)
    k_full, v_full, k_ring, v_ring = borrowed(k_full), borrowed(v_full), borrowed(k_ring), borrowed(v_ring)
    head_rows, output_norm, logits, counters = borrowed(head_rows), borrowed(output_norm), borrowed(logits), \
        borrowed(counters)
    q, k, v, attended, gate, up = borrowed(q), borrowed(k), borrowed(v), borrowed(attended), borrowed(gate), \
        borrowed(up)
    out, normed, q_rotated, k_rotated = borrowed(out), borrowed(normed), borrowed(q_rotated), borrowed(k_rotated)
    part_max, part_sum, part_out = borrowed(part_max), borrowed(part_sum), borrowed(part_out)
    shared_h, shared_q, shared_d, shared_sums = borrowed(shared_h), borrowed(shared_q), borrowed(shared_d), \
        borrowed(shared_sums)
    shared_d_t, shared_sums_t = borrowed(shared_d_t), borrowed(shared_sums_t)
    timings = borrowed(timings)
    started = cycles()
    # this worker's row of the timings: a ticket (the launch runs n_workers workers)
    row = min(atomic_add(timings, n_workers * TIMING_SLOTS, 1), n_workers - 1) * TIMING_SLOTS
    matmul, rope, attention, post_norm = phases
    n, dim = x.shape
    n_kv_heads, head_dim = k_full.shape[2], k_full.shape[4]
    group = n_heads // n_kv_heads
    widest = max(dim, q.shape[1], gate.shape[1])
    # this worker's scratch: the activations of a matmul phase and attention's partial results
    scratch = (np.empty(n * widest, dtype=np.float32),        # prologue output
               np.empty(n * widest, dtype=np.int8),           # quantized activations
               np.empty(n * widest // 16, dtype=np.float32),  # their scales per 16
               np.empty(n * widest // 16, dtype=np.float32),  # scaled sums (half, block; portable._quantize_row)
               np.empty(n * widest // 16, dtype=np.float32),  # the same two by block
               np.empty(n * widest // 16, dtype=np.float32),
               # the row tasks' offset table and interleaved weight strip (kernels_avx2.scratch_rows)
               np.empty((scratch_rows(n, widest), 8), dtype=np.float32))
    shared_scratch = (shared_h, shared_q, shared_d, shared_sums, shared_d_t, shared_sums_t, scratch[6])
    scores = np.empty((group, KEY_CHUNK), dtype=np.float32)
    run_max = np.empty(group, dtype=np.float32)
    run_sum = np.empty(group, dtype=np.float32)
    run_out = np.empty((group, head_dim), dtype=np.float32)
    no_weight, no_up = np.empty(0, dtype=np.float32), np.empty((0, 0), dtype=np.float32)
    post_attn, post_ffn = flags[POST_ATTN_NORM] != 0, flags[POST_FFN_NORM] != 0
    # the arguments that differ between the matmul phases as run-time values (numba would compile a form of
    # matmul_phase for each constant otherwise)
    rms_norm, no_prologue, gate_prologue = np.int64(RMS_NORM), np.int64(NO_PROLOGUE), flags[GATE_PROLOGUE]
    one, two, three, write = np.int64(1), np.int64(2), np.int64(3), flags[QK_NORM] < 0
    for layer in range(norms.shape[0]):
        phase, first = layer * PHASES_PER_LAYER, layer * MATRICES_PER_LAYER
        attn_norm, post_attn_norm, ffn_norm, post_ffn_norm = norms[layer, 0], norms[layer, 1], norms[layer, 2], \
            norms[layer, 3]
        # the layer's cache: its row in the full group or in the ring group
        if layer_cache[layer, 0] == 0:
            k_cache, v_cache = k_full[layer_cache[layer, 1]], v_full[layer_cache[layer, 1]]
        else:
            k_cache, v_cache = k_ring[layer_cache[layer, 1]], v_ring[layer_cache[layer, 1]]
        # attention block
        t = cycles()
        matmul(rows, type_slots, counters, phase, n_workers, weights, first, three, (q, k, v), x,
                     rms_norm, attn_norm, eps, no_up, write, scratch, shared_scratch)
        t = lap(timings, row + QKV_TIME, t)
        rope(counters, phase + 1, n_workers, q.reshape((n, n_heads, head_dim)), k.reshape((n, n_kv_heads, head_dim)),
                   v.reshape((n, n_kv_heads, head_dim)), positions, slots, cos[layer_rope[layer]],
                   sin[layer_rope[layer]], neox, k_cache, v_cache, q_rotated, k_rotated, head_norms[layer, 0],
                   head_norms[layer, 1], qkv_bias[layer], eps, flags, query_scale)
        t = lap(timings, row + ROPE_TIME, t)
        attention(counters, phase + 2, n_workers, q_rotated, positions, slots, layer_windows[layer], softcap, k_cache,
                         v_cache, part_max, part_sum, part_out, attended.reshape((n, n_heads, head_dim)), scores,
                         run_max, run_sum, run_out)
        t = lap(timings, row + ATTENTION_TIME, t)
        # without a post-norm the product is added into x as it is written, else it goes through ``out``
        o = out if post_attn else x
        matmul(rows, type_slots, counters, phase + 4, n_workers, weights, first + 3, one, (o, o, o), attended,
                     no_prologue, no_weight, eps, no_up, not post_attn, scratch, shared_scratch)
        t = lap(timings, row + OUTPUT_TIME, t)
        if post_attn:
            post_norm(counters, phase + 5, n_workers, x, out, post_attn_norm, eps, normed)
            t = lap(timings, row + POST_NORM_TIME, t)
        # feed-forward block
        matmul(rows, type_slots, counters, phase + 6, n_workers, weights, first + 4, two, (gate, up, up), x,
                     rms_norm, ffn_norm, eps, no_up, write, scratch, shared_scratch)
        t = lap(timings, row + GATE_UP_TIME, t)
        o = out if post_ffn else x
        matmul(rows, type_slots, counters, phase + 7, n_workers, weights, first + 6, one, (o, o, o), gate,
                     gate_prologue, no_weight, eps, up, not post_ffn, scratch, shared_scratch)
        t = lap(timings, row + DOWN_TIME, t)
        if post_ffn:
            post_norm(counters, phase + 8, n_workers, x, out, post_ffn_norm, eps, normed)
            t = lap(timings, row + POST_NORM_TIME, t)
    # the output head (x is final: every worker has passed the last phase's wait)
    if head_rows.shape[0] > 0:
        t = cycles()
        x_head = np.empty((head_rows.shape[0], dim), dtype=np.float32)   # this worker's copy of the rows wanted
        for i in range(head_rows.shape[0]):
            for d in range(dim):
                x_head[i, d] = x[head_rows[i], d]
        matmul(rows, type_slots, counters, norms.shape[0] * PHASES_PER_LAYER, n_workers, weights,
                     norms.shape[0] * MATRICES_PER_LAYER, one, (logits, logits, logits), x_head, rms_norm,
                     output_norm, eps, no_up, write, scratch, shared_scratch)
        lap(timings, row + HEAD_TIME, t)
    lap(timings, row + WORKER_TIME, started)


@njit(parallel=True, cache=True)
def run_workers(worker, rows, phases, args, n_workers):
    """The parallel launch: ``worker(rows, phases, args)`` on n_workers threads (worker: ``worker_program`` as a
    first-class function, so that this launch does not take a copy of its code)."""
    for _ in prange(n_workers):
        worker(rows, phases, args)


@njit(cache=True)
def _weight_list(first):
    """A numba typed List holding ``first`` (built by cached kernels: numba's own List methods compile anew in
    every process), borrowed (``intrinsics.borrowed``: the step keeps the arrays, ``_views``)."""
    weights = List()
    weights.append(borrowed(first))
    return weights


@njit(cache=True)
def _append_weight(weights, w):
    weights.append(borrowed(w))


# --------------------------------------------------------------------------- the compiled forms, named

# The numba types of what ``run`` hands the workers: explicit, so that every kernel of the launch can be compiled
# (by this process or a helper, ``parallel_compile``) before a batch exists. A cache of float16 is passed as its
# uint16 bits ("f16"), a float32 one as it is ("f32"). tests/test_decoder_step.py checks them against a real run.
WEIGHT = types.Array(types.uint8, 2, "C", readonly=True)
ROWS = types.UniTuple(types.FunctionType(ROWS_RANGE_SIGNATURE), MAX_TYPE_SLOTS)
CACHE_KINDS = {"f16": types.uint16, "f32": types.float32}


def _f32(ndim: int) -> types.Array:
    return types.Array(types.float32, ndim, "C")


def _i64(ndim: int) -> types.Array:
    return types.Array(types.int64, ndim, "C")


def argument_types(cache_kind: str) -> types.Tuple:
    """The type of ``run``'s worker arguments (the tuple ``worker_program`` unpacks) for a cache of that kind."""
    cache = types.Array(CACHE_KINDS[cache_kind], 5, "C")
    return types.Tuple((
        _i64(1), types.ListType(WEIGHT), _f32(3), _f32(3), _f32(2), _i64(1),   # type_slots .. flags
        _i64(1), _i64(2), _i64(1), _f32(2), _i64(1), _i64(1),                  # layer_windows .. slots
        _f32(3), _f32(3), types.boolean, cache, cache, cache, cache,            # cos, sin, neox, caches
        types.int64, types.float32, types.float32, types.float32, types.int64,  # n_heads .. n_workers
        _i64(1), _f32(1), _f32(2),                                              # head_rows, output_norm, logits
        _i64(1), *(_f32(2),) * 8, _f32(3), _f32(3), _f32(4), _f32(4), _f32(5),  # shared_buffers
        _f32(1), types.Array(types.int8, 1, "C"), _f32(1), _f32(1), _f32(1), _f32(1), _i64(1)))


SCRATCH = types.Tuple((_f32(1), types.Array(types.int8, 1, "C"), _f32(1), _f32(1), _f32(1), _f32(1), _f32(2)))


def phase_types(cache_kind: str) -> dict:
    """The argument types of each phase function, as ``worker_program`` calls them."""
    cache = types.Array(CACHE_KINDS[cache_kind], 4, "C")
    i64, f32 = types.int64, types.float32
    return {
        "matmul_phase": (ROWS, _i64(1), _i64(1), i64, i64, types.ListType(WEIGHT), i64, i64,
                         types.UniTuple(_f32(2), 3), _f32(2), i64, _f32(1), f32, _f32(2), types.boolean, SCRATCH,
                         SCRATCH),
        "rope_phase": (_i64(1), i64, i64, _f32(3), _f32(3), _f32(3), _i64(1), _i64(1), _f32(2), _f32(2), types.boolean,
                       cache, cache, _f32(3), _f32(3), _f32(1), _f32(1), _f32(1), f32, _i64(1), f32),
        "attention_phases": (_i64(1), i64, i64, _f32(3), _i64(1), _i64(1), i64, f32, cache, cache, _f32(4), _f32(4),
                             _f32(5), _f32(3), _f32(2), _f32(1), _f32(1), _f32(2)),
        "post_norm_phase": (_i64(1), i64, i64, _f32(2), _f32(2), _f32(1), f32, _f32(2)),
    }


PHASE_FUNCTIONS = {"matmul_phase": matmul_phase, "rope_phase": rope_phase, "attention_phases": attention_phases,
                   "post_norm_phase": post_norm_phase}
PHASES_NEEDING_CACHE_KIND = ("rope_phase", "attention_phases")


def phases_type(cache_kind: str) -> types.Tuple:
    return types.Tuple(tuple(types.FunctionType(types.none(*arguments))
                             for arguments in phase_types(cache_kind).values()))


def worker_types(cache_kind: str) -> tuple:
    return ROWS, phases_type(cache_kind), argument_types(cache_kind)


def run_workers_types(cache_kind: str) -> tuple:
    worker = types.FunctionType(types.none(*worker_types(cache_kind)))
    return worker, ROWS, phases_type(cache_kind), argument_types(cache_kind), types.int64


EMBEDDING_TYPES = (WEIGHT, _i64(1), _f32(2))
_workers: dict[str, tuple] = {}   # cache kind -> (worker_program and the phases as first-class functions, the entry)


def _first_class(dispatcher, arguments: tuple) -> CompileResultWAP:
    """``dispatcher`` compiled for ``arguments`` (or loaded from the kernel cache) as a first-class function."""
    dispatcher.compile(arguments)
    return CompileResultWAP(dispatcher.overloads[arguments])


def launch_for(cache_kind: str) -> tuple:
    """(worker_program, the phases as first-class functions, the compiled ``run_workers`` entry) for a cache of
    that kind, compiled or loaded from the kernel cache once per process. The entry is called directly (numba's
    dispatch would work out the types of the forty arguments again at every step)."""
    launch = _workers.get(cache_kind)
    if launch is None:
        phases = tuple(_first_class(PHASE_FUNCTIONS[name], arguments)
                       for name, arguments in phase_types(cache_kind).items())
        worker = _first_class(worker_program, worker_types(cache_kind))
        signature = run_workers_types(cache_kind)
        run_workers.compile(signature)
        launch = _workers[cache_kind] = (worker, phases, run_workers.overloads[signature].entry_point)
    return launch


def compile_unit(unit: str) -> None:
    """Compile (or load from the kernel cache) one named form: ``worker_program-<kind>``, ``run_workers-<kind>``,
    ``rows-<type>``, ``embedding-<type>``, ``lists`` or ``checks`` (see ``DecoderLayersStep.units``)."""
    from ..quants import portable
    kind, _, detail = unit.partition("-")
    if kind in PHASE_FUNCTIONS:
        PHASE_FUNCTIONS[kind].compile(phase_types(detail or "f32")[kind])
    elif kind == "worker_program":
        worker_program.compile(worker_types(detail))
    elif kind == "run_workers":
        run_workers.compile(run_workers_types(detail))
    elif kind == "rows":
        row_function(detail)
    elif kind == "embedding":
        portable.EMBEDDINGS[detail].compile(EMBEDDING_TYPES)
    elif kind == "lists":
        _weight_list.compile((WEIGHT,))
        _append_weight.compile((types.ListType(WEIGHT), WEIGHT))
    elif kind == "checks":
        _check_indices.compile((_i64(1), _i64(1), types.int64, types.int64, types.int64))
    else:
        raise ValueError(f"unknown compile unit '{unit}'")


def most_key_chunks(positions: np.ndarray, widest_window: int) -> int:
    """The most key chunks a token of the batch attends to (``attention_kernels.chunk_count``)."""
    if widest_window > 0:
        first = np.maximum(0, positions - widest_window + 1)
        return int((positions // KEY_CHUNK - first // KEY_CHUNK).max()) + 1
    return int(positions.max()) // KEY_CHUNK + 1


def shared_buffers(c, n: int, max_chunks: int, n_workers: int) -> tuple:
    """What the workers share: the phase counters and the intermediate activations of n tokens (model config c),
    and room for every (token, KV head, key chunk)'s attention parts (as ``attention_kernels.chunk_parts``)."""
    group = c.n_heads // c.n_kv_heads
    empty = np.empty
    widest = n * max(c.dim, c.q_dim, c.hidden_dim)
    # counters: two a phase (items claimed, items done), the head's last; then two a phase for shared preparing
    return (np.zeros(4 * (c.n_layers * PHASES_PER_LAYER + 1), dtype=np.int64),
            empty((n, c.q_dim), np.float32), empty((n, c.kv_dim), np.float32),  # q, k
            empty((n, c.kv_dim), np.float32), empty((n, c.q_dim), np.float32),  # v, attended
            empty((n, c.hidden_dim), np.float32), empty((n, c.hidden_dim), np.float32),  # gate, up
            empty((n, c.dim), np.float32), empty((n, c.dim), np.float32),  # out (before a post-norm), normed
            empty((n, c.n_heads, c.head_dim), np.float32),                  # q_rotated
            empty((n, c.n_kv_heads, c.head_dim), np.float32),               # k_rotated
            empty((n, c.n_kv_heads, max_chunks, group), np.float32),        # part_max
            empty((n, c.n_kv_heads, max_chunks, group), np.float32),        # part_sum
            empty((n, c.n_kv_heads, max_chunks, group, c.head_dim), np.float32),  # part_out
            # a matmul phase's activations when the workers prepare them together (see matmul_phase)
            empty(widest, np.float32), empty(widest, np.int8), empty(widest // 16, np.float32),
            empty(widest // 16, np.float32), empty(widest // 16, np.float32), empty(widest // 16, np.float32),
            np.zeros((n_workers + 1) * TIMING_SLOTS, np.int64))                # timings (and the workers' tickets)


# --------------------------------------------------------------------------- from Python

class DecoderLayersStep:
    """The layer loop of ``DecoderModel._layers`` for batches of up to MAX_TOKENS tokens, as one launch, and the
    output head (final norm and logits) when its matrix's type has a slot (``has_head``).

    ``for_model`` returns None where it does not apply: kernels other than AVX2, layer matrices
    of a type without an AVX2 row task (F32, F16, BF16) or of more than MAX_TYPE_SLOTS types, more than
    two cache groups.
    """

    max_tokens = MAX_TOKENS

    def __init__(self, model, types: tuple[str, ...], matrices: list, head=None):
        from ..quants import kernels, kernels_avx2
        c, block = model.config, model.config.block
        self.config = c
        self.types = types
        self.has_head = head is not None
        matrices = matrices + ([head] if head is not None else [])
        self._views = [kernels._kernel_view(w) for w in matrices]
        self.rows = self.weights = None   # compiled kernels and numba lists: made by the first run (``prepare``)
        self._prepared: set[str] = set()  # cache kinds whose compiled forms are loaded
        self.type_slots = np.array([types.index(w.ggml_type) for w in matrices], dtype=np.int64)  # (7 n_layers [+ 1],)
        self.output_norm = np.ascontiguousarray(model.output_norm, dtype=np.float32)                 # (dim,)
        self.vocab_size = head.shape[0] if head is not None else 0
        self.embedding_type = model.token_embd.ggml_type if model.token_embd.ggml_type in kernels_avx2.ROWS_RANGES \
            else None   # its lookup's compiled form is made with the launch's (quantized types only)
        missing = np.zeros(c.dim, dtype=np.float32)

        no_head_norm = np.ones(c.head_dim, dtype=np.float32)

        def given(value, otherwise):
            return otherwise if value is None else value

        self.norms = np.stack([np.stack([layer.attn_norm, given(layer.post_attn_norm, missing), layer.ffn_norm,
                                         given(layer.post_ffn_norm, missing)])
                               for layer in model.layers])                                # (n_layers, 4, dim)
        self.head_norms = np.stack([np.stack([given(layer.q_norm, no_head_norm), given(layer.k_norm, no_head_norm)])
                                    for layer in model.layers])                           # (n_layers, 2, head_dim)
        if block.qkv_bias:
            self.qkv_bias = np.stack([np.concatenate([layer.q_bias, layer.k_bias, layer.v_bias])
                                      for layer in model.layers])                          # (n_layers, q + 2 kv)
        else:
            self.qkv_bias = np.zeros((c.n_layers, 0), dtype=np.float32)
        self.flags = np.zeros(N_FLAGS, dtype=np.int64)
        self.flags[QK_NORM], self.flags[POST_ATTN_NORM] = block.qk_norm, block.post_attn_norm
        self.flags[POST_FFN_NORM], self.flags[GATE_PROLOGUE] = block.post_ffn_norm, GATED_PROLOGUES[block.activation]
        self.flags[QUERY_SCALED] = model.query_scale is not None
        self.flags[QKV_BIAS] = block.qkv_bias
        self.query_scale = np.float32(model.query_scale if model.query_scale is not None else 1.0)
        self.layer_windows = np.array([c.window(i) for i in range(c.n_layers)], dtype=np.int64)
        self.widest_window = 0 if self.layer_windows.min() == 0 else int(self.layer_windows.max())
        self._free_buffers = None         # (tokens, key chunks, workers), the last run's shared buffers; None: in use
        self._buffers_lock = threading.Lock()
        self._timings, self._timed_runs = None, 0   # phase cycles, the workers' average, summed (``start_timing``)
        self.softcap = np.float32(c.attention_softcap)

    @classmethod
    def for_model(cls, model) -> "DecoderLayersStep | None":
        from ..quants import kernels, kernels_avx2
        if kernels.KERNELS != "avx2":
            return None
        matrices = [w for layer in model.layers for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate,
                                                          layer.w_up, layer.w_down)]
        types = tuple(sorted({w.ggml_type for w in matrices}))
        if len(types) > MAX_TYPE_SLOTS or any(t not in kernels_avx2.ROWS_RANGES for t in types):
            return None
        head = model.output
        with_head = tuple(sorted(set(types) | {head.ggml_type}))
        if len(with_head) <= MAX_TYPE_SLOTS and head.ggml_type in kernels_avx2.ROWS_RANGES:
            return cls(model, with_head, matrices, head)
        return cls(model, types, matrices)

    def _layout(self, cache):
        """(layer_cache (n_layers, 2): each layer's group and index in it, k_full, v_full, k_ring, v_ring, the
        RoPE schemes, each layer's scheme (n_layers,), the most tokens one call may add) of a cache, worked out
        once per cache: its groups and context length never change."""
        layout = getattr(cache, "_decoder_step_layout", None)
        if layout is not None:
            return layout
        c = self.config
        if len(cache.groups) > 2:
            raise ValueError("DecoderLayersStep.run: at most two cache groups (full layers and rings)")
        full_layers, k_full, v_full = cache.groups[0]
        ring_layers, k_ring, v_ring = cache.groups[-1]
        layer_cache = np.empty((c.n_layers, 2), dtype=np.int64)                   # (group, index in it)
        for group, layers in ((0, full_layers), (1, ring_layers)):
            for index, layer in enumerate(layers):
                layer_cache[layer] = group, index
        ring_room = cache.n_ctx       # the most new tokens one call may write (every ring holds its window and them)
        for layer in range(c.n_layers):
            rows = cache.rows[layer]
            if rows < cache.n_ctx:
                if rows % KEY_CHUNK or rows <= self.layer_windows[layer]:
                    raise ValueError(f"DecoderLayersStep.run: layer {layer}'s ring of {rows} rows does not suit "
                                     f"its window of {self.layer_windows[layer]}")
                ring_room = min(ring_room, rows - self.layer_windows[layer])
        if k_full.dtype == np.float16:
            k_full, v_full, k_ring, v_ring = (a.view(np.uint16) for a in (k_full, v_full, k_ring, v_ring))
        frequencies = [c.rope(i, cache.n_ctx) for i in range(c.n_layers)]       # RoPE of each layer
        distinct = list(dict.fromkeys(frequencies))                               # the schemes, in first use order
        layer_rope = np.array([distinct.index(f) for f in frequencies], dtype=np.int64)
        cache._decoder_step_layout = layout = (layer_cache, k_full, v_full, k_ring, v_ring, distinct, layer_rope,
                                               ring_room)
        return layout

    def units(self, cache_kind: str) -> list[str]:
        """The compiled forms a forward pass through this step needs (``compile_unit`` names), longest first (as
        measured by benchmarks/bench_compile.py)."""
        k_rows = [f"rows-{t}" for t in self.types if t.endswith("_K")]          # the longest row ranges
        other_rows = [f"rows-{t}" for t in self.types if not t.endswith("_K")]
        return ([f"attention_phases-{cache_kind}", "matmul_phase"] + k_rows
                + [f"run_workers-{cache_kind}", f"rope_phase-{cache_kind}"] + other_rows
                + [f"worker_program-{cache_kind}", "post_norm_phase"]
                + ([f"embedding-{self.embedding_type}"] if self.embedding_type else []) + ["lists", "checks"])

    def prepare(self, cache) -> None:
        """Every compiled form a run with this cache needs (compiled on a fresh install, two processes sharing the
        work, or loaded from the kernel cache; the embedding lookup's too), the row ranges of each type slot and
        the weights as a numba typed list. The first run does it; ``DecoderModel`` calls it before its embedding
        lookup, inside its progress note."""
        cache_kind = "f16" if cache.groups[0][1].dtype == np.float16 else "f32"
        if cache_kind in self._prepared:
            return
        from ..parallel_compile import compile_shared
        compile_shared(self.units(cache_kind), compile_unit)
        launch_for(cache_kind)
        self._prepared.add(cache_kind)
        if self.rows is not None:
            return
        slot_types = list(self.types) + [self.types[0]] * (MAX_TYPE_SLOTS - len(self.types))
        self.rows = tuple(row_function(t) for t in slot_types)
        weights = _weight_list(self._views[0])
        for view in self._views[1:]:
            _append_weight(weights, view)
        self.weights = weights

    def start_timing(self) -> None:
        """From now on, add up the time the workers spend in each kind of phase (``phase_seconds``)."""
        self._timings, self._timed_runs = np.zeros(TIMING_SLOTS), 0

    def phase_seconds(self) -> dict:
        """Since ``start_timing``: {'runs': launches, then per PHASE_TIME_NAMES: seconds a run, the workers'
        average}. A matmul phase's time includes its activations' preparation and its wait for the others;
        ``worker_total`` is the whole program (a run's wall time less it: Python and the launch)."""
        if self._timings is None:
            raise RuntimeError("DecoderLayersStep.phase_seconds: call start_timing first")
        scale = 1.0 / (max(self._timed_runs, 1) * cycles_per_second())
        return {"runs": self._timed_runs,
                **{name: float(self._timings[slot]) * scale for slot, name in enumerate(PHASE_TIME_NAMES)}}

    def stop_timing(self) -> dict:
        """``phase_seconds``, and the accounting off again (runs after it cost no Python for the timings)."""
        seconds = self.phase_seconds()
        self._timings, self._timed_runs = None, 0
        return seconds

    def run(self, x: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache,
            head_rows: np.ndarray | None = None) -> np.ndarray | None:
        """Every layer on x (n, dim) float32 C-contiguous, in place (the residual stream); positions,
        slots (n,) int64; K/V written into ``cache``. With ``has_head`` and head_rows (m,) int64 (rows of x):
        returns their logits (m, vocab_size) before any final soft-cap; else None."""
        c = self.config
        if not (x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable and x.shape[1:] == (c.dim,)):
            raise ValueError(f"DecoderLayersStep.run: x must be a writeable C-contiguous float32 (n, {c.dim}) array")
        positions, slots = np.ascontiguousarray(positions, np.int64), np.ascontiguousarray(slots, np.int64)
        self.prepare(cache)
        layer_cache, k_full, v_full, k_ring, v_ring, distinct, layer_rope, ring_room = self._layout(cache)
        if x.shape[0] > ring_room:
            raise ValueError(f"DecoderLayersStep.run: {x.shape[0]} tokens in one call, but the cache's rings hold "
                             f"their windows and {ring_room} new tokens only (KVCache max_batch_tokens)")
        cache_kind = "f16" if k_full.dtype == np.uint16 else "f32"
        n_slots = cache.n_slots
        if _check_indices(slots, positions, n_slots, cache.n_ctx, 0) != _OK:
            ref.check_cache_indices("attend", slots, positions, n_slots, cache.n_ctx)
        if len(distinct) == 1:
            cos, sin = _rope_table(positions, distinct[0], c.n_rot)
            cos, sin = cos[None], sin[None]                                       # (1, n, n_rot / 2)
        else:
            tables = [_rope_table(positions, f, c.n_rot) for f in distinct]
            cos = np.stack([table[0] for table in tables])                        # (n_schemes, n, n_rot / 2)
            sin = np.stack([table[1] for table in tables])
        if head_rows is None or not self.has_head:
            head_rows = _NO_ROWS
        else:
            head_rows = np.ascontiguousarray(head_rows, dtype=np.int64)
            if head_rows.size and (head_rows.min() < 0 or head_rows.max() >= x.shape[0]):
                raise IndexError(f"DecoderLayersStep.run: head_rows must lie in 0:{x.shape[0]}")
        logits = np.empty((head_rows.shape[0], self.vocab_size), dtype=np.float32)   # (m, vocab_size)
        n_workers = numba.get_num_threads()
        # the shared buffers of the last run's shape are reused (a decode step asks for the same ones each
        # time), unless another thread's run holds them: only their counters must start at zero
        key = (x.shape[0], most_key_chunks(positions, self.widest_window), n_workers)
        with self._buffers_lock:
            free, self._free_buffers = self._free_buffers, None
        if free is not None and free[0] == key:
            buffers = free[1]
            buffers[0].fill(0)
            buffers[-1].fill(0)
        else:
            buffers = shared_buffers(c, *key)
        args = (self.type_slots, self.weights, self.norms, self.head_norms, self.qkv_bias, self.flags,
                self.layer_windows, layer_cache, layer_rope, x, positions, slots, cos, sin, c.rope_style == "neox",
                k_full, v_full, k_ring, v_ring, c.n_heads, np.float32(c.norm_eps), self.query_scale, self.softcap,
                n_workers, head_rows, self.output_norm, logits) + buffers
        worker, phases, launch = launch_for(cache_kind)
        launch(worker, self.rows, phases, args, n_workers)
        if self._timings is not None:
            self._timings += buffers[-1][:n_workers * TIMING_SLOTS].reshape(n_workers, TIMING_SLOTS).mean(axis=0)
            self._timed_runs += 1
        with self._buffers_lock:
            self._free_buffers = (key, buffers)
        return logits if self.has_head and head_rows is not _NO_ROWS else None


_NO_ROWS = np.zeros(0, dtype=np.int64)
