"""Gemma 3's SentencePiece vocabulary from GGUF metadata: llama.cpp's ids (golden data from
llama-cpp-python 0.3.36) with and without special-token parsing, exact decoding, streaming
detokenization through byte-fallback tokens, the merge-table kernel against its reference,
and SmolLM2's byte-level tokenizer unchanged by the SentencePiece work."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from localllm.tokenizer import Tokenizer
from localllm.tokenizer_build import _token_splits, _token_splits_ref, _vocabulary
from tests.test_tokenizer import TRICKY_TEXTS

# Characters missing from Gemma's vocabulary (they fall back to <0xAB> byte tokens) between
# multi-byte characters that are tokens.
BYTE_FALLBACK_TEXT = "naïve 𓀀 𝄞 ꙮ 東京 🤖 ᚠᚢᚦ"


@pytest.fixture(scope="module")
def gemma(gemma3_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma3_gguf.metadata)


@pytest.mark.real_model
def test_attributes(gemma):
    assert gemma.vocab_size == 262144
    assert (gemma.bos_id, gemma.eos_id, gemma.pad_id, gemma.add_bos) == (2, 1, 0, True)
    assert (gemma.bos_token, gemma.eos_token) == ("<bos>", "<eos>")
    # <eos>, <end_of_turn>, and "</s>" (on llama.cpp's list of end-of-generation texts)
    assert gemma.eog_ids == frozenset({1, 106, 212})
    assert {0, 1, 2, 3, 105, 106} <= gemma.special_ids
    assert 138 not in gemma.special_ids  # "  ": user-defined, ordinary text when decoding


@pytest.mark.real_model
def test_golden_ids_both_ways(gemma, golden_gemma3):
    assert len(golden_gemma3["tokenize"]) >= 12
    for entry in golden_gemma3["tokenize"]:
        text = entry["text"]
        assert gemma.encode(text) == entry["ids"], text
        assert gemma.encode(text, add_bos=False, parse_special=False) == entry["ids_no_special"], text
        assert gemma.decode(entry["ids"]) == "<bos>" + text  # special tokens render as their text
        assert gemma.decode(entry["ids_no_special"]) == text


@pytest.mark.real_model
def test_user_defined_tokens_match_without_special_parsing(gemma):
    # Whitespace runs and HTML tags are USER_DEFINED: one token even with parse_special=False,
    # as in llama.cpp; CONTROL tokens such as <start_of_turn> only with parse_special.
    assert gemma.encode("    x", add_bos=False, parse_special=False)[0] == 140
    assert gemma.encode("<table>", add_bos=False, parse_special=False) == [168]
    assert gemma.encode("<start_of_turn>", add_bos=False) == [105]
    assert 105 not in gemma.encode("<start_of_turn>", add_bos=False, parse_special=False)


@pytest.mark.real_model
def test_golden_prompts(gemma, golden_gemma3):
    for case in golden_gemma3["cases"]:
        assert gemma.encode(case["prompt"]) == case["prompt_tokens"], case["name"]
        assert gemma.decode(case["prompt_tokens"][1:]) == case["prompt"], case["name"]


@pytest.mark.real_model
def test_streaming_detokenization_through_byte_fallback(gemma):
    ids = gemma.encode(BYTE_FALLBACK_TEXT, add_bos=False)
    byte_tokens = [i for i in ids if gemma.hf_tokenizer.id_to_token(i).startswith("<0x")]
    assert len(byte_tokens) >= 6
    detokenizer = gemma.detokenizer(at_text_start=True)
    pieces = [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]
    assert "".join(pieces) == gemma.decode(ids) == BYTE_FALLBACK_TEXT == detokenizer.text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]  # byte tokens holding part of a character wait for the rest
    assert gemma.hf_tokenizer.decode(ids) == BYTE_FALLBACK_TEXT  # the tokenizers decoder agrees


@pytest.mark.real_model
def test_token_bytes(gemma):
    vocab = gemma.hf_tokenizer.get_vocab()
    assert gemma.token_bytes(vocab["▁Hello"]) == b" Hello"
    assert gemma.token_bytes(vocab["<0xF0>"]) == b"\xf0"
    assert gemma.token_bytes(138) == b"  "
    assert gemma.token_bytes(106) == b"<end_of_turn>"


@pytest.mark.real_model
def test_token_splits_kernel_matches_reference(gemma3_gguf):
    tokens, vocab = _vocabulary(gemma3_gguf.metadata)
    fast, ref = _token_splits(tokens), _token_splits_ref(tokens, vocab)
    assert len(fast[0]) > 500_000
    for fast_column, ref_column in zip(fast, ref):
        np.testing.assert_array_equal(fast_column, ref_column)


SMALL_VOCABULARIES = [
    ["a"],
    ["a", "b", "ab", "abab", "ba"],
    ["\x00", "\x00a", "a", "é", "aé", "😀", "a😀"],
    ["▁", "▁▁", "▁▁▁", "x▁"],
]


@pytest.mark.parametrize("tokens", SMALL_VOCABULARIES)
def test_token_splits_small_vocabularies(tokens):
    vocab = {text: i for i, text in enumerate(tokens)}
    for fast_column, ref_column in zip(_token_splits(tokens), _token_splits_ref(tokens, vocab)):
        np.testing.assert_array_equal(fast_column, ref_column)


# ---------------------------------------------------------------- SmolLM2 unchanged
# test_tokenizer's tricky texts, and SmolLM2's StarCoder-style special tokens before the empty one
SMOLLM2_TEXTS = TRICKY_TEXTS[:-1] + ["<|endoftext|><reponame>x<file_sep>", ""]
# sha256 of every token's bytes, the ids of SMOLLM2_TEXTS both ways and the special ids, from the
# tokenizer as it was before the SentencePiece (Gemma) work.
SMOLLM2_FINGERPRINT = "7cd5cc43556721f1dd175b4ed059305f3bb25bf8439ade4c68d760acf91ceb49"


def _fingerprint(tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256()
    for token_id in range(tokenizer.vocab_size):
        digest.update(tokenizer.token_bytes(token_id) + b"\xff")
    for text in SMOLLM2_TEXTS:
        for parse_special in (True, False):
            digest.update(repr(tokenizer.encode(text, add_bos=True, parse_special=parse_special)).encode())
    digest.update(repr((sorted(tokenizer.special_ids), sorted(tokenizer.eog_ids), tokenizer.bos_id,
                        tokenizer.eos_id, tokenizer.pad_id, tokenizer.add_bos, tokenizer.fim_ids)).encode())
    return digest.hexdigest()


@pytest.mark.real_model
def test_smollm2_tokenizer_unchanged(smollm2_gguf, golden_smollm2):
    smollm2 = Tokenizer.from_gguf_metadata(smollm2_gguf.metadata)
    assert _fingerprint(smollm2) == SMOLLM2_FINGERPRINT
    for case in golden_smollm2:
        text = case.get("prompt") or case["rendered_prompt"]
        assert smollm2.encode(text) == case["prompt_tokens"], case["name"]
