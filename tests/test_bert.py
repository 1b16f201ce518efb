"""BERT encoder: kernels vs their numpy twins, the dataflow vs an independent float64 oracle."""
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


# --------------------------------------------------------------------------- kernels

@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    """Run a kernel test on the serial and on the parallel path (thresholds dropped to 0)."""
    if request.param == "parallel":
        monkeypatch.setattr(ops, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(ops, "PARALLEL_MIN_ROWS", 0)
    else:
        monkeypatch.setattr(ops, "PARALLEL_MIN_WORK", 1 << 40)
        monkeypatch.setattr(ops, "PARALLEL_MIN_ROWS", 1 << 40)
    return request.param


@pytest.mark.parametrize("n", [1, 3, 17, 40])
def test_add_layer_norm_matches_ref(n, threads):
    rng = np.random.default_rng(n)
    x, r = rng.standard_normal((2, n, 37)).astype(np.float32) * 3
    w, b = rng.standard_normal((2, 37)).astype(np.float32)
    np.testing.assert_allclose(ops.add_layer_norm(x, r, w, b, 1e-12), ops.add_layer_norm_ref(x, r, w, b, 1e-12),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.layer_norm(x, w, b, 1e-5), ops.layer_norm_ref(x, w, b, 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_gelu_matches_erf_definition(threads):
    x = np.concatenate([np.linspace(-12, 12, 4005), [0.0, -0.0, 1e-8, -1e-8, 50.0, -50.0]]).astype(np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(ops.gelu_ref(x), exact, rtol=1e-6, atol=1e-7)
    fast = ops.gelu(x.reshape(-1, 7).copy())
    np.testing.assert_allclose(fast.reshape(-1), exact, rtol=2e-6, atol=2e-7)
    tanh_form = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    np.testing.assert_allclose(ops.gelu(x.reshape(1, -1).copy(), "gelu_tanh").reshape(-1), tanh_form,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="GELU kind"):
        ops.gelu(x.reshape(1, -1), "relu")


@pytest.mark.parametrize("lengths,n_heads,head_dim", [([1], 1, 4), ([5, 1, 9], 3, 8), ([33, 2], 2, 16)])
def test_attention_matches_ref_and_padded_oracle(lengths, n_heads, head_dim, threads):
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
    with pytest.raises(KeyError, match="blk.1.ffn_up.weight"):
        bert.BertModel(config, {k: v for k, v in weights.items() if k != "blk.1.ffn_up.weight"})
    bad = dict(weights)
    bad["blk.0.attn_k.weight"] = QTensor.from_float("blk.0.attn_k.weight", np.zeros((32, 31), np.float32))
    with pytest.raises(ValueError, match=r"blk.0.attn_k.weight.*\(32, 31\)"):
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


def test_batched_equals_one_by_one(tiny_hf):
    model = _model(tiny_hf)
    rows = [[2, 3], [2, 8, 9, 3], [2] + list(range(5, 30)) + [3]]
    ids, mask = _padded(rows)
    batched = model.forward(ids, mask)
    for i, r in enumerate(rows):
        alone = model.forward(np.array([r]), np.ones((1, len(r))))
        np.testing.assert_allclose(batched[i, :len(r)], alone[0], rtol=1e-5, atol=1e-5)


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
