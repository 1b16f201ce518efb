"""BERT encoder: kernels vs their numpy twins, the dataflow vs an independent float64 oracle, batch invariance."""
from __future__ import annotations

import math

import numpy as np
import pytest

from localllm.formats.safetensors import read_hf_folder
from localllm.models import bert
from localllm.ops import encoder as ops
from localllm.quants import QTensor
from tests.tiny_bert import TINY_CONFIG, oracle_forward, write_tiny_bert


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model")


@pytest.fixture(scope="module")
def tiny_hf(tiny_folder):
    return read_hf_folder(tiny_folder)


def _model(hf, backend="auto"):
    return bert.BertModel(bert.config_from_hf(hf.config), bert.weights_from_hf(hf.tensors), backend=backend)


def _raw(hf):
    return {name: np.asarray(t.data) for name, t in hf.tensors.items()}


def _bits(a) -> bytes:
    """The bytes of a float32 array: equal bits, not just equal values (-0.0 != 0.0 here)."""
    return np.ascontiguousarray(a, np.float32).tobytes()


# --------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("n_out,n_in", [(1, 1), (5, 3), (37, 19), (64, 40), (ops.PANEL + 1, 2 * ops.PANEL)])
@pytest.mark.parametrize("n", [1, 5, 6, 7, 13])
def test_linear_matches_ref(n_out, n_in, n):
    rng = np.random.default_rng(n_out * n)
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    for bias in (b, None):
        got = ops.linear(x, ops.pack_linear(w, bias))
        assert got.shape == (n, n_out) and got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_allclose(got, ops.linear_ref(x, w, bias), rtol=1e-5, atol=1e-5)
    assert ops.linear(np.zeros((0, n_in), np.float32), ops.pack_linear(w, b)).shape == (0, n_out)
    with pytest.raises(ValueError, match="linear"):
        ops.linear(np.zeros((2, n_in + 1), np.float32), ops.pack_linear(w, b))


