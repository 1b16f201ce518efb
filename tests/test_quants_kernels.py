"""quants.kernels (both the AVX2 and the portable path) against independent oracles.

Weights are random blocks (random bytes, with sane f16 scales) of every type;
the float oracle is ``gguf.quants.dequantize`` followed by a float64 product.

Tolerances: the kernels quantize each 16 activations to int8 with scale
``dx = max|x| / 127``, so each activation moves by at most ``dx / 2`` and an
output by at most ``sum_k |W[r, k]| * dx_k / 2`` (checked against the float
oracle). Fed the already-quantized activations ``xq * dx``, the kernels are
exact up to float32 rounding of the scale products (checked to 1e-5 of
``sum_k |W[r, k] x_k|``).
"""
import gguf
import numpy as np
import pytest

from localllm.quants import GGML_BLOCK_SIZES, QTensor, UnsupportedTensorType, kernels, portable
from localllm.quants import ref as quants_ref
from localllm.quants.synthetic import random_weight

QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
FLOATS = ["F32", "F16", "BF16"]
PATHS = list(kernels.AVAILABLE_KERNELS)


def oracle_weights(w: QTensor) -> np.ndarray:
    """float64 (rows, cols) from gguf's own dequantizer."""
    qtype = gguf.GGMLQuantizationType[w.ggml_type]
    data = w.data.view(np.uint8) if w.ggml_type in ("F32", "F16") else w.data
    return gguf.quants.dequantize(data, qtype).astype(np.float64).reshape(w.shape)


def quantize_activations_numpy(x: np.ndarray):
    """The int8-per-16 activation quantization, in numpy (twin of portable.quantize_activations): xq, the scales
    d per 16 and the scaled sums (d_0 * sum of a block's first 16 xq, then that plus d_1 * the second 16's)."""
    n, cols = x.shape
    blocks = x.reshape(n, cols // 16, 16)
    d = np.abs(blocks).max(axis=2) / np.float32(127.0)                        # (n, cols/16)
    inverse = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
    xq = np.rint(blocks * inverse[:, :, None]).astype(np.int8)               # (n, cols/16, 16)
    sums16 = xq.sum(axis=2, dtype=np.int64)                                  # (n, cols/16)
    scaled = (d * sums16.astype(np.float32)).astype(np.float32)             # (n, cols/16) d_h * sum of half h
    xsums = scaled.copy()
    xsums[:, 1::2] = scaled[:, 0::2] + scaled[:, 1::2]                        # the odd entries: the whole block
    return xq.reshape(n, cols), d.astype(np.float32), xsums


def test_quantize_activations_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 96)).astype(np.float32) * np.float32(3.0)
    x[1, 32:64] = 0.0          # an all-zero block: scale 0, no division by zero
    x[2, 0] = 1000.0           # one outlier dominating its block
    xq, xd, xsums = portable.quantize_activations(x)
    eq, ed, esums = quantize_activations_numpy(x)
    np.testing.assert_array_equal(xq, eq)
    np.testing.assert_array_equal(xd, ed)
    np.testing.assert_allclose(xsums, esums, rtol=1e-6)
    assert xd[1, 2] == xd[1, 3] == 0 and not xq[1, 32:64].any()
    assert xq.dtype == np.int8 and np.abs(xq.astype(np.int64)).max() == 127


