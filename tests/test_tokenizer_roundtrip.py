"""Tokenizer round trips with hypothesis, on the real vocabularies (GGUF tokenizers only, no weights):
SmolLM2 (byte-level BPE), Gemma 3 (SentencePiece with byte fallback) and all-MiniLM (WordPiece).

For arbitrary Unicode (combining marks, emoji ZWJ sequences, flags, CR/LF runs, SentencePiece's "▁",
special-token texts, lone surrogates as a JSON "\\ud800" escape delivers them) and for arbitrary
token id sequences (byte tokens that make invalid UTF-8 included):

* streaming detokenization (the engine's ``IncrementalDetokenizer``, one id at a time) writes
  exactly what ``decode`` of the whole sequence writes, U+FFFD where the bytes are not UTF-8;
* ``decode(encode(text)) == text`` for the byte-level BPE and SentencePiece vocabularies (a lone
  surrogate, which UTF-8 cannot carry, becomes U+FFFD as in Ollama's JSON decoder); WordPiece
  promises no round trip (it lower-cases and splits punctuation), only its own fixed point.

Examples are derandomized and bounded (the whole file runs in a few seconds).
"""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localllm.tokenizer import Tokenizer, bytes_to_unicode
from tests.test_tokenizer import spm  # noqa: F401 (the tiny SentencePiece vocabulary fixture)

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# Pieces that stress the tokenizers: combining marks, ZWJ emoji families, skin tones, variation
# selectors, flags, CJK, RTL, CR/LF and space runs, SentencePiece's space mark, byte-token lookalikes
# and special-token texts.
TRICKY_PIECES = ["e\u0301", "\u0301\u0301", "👨\u200d👩\u200d👧\u200d👦", "👍🏽", "❤\ufe0f", "🇫🇷🇯🇵", "\u200d",
                 "東京", "한국어", "مرحبا", "\u202e", " ", "  ", "\t", "\n", "\r\n", "\n\n\n", "▁", "▁▁x",
                 "<0x41>", "<0xE2>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<eos>", "[CLS]", "##ing",
                 "\x00", "\x7f", "\ufeff", "\ufffd", "𓀀", "𝄞", "\U0010ffff"]
unicode_text = st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from(TRICKY_PIECES)), max_size=24).map("".join)
with_surrogates = st.lists(st.one_of(st.characters(), st.sampled_from(TRICKY_PIECES),
                                     st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
                           max_size=16).map("".join)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_gguf.metadata)


@pytest.fixture(scope="module")
def gemma(gemma3_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma3_gguf.metadata)


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> Tokenizer:
    return Tokenizer.from_hf_folder(minilm_dir)


