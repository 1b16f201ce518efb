"""Tokenizer: golden token ids (llama.cpp / transformers) for SmolLM2, exact round trips, the
incremental detokenizer, a hand-checked SentencePiece vocabulary and a BERT folder."""
from __future__ import annotations

import gguf
import pytest

from localllm.formats.gguf import read_gguf
from localllm.tokenizer import Tokenizer
from localllm.tokenizer_build import PRE_TOKENIZERS

TRICKY_TEXTS = [
    "Ça va? naïve café, ÉCOLE — déjà vu",
    "pizza 🍕, flags 🇫🇷🇯🇵, family 👨‍👩‍👧, skin 👍🏽",
    "東京は日本の首都です。한국어 텍스트. 中文，标点！",
    "tabs\tand   runs of     spaces\n\n\n  indented\r\nwindows line",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing   ",
    "digits 1234567890 and 3.14159, x**2 != y; {'k': [1, 2]}",
    "",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_gguf.metadata)


# ---------------------------------------------------------------- SmolLM2 (byte-level BPE)
def test_golden_prompt_tokens(smollm2, golden_smollm2):
    assert len(golden_smollm2) >= 8
    for case in golden_smollm2:
        text = case.get("prompt") or case["rendered_prompt"]
        assert smollm2.encode(text) == case["prompt_tokens"], case["name"]
        assert smollm2.decode(case["prompt_tokens"]) == text, case["name"]


def test_smollm2_attributes(smollm2):
    assert smollm2.vocab_size == 49152
    assert smollm2.add_bos is False
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    # <|endoftext|> (0) and <|im_end|> (2) by name; <reponame> (4) is llama.cpp's FIM-repo token.
    assert smollm2.eog_ids == frozenset({0, 2, 4})
    assert smollm2.encode("Hi", add_bos=True) == [1] + smollm2.encode("Hi")
    assert smollm2.chat_template.startswith("{% for message in messages %}")


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_is_exact(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_special_tokens(smollm2):
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2.decode(ids, skip_special=True) == "user\nhi"
    plain = smollm2.encode("<|im_start|>", parse_special=False)
    assert 1 not in plain and len(plain) > 1
    assert smollm2.decode(plain) == "<|im_start|>"
    assert smollm2.encode("<|im_start|>") == [1]  # the parsing twin did not change the default path


def test_token_bytes(smollm2):
    vocab = smollm2.hf_tokenizer.get_vocab()
    assert smollm2.token_bytes(vocab["Ġthe"]) == b" the"
    assert smollm2.token_bytes(vocab["Ċ"]) == b"\n"
    assert smollm2.token_bytes(vocab["Ã"]) == b"\xc3"  # half of a 2-byte character
    assert smollm2.token_text(vocab["Ã"]) == "\ufffd"
    assert smollm2.token_bytes(2) == b"<|im_end|>"
    with pytest.raises(ValueError, match="out of range"):
        smollm2.token_bytes(49152)
    with pytest.raises(ValueError, match="out of range"):
        smollm2.decode([5, -1])
    with pytest.raises(TypeError):
        smollm2.encode(b"bytes")


def test_incremental_detokenizer_never_splits_characters(smollm2):
    text = "🍕 東京 👨‍👩‍👧 naïve"
    ids = smollm2.encode(text)
    detokenizer = smollm2.detokenizer()
    pieces = [detokenizer.push(token_id) for token_id in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == smollm2.decode(ids) == text == detokenizer.text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]  # some tokens hold only part of a character and had to wait


def test_incremental_detokenizer_flushes_incomplete_bytes(smollm2):
    ids = smollm2.encode("🍕")
    assert len(ids) > 1
    detokenizer = smollm2.detokenizer()
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.text == "\ufffd"


def test_incremental_detokenizer_skip_special(smollm2):
    ids = smollm2.encode("<|im_start|>assistant\nHello!<|im_end|>")
    detokenizer = smollm2.detokenizer(skip_special=True)
    text = "".join(detokenizer.push(token_id) for token_id in ids) + detokenizer.flush()
    assert text == "assistant\nHello!" == smollm2.decode(ids, skip_special=True)


# ---------------------------------------------------------------- pre-tokenizer regexes
@pytest.mark.parametrize("pre, expected", [
    ("gpt2", ["Hello", " WORLD", "'s", " 12345", " café", "!!"]),
    ("smollm", ["Hello", " WORLD", "'s", " ", "1", "2", "3", "4", "5", " café", "!!"]),
    ("llama3", ["Hello", " WORLD", "'s", " ", "123", "45", " café", "!!"]),
    ("qwen2", ["Hello", " WORLD", "'s", " ", "1", "2", "3", "4", "5", " café", "!!"]),
    ("default", ["Hello", " WORLD", "'", "s", " ", "123", "45", " café", "!!"]),
])
def test_pre_tokenizer_splits(pre, expected):
    from tokenizers import Regex, pre_tokenizers

    splitter = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), "isolated") for r in PRE_TOKENIZERS[pre]])
    assert [piece for piece, _ in splitter.pre_tokenize_str("Hello WORLD's 12345 café!!")] == expected


