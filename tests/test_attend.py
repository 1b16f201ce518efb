"""The fused ``attend`` (RoPE + cache write + attention) against its numpy reference, float16 and float32 caches.

Oracles: ``ref.attend`` (ref.rope + a numpy cache write + ref.attention);
numpy's own float16 rounding for the cache contents and for ``ops.vector``.
"""
import numpy as np
import pytest
from numba import njit

from localllm.kv_cache import ContextLengthExceeded, KVCache
from localllm.ops import attention_kernels, get_backend, ref
from localllm.ops.attention_kernels import KEY_CHUNK
from localllm.ops.vector import fma8, load1, load8, splat8, store1, store8, sum_lanes8

DTYPES = [np.float16, np.float32]


def _inputs(rng, n, n_heads, n_kv_heads, head_dim):
    q = rng.standard_normal((n, n_heads, head_dim)).astype(np.float32) * 2
    k = rng.standard_normal((n, n_kv_heads, head_dim)).astype(np.float32) * 2
    v = rng.standard_normal((n, n_kv_heads, head_dim)).astype(np.float32)
    return q, k, v


def _caches(rng, n_slots, n_kv_heads, n_ctx, head_dim, dtype):
    shape = (n_slots, n_kv_heads, n_ctx, head_dim)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def _both(q, k, v, positions, slots, k_cache, v_cache, rope_dim, style="norm"):
    """(fast output, fast caches), (reference output, reference caches) from the same starting caches."""
    fast_k, fast_v, ref_k, ref_v = k_cache.copy(), v_cache.copy(), k_cache.copy(), v_cache.copy()
    fast = attention_kernels.attend(q, k, v, positions, slots, fast_k, fast_v, 10000.0, rope_dim, style)
    expected = ref.attend(q, k, v, positions, slots, ref_k, ref_v, 10000.0, rope_dim, style)
    return (fast, fast_k, fast_v), (expected, ref_k, ref_v)


# prefill of one prompt crossing a KEY_CHUNK boundary, decode of several slots, and both mixed
BATCHES = {
    "prefill": ([2] * 40, list(range(KEY_CHUNK - 20, KEY_CHUNK + 20))),
    "decode": ([0, 3, 1, 2], [KEY_CHUNK, 2 * KEY_CHUNK + 5, 0, KEY_CHUNK - 1]),
    "mixed": ([1] * 9 + [0, 3], list(range(KEY_CHUNK - 4, KEY_CHUNK + 5)) + [290, 7]),
    "one": ([3], [2 * KEY_CHUNK]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim, rope_dim, style", [
    (9, 3, 64, 64, "norm"), (4, 4, 20, 20, "neox"), (6, 2, 20, 12, "norm"), (3, 1, 64, 32, "neox")])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_attend_matches_reference(dtype, n_heads, n_kv_heads, head_dim, rope_dim, style, batch):
    rng = np.random.default_rng(head_dim + n_heads)
    slots, positions = (np.array(a, dtype=np.int64) for a in BATCHES[batch])
    q, k, v = _inputs(rng, len(slots), n_heads, n_kv_heads, head_dim)
    k_cache, v_cache = _caches(rng, 4, n_kv_heads, 300, head_dim, dtype)
    (out, fast_k, fast_v), (expected, ref_k, ref_v) = _both(q, k, v, positions, slots, k_cache, v_cache,
                                                            rope_dim, style)
    assert out.dtype == np.float32 and out.shape == (len(slots), n_heads, head_dim)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)
    # the cache holds the rotated keys and the values, rounded like numpy rounds; nothing else changed
    np.testing.assert_array_equal(fast_k, ref_k)
    np.testing.assert_array_equal(fast_v, ref_v)
    assert not np.array_equal(fast_k, k_cache)