@pytest.fixture(scope="module", params=["smollm2", "gemma", "minilm"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def streamed(tokenizer: Tokenizer, ids: list[int], skip_special: bool = False, at_text_start: bool = True) -> str:
    """The text the engine streams for ``ids``: one push per id, then the flush."""
    detokenizer = tokenizer.detokenizer(skip_special, at_text_start=at_text_start)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    pieces.append(detokenizer.flush())
    assert detokenizer.text == "".join(pieces)
    return "".join(pieces)


def byte_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of tokens that stand for one byte outside ASCII (half of a UTF-8 character on their own)."""
    return [i for i in range(tokenizer.vocab_size) if len(tokenizer.token_bytes(i)) == 1
            and tokenizer.token_bytes(i)[0] >= 0x80]


def token_ids(tokenizer: Tokenizer):
    """Any id, with byte tokens and special tokens (BOS, EOS, ...) often."""
    favourites = byte_token_ids(tokenizer)[:512] + sorted(tokenizer.special_ids)[:64]
    pick = st.integers(0, tokenizer.vocab_size - 1)
    if favourites:
        pick = st.one_of(pick, st.sampled_from(favourites))
    return st.lists(pick, max_size=24)


# ---------------------------------------------------------------- streaming == full decoding
def test_streaming_the_ids_of_any_text_writes_the_decoded_text(tokenizer):
    @settings(max_examples=120, **SETTINGS)
    @given(text=unicode_text, skip_special=st.booleans())
    def check(text, skip_special):
        ids = tokenizer.encode(text)
        assert streamed(tokenizer, ids, skip_special) == tokenizer.decode(ids, skip_special)

    check()


def test_streaming_any_ids_writes_the_decoded_text(tokenizer):
    @settings(max_examples=150, **SETTINGS)
    @given(ids=token_ids(tokenizer), skip_special=st.booleans())
    def check(ids, skip_special):
        assert streamed(tokenizer, ids, skip_special) == tokenizer.decode(ids, skip_special)

    check()


@pytest.mark.parametrize("name", ["smollm2", "gemma"])
def test_streaming_a_continuation_writes_what_follows_the_prompt(name, request):
    """Generated ids after a prompt (``at_text_start=False``, as the engine streams): the text decode of
    prompt + generated adds to decode of the prompt."""
    tokenizer = request.getfixturevalue(name)

    @settings(max_examples=80, **SETTINGS)
    @given(prompt=unicode_text, generated=token_ids(tokenizer))
    def check(prompt, generated):
        prompt_ids = tokenizer.encode(prompt)
        whole = tokenizer.decode(prompt_ids + generated)
        before = tokenizer.decode(prompt_ids)
        text = streamed(tokenizer, generated, at_text_start=False)
        if "\ufffd" not in whole[len(before) - 1:]:    # an unfinished character of the prompt may take the
            assert whole == before + text                # generated bytes; otherwise the texts just join

    check()


@pytest.mark.parametrize("name", ["smollm2", "gemma"])
def test_invalid_utf8_becomes_replacement_characters_in_both(name, request):
    tokenizer = request.getfixturevalue(name)
    lone = byte_token_ids(tokenizer)
    first_bytes = [i for i in lone if tokenizer.token_bytes(i)[0] >= 0xC2]      # a character's lead byte
    continuation = [i for i in lone if tokenizer.token_bytes(i)[0] < 0xC0]      # 10xxxxxx
    ordinary = tokenizer.encode("ok", add_bos=False)
    for ids in ([continuation[0]], [first_bytes[0]], [first_bytes[0]] + ordinary, ordinary + [first_bytes[-1]],
                [continuation[0], continuation[1]] + ordinary + [first_bytes[0], first_bytes[1]]):
        text = tokenizer.decode(ids)
        assert "\ufffd" in text and "ok" in text or len(ids) <= 2
        assert streamed(tokenizer, ids) == text


# ---------------------------------------------------------------- encode/decode round trips
def vocabulary_bytes(tokenizer: Tokenizer) -> set[int]:
    """The bytes a byte-level vocabulary has a token for."""
    vocab = tokenizer.hf_tokenizer.get_vocab()
    return {byte for byte, char in bytes_to_unicode().items() if char in vocab}


def test_byte_level_bpe_round_trips_any_text(smollm2):
    """Exact for every byte the vocabulary has a token for; SmolLM2's lacks 21 (control characters
    such as \x04, and 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF), which encode drops as llama.cpp does."""
    has = vocabulary_bytes(smollm2)
    assert len(has) == 256 - 21 and 0xF1 not in has and {0xEF, 0xBF, 0xBD} <= has

    @settings(max_examples=200, **SETTINGS)
    @given(text=unicode_text)
    def check(text):
        kept = bytes(byte for byte in text.encode() if byte in has).decode("utf-8", errors="replace")
        assert smollm2.decode(smollm2.encode(text)) == kept
        assert smollm2.decode(smollm2.encode(text, parse_special=False)) == kept

    check()
    assert smollm2.decode(smollm2.encode("a\U00040000b")) == "a\ufffd\ufffd\ufffdb"   # 0xF1 dropped


def test_sentencepiece_round_trips_any_text(gemma):
    """Exact but for SentencePiece's own normalisation: "▁" is its space mark, so a "▁" in the text
    comes back as a space (as in llama.cpp). Gemma's vocabulary adds no prefix space
    (``add_space_prefix`` false); the BOS token ``encode`` adds is written as "<bos>"."""
    @settings(max_examples=200, **SETTINGS)
    @given(text=unicode_text)
    def check(text):
        expected = text.replace("▁", " ")
        assert gemma.decode(gemma.encode(text, add_bos=False)) == expected
        assert gemma.decode(gemma.encode(text)) == "<bos>" + expected
        assert gemma.decode(gemma.encode(text, add_bos=False, parse_special=False)) == expected

    check()
    assert gemma.decode(gemma.encode("a▁b c", add_bos=False)) == "a b c"


def test_wordpiece_decoding_is_a_fixed_point(minilm):
    """WordPiece does not keep case, accents or spacing; what it promises is that decoded text encodes
    to the same ids again."""
    @settings(max_examples=100, **SETTINGS)
    @given(text=unicode_text)
    def check(text):
        ids = minilm.encode(text, add_bos=False)
        assert minilm.encode(minilm.decode(ids), add_bos=False) == ids

    check()


def test_lone_surrogates_encode_as_replacement_characters(tokenizer):
    @settings(max_examples=60, **SETTINGS)
    @given(text=with_surrogates)
    def check(text):
        clean = LONE_SURROGATE.sub("\ufffd", text)
        assert tokenizer.encode(text) == tokenizer.encode(clean)
        assert tokenizer.decode(tokenizer.encode(text, add_bos=False)) == tokenizer.decode(
            tokenizer.encode(clean, add_bos=False))

    check()
    assert tokenizer.encode("a\ud800b", add_bos=False) == tokenizer.encode("a\ufffdb", add_bos=False)


def test_sentencepiece_with_a_prefix_space_round_trips_any_text(spm):
    """A tiny SentencePiece vocabulary with ``add_space_prefix`` (llama's default), byte fallback for
    everything else: the space encode puts in front of the text is taken off again, in ``decode`` and in
    a stream that starts the text."""
    @settings(max_examples=150, **SETTINGS)
    @given(text=unicode_text)
    def check(text):
        ids = spm.encode(text)
        expected = text.replace("▁", " ")
        assert spm.decode(ids, skip_special=True) == expected
        assert streamed(spm, ids, skip_special=True) == expected
        assert streamed(spm, ids) == spm.decode(ids)

    check()
