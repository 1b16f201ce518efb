"""Sentence embeddings: golden all-MiniLM-L6-v2 vectors, GGUF bert, pooling modes, truncation, dimensions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers

from localllm.embeddings import InputTooLong, load_embedding_model, pool
from localllm.formats.safetensors import read_hf_folder
from localllm.wordpiece import wordpiece_from_gguf
from tests.tiny_bert import oracle_forward, write_tiny_bert

EXTRA_TEXTS = ["Crème brûlée, naïve café!", "北京欢迎你 and 東京", "tabs\tand\nnewlines   spaces",
               "[SEP] inside [CLS] text", "UPPER lower MiXeD 12345 3.14159", "emoji 🙂 & symbols #@$%^"]


def _hf_tokenizer(folder: Path) -> tokenizers.Tokenizer:
    """The folder's own tokenizer.json, without the fixed truncation/padding that file carries."""
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def minilm_folder(minilm_dir) -> Path:
    return Path(minilm_dir)


@pytest.fixture(scope="module")
def minilm(minilm_folder):
    return load_embedding_model(minilm_folder)


@pytest.fixture(scope="module")
def golden(golden_minilm):
    return golden_minilm


# --------------------------------------------------------------------------- real model

def test_golden_embeddings(minilm, golden):
    assert (minilm.dim, minilm.max_seq_length, minilm.pooling) == (384, 256, "mean")
    assert "" in golden["inputs"] and max(minilm.count_tokens(golden["inputs"])) > 256
    vectors = minilm.embed(golden["inputs"])
    assert vectors.shape == (len(golden["inputs"]), 384) and vectors.dtype == np.float32
    cosines = _cos(vectors, golden["embeddings"])
    assert np.all(cosines >= 0.9999), cosines
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_count_tokens_matches_hf_tokenizer(minilm, minilm_folder, golden):
    reference = _hf_tokenizer(minilm_folder)
    texts = golden["inputs"] + EXTRA_TEXTS
    assert minilm.count_tokens(texts) == [len(reference.encode(t).ids) for t in texts]
    assert minilm.count_tokens("") == [2]


def _bits(a) -> bytes:
    """The bytes of a float32 array: equal bits, not just equal values."""
    return np.ascontiguousarray(a, np.float32).tobytes()


def _assert_batch_invariant(model, texts, others):
    """Each of ``texts`` embeds to the same bits alone and in batches of ``others`` (several orders and
    batch sizes; raw vectors, and normalized once)."""
    for text in texts:
        alone, alone_normalized = model.embed([text], normalize=False)[0], model.embed([text])[0]
        batches = [[text] + others, others[:2] + [text] + others[2:], [others[-1], text, text]]
        for batch, batch_size in [(b, size) for b in batches for size in (32, 2)]:
            vectors = model.embed(batch, normalize=False, batch_size=batch_size)
            for i in (i for i, t in enumerate(batch) if t == text):
                assert _bits(vectors[i]) == _bits(alone), (text[:30], len(batch), batch_size)
        assert _bits(model.embed(others + [text])[-1]) == _bits(alone_normalized)


def _invariance_texts(golden) -> tuple[list[str], list[str]]:
    """Texts to check, and other texts of varied lengths to batch them with (the last one is cut at 256 tokens)."""
    long_text = max(golden["inputs"], key=len)
    others = ["x", "A medium sentence about the weather in the mountains, and a second clause.",
              " ".join(["word"] * 60), EXTRA_TEXTS[1], long_text]
    return [golden["inputs"][0], "", long_text], others


@pytest.mark.parametrize("backend", ["fast", "ref"])
def test_embedding_does_not_depend_on_the_batch(minilm_folder, golden, backend):
    """One text, one vector: bit for bit the same alone and among other texts (the server promises it)."""
    model = load_embedding_model(minilm_folder, backend=backend)
    texts, others = _invariance_texts(golden)
    assert max(model.count_tokens(others)) > 256
    _assert_batch_invariant(model, texts, others)


def test_batched_equals_one_by_one(minilm, golden):
    texts = golden["inputs"] + EXTRA_TEXTS
    batched = minilm.embed(texts, batch_size=5)
    for i, text in enumerate(texts):
        assert _bits(batched[i]) == _bits(minilm.embed(text)[0])


