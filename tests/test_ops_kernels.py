"""ops.kernels against ops.ref (the numpy twins) on random inputs of odd shapes.

Tolerances are float32 rounding: the kernels sum in another order and use
``fast_exp`` (checked against float64 exp here to 2e-7 relative).
"""
import numpy as np
import pytest
from numba import njit

from localllm.kv_cache import ContextLengthExceeded
from localllm.ops import attention_kernels, kernels, ref


@njit(cache=True)
def _exp_all(values):
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        out[i] = kernels.fast_exp(values[i])
    return out


def test_fast_exp_matches_float64_exp():
    values = np.concatenate([np.linspace(-87, 87.9, 200001), [0.0, -1e-8, 1e-8]]).astype(np.float32)
    expected = np.exp(values.astype(np.float64))
    assert np.max(np.abs(_exp_all(values) - expected) / expected) < 2e-7
    # beyond the float32 range: clamped, finite, never NaN
    extremes = _exp_all(np.array([-1e4, -np.inf, 1e4], dtype=np.float32))
    assert extremes[0] < 1e-37 and extremes[1] < 1e-37 and np.isfinite(extremes[2])


@pytest.mark.parametrize("n", [1, 3, 17, 40])
def test_rms_norm(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 77)).astype(np.float32) * 4
    weight = rng.standard_normal(77).astype(np.float32)
    np.testing.assert_allclose(kernels.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 17, 40])