@pytest.mark.parametrize("batch", ["prefill", "decode"])
def test_soft_capped_scores_and_scaled_frequencies_match_reference(batch):
    """Gemma 2's soft-capped scores and Llama 3 / LongRoPE frequency factors with a cos/sin scale: numba = numpy,
    and each of them changes the answer (so neither path may ignore it)."""
    rng = np.random.default_rng(7)
    slots, positions = (np.array(a, dtype=np.int64) for a in BATCHES[batch])
    q, k, v = _inputs(rng, len(slots), 4, 2, 32)
    q *= 3  # scores large enough for a cap of 2 to bite
    k_cache, v_cache = _caches(rng, 4, 2, 300, 32, np.float16)
    frequencies = ref.RopeFrequencies(10000.0, tuple(np.linspace(1.0, 8.0, 16)), 1.2)

    def run(attend, theta, softcap):
        k_copy, v_copy = k_cache.copy(), v_cache.copy()
        return attend(q, k, v, positions, slots, k_copy, v_copy, theta, 32, "neox", 0, softcap), k_copy

    for theta, softcap in ((frequencies, 2.0), (frequencies, 0.0), (10000.0, 2.0)):
        (fast, fast_k), (expected, ref_k) = run(attention_kernels.attend, theta, softcap), run(ref.attend, theta,
                                                                                             softcap)
        np.testing.assert_allclose(fast, expected, rtol=1e-5, atol=1e-5)  # tanh: a few ulps apart
        np.testing.assert_array_equal(fast_k, ref_k)
    plain = run(ref.attend, 10000.0, 0.0)
    assert np.abs(run(ref.attend, 10000.0, 2.0)[0] - plain[0]).max() > 1e-2          # the cap bites
    assert np.abs(run(ref.attend, frequencies, 0.0)[1].astype(np.float32) - plain[1]).max() > 1e-2  # keys turn
    # RopeFrequencies(theta) is the plain base, bit for bit
    np.testing.assert_array_equal(run(attention_kernels.attend, ref.RopeFrequencies(10000.0), 0.0)[0],
                                  run(attention_kernels.attend, 10000.0, 0.0)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_attend_equals_rope_write_attention(dtype):
    """Through the backend namespaces: fast attend == fast rope + cache write + fast attention."""
    fast = get_backend("fast")
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 5, 6, 2, 64)
    slots, positions = np.array([0, 0, 0, 1, 1]), np.array([200, 201, 202, 3, 4])
    k_cache, v_cache = _caches(rng, 2, 2, 256, 64, dtype)
    k2, v2 = k_cache.copy(), v_cache.copy()
    fused = fast.attend(q, k, v, positions, slots, k_cache, v_cache, 5e5, 64, "norm")
    k2[slots, :, positions] = fast.rope(k, positions, 5e5, 64, "norm")
    v2[slots, :, positions] = v
    separate = fast.attention(fast.rope(q, positions, 5e5, 64, "norm"), k2, v2, slots, positions)
    np.testing.assert_array_equal(k_cache, k2)
    np.testing.assert_allclose(fused, separate, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attend_results_do_not_depend_on_the_batch(dtype):
    """A token's output is bit-identical whether its prompt came in one call, in chunks, or it decodes alone."""
    rng = np.random.default_rng(5)
    n = 2 * KEY_CHUNK + 30
    q, k, v = _inputs(rng, n, 6, 2, 24)
    positions, slots = np.arange(n), np.zeros(n, dtype=np.int64)
    k_cache, v_cache = (np.zeros((1, 2, n, 24), dtype=dtype) for _ in range(2))
    together = attention_kernels.attend(q, k, v, positions, slots, k_cache, v_cache, 1e4, 24)
    k_chunked, v_chunked = np.zeros_like(k_cache), np.zeros_like(v_cache)
    parts = [attention_kernels.attend(q[a:b], k[a:b], v[a:b], positions[a:b], slots[a:b], k_chunked, v_chunked,
                                      1e4, 24) for a, b in [(0, 3), (3, 130), (130, 131), (131, n)]]
    np.testing.assert_array_equal(np.concatenate(parts), together)
    np.testing.assert_array_equal(k_chunked, k_cache)
    # the last token once more, alone and next to an unrelated sequence in another slot
    k_two, v_two = (np.concatenate([c, c]) for c in (k_cache, v_cache))
    alone = attention_kernels.attend(q[-1:], k[-1:], v[-1:], positions[-1:], slots[-1:], k_cache, v_cache, 1e4, 24)
    paired = attention_kernels.attend(q[[-1, 0]], k[[-1, 0]], v[[-1, 0]], np.array([n - 1, 0]), np.array([0, 1]),
                                      k_two, v_two, 1e4, 24)
    np.testing.assert_array_equal(alone[0], together[-1])
    np.testing.assert_array_equal(paired[0], together[-1])


@pytest.mark.parametrize("attend", [attention_kernels.attend, ref.attend], ids=["fast", "ref"])
def test_attend_rejects_bad_arguments(attend):
    q, k, v = _inputs(np.random.default_rng(0), 1, 4, 2, 8)
    k_cache, v_cache = (np.zeros((2, 2, 8, 8), dtype=np.float16) for _ in range(2))

    def call(**changes):
        args = dict(q=q, k=k, v=v, positions=np.array([0]), slots=np.array([0]), k_cache=k_cache, v_cache=v_cache,
                    theta=1e4, rope_dim=8, style="norm")
        args.update(changes)
        return attend(**args)

    with pytest.raises(ContextLengthExceeded, match="9 tokens but the context window is 8"):
        call(positions=np.array([8]))
    with pytest.raises(IndexError, match="positions must not be negative"):
        call(positions=np.array([-1]))
    with pytest.raises(IndexError, match="slots must lie in the cache's slots 0..1"):
        call(slots=np.array([2]))
    with pytest.raises(ValueError, match=r"k \(1, 3, 8\) and v \(1, 2, 8\) must be"):
        call(k=np.zeros((1, 3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="does not fit caches"):
        call(q=np.zeros((1, 3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="slots and positions must be"):
        call(positions=np.array([0, 1]))
    with pytest.raises(ValueError, match="float16 or float32"):
        call(k_cache=k_cache.astype(np.float64), v_cache=v_cache.astype(np.float64))
    with pytest.raises(ValueError, match="rope_dim"):
        call(rope_dim=7)
    with pytest.raises(ValueError, match="style"):
        call(style="gptj")
    assert not k_cache.any() and not v_cache.any()  # nothing written by a refused call


def test_attend_on_an_empty_batch():
    k_cache = np.zeros((1, 1, 4, 8), dtype=np.float16)
    empty = np.zeros((0, 1, 8), dtype=np.float32)
    out = attention_kernels.attend(empty, empty, empty, np.zeros(0, np.int64), np.zeros(0, np.int64),
                                   k_cache, k_cache.copy(), 1e4, 8)
    assert out.shape == (0, 1, 8)


# --------------------------------------------------------------------------- ops.vector

@njit(cache=True)
def _roundtrip(source, destination):
    """destination = source via load8/store8 (8 at a time) and load1/store1 (the rest)."""
    body = source.size - source.size % 8
    for e in range(0, body, 8):
        store8(destination, e, load8(source, e))
    for e in range(body, source.size):
        store1(destination, e, load1(source, e))


@njit(cache=True)
def _dot_rows(a, b):
    """a (8, m) @ b (m,), m a multiple of 8: eight dot products by fma8 and splat8, finished by sum_lanes8."""
    m = b.size
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = splat8(0.0)
    for d in range(0, m, 8):
        x = load8(b, d)
        a0, a1 = fma8(load8(a, d), x, a0), fma8(load8(a, m + d), x, a1)
        a2, a3 = fma8(load8(a, 2 * m + d), x, a2), fma8(load8(a, 3 * m + d), x, a3)
        a4, a5 = fma8(load8(a, 4 * m + d), x, a4), fma8(load8(a, 5 * m + d), x, a5)
        a6, a7 = fma8(load8(a, 6 * m + d), x, a6), fma8(load8(a, 7 * m + d), x, a7)
    out = np.empty(8, dtype=np.float32)
    store8(out, 0, sum_lanes8(a0, a1, a2, a3, a4, a5, a6, a7))
    return out


def test_vector_conversions_round_like_numpy():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.standard_normal(1000) * 100, [65504.0, 65520.0, 1e6, -1e6, 6e-8, 1e-9, 0.0, -0.0],
                             (np.arange(5000) * 0.013 + 1e-3)]).astype(np.float32)[:6003]   # not a multiple of 8
    halves = np.empty(values.size, dtype=np.float16)
    _roundtrip(values, halves.view(np.uint16))
    with np.errstate(over="ignore"):  # 1e6 rounds to inf, as it should
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(halves.view(np.uint16), expected.view(np.uint16))
    widened = np.empty(values.size, dtype=np.float32)
    _roundtrip(halves.view(np.uint16), widened)
    np.testing.assert_array_equal(widened, halves.astype(np.float32))
    copied = np.empty_like(values)
    _roundtrip(values, copied)
    np.testing.assert_array_equal(copied, values)


def test_vector_dot_products():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((8, 24)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    np.testing.assert_allclose(_dot_rows(a, b), a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_dtype(dtype):
    cache = KVCache(n_layers=2, n_slots=3, n_ctx=16, n_kv_heads=2, head_dim=8, dtype=dtype)
    assert cache.k[0].dtype == dtype and cache.v[1].dtype == dtype
    assert cache.nbytes_per_token == 2 * 2 * 2 * 8 * np.dtype(dtype).itemsize
    k = np.full((1, 2, 8), 1 / 3, dtype=np.float32)
    cache.write(1, np.array([2]), np.array([5]), k, -k)
    assert cache.k[1][2, :, 5].tolist() == [[float(dtype(1 / 3))] * 8] * 2
    cache.lengths[2] = 6
    cache.tokens[2] = [1, 2, 3, 4, 5, 6]
    cache.copy_prefix(2, 0, 6)
    np.testing.assert_array_equal(np.stack(cache.v)[:, 0, :, :6], np.stack(cache.v)[:, 2, :, :6])
    assert cache.lengths[0] == 6 and cache.tokens[0] == [1, 2, 3, 4, 5, 6]


def test_kv_cache_refuses_other_dtypes():
    with pytest.raises(ValueError, match="dtype must be float16 or float32"):
        KVCache(1, 1, 4, 1, 8, dtype=np.float64)