def test_truncation_keeps_final_sep(minilm, golden, minilm_folder):
    long_text = max(golden["inputs"], key=len)
    n_tokens = minilm.count_tokens(long_text)[0]
    assert n_tokens > 256
    with pytest.raises(InputTooLong) as info:
        minilm.embed(["short", long_text], truncate=False)
    assert (info.value.index, info.value.n_tokens, info.value.max_seq_length) == (1, n_tokens, 256)
    assert "input 1" in str(info.value) and str(n_tokens) in str(info.value) and "256" in str(info.value)
    # truncate=True == [CLS] + first 254 content tokens + [SEP], given as token ids
    reference = _hf_tokenizer(minilm_folder)
    content = reference.encode(long_text, add_special_tokens=False).ids
    np.testing.assert_allclose(minilm.embed(long_text), minilm.embed([content[:254]]), atol=1e-6)
    assert minilm.embed([content[:254]], truncate=False).shape == (1, 384)
    with pytest.raises(InputTooLong):
        minilm.embed([content[:255]], truncate=False)


def test_token_id_inputs_equal_text(minilm, minilm_folder):
    reference = _hf_tokenizer(minilm_folder)
    texts = ["Why is the sky blue?", ""]
    ids = [reference.encode(t, add_special_tokens=False).ids for t in texts]
    np.testing.assert_allclose(minilm.embed(ids), minilm.embed(texts), atol=1e-6)
    with pytest.raises(ValueError, match=r"texts\[1\].*0\.\.30521"):
        minilm.embed([[1, 2], [30522]])
    with pytest.raises(TypeError):
        minilm.embed(["text", [1, 2]])


def test_dimensions_and_normalize(minilm):
    texts = ["First text", "Second text, a little longer"]
    full = minilm.embed(texts)
    raw = minilm.embed(texts, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), full, atol=1e-6)
    short = minilm.embed(texts, dimensions=64)
    assert short.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(short, full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(minilm.embed(texts, dimensions=64, normalize=False), raw[:, :64], atol=1e-6)
    for bad in (0, 385, -1, 2.5, True):
        with pytest.raises(ValueError, match="dimensions"):
            minilm.embed(texts, dimensions=bad)
    assert minilm.embed([]).shape == (0, 384)


def test_vocab_txt_folder_tokenizes_like_tokenizer_json(minilm_folder, minilm, golden, tmp_path):
    folder = tmp_path / "no_tokenizer_json"
    folder.mkdir()
    for item in minilm_folder.iterdir():
        if item.name != "tokenizer.json":
            (folder / item.name).symlink_to(item)
    model = load_embedding_model(folder)
    texts = golden["inputs"] + EXTRA_TEXTS
    assert [model.tokenizer.with_specials(c) for c in model.tokenizer.content_ids(texts)] == \
        [minilm.tokenizer.with_specials(c) for c in minilm.tokenizer.content_ids(texts)]


# --------------------------------------------------------------------------- GGUF bert

def _phantom(token: str, token_type: int) -> str:
    """llama.cpp's converter stores WordPiece pieces in phantom-space form."""
    if token_type == gguf.TokenType.CONTROL:
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def write_bert_gguf(folder: Path, path: Path, weight_type: str) -> Path:
    """Convert a HF BERT folder to GGUF the way llama.cpp's convert_hf_to_gguf.py lays it out."""
    hf = read_hf_folder(folder)
    config = hf.config
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name("all-minilm-test")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special_ids = {t["id"] for t in tok["added_tokens"] if t["special"]}
    types = [gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL for _, i in vocab]
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("jina-v2-en")
    writer.add_token_list([_phantom(t, ty) for (t, _), ty in zip(vocab, types)])
    writer.add_token_types(types)
    writer.add_token_type_count(config["type_vocab_size"])
    gguf.SpecialVocab(folder, n_vocab=len(vocab)).add_to_gguf(writer)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, config["num_hidden_layers"])
    for hf_name, tensor in hf.tensors.items():
        if hf_name.startswith("pooler."):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        data = np.asarray(tensor.data, np.float32)
        if data.ndim == 1 or weight_type == "F32":
            writer.add_tensor(name, data)
        elif weight_type == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[weight_type]
            raw = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=["F32", "F16"])