def test_linear_rows_do_not_depend_on_the_batch():
    """Each row of ``linear`` is the same bits in a call of any size at any position (BLAS' are not)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3 * ops.PANEL, 96)).astype(np.float32)
    packed = ops.pack_linear(w, rng.standard_normal(3 * ops.PANEL).astype(np.float32))
    x = rng.standard_normal((100, 96)).astype(np.float32)
    full = ops.linear(x, packed)
    for start, count in [(0, 1), (1, 1), (5, 2), (3, 6), (7, 7), (11, 13), (0, 64), (37, 63)]:
        assert _bits(ops.linear(x[start:start + count], packed)) == _bits(full[start:start + count])


def test_encoder_ops_do_not_depend_on_the_batch():
    """Attention of a sentence, LayerNorm and GELU of a row: the same bits alone and among many others."""
    rng = np.random.default_rng(3)
    n_heads, dim = 4, 64
    lengths = [7, 300, 1, 45, 256, 3]  # enough work for every thread
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    q, k, v = (rng.standard_normal((offsets[-1], dim)).astype(np.float32) for _ in range(3))
    together = ops.attention(q, k, v, offsets, n_heads)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        alone = ops.attention(q[start:stop], k[start:stop], v[start:stop], np.array([0, stop - start]), n_heads)
        assert _bits(alone) == _bits(together[start:stop])
    w, b = rng.standard_normal((2, dim)).astype(np.float32)
    normed = ops.add_layer_norm(q, k, w, b, 1e-12)
    up = ops.gelu(np.repeat(q, 8, axis=1) * 3)
    for i in (0, 7, 400):
        assert _bits(ops.add_layer_norm(q[i:i + 1], k[i:i + 1], w, b, 1e-12)) == _bits(normed[i:i + 1])
        assert _bits(ops.gelu(np.repeat(q[i:i + 1], 8, axis=1) * 3)) == _bits(up[i:i + 1])


@pytest.mark.parametrize("n", [1, 3, 17, 40])
def test_add_layer_norm_matches_ref(n):
    rng = np.random.default_rng(n)
    x, r = rng.standard_normal((2, n, 37)).astype(np.float32) * 3
    w, b = rng.standard_normal((2, 37)).astype(np.float32)
    np.testing.assert_allclose(ops.add_layer_norm(x, r, w, b, 1e-12), ops.add_layer_norm_ref(x, r, w, b, 1e-12),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.layer_norm(x, w, b, 1e-5), ops.layer_norm_ref(x, w, b, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_gelu_matches_erf_definition():
    x = np.concatenate([np.linspace(-12, 12, 4005), [0.0, -0.0, 1e-8, -1e-8, 50.0, -50.0]]).astype(np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(ops.gelu_ref(x), exact, rtol=1e-6, atol=1e-7)
    fast = ops.gelu(x.reshape(-1, 7).copy())
    np.testing.assert_allclose(fast.reshape(-1), exact, rtol=2e-6, atol=2e-7)
    one_thread = ops.gelu(x.reshape(-1, 7).copy(), threads=False)
    np.testing.assert_allclose(one_thread.reshape(-1), exact, rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(ops.gelu(x.reshape(1, -1).copy(), "gelu_tanh", threads=False),
                               ops.gelu(x.reshape(1, -1).copy(), "gelu_tanh"), rtol=1e-6, atol=1e-7)
    tanh_form = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    np.testing.assert_allclose(ops.gelu(x.reshape(1, -1).copy(), "gelu_tanh").reshape(-1), tanh_form,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="GELU kind"):
        ops.gelu(x.reshape(1, -1), "relu")


@pytest.mark.parametrize("lengths,n_heads,head_dim", [([1], 1, 4), ([5, 1, 9], 3, 8), ([33, 2], 2, 16)])
def test_attention_matches_ref_and_padded_oracle(lengths, n_heads, head_dim):
    rng = np.random.default_rng(len(lengths))
    dim, n = n_heads * head_dim, sum(lengths)
    q, k, v = (rng.standard_normal((n, dim)).astype(np.float32) * 2 for _ in range(3))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    fast = ops.attention(q, k, v, offsets, n_heads)
    np.testing.assert_allclose(fast, ops.attention_ref(q, k, v, offsets, n_heads), rtol=1e-4, atol=1e-5)
    # padded form with a -inf key mask, head by head, in float64
    for s, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        for h in range(n_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            scores = q[start:stop, cols].astype(np.float64) @ k[start:stop, cols].T / math.sqrt(head_dim)
            p = np.exp(scores - scores.max(1, keepdims=True))
            expected = (p / p.sum(1, keepdims=True)) @ v[start:stop, cols]
            np.testing.assert_allclose(fast[start:stop, cols], expected, rtol=1e-4, atol=1e-5)


def test_attention_strided_inputs_and_bad_offsets():
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((6, 24)).astype(np.float32)
    q, k, v = qkv[:, :8], qkv[:, 8:16], qkv[:, 16:]
    offsets = np.array([0, 2, 6])
    np.testing.assert_allclose(ops.attention(q, k, v, offsets, 2),
                               ops.attention_ref(q.copy(), k.copy(), v.copy(), offsets, 2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="offsets"):
        ops.attention(q, k, v, np.array([0, 2, 5]), 2)


# --------------------------------------------------------------------------- config and weights

def test_config_from_hf(tiny_hf):
    c = bert.config_from_hf(tiny_hf.config)
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.head_dim) == (32, 48, 2, 4, 8)
    assert (c.n_ctx_train, c.n_token_types, c.hidden_act) == (40, 2, "gelu")
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        bert.config_from_hf({**TINY_CONFIG, "vocab_size": 9, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        bert.config_from_hf({**TINY_CONFIG, "vocab_size": 9, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="roberta"):
        bert.config_from_hf({**TINY_CONFIG, "model_type": "roberta"})


def test_weights_from_hf_names(tiny_hf):
    names = set(bert.weights_from_hf(tiny_hf.tensors))
    assert {"token_embd.weight", "position_embd.weight", "token_types.weight", "token_embd_norm.bias",
            "blk.1.attn_q.weight", "blk.1.attn_output_norm.weight", "blk.0.ffn_up.bias",
            "blk.0.ffn_down.weight", "blk.1.layer_output_norm.bias"} <= names
    assert not any(n.startswith("pooler") for n in names)
    prefixed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in tiny_hf.tensors.items()}
    assert set(bert.weights_from_hf(prefixed)) == names
    with pytest.raises(ValueError, match="unexpected BERT tensor 'encoder.layer.0.mystery.weight'"):
        bert.weights_from_hf({"encoder.layer.0.mystery.weight": QTensor.from_float("x", np.zeros((2, 2)))})


def test_missing_or_misshapen_tensor_is_named(tiny_hf):
    config = bert.config_from_hf(tiny_hf.config)
    weights = bert.weights_from_hf(tiny_hf.tensors)
    from localllm.formats.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="blk.1.ffn_up.weight"):
        bert.BertModel(config, {k: v for k, v in weights.items() if k != "blk.1.ffn_up.weight"})
    bad = dict(weights)
    bad["blk.0.attn_k.weight"] = QTensor.from_float("blk.0.attn_k.weight", np.zeros((32, 31), np.float32))
    with pytest.raises(ModelFormatError, match=r"blk.0.attn_k.weight.*\(32, 31\)"):
        bert.BertModel(config, bad)


# --------------------------------------------------------------------------- forward

def _padded(rows, pad_left=False):
    L = max(len(r) for r in rows)
    ids = np.zeros((len(rows), L), np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if pad_left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@pytest.mark.parametrize("backend", ["auto", "ref"])
def test_forward_matches_oracle_with_padding(tiny_hf, backend):
    model = _model(tiny_hf, backend)
    rows = [[2, 5, 6, 7, 3], [2, 3], [2, 9, 10, 11, 12, 13, 14, 15, 16, 3]]
    ids, mask = _padded(rows)
    hidden = model.forward(ids, mask)
    assert hidden.shape == (3, 10, 32) and hidden.dtype == np.float32
    expected = oracle_forward(_raw(tiny_hf), tiny_hf.config, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(hidden[real], expected[real], rtol=1e-4, atol=2e-4)
    assert np.all(hidden[~real] == 0)


@pytest.mark.parametrize("backend", ["fast", "ref"])
def test_batched_equals_one_by_one_bit_for_bit(tiny_hf, backend):
    model = _model(tiny_hf, backend)
    rows = [[2, 3], [2, 8, 9, 3], [2] + list(range(5, 30)) + [3], [2, 7, 3]]
    ids, mask = _padded(rows)
    batched = model.forward(ids, mask)
    packed, offsets = model.encode(rows)
    assert offsets.tolist() == [0, 2, 6, 33, 36] and packed.shape == (36, 32)
    for i, r in enumerate(rows):
        alone = model.forward(np.array([r]), np.ones((1, len(r))))
        assert _bits(batched[i, :len(r)]) == _bits(alone[0]) == _bits(packed[offsets[i]:offsets[i + 1]])
        for others in (rows[:i], rows[i + 1:], rows[::-1]):
            together, at = model.encode(others + [r])
            assert _bits(together[at[-2]:at[-1]]) == _bits(alone[0])


def test_encode_of_nothing(tiny_hf):
    model = _model(tiny_hf)
    x, offsets = model.encode([])
    assert x.shape == (0, 32) and offsets.tolist() == [0]
    x, offsets = model.encode([[], [2, 3]])
    assert x.shape == (2, 32) and offsets.tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="41 tokens exceeds the model's 40 positions"):
        model.encode([[2] * 41])


def test_left_padding_keeps_positions_by_column(tiny_hf):
    model = _model(tiny_hf)
    ids, mask = _padded([[2, 8, 3], [2, 8, 9, 10, 3]], pad_left=True)
    expected = oracle_forward(_raw(tiny_hf), tiny_hf.config, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(model.forward(ids, mask)[real], expected[real], rtol=1e-4, atol=2e-4)


def test_f16_weights_match_f32(tmp_path, tiny_hf):
    f16 = read_hf_folder(write_tiny_bert(tmp_path / "f16", dtype=np.float16))
    assert f16.tensors["encoder.layer.0.attention.self.query.weight"].ggml_type == "F16"
    ids, mask = _padded([[2, 5, 6, 3], [2, 7, 3]])
    np.testing.assert_allclose(_model(f16).forward(ids, mask), _model(tiny_hf).forward(ids, mask),
                               rtol=0, atol=2e-2)


def test_forward_rejects_bad_input(tiny_hf):
    model = _model(tiny_hf)
    with pytest.raises(ValueError, match="exceeds the model's 40 positions"):
        model.forward(np.zeros((1, 41), np.int64))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.forward(np.zeros((2, 3), np.int64), np.ones((2, 4)))
    with pytest.raises(ValueError, match="input_ids"):
        model.forward(np.zeros((3,), np.int64))