def _byte_level_metadata(pre: str) -> dict:
    from tests.tiny_models import byte_level_vocab

    tokens, token_types = byte_level_vocab()
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": token_types, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.eos_token_id": 258}


@pytest.mark.parametrize("pre", ["default", "gpt-2", "smollm", "llama-bpe", "qwen2", "deepseek-llm",
                                 "deepseek-coder", "deepseek-v3", "falcon", "poro-chat", "viking", "tekken",
                                 "gpt-4o", "qwen35", "chatglm-bpe"])
def test_every_pre_type_builds_and_round_trips(pre):
    tokenizer = Tokenizer.from_gguf_metadata(_byte_level_metadata(pre))
    for text in TRICKY_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.add_bos is False  # no BOS id in this vocabulary
    assert tokenizer.eog_ids == {256, 258}  # <|endoftext|> (256) and <|im_end|> (258, also eos)


def test_unknown_model_or_pre_is_named():
    with pytest.raises(ValueError, match="'no-such-pre'"):
        Tokenizer.from_gguf_metadata(_byte_level_metadata("no-such-pre"))
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf_metadata({**_byte_level_metadata("default"), "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


# ---------------------------------------------------------------- SentencePiece style (tiny GGUF)
SPM_PIECES = {  # piece -> score; pieces needed to build each word by pairwise merges
    "▁": -1.0, "h": -2.0, "e": -2.0, "l": -2.0, "o": -2.0, "w": -2.0, "r": -2.0, "d": -2.0,
    "a": -2.0, "b": -2.0, "c": -2.0,
    "▁h": -3.0, "▁he": -4.0, "▁hel": -5.0, "▁hell": -6.0, "▁hello": -7.0,
    "▁w": -3.0, "▁wo": -4.0, "▁wor": -5.0, "▁worl": -6.0, "▁world": -7.0,
    "ab": -0.5, "bc": -1.5, "▁a": -2.5,  # for "abc": the best-scoring merge ("ab") goes first
}


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    scores = [0.0] * 259 + list(SPM_PIECES.values())
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Tokenizer.from_gguf_metadata(read_gguf(path).metadata)


def _ids(tokenizer: Tokenizer, *pieces: str) -> list[int]:
    vocab = tokenizer.hf_tokenizer.get_vocab()
    return [vocab[piece] for piece in pieces]


def test_spm_known_words_use_their_pieces(spm):
    assert spm.add_bos is True and spm.bos_id == 1 and spm.eos_id == 2
    assert spm.encode("hello world") == [1] + _ids(spm, "▁hello", "▁world")
    assert spm.encode("hello world", add_bos=False) == _ids(spm, "▁hello", "▁world")
    assert spm.encode("abc", add_bos=False) == _ids(spm, "▁", "ab", "c")


def test_spm_unknown_characters_fall_back_to_bytes(spm):
    assert spm.encode("hello €", add_bos=False) == _ids(spm, "▁hello", "▁", "<0xE2>", "<0x82>", "<0xAC>")
    assert spm.encode("hello\nworld", add_bos=False) == _ids(spm, "▁hello", "<0x0A>", "w", "o", "r", "l", "d")


@pytest.mark.parametrize("text", ["hello world", "hello €", "hello  world\n", "  ab c", "héllo 🍕 東京", ""])
def test_spm_round_trip(spm, text):
    assert spm.decode(spm.encode(text), skip_special=True) == text
    assert spm.decode(spm.encode(text)) == "<s>" + text  # the BOS renders unless skipped
    assert spm.decode(spm.encode(text, add_bos=False)) == text


def test_spm_token_bytes_and_special_text(spm):
    assert spm.token_bytes(_ids(spm, "▁hello")[0]) == b" hello"
    assert spm.token_bytes(_ids(spm, "<0xE2>")[0]) == b"\xe2"
    assert spm.token_bytes(1) == b"<s>"
    # as llama.cpp: a text run after a special token gets its own prefix space
    ids = spm.encode("hello</s>world")
    assert ids == [1] + _ids(spm, "▁hello") + [2] + _ids(spm, "▁world")
    assert spm.decode(ids) == "<s>hello</s> world"
    assert spm.decode(ids, skip_special=True) == "hello world"
    assert spm.eog_ids == frozenset({2})


def test_spm_detokenizer_leading_space(spm):
    ids = spm.encode("hello world €")
    at_start = spm.detokenizer(skip_special=True, at_text_start=True)
    text = "".join(at_start.push(i) for i in ids) + at_start.flush()
    assert text == "hello world €" == spm.decode(ids, skip_special=True)
    continuation = spm.detokenizer()  # generated text after a prompt keeps the space of its first token
    assert "".join(continuation.push(i) for i in ids[1:]) + continuation.flush() == " hello world €"


# ---------------------------------------------------------------- Hugging Face folder (BERT)
def test_hf_folder_bert(minilm_dir):
    bert = Tokenizer.from_hf_folder(minilm_dir)
    assert bert.vocab_size == 30522
    assert bert.add_bos is True  # the post-processor adds [CLS] ... [SEP]
    assert bert.encode("Hello world") == [101, 7592, 2088, 102]
    assert bert.encode("Hello world", add_bos=False) == [7592, 2088]
    assert bert.decode([101, 7592, 2088, 102], skip_special=True) == "hello world"
    assert len(bert.encode("word " * 300)) == 302  # tokenizer.json's truncation (128) is switched off
    assert bert.special_ids >= {0, 100, 101, 102, 103}
    assert bert.token_bytes(7592) == b"hello"


def test_hf_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def _save_as_hf_folder(tokenizer: Tokenizer, folder, config: dict):
    import json

    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer.hf_tokenizer.to_str(), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_hf_folder_byte_level_matches_golden(smollm2, golden_smollm2, tmp_path):
    folder = _save_as_hf_folder(smollm2, tmp_path / "smollm2",
                                {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                                 "chat_template": smollm2.chat_template})
    hf = Tokenizer.from_hf_folder(folder)
    assert (hf.bos_id, hf.eos_id, hf.add_bos, hf.chat_template) == (1, 2, False, smollm2.chat_template)
    assert {0, 2} <= hf.eog_ids
    for case in golden_smollm2:
        text = case.get("prompt") or case["rendered_prompt"]
        assert hf.encode(text) == case["prompt_tokens"], case["name"]
        assert hf.decode(case["prompt_tokens"]) == text
    assert [hf.token_bytes(i) for i in range(0, 49152, 97)] == [smollm2.token_bytes(i) for i in range(0, 49152, 97)]


def test_hf_folder_sentencepiece(spm, tmp_path):
    hf = Tokenizer.from_hf_folder(_save_as_hf_folder(spm, tmp_path / "spm", {"eos_token": "</s>"}))
    assert hf.encode("hello €") == spm.encode("hello €", add_bos=False)
    for text in ["hello world", "  ab c\n", "héllo 🍕"]:
        ids = hf.encode(text)
        assert hf.decode(ids) == text
        detokenizer = hf.detokenizer(at_text_start=True)
        assert "".join(detokenizer.push(i) for i in ids) + detokenizer.flush() == text


def test_hf_folder_wordpiece_detokenizer(minilm_dir):
    bert = Tokenizer.from_hf_folder(minilm_dir)
    ids = bert.encode("Hello, wonderful world!")
    detokenizer = bert.detokenizer(skip_special=True)
    text = "".join(detokenizer.push(i) for i in ids) + detokenizer.flush()
    assert text == bert.decode(ids, skip_special=True) == "hello, wonderful world!"


def test_fill_in_the_middle_ids_from_token_texts_and_metadata():
    from tests.tiny_models import byte_level_vocab

    tokens, types = byte_level_vocab()
    tokens, types = tokens + ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], types + [3, 3, 3]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": []}
    n = len(tokens)
    assert Tokenizer.from_gguf_metadata(metadata).fim_ids == {"fim_pre": n - 3, "fim_suf": n - 2, "fim_mid": n - 1}
    by_key = dict(metadata, **{"tokenizer.ggml.prefix_token_id": 5, "tokenizer.ggml.suffix_token_id": 6,
                               "tokenizer.ggml.middle_token_id": 7, "tokenizer.ggml.tokens": tokens[:-3],
                               "tokenizer.ggml.token_type": types[:-3]})
    assert Tokenizer.from_gguf_metadata(by_key).fim_ids == {"fim_pre": 5, "fim_suf": 6, "fim_mid": 7}
    plain = dict(metadata, **{"tokenizer.ggml.tokens": tokens[:-3], "tokenizer.ggml.token_type": types[:-3]})
    assert Tokenizer.from_gguf_metadata(plain).fim_ids is None
    # what /api/show reads without building the tokenizer: the same ids in every case
    from localllm.tokenizer_build import gguf_fim_ids
    for case in (metadata, by_key, plain):
        assert gguf_fim_ids(case) == Tokenizer.from_gguf_metadata(case).fim_ids


def test_insert_capability_follows_the_fim_tokens(tmp_path):
    """Ollama's ``insert`` capability: listed by /api/show (from the file) and the loaded Model alike."""
    import localllm
    from localllm.model_info import supports_insert
    from localllm.store import ModelStore
    from localllm_server.ollama_api.responses import capabilities
    from tests.tiny_models import write_tiny_llama

    plain = write_tiny_llama(tmp_path / "plain.gguf")
    fim = write_tiny_llama(tmp_path / "fim.gguf", extra_tokens=("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    store = ModelStore(tmp_path / "store")
    for name, path, expected in (("plain", plain, False), ("fim", fim, True)):
        entry = store.add_local(name, path)
        assert supports_insert(entry.path, entry.format) is expected
        assert ("insert" in capabilities(entry)) is expected
        assert ("insert" in localllm.load(path, backend="ref").capabilities) is expected