def minilm_gguf(request, minilm_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"all-minilm-{request.param}.gguf"
    return write_bert_gguf(minilm_folder, path, request.param), request.param


def test_gguf_bert_matches_golden(minilm_gguf, minilm, golden):
    path, weight_type = minilm_gguf
    model = load_embedding_model(path)
    assert (model.name, model.dim, model.max_seq_length, model.pooling) == ("all-minilm-test", 384, 512, "mean")
    assert model.encoder.layers[0]["ffn_up"].weight.ggml_type == weight_type
    model = load_embedding_model(path, max_seq_length=256)
    texts = golden["inputs"] + EXTRA_TEXTS
    assert model.count_tokens(texts) == minilm.count_tokens(texts)
    vectors = model.embed(golden["inputs"])
    assert np.all(_cos(vectors, golden["embeddings"]) >= 0.9999)
    assert np.all(_cos(model.embed(EXTRA_TEXTS), minilm.embed(EXTRA_TEXTS)) >= 0.9999)


@pytest.mark.parametrize("backend", ["fast", "ref"])
def test_gguf_embedding_does_not_depend_on_the_batch(minilm_gguf, golden, backend):
    model = load_embedding_model(minilm_gguf[0], max_seq_length=256, backend=backend)
    texts, others = _invariance_texts(golden)
    _assert_batch_invariant(model, texts[:2], others)


def test_gguf_wordpiece_tokenizer_matches_hf(minilm_gguf, minilm_folder, golden):
    from localllm.formats.gguf import read_gguf

    tokenizer = wordpiece_from_gguf(read_gguf(minilm_gguf[0]).metadata)
    reference = _hf_tokenizer(minilm_folder)
    for text in golden["inputs"] + EXTRA_TEXTS:
        assert tokenizer.encode(text).ids == reference.encode(text).ids, text


def test_gguf_quantized_bert_matches_dequantized_oracle(tmp_path):
    folder = write_tiny_bert(tmp_path / "hf", pooling="mean", config_overrides={"intermediate_size": 64})
    path = write_bert_gguf(folder, tmp_path / "tiny-q8_0.gguf", "Q8_0")
    from localllm.formats.gguf import read_gguf

    file = read_gguf(path)
    assert file.tensors["blk.0.ffn_down.weight"].ggml_type == "Q8_0"
    # oracle on the dequantized weights (gguf.quants), HF names
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, 2)
    hf = read_hf_folder(folder)
    weights = {}
    for hf_name, tensor in hf.tensors.items():
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            continue
        t = file.tensors[name]
        raw = np.asarray(t.data)
        weights[hf_name] = (gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[t.ggml_type]).reshape(t.shape)
                            if t.ggml_type == "Q8_0" else raw.astype(np.float32))
    tok = _hf_tokenizer(folder)
    rows = [tok.encode(t).ids for t in TINY_TEXTS]
    L = max(map(len, rows))
    ids, mask = np.zeros((len(rows), L), np.int64), np.zeros((len(rows), L), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    expected = _numpy_pool(oracle_forward(weights, hf.config, ids, mask), mask, "mean")
    exact = load_embedding_model(path, backend="ref")
    np.testing.assert_allclose(exact.embed(TINY_TEXTS, normalize=False), expected, rtol=1e-4, atol=2e-4)
    fast = load_embedding_model(path, backend="fast")
    assert np.all(_cos(fast.embed(TINY_TEXTS), expected) >= 0.999)
    for model in (exact, fast):
        _assert_batch_invariant(model, TINY_TEXTS[:2], TINY_TEXTS[2:] + ["the dog runs " * 20])


@pytest.mark.parametrize("cased", [False, True])
def test_gguf_wordpiece_casing_from_vocabulary(cased):
    words = ["Paris", "Rome", "The", "Cat"] if cased else ["paris", "rome", "the", "cat"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokens = specials + ["\u2581" + w for w in words] + ["s", "\u2581."]
    metadata = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [3] * 4 + [1] * (len(tokens) - 4),
                "tokenizer.ggml.unknown_token_id": 1, "tokenizer.ggml.bos_token_id": 2,
                "tokenizer.ggml.seperator_token_id": 3}
    tokenizer = wordpiece_from_gguf(metadata)
    paris = tokens.index("\u2581" + words[0])
    assert tokenizer.encode("Paris").ids == [2, paris, 3]
    assert tokenizer.encode("PARIS Rome").ids == ([2, 1, tokens.index("\u2581Rome"), 3] if cased
                                                  else [2, paris, tokens.index("\u2581rome"), 3])
    assert tokenizer.encode("cats .", add_special_tokens=False).ids == (
        [1, tokens.index("\u2581.")] if cased else [tokens.index("\u2581cat"), tokens.index("s"), tokens.index("\u2581.")])
    with pytest.raises(ValueError, match="'llama'"):
        wordpiece_from_gguf({**metadata, "tokenizer.ggml.model": "llama"})


def test_gguf_other_architecture_is_rejected(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="llama"):
        load_embedding_model(path)


# --------------------------------------------------------------------------- tiny model: pooling

TINY_TEXTS = ["the cat sat", "", "a red fish on the mat , the dog runs", "blue"]
POOLINGS = ["mean", "cls", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean"]


def _numpy_pool(hidden, mask, mode):
    m = mask.astype(np.float64)
    n = m.sum(1, keepdims=True)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        return hidden[np.arange(len(hidden)), mask.sum(1) - 1]
    if mode == "max":
        return np.array([h[mk.astype(bool)].max(0) for h, mk in zip(hidden, mask)])
    if mode == "mean":
        return (hidden * m[..., None]).sum(1) / n
    if mode == "mean_sqrt_len_tokens":
        return (hidden * m[..., None]).sum(1) / np.sqrt(n)
    w = m * np.arange(1, m.shape[1] + 1)
    return (hidden * w[..., None]).sum(1) / w.sum(1, keepdims=True)


@pytest.mark.parametrize("mode", POOLINGS)
def test_pooling_modes_match_numpy(tmp_path, mode):
    folder = write_tiny_bert(tmp_path / mode, pooling=mode)
    model = load_embedding_model(folder)
    assert model.pooling == mode
    tok = _hf_tokenizer(folder)
    rows = [tok.encode(t).ids for t in TINY_TEXTS]
    L = max(map(len, rows))
    ids, mask = np.zeros((len(rows), L), np.int64), np.zeros((len(rows), L), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    hf = read_hf_folder(folder)
    hidden = oracle_forward({k: np.asarray(t.data) for k, t in hf.tensors.items()}, hf.config, ids, mask)
    expected = _numpy_pool(hidden, mask, mode)
    np.testing.assert_allclose(model.embed(TINY_TEXTS, normalize=False), expected, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(model.embed(TINY_TEXTS), expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               rtol=1e-4, atol=2e-4)


def test_pool_rejects_unknown_mode():
    with pytest.raises(ValueError, match="pooling mode 'median'"):
        pool(np.zeros((1, 2, 3), np.float32), np.ones((1, 2)), "median")


def test_tiny_folder_settings(tmp_path):
    model = load_embedding_model(write_tiny_bert(tmp_path / "a", pooling="cls", max_seq_length=8))
    assert (model.max_seq_length, model.pooling, model.has_normalize_module) == (8, "cls", True)
    long_text = "the cat sat on the mat the dog"
    assert model.count_tokens(long_text) == [10]
    with pytest.raises(InputTooLong):
        model.embed(long_text, truncate=False)
    assert model.embed(long_text).shape == (1, 32)
    bare = load_embedding_model(write_tiny_bert(tmp_path / "b", pooling=None))
    assert (bare.pooling, bare.max_seq_length, bare.has_normalize_module) == ("mean", 40, False)
    with pytest.raises(ValueError, match="max_seq_length 41"):
        load_embedding_model(tmp_path / "b", max_seq_length=41)


def test_unknown_hf_architecture_is_named(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*model_type='llama'"):
        load_embedding_model(folder)
    with pytest.raises(FileNotFoundError):
        load_embedding_model(tmp_path / "nothing-here")


def test_pooling_config_new_style(tmp_path):
    folder = write_tiny_bert(tmp_path / "m", pooling="mean")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32,
                                                                 "pooling_mode": "lasttoken"}))
    assert load_embedding_model(folder).pooling == "lasttoken"
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": ["cls", "mean"]}))
    with pytest.raises(ValueError, match="exactly one pooling mode"):
        load_embedding_model(folder)
    shutil.rmtree(folder / "1_Pooling")
    assert load_embedding_model(folder).pooling == "mean"


def test_hostile_bert_gguf_hyperparameters_are_format_errors(tmp_path):
    """A BERT GGUF whose sizes are not positive integers, whose block count exceeds its tensors or whose config
    disagrees with its tensor shapes is refused with localllm's format error before any kernel runs."""
    from localllm.formats.errors import ModelFormatError
    from localllm.formats.gguf import read_gguf
    from localllm.models import bert

    folder = write_tiny_bert(tmp_path / "hf", pooling="mean")
    file = read_gguf(write_bert_gguf(folder, tmp_path / "tiny.gguf", "F32"))
    good = dict(file.metadata)
    for key, value in (("bert.embedding_length", 0), ("bert.block_count", 10**9), ("bert.attention.head_count", -1),
                       ("bert.feed_forward_length", "wide"), ("bert.attention.layer_norm_epsilon", float("nan"))):
        file.metadata = {**good, key: value}
        with pytest.raises(ModelFormatError):
            bert.BertModel(bert.config_from_gguf(file), dict(file.tensors))
    file.metadata = {**good, "bert.feed_forward_length": good["bert.feed_forward_length"] * 2}  # shapes disagree
    with pytest.raises(ModelFormatError, match="ffn_up"):
        bert.BertModel(bert.config_from_gguf(file), dict(file.tensors))