def test_f16_to_f32_every_half():
    bits = np.arange(65536, dtype=np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    out = np.empty((1, 65536), dtype=np.float32)
    portable.embedding_float(11, bits.reshape(1, -1), np.zeros(1, dtype=np.int64), out)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(out[0][finite], expected[finite])
    assert np.array_equal(np.isnan(out[0]), np.isnan(expected))
    assert np.array_equal(np.isinf(out[0]), np.isinf(expected))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", QUANTIZED)
def test_quantized_matmul(path, ggml_type):
    block_elems = GGML_BLOCK_SIZES[ggml_type][0]
    cols = 2 * block_elems if block_elems == 256 else 5 * block_elems
    for rows, n in ((1, 1), (7, 3), (33, 17), (9, 4)):
        w = random_weight(ggml_type, rows, cols, seed=rows)
        weights = oracle_weights(w)                                            # (rows, cols)
        x = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
        got = kernels.matmul(w, x, kernels=path)                                # (n, rows)
        assert got.shape == (n, rows) and got.dtype == np.float32

        # against the float oracle, within the activation-rounding bound
        xq, xd, _ = quantize_activations_numpy(x)
        half_step = np.repeat(xd, 16, axis=1).astype(np.float64) / 2           # (n, cols)
        bound = half_step @ np.abs(weights).T                                   # (n, rows)
        error = np.abs(got - x.astype(np.float64) @ weights.T)
        assert np.all(error <= 1.01 * bound + 1e-6), f"{ggml_type} rows={rows} n={n}"

        # on already-quantized activations: exact up to float32 rounding
        x_exact = (xq.reshape(n, -1, 16) * xd[:, :, None]).reshape(n, cols)
        got_exact = kernels.matmul(w, x_exact, kernels=path)
        magnitude = np.abs(x_exact.astype(np.float64)) @ np.abs(weights).T
        np.testing.assert_array_less(np.abs(got_exact - x_exact.astype(np.float64) @ weights.T),
                                     1e-5 * magnitude + 1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", FLOATS)
def test_float_matmul(path, ggml_type):
    for rows, cols, n in ((1, 8, 1), (7, 33, 3), (33, 100, 17)):
        w = random_weight(ggml_type, rows, cols, seed=cols)
        weights = oracle_weights(w)
        x = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
        got = kernels.matmul(w, x, kernels=path)
        magnitude = np.abs(x.astype(np.float64)) @ np.abs(weights).T
        np.testing.assert_array_less(np.abs(got - x.astype(np.float64) @ weights.T), 1e-5 * magnitude + 1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                       "F16"])
def test_results_do_not_depend_on_the_batch(path, ggml_type):
    """A token's output is bit-identical alone, in a prefill tile (from TILE_MIN_TOKENS == 8 tokens on: four
    tokens against a task's eight interleaved rows), among eight tokens in one vector (the partial task, from 8
    tokens on) or among the leftovers (19 weight rows: two full tasks and three leftover rows; two K
    super-blocks)."""
    w = random_weight(ggml_type, 19, 512)
    x = np.random.default_rng(4).standard_normal((23, 512)).astype(np.float32)
    together = kernels.matmul(w, x, kernels=path)                # the tile for 20 tokens, 3 leftovers
    for j in range(23):
        np.testing.assert_array_equal(kernels.matmul(w, x[j:j + 1], kernels=path)[0], together[j])
    np.testing.assert_array_equal(kernels.matmul(w, x[3:], kernels=path), together[3:])
    np.testing.assert_array_equal(kernels.matmul(w, x[1:12], kernels=path), together[1:12])   # 8 in the lanes
    np.testing.assert_array_equal(kernels.matmul(w, x[1:4], kernels=path), together[1:4])


@pytest.mark.parametrize("path", PATHS)
def test_matmul_many_equals_separate_products(path):
    wq, wk, wv = (random_weight("Q4_1", rows, 64, seed=rows) for rows in (12, 4, 5))
    x = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    fused = kernels.matmul_many([wq, wk, wv], x, kernels=path)
    for w, out in zip((wq, wk, wv), fused):
        np.testing.assert_array_equal(out, kernels.matmul(w, x, kernels=path))
    single = kernels.matmul_many([wk], x[0], kernels=path)
    np.testing.assert_array_equal(single[0], kernels.matmul(wk, x[:1], kernels=path)[0])


def test_matmul_many_mixed_types_and_bad_shapes():
    """Q4_K_M-style files mix types among Q/K/V: one launch per type, results in order."""
    ws = [random_weight("Q4_1", 4, 64, seed=1), random_weight("Q8_0", 3, 64, seed=2), random_weight("Q4_1", 5, 64)]
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    for w, out in zip(ws, kernels.matmul_many(ws, x)):
        np.testing.assert_array_equal(out, kernels.matmul(w, x))
    with pytest.raises(ValueError, match="does not match"):
        kernels.matmul_many([random_weight("Q4_1", 4, 64), random_weight("Q4_1", 4, 96)], np.zeros((1, 64)))


def test_matmul_vector_and_views():
    w = random_weight("Q8_0", 5, 64)
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    full = kernels.matmul(w, x)
    np.testing.assert_array_equal(kernels.matmul(w, x[2]), full[2])
    # a read-only, non-contiguous x and a read-only weight (as a memmap is)
    strided = np.repeat(x, 2, axis=1)[:, ::2]
    strided.flags.writeable = False
    frozen = w.data.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(kernels.matmul(QTensor("w", "Q8_0", (5, 64), frozen), strided), full)
    # rows of a larger tensor
    np.testing.assert_array_equal(kernels.matmul(w.row_slice(1, 4), x), full[:, 1:4])


def test_bad_inputs_name_the_tensor():
    w = random_weight("Q4_0", 3, 64)
    with pytest.raises(ValueError, match=r"'w'.*\(n, 64\)"):
        kernels.matmul(w, np.zeros((2, 32), dtype=np.float32))
    bad = QTensor("broken", "Q4_0", (3, 64), np.zeros((3, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="broken"):
        kernels.matmul(bad, np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="kernels"):
        kernels.matmul(w, np.zeros((1, 64), dtype=np.float32), kernels="cuda")
    with pytest.raises(IndexError, match="'w'"):
        kernels.embedding_rows(w, [3])
    with pytest.raises(TypeError, match="integers"):
        kernels.embedding_rows(w, [0.5])
    with pytest.raises(UnsupportedTensorType):
        QTensor("odd", "IQ2_XS", (1, 256), np.zeros((1, 66), dtype=np.uint8))


@pytest.mark.parametrize("ggml_type", QUANTIZED + FLOATS)
def test_embedding_rows_and_dequantize(ggml_type):
    cols = 512 if GGML_BLOCK_SIZES[ggml_type][0] == 256 else 96
    w = random_weight(ggml_type, 11, cols, seed=5)
    weights = oracle_weights(w).astype(np.float32)
    ids = np.array([[3, 0], [10, 3]])
    got = kernels.embedding_rows(w, ids)
    assert got.shape == (2, 2, cols)
    np.testing.assert_allclose(got, weights[ids], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kernels.dequantize(w), weights, rtol=1e-6, atol=1e-7)


def test_kernel_selection_and_threads():
    assert kernels.KERNELS in kernels.AVAILABLE_KERNELS
    assert "portable" in kernels.AVAILABLE_KERNELS
    assert kernels.threading_layer() in ("omp", "tbb", "workqueue")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0", "Q6_K", "F16"])
def test_fused_prologues_and_residual_add_equal_the_separate_calls(path, ggml_type):
    """rms_norm -> matmul, swiglu -> matmul and the residual add, fused into the launch, give the same bits
    as the separate ops (decode-sized, eight-token and parallel-prologue batches)."""
    from localllm.ops import kernels as ops_kernels
    rng = np.random.default_rng(7)
    wq, wk = random_weight(ggml_type, 19, 256, seed=1), random_weight(ggml_type, 8, 256, seed=2)
    w_down = random_weight(ggml_type, 64, 512, seed=3)
    norm_weight = rng.uniform(0.5, 1.5, 256).astype(np.float32)
    for n in (1, 3, 11, 20):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        fused = kernels.rms_norm_matmul_many((wq, wk), x, norm_weight, 1e-5, kernels=path)
        h = ops_kernels.rms_norm(x, norm_weight, 1e-5)
        for got, w in zip(fused, (wq, wk)):
            np.testing.assert_array_equal(got, kernels.matmul(w, h, kernels=path))
        residual = rng.standard_normal((n, 19)).astype(np.float32)
        kept = residual.copy()
        np.testing.assert_array_equal(kernels.matmul_add(wq, x, residual, kernels=path),
                                      residual + kernels.matmul(wq, x, kernels=path))
        np.testing.assert_array_equal(residual, kept)                                   # not modified
        gate, up = rng.standard_normal((2, n, 512)).astype(np.float32)
        residual = rng.standard_normal((n, 64)).astype(np.float32)
        np.testing.assert_array_equal(
            kernels.swiglu_matmul_add(w_down, gate, up, residual, kernels=path),
            residual + kernels.matmul(w_down, ops_kernels.swiglu(gate, up), kernels=path))


def test_fused_forms_reject_bad_shapes():
    w = random_weight("Q4_1", 8, 64)
    x = np.zeros((2, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="residual must be"):
        kernels.matmul_add(w, x, np.zeros((2, 9), dtype=np.float32))
    with pytest.raises(ValueError, match="same shape"):
        kernels.swiglu_matmul_add(w, x, np.zeros((2, 32), dtype=np.float32), np.zeros((2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="norm_weight"):
        kernels.rms_norm_matmul_many([w], x, np.ones(32, dtype=np.float32), 1e-5)


def test_reference_fused_forms_are_the_compositions():
    from localllm.ops import ref as ops_ref
    w = random_weight("Q4_1", 8, 64)
    rng = np.random.default_rng(3)
    x, residual = rng.standard_normal((3, 64)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    norm_weight = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    np.testing.assert_array_equal(quants_ref.rms_norm_matmul_many([w], x, norm_weight, 1e-5)[0],
                                  quants_ref.matmul(w, ops_ref.rms_norm(x, norm_weight, 1e-5)))
    np.testing.assert_array_equal(quants_ref.matmul_add(w, x, residual), residual + quants_ref.matmul(w, x))
