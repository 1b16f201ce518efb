"""quants.ref against gguf.quants (an independent dequantizer) and plain numpy."""
import types

import gguf
import numpy as np
import pytest

from localllm.quants import GGML_BLOCK_SIZES, SUPPORTED_TYPES, QTensor, UnsupportedTensorType
from localllm.quants import ref, synthetic
from localllm.quants.synthetic import F16_FIELDS

QUANT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def f16_bytes(value: float) -> np.ndarray:
    return np.array([value], dtype="<f2").view(np.uint8)


def random_blocks(ggml_type: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random quant bytes with finite random f16 scales (either sign), ``uint8 (n_blocks, block_bytes)``."""
    blocks = np.empty((n_blocks, GGML_BLOCK_SIZES[ggml_type][1]), dtype=np.uint8)
    return synthetic.random_blocks(blocks, ggml_type, rng, scale_range=(-2.0, 2.0))


def random_qtensor(ggml_type: str, rows: int, cols: int, rng: np.random.Generator, name="w") -> QTensor:
    if ggml_type == "F32":
        return QTensor(name, "F32", (rows, cols), rng.standard_normal((rows, cols)).astype(np.float32))
    if ggml_type == "F16":
        return QTensor(name, "F16", (rows, cols), rng.standard_normal((rows, cols)).astype(np.float16))
    if ggml_type == "BF16":
        bits = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16
        return QTensor(name, "BF16", (rows, cols), bits.astype("<u2").view(np.uint8).reshape(rows, 2 * cols))
    block_elems = GGML_BLOCK_SIZES[ggml_type][0]
    n_blocks = cols // block_elems
    data = random_blocks(ggml_type, rows * n_blocks, rng).reshape(rows, -1)
    return QTensor(name, ggml_type, (rows, cols), data)


def gguf_dequantize(t: QTensor) -> np.ndarray:
    return gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.ggml_type]).reshape(t.shape)


def assert_matches(actual, expected):
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0)


def test_every_supported_type_has_a_dequantizer():
    assert set(ref.DEQUANTIZERS) == SUPPORTED_TYPES


@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
@pytest.mark.parametrize("n_blocks", [1, 7, 64])
def test_block_dequantizers_match_gguf(ggml_type, n_blocks):
    rng = np.random.default_rng(n_blocks)
    blocks = random_blocks(ggml_type, n_blocks, rng)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type])
    actual = getattr(ref, f"dequantize_{ggml_type}")(blocks)
    assert_matches(actual, expected.reshape(n_blocks, GGML_BLOCK_SIZES[ggml_type][0]))


@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
def test_all_zero_blocks_are_zero(ggml_type):
    blocks = np.zeros((3, GGML_BLOCK_SIZES[ggml_type][1]), dtype=np.uint8)
    actual = getattr(ref, f"dequantize_{ggml_type}")(blocks)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type]).reshape(actual.shape)
    assert_matches(actual, expected)
    assert not np.any(actual)


@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
def test_extreme_quant_values(ggml_type):
    # every quant byte 0xFF, then every quant byte 0x00, with scale fields fixed at 1.0
    for fill in (0x00, 0xFF):
        blocks = np.full((2, GGML_BLOCK_SIZES[ggml_type][1]), fill, dtype=np.uint8)
        for offset in F16_FIELDS[ggml_type]:
            blocks[:, offset:offset + 2] = f16_bytes(1.0)
        actual = getattr(ref, f"dequantize_{ggml_type}")(blocks)
        expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type]).reshape(actual.shape)
        assert_matches(actual, expected)


def test_hand_computed_q4_0_and_q8_0():
    block = np.zeros((1, 18), dtype=np.uint8)
    block[0, 0:2] = f16_bytes(0.5)
    block[0, 2] = 0x1F  # element 0 = 15, element 16 = 1
    expected = np.full(32, -4.0, dtype=np.float32)  # 0.5 * (0 - 8)
    expected[0], expected[16] = 0.5 * 7, 0.5 * -7
    np.testing.assert_array_equal(ref.dequantize_Q4_0(block)[0], expected)

    block = np.zeros((1, 34), dtype=np.uint8)
    block[0, 0:2] = f16_bytes(0.25)
    block[0, 2:34] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    np.testing.assert_array_equal(ref.dequantize_Q8_0(block)[0], 0.25 * np.arange(-16, 16))


@pytest.mark.parametrize("ggml_type", sorted(SUPPORTED_TYPES))
@pytest.mark.parametrize("rows,n_col_blocks", [(1, 1), (3, 2), (7, 3)])
def test_dequantize_qtensor_ragged_shapes(ggml_type, rows, n_col_blocks):
    rng = np.random.default_rng(rows * 10 + n_col_blocks)
    cols = n_col_blocks * (GGML_BLOCK_SIZES[ggml_type][0] if ggml_type in QUANT_TYPES else 32)
    t = random_qtensor(ggml_type, rows, cols, rng)
    assert_matches(ref.dequantize(t), gguf_dequantize(t))


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q6_K", "F16", "BF16"])
def test_dequantize_one_dimensional_tensor(ggml_type):
    rng = np.random.default_rng(3)
    t2 = random_qtensor(ggml_type, 1, 256, rng)
    t1 = QTensor("norm", ggml_type, (256,), t2.data.reshape(-1))
    out = ref.dequantize(t1)
    assert out.shape == (256,)
    assert_matches(out, gguf_dequantize(t2).reshape(256))


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q5_0", "Q3_K", "F32"])
def test_dequantize_rows(ggml_type):
    rng = np.random.default_rng(5)
    t = random_qtensor(ggml_type, 9, 512, rng)
    full = gguf_dequantize(t)
    assert_matches(ref.dequantize_rows(t, 2, 7), full[2:7])
    assert ref.dequantize_rows(t, 4, 4).shape == (0, 512)
    with pytest.raises(IndexError, match="'w'"):
        ref.dequantize_rows(t, 5, 10)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q5_1", "Q8_0", "Q2_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
@pytest.mark.parametrize("n", [1, 5])
def test_matmul_matches_dense(ggml_type, n, monkeypatch):
    rng = np.random.default_rng(n)
    t = random_qtensor(ggml_type, 13, 512, rng)
    x = rng.standard_normal((n, 512)).astype(np.float32)
    expected = x @ gguf_dequantize(t).T
    # a tiny chunk so the chunk loop runs several times, with a ragged last chunk
    monkeypatch.setattr(ref, "MATMUL_CHUNK_WEIGHTS", 5 * 512)
    out = ref.matmul(t, x)
    assert out.shape == (n, 13) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(ref.matmul(t, x[0]), expected[0], rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_matmul_rejects_wrong_width():
    t = random_qtensor("Q8_0", 4, 64, np.random.default_rng(0), name="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="blk.0.attn_q.weight"):
        ref.matmul(t, np.zeros((2, 32), dtype=np.float32))


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K", "F32"])
def test_embedding_rows(ggml_type):
    rng = np.random.default_rng(11)
    t = random_qtensor(ggml_type, 10, 256, rng, name="token_embd.weight")
    full = gguf_dequantize(t)
    ids = np.array([3, 0, 9, 3])
    assert_matches(ref.embedding_rows(t, ids), full[ids])
    assert_matches(ref.embedding_rows(t, [[1, 2], [8, 7]]), full[[[1, 2], [8, 7]]])
    with pytest.raises(IndexError, match="token_embd.weight"):
        ref.embedding_rows(t, [10])
    with pytest.raises(IndexError, match="token_embd.weight"):
        ref.embedding_rows(t, [-1])


def test_unsupported_type_names_the_tensor():
    with pytest.raises(UnsupportedTensorType, match="blk.3.ffn_up.weight"):
        QTensor("blk.3.ffn_up.weight", "IQ2_XXS", (4, 256), np.zeros((4, 66), dtype=np.uint8))
    # ref guards on its own too (for tensor-like objects that skipped QTensor's check)
    fake = types.SimpleNamespace(name="blk.3.ffn_up.weight", ggml_type="IQ2_XXS", shape=(4, 256),
                                 data=np.zeros((4, 66), dtype=np.uint8), rows=4, cols=256)
    for call in (lambda: ref.dequantize(fake), lambda: ref.dequantize_rows(fake, 0, 1),
                 lambda: ref.matmul(fake, np.zeros((1, 256), np.float32)),
                 lambda: ref.embedding_rows(fake, [0])):
        with pytest.raises(UnsupportedTensorType, match="blk.3.ffn_up.weight"):
            call()


def test_data_of_wrong_size_is_rejected():
    t = QTensor("output.weight", "Q4_0", (2, 64), np.zeros((2, 18), dtype=np.uint8))
    with pytest.raises(ValueError, match="output.weight"):
        ref.dequantize(t)


# --------------------------------------------------------------------------- real model

@pytest.mark.real_model
def test_smollm2_tensors_match_gguf(smollm2_gguf_path):
    reader = gguf.GGUFReader(smollm2_gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    for name, n_rows in [("blk.0.ffn_down.weight", None), ("token_embd.weight", 64)]:
        tensor = tensors[name]
        cols, rows = (int(v) for v in tensor.shape[:2])  # ggml order: (cols, rows)
        data = tensor.data[:n_rows] if n_rows else tensor.data
        rows = data.shape[0]
        t = QTensor(name, tensor.tensor_type.name, (rows, cols), data)
        expected = gguf.quants.dequantize(data, tensor.tensor_type)
        assert_matches(ref.dequantize(t), expected)
        assert_matches(ref.embedding_rows(t, [rows - 1, 0]), expected[[rows - 1, 0]])
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