def test_swiglu(n):
    rng = np.random.default_rng(n)
    gate = rng.standard_normal((n, 129)).astype(np.float32) * 6
    up = rng.standard_normal((n, 129)).astype(np.float32)
    gate[0, :3] = [-200.0, 200.0, 0.0]
    with np.errstate(over="ignore"):  # the reference's exp(200)
        expected = ref.swiglu(gate, up)
    np.testing.assert_allclose(kernels.swiglu(gate, up), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("n, rope_dim", [(1, 64), (3, 32), (17, 64), (20, 6)])
def test_rope(style, n, rope_dim):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 5, 64)).astype(np.float32)
    positions = rng.integers(0, 5000, n)
    np.testing.assert_allclose(kernels.rope(x, positions, 10000.0, rope_dim, style),
                               ref.rope(x, positions, 10000.0, rope_dim, style), rtol=1e-6, atol=1e-6)
    # the angle table is remembered per positions; a second call with other positions must not reuse it
    other = positions + 1
    np.testing.assert_allclose(kernels.rope(x, other, 500.0, rope_dim, style),
                               ref.rope(x, other, 500.0, rope_dim, style), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("positions", [[0], [5], [1023], [1024], [70_000], [3, 4, 5, 6], [1020, 1021, 1022, 1023, 1024],
                                       list(range(300)), [2047, 9, 4096]])
def test_rope_table_rows_are_ref_rope_angles_bit_for_bit(positions):
    """Decode reads a position's cos and sin from a table of ROPE_BLOCK positions worked out together: the same
    bits as the position worked out alone (and as any batch that holds it)."""
    positions = np.array(positions, dtype=np.int64)
    for theta in (10000.0, ref.RopeFrequencies(500000.0, tuple(np.linspace(1.0, 8.0, 32)), 1.25)):
        cos, sin = kernels._rope_table(positions, theta, 64)
        want_cos, want_sin = ref.rope_angles(positions, theta, 64)
        assert cos.tobytes() == want_cos.tobytes() and sin.tobytes() == want_sin.tobytes()
        for i, position in enumerate(positions[:4]):
            alone_cos, alone_sin = ref.rope_angles(np.array([position]), theta, 64)
            assert cos[i].tobytes() == alone_cos[0].tobytes() and sin[i].tobytes() == alone_sin[0].tobytes()


def test_rope_rejects_bad_arguments():
    x = np.zeros((2, 3, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="style"):
        kernels.rope(x, np.zeros(2, dtype=np.int64), 1e4, 8, "gptj")
    with pytest.raises(ValueError, match="rope_dim"):
        kernels.rope(x, np.zeros(2, dtype=np.int64), 1e4, 7)
    with pytest.raises(ValueError, match="positions"):
        kernels.rope(x, np.zeros(3, dtype=np.int64), 1e4, 8)


def _cache(rng, n_slots, n_kv_heads, n_ctx, head_dim, dtype=np.float32):
    shape = (n_slots, n_kv_heads, n_ctx, head_dim)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_attention_decode_batch(n, dtype):
    """One query per sequence (decode), GQA 9 heads over 3 KV heads, random slots and lengths."""
    rng = np.random.default_rng(n)
    k_cache, v_cache = _cache(rng, 4, 3, 50, 16, dtype)
    q = rng.standard_normal((n, 9, 16)).astype(np.float32) * 3
    slots = rng.integers(0, 4, n)
    positions = rng.integers(0, 50, n)
    np.testing.assert_allclose(attention_kernels.attention(q, k_cache, v_cache, slots, positions),
                               ref.attention(q, k_cache, v_cache, slots, positions), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_causal_prefill_and_mixed_batch(dtype):
    """A prompt (positions 0..m-1 of one slot) next to decode tokens of other slots."""
    rng = np.random.default_rng(7)
    k_cache, v_cache = _cache(rng, 3, 2, 70, 32, dtype)
    slots = np.array([1] * 33 + [0, 2])
    positions = np.array(list(range(33)) + [69, 5])
    q = rng.standard_normal((35, 6, 32)).astype(np.float32)
    np.testing.assert_allclose(attention_kernels.attention(q, k_cache, v_cache, slots, positions),
                               ref.attention(q, k_cache, v_cache, slots, positions), rtol=1e-5, atol=2e-6)


def test_attention_rejects_bad_arguments():
    k_cache = np.zeros((2, 2, 8, 4), dtype=np.float32)
    q = np.zeros((1, 4, 4), dtype=np.float32)
    with pytest.raises(ContextLengthExceeded, match="context window is 8"):
        attention_kernels.attention(q, k_cache, k_cache, np.array([0]), np.array([8]))
    with pytest.raises(IndexError, match="positions"):
        attention_kernels.attention(q, k_cache, k_cache, np.array([0]), np.array([-1]))
    with pytest.raises(IndexError, match="slots"):
        attention_kernels.attention(q, k_cache, k_cache, np.array([2]), np.array([0]))
    with pytest.raises(ValueError, match="does not fit"):
        attention_kernels.attention(np.zeros((1, 3, 4), dtype=np.float32), k_cache, k_cache, np.array([0]), np.array([0]))
    with pytest.raises(ValueError, match="float16 or float32"):
        attention_kernels.attention(q, k_cache.astype(np.float64), k_cache.astype(np.float64), np.array([0]),
                                    np.array([0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_results_do_not_depend_on_the_batch(dtype):
    """Few tokens run serially / key chunks in parallel, many tokens run in parallel / by (token, KV head):
    the same token must get bit-identical results either way (chunked prefill == one-shot prefill)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, 96)).astype(np.float32) * 3
    weight = rng.standard_normal(96).astype(np.float32)
    np.testing.assert_array_equal(kernels.rms_norm(x[:3], weight, 1e-5), kernels.rms_norm(x, weight, 1e-5)[:3])
    gate, up = x * 2, x[::-1].copy()
    np.testing.assert_array_equal(kernels.swiglu(gate[:5], up[:5]), kernels.swiglu(gate, up)[:5])
    k_cache, v_cache = _cache(rng, 1, 2, 300, 16, dtype)
    q = rng.standard_normal((300, 4, 16)).astype(np.float32)
    slots, positions = np.zeros(300, dtype=np.int64), np.arange(300)
    together = attention_kernels.attention(q, k_cache, v_cache, slots, positions)
    for i in (0, 130, 299):
        alone = attention_kernels.attention(q[i:i + 1], k_cache, v_cache, slots[i:i + 1], positions[i:i + 1])
        np.testing.assert_array_equal(alone[0], together[i])
