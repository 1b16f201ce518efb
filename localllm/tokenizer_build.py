"""Building a ``Tokenizer`` from GGUF metadata or a Hugging Face folder.

The GGUF rules follow llama.cpp's ``llama-vocab.cpp``: which regexes split the text before
BPE (``tokenizer.ggml.pre``), the default special ids and ``add_bos``, which tokens end
generation, and SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``, e.g. Gemma)
as a BPE whose merges are ranked by the score of the merged piece, which is what llama.cpp's
greedy highest-score-bigram-first merge computes. Everything is built on ``tokenizers``
models; nothing here tokenizes by hand.

The builders return the keyword arguments of ``localllm.tokenizer.Tokenizer``; this module
does not import the tokenizer module (the dependency goes one way: tokenizer -> tokenizer_build).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .formats.errors import ModelFormatError

# GGUF token types (tokenizer.ggml.token_type), as llama.cpp names them.
TOKEN_UNDEFINED, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(7)



class TokenizerMetadataError(ModelFormatError):
    """GGUF ``tokenizer.ggml.*`` metadata that cannot make a tokenizer: a missing or empty vocabulary, lists
    whose lengths do not match it, token types or special ids out of range, malformed merges, values of the
    wrong type. Raised before ``tokenizers`` sees the vocabulary (it panics on some of these)."""


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_MARK = "\u2581"  # "▁", SentencePiece's space


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}
_SHIFTED_CHARS = str.maketrans({char: chr(byte) for char, byte in _UNICODE_TO_BYTE.items() if ord(char) > 255})


def byte_level_token_bytes(text: str) -> bytes:
    """Bytes of a byte-level BPE token text (characters outside the map stay as their UTF-8)."""
    try:
        return text.translate(_SHIFTED_CHARS).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode() for c in text)


def sentencepiece_token_bytes(text: str, byte_fallback: bool) -> bytes:
    """Bytes of a SentencePiece token text: "<0xAB>" -> b"\\xab" (with byte fallback), "▁" -> space."""
    match = _BYTE_TOKEN.fullmatch(text) if byte_fallback else None
    if match:
        return bytes([int(match.group(1), 16)])
    return text.replace(_SPACE_MARK, " ").encode()


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# tokenizer.ggml.pre -> the regexes llama.cpp applies one after the other (each splits the
# pieces the previous one produced; matches and the text between them are both kept).
# deepseek-llm's letter class is the list of cased letters (Lu, Ll, Lt): written here as
# those Unicode categories.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "deepseek-llm": ("[\r\n]", r"\s?[\p{Lu}\p{Ll}\p{Lt}]+",
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$",
                     _CJK_HANGUL, r"\p{N}+"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "poro": (_PORO,),
    "viking": (_PORO, r"\p{N}"),
    "tekken": (_TEKKEN,),
    "gpt-4o": (_GPT4O,),
}

# tokenizer.ggml.pre name -> (PRE_TOKENIZERS key, ignore_merges, default add_bos)
_PRE_TYPES: dict[str, tuple[str, bool, bool]] = {"default": ("default", False, False)}
for _names, _entry in [
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     ("llama3", True, True)),
    (("dbrx", "smaug-bpe"), ("llama3", False, False)),
    (("glm4", "chatglm-bpe"), ("llama3", False, False)),
    (("deepseek-llm",), ("deepseek-llm", False, False)),
    (("deepseek-coder",), ("deepseek-coder", False, False)),
    (("deepseek-v3",), ("deepseek-v3", False, False)),
    (("falcon",), ("falcon", False, False)),
    (("gpt2", "gpt-2", "mpt", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
      "a.x-4.0", "mellum", "modern-bert", "olmo", "jais", "trillion", "granite-docling", "exaone4",
      "jina-v1-en", "jina-v2-code", "roberta-bpe"), ("gpt2", False, False)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
     ("smollm", False, False)),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
     ("qwen2", False, False)),
    (("qwen35",), ("qwen35", False, False)),
    (("poro-chat", "bloom", "gpt3-finnish"), ("poro", False, False)),
    (("viking",), ("viking", False, False)),
    (("tekken",), ("tekken", True, True)),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), ("gpt-4o", False, False)),
]:
    for _name in _names:
        _PRE_TYPES[_name] = _entry

# Token texts that end generation (llama.cpp's list), and the ones it takes as FIM tokens
# (pad, repo and file-separator FIM tokens end generation too).
EOG_TOKEN_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_SPECIAL_ID_KEYS = {name: f"tokenizer.ggml.{name}_token_id"
                    for name in ("bos", "eos", "eot", "eom", "unknown", "padding", "fim_pre", "fim_suf", "fim_mid",
                                 "fim_pad", "fim_rep", "fim_sep")}


# ---------------------------------------------------------------------------- GGUF
def gguf_tokenizer_args(metadata: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``Tokenizer`` for GGUF metadata (``tokenizer.ggml.*`` keys as plain values)."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerMetadataError("GGUF metadata has no 'tokenizer.ggml.model'")
    if model not in ("gpt2", "llama"):
        raise TokenizerMetadataError(f"unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama')")
    tokens, vocab = _vocabulary(metadata)
    n_tokens = len(tokens)
    token_types = _per_token(metadata, "tokenizer.ggml.token_type", n_tokens, TOKEN_NORMAL, _is_token_type,
                             f"a token type {TOKEN_UNDEFINED}..{TOKEN_BYTE}")
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerMetadataError(f"GGUF metadata 'tokenizer.chat_template' is a {type(template).__name__}, "
                                     "not a string")

    special = _special_ids(metadata, model, n_tokens)
    eog_ids = _eog_ids(tokens, vocab, token_types, special)  # may mark more tokens CONTROL, as llama.cpp does

    if model == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre") or "default"
        if not isinstance(pre, str) or pre not in _PRE_TYPES:
            raise TokenizerMetadataError(f"unknown tokenizer.ggml.pre {pre!r} for a 'gpt2' vocabulary "
                                         f"(known: {', '.join(sorted(_PRE_TYPES))})")
        regex_key, ignore_merges, add_bos = _PRE_TYPES[pre]
        hf_tokenizer = _byte_level_bpe(vocab, _merges(metadata, vocab), PRE_TOKENIZERS[regex_key], ignore_merges)
        pieces = _gguf_pieces(tokens, token_types, list(map(byte_level_token_bytes, tokens)))
        add_space_prefix = False
    else:
        scores = _per_token(metadata, "tokenizer.ggml.scores", n_tokens, 0.0, _is_number, "a number")
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        unk_id = special["unknown"]
        hf_tokenizer = _sentencepiece_bpe(tokens, vocab, scores, add_space_prefix,
                                          None if unk_id is None else tokens[unk_id])
        add_bos = True
        pieces = _gguf_pieces(tokens, token_types, _unescaped_pieces(tokens))

    _add_special_tokens(hf_tokenizer, tokens, token_types)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos)) and special["bos"] is not None
    special_ids = np.flatnonzero(np.isin(token_types, (TOKEN_CONTROL, TOKEN_UNKNOWN))).tolist()
    return dict(hf_tokenizer=hf_tokenizer, pieces=pieces, special_ids=special_ids, bos_id=special["bos"],
                eos_id=special["eos"], pad_id=special["padding"], add_bos=add_bos, eog_ids=eog_ids,
                strip_first_space=add_space_prefix, bytes_exact=True, uses_post_processor=False,
                chat_template=metadata.get("tokenizer.chat_template"), fim_ids=_fim_ids(metadata, special))


def gguf_fim_ids(metadata: dict[str, Any]) -> dict[str, int] | None:
    """The fill-in-the-middle ids a tokenizer built from this GGUF metadata has, without building it
    (what ``/api/show`` needs to list ``insert``): the same keys, then the same token texts."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        return None
    special = _special_ids(metadata, metadata.get("tokenizer.ggml.model"), len(tokens))
    wanted = {text for name in ("fim_pre", "fim_suf", "fim_mid") for text in _FIM_TEXTS[name]}
    vocab = {text: i for i, text in enumerate(tokens) if text in wanted}    # token texts are unique
    for name in ("fim_pre", "fim_suf", "fim_mid"):
        match = next((vocab[t] for t in _FIM_TEXTS[name] if t in vocab), None)
        if special.get(name) is None and match is not None:
            special[name] = match
    return _fim_ids(metadata, special)


def _fim_ids(metadata: dict[str, Any], special: dict[str, int | None]) -> dict[str, int] | None:
    """Prefix/suffix/middle ids (``fim_*_token_id``, the older ``prefix/suffix/middle_token_id`` keys, or
    the token texts llama.cpp recognises, already folded into ``special``); None unless all three exist."""
    ids = {}
    for name, old in (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle")):
        value = special.get(name)
        if value is None:
            value = _token_id(metadata, f"tokenizer.ggml.{old}_token_id")
        if value is not None:
            ids[name] = value
    return ids if len(ids) == 3 else None


def _vocabulary(metadata: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """The token texts (an empty text becomes "[EMPTY_<id>]") and the text -> id map; texts must be unique."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerMetadataError("GGUF metadata 'tokenizer.ggml.tokens' is missing or empty")
    if not all(isinstance(text, str) for text in tokens):
        raise TokenizerMetadataError("GGUF metadata 'tokenizer.ggml.tokens' holds values that are not strings")
    if "" in tokens:
        tokens = [text if text else f"[EMPTY_{i}]" for i, text in enumerate(tokens)]
    vocab = dict(zip(tokens, range(len(tokens))))
    if len(vocab) != len(tokens):
        seen: dict[str, int] = {}
        for token_id, text in enumerate(tokens):
            if text in seen:
                raise TokenizerMetadataError(f"tokenizer.ggml.tokens: duplicate token {text!r} at ids {seen[text]} "
                                             f"and {token_id}")
            seen[text] = token_id
    return tokens, vocab


def _is_token_type(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and TOKEN_UNDEFINED <= value <= TOKEN_BYTE


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _per_token(metadata: dict[str, Any], key: str, n_tokens: int, default: Any, valid, expected: str) -> list:
    """One value a token (``default`` for each when the key is absent): exactly n_tokens of them, each
    ``valid``, or TokenizerMetadataError."""
    values = metadata.get(key)
    if values is None:
        return [default] * n_tokens
    if not isinstance(values, list) or len(values) != n_tokens:
        count = f"{len(values)} entries" if isinstance(values, list) else f"a {type(values).__name__}"
        raise TokenizerMetadataError(f"GGUF metadata '{key}' has {count} for {n_tokens} tokens")
    bad = next((i for i, value in enumerate(values) if not valid(value)), None)
    if bad is not None:
        raise TokenizerMetadataError(f"GGUF metadata '{key}' entry {bad} is {values[bad]!r}, expected {expected}")
    return list(values)


def _token_id(metadata: dict[str, Any], key: str) -> int | None:
    """An id key's value (None when absent); an integer or TokenizerMetadataError."""
    value = metadata.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TokenizerMetadataError(f"GGUF metadata '{key}' is {value!r}, expected a token id")
    return value


def _merges(metadata: dict[str, Any], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` as (left, right) pairs: each "left right" (split at the first space after
    the first character, as llama.cpp splits them) with left, right and left + right in the vocabulary;
    TokenizerMetadataError naming the first that is not (``tokenizers`` panics on a merged text it lacks)."""
    merges = metadata.get("tokenizer.ggml.merges") or []
    if not isinstance(merges, list):
        raise TokenizerMetadataError("GGUF metadata 'tokenizer.ggml.merges' is not a list")
    pairs = []
    for index, merge in enumerate(merges):
        split = merge.find(" ", 1) if isinstance(merge, str) else -1
        left, right = (merge[:split], merge[split + 1:]) if split > 0 else ("", "")
        if not right or left not in vocab or right not in vocab or left + right not in vocab:
            raise TokenizerMetadataError(f"GGUF metadata 'tokenizer.ggml.merges' entry {index} ({merge!r}) is not "
                                         "two tokens of the vocabulary whose concatenation is one")
        pairs.append((left, right))
    return pairs


def _special_ids(metadata: dict[str, Any], model: str, n_tokens: int) -> dict[str, int | None]:
    """Special ids from the metadata; llama.cpp's SentencePiece defaults (bos 1, eos 2, unk 0).

    A BOS or EOS id outside the vocabulary is an error (generation needs them); other ids outside it are
    ignored, as llama.cpp ignores them (it warns), falling back to the default.
    """
    defaults = {"bos": 1, "eos": 2, "unknown": 0} if model == "llama" else {}
    special: dict[str, int | None] = {}
    for name, key in _SPECIAL_ID_KEYS.items():
        default = defaults.get(name)
        value = _token_id(metadata, key)
        if value is not None and not 0 <= value < n_tokens and name in ("bos", "eos"):
            raise TokenizerMetadataError(f"GGUF metadata '{key}' is {value}, outside the vocabulary of "
                                         f"{n_tokens} tokens")
        if value is None or not 0 <= value < n_tokens:
            value = default if default is not None and default < n_tokens else None
        special[name] = value
    return special


def _eog_ids(tokens: list[str], vocab: dict[str, int], token_types: list[int],
             special: dict[str, int | None]) -> set[int]:
    """End-of-generation ids as llama.cpp collects them. Tokens it recognises by name (FIM and
    end-of-generation tokens) become CONTROL tokens, as llama.cpp does."""
    found_by_name = set()
    for name, texts in _FIM_TEXTS.items():
        match = next((vocab[t] for t in texts if t in vocab), None)
        if special.get(name) is None and match is not None:
            special[name] = match
            found_by_name.add(match)
    named_eog = {vocab[text] for text in EOG_TOKEN_TEXTS if text in vocab}
    for token_id in found_by_name | named_eog:
        if token_types[token_id] != TOKEN_CONTROL:
            token_types[token_id] = TOKEN_CONTROL
    eog = named_eog | {special[name] for name in ("fim_pad", "fim_rep", "fim_sep", "eos", "eot", "eom")}
    eog.discard(None)
    texts = {tokens[i]: i for i in eog}
    # gpt-oss / solar-open: "<|end|>" ends a message, not the generation.
    if "<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                               or ("<|calls|>" in texts and "<|flush|>" in texts)):
        eog.discard(texts["<|end|>"])
        token_types[texts["<|end|>"]] = TOKEN_USER_DEFINED
    # gemma4 / paddleocr: "</s>" is ordinary text there.
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(texts["</s>"])
        token_types[texts["</s>"]] = TOKEN_NORMAL
    return eog


def _unescaped_pieces(tokens: list[str]) -> list[bytes]:
    """Bytes of NORMAL SentencePiece tokens: the text with "▁" as a space. One pass over all the
    texts joined by NUL (split back unless a text holds a NUL itself)."""
    pieces = "\x00".join(tokens).replace(_SPACE_MARK, " ").encode().split(b"\x00")
    if len(pieces) != len(tokens):
        pieces = [text.replace(_SPACE_MARK, " ").encode() for text in tokens]
    return pieces


def _gguf_pieces(tokens: list[str], token_types: list[int], normal_pieces: list[bytes]) -> list[bytes]:
    """token_bytes of every GGUF token: llama.cpp's token_to_piece with special tokens rendered.

    NORMAL tokens as ``normal_pieces`` has them, BYTE tokens ("<0xAB>") as their byte, CONTROL,
    UNKNOWN and USER_DEFINED tokens as their text, UNUSED/UNDEFINED tokens as nothing.
    """
    pieces = list(normal_pieces)
    for token_id in np.flatnonzero(np.asarray(token_types) != TOKEN_NORMAL).tolist():
        kind, text = token_types[token_id], tokens[token_id]
        if kind == TOKEN_BYTE:
            pieces[token_id] = sentencepiece_token_bytes(text, byte_fallback=True)
        elif kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
            pieces[token_id] = text.encode()
        else:
            pieces[token_id] = b""
    return pieces


def _byte_level_bpe(vocab: dict[str, int], pairs: list[tuple[str, str]], regexes: tuple[str, ...],
                    ignore_merges: bool) -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens: list[str], vocab: dict[str, int], scores: list[float],
                       add_space_prefix: bool, unk_token: str | None) -> HFTokenizer:
    """llama.cpp's SentencePiece tokenizer as a ``tokenizers`` BPE.

    llama.cpp starts from the characters and repeatedly merges the adjacent pair whose
    concatenation is the highest-scoring token (the leftmost pair on a tie); characters
    missing from the vocabulary become ``<0xAB>`` byte tokens. The same as a BPE whose merges
    are every split of every token into two tokens, ranked by the merged token's score (equal
    scores by token id, then split), given unique scores and vocabularies holding every
    character of their tokens as a token, as SentencePiece's do (Gemma 3: llama.cpp's ids on
    every text tried).
    """
    merged_ids, left_ids, right_ids = _token_splits(tokens)
    order = np.lexsort((left_ids, merged_ids, -np.asarray(scores, dtype=np.float64)[merged_ids]))
    text_of = tokens.__getitem__
    merges = list(zip(map(text_of, left_ids[order].tolist()), map(text_of, right_ids[order].tolist())))
    model = models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    tokenizer = HFTokenizer(model)
    spaces = [normalizers.Replace(" ", _SPACE_MARK)]
    tokenizer.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(_SPACE_MARK)] if add_space_prefix else []) + spaces)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tokenizer


def _token_splits(tokens: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(merged, left, right) id arrays: every way to write a token as the concatenation of two tokens.

    Any token type may take part, as in llama.cpp (added tokens are split out of the text
    before the merges run, so only the pieces in between reach them). The texts go to the
    kernel as one array of code points; ``_token_splits_ref`` is the plain-Python twin.
    """
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    starts = np.zeros(len(tokens), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    codes = np.frombuffer("".join(tokens).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return _token_splits_kernel(codes, starts, lengths)


def _token_splits_ref(tokens: list[str], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_token_splits`` with a dict look-up of both halves of every split (same triples, token order)."""
    found = [(merged_id, vocab[text[:split]], vocab[text[split:]])
             for merged_id, text in enumerate(tokens) for split in range(1, len(text))
             if text[:split] in vocab and text[split:] in vocab]
    columns = np.array(found, dtype=np.int64).reshape(-1, 3)
    return columns[:, 0].copy(), columns[:, 1].copy(), columns[:, 2].copy()


_HASH_BASE = np.uint64(0x100000001B3)  # polynomial hash of a text's code points (mod 2**64)
_HASH_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: a hash's slot is the top bits of hash * this


@njit(cache=True)
def _token_splits_kernel(codes, starts, lengths):
    """Splits of token texts given as code points (text i: ``codes[starts[i]:starts[i] + lengths[i]]``).

    An open-addressing table of the tokens by polynomial hash; for every token and split
    position the hashes of both halves (rolling) are looked up, each candidate compared
    code point by code point. Returns (merged, left, right) ids in token order, then split order.
    """
    n_tokens = lengths.shape[0]
    max_length = 1
    n_splits = 0
    for token_id in range(n_tokens):
        max_length = max(max_length, lengths[token_id])
        n_splits += max(lengths[token_id] - 1, 0)
    powers = np.ones(max_length + 1, dtype=np.uint64)
    for i in range(1, max_length + 1):
        powers[i] = powers[i - 1] * _HASH_BASE
    hashes = np.zeros(n_tokens, dtype=np.uint64)
    for token_id in range(n_tokens):
        hashes[token_id] = _text_hash(codes, starts[token_id], lengths[token_id])

    slot_bits = 1
    while (1 << slot_bits) < 2 * n_tokens:
        slot_bits += 1
    table = np.full(1 << slot_bits, -1, dtype=np.int64)  # slot -> token id, -1 = empty
    for token_id in range(n_tokens):
        slot = _slot(hashes[token_id], slot_bits)
        while table[slot] >= 0:
            slot = (slot + 1) & ((1 << slot_bits) - 1)
        table[slot] = token_id

    merged = np.empty(n_splits, dtype=np.int64)
    left = np.empty(n_splits, dtype=np.int64)
    right = np.empty(n_splits, dtype=np.int64)
    n_found = 0
    for token_id in range(n_tokens):
        start, length = starts[token_id], lengths[token_id]
        left_hash = np.uint64(0)
        for split in range(1, length):
            left_hash = left_hash * _HASH_BASE + np.uint64(codes[start + split - 1]) + np.uint64(1)
            left_id = _find(codes, starts, lengths, hashes, table, slot_bits, left_hash, start, split)
            if left_id < 0:
                continue
            right_hash = hashes[token_id] - left_hash * powers[length - split]
            right_id = _find(codes, starts, lengths, hashes, table, slot_bits, right_hash, start + split,
                             length - split)
            if right_id >= 0:
                merged[n_found], left[n_found], right[n_found] = token_id, left_id, right_id
                n_found += 1
    return merged[:n_found], left[:n_found], right[:n_found]


@njit(cache=True, inline="always")
def _text_hash(codes, start, length):
    value = np.uint64(0)
    for i in range(start, start + length):
        value = value * _HASH_BASE + np.uint64(codes[i]) + np.uint64(1)
    return value


@njit(cache=True, inline="always")
def _slot(value, slot_bits):
    return np.int64((value * _HASH_MIX) >> np.uint64(64 - slot_bits))


@njit(cache=True, inline="always")
def _find(codes, starts, lengths, hashes, table, slot_bits, value, start, length):
    """Id of the token whose text is ``codes[start:start + length]`` (hash ``value``), or -1."""
    slot = _slot(value, slot_bits)
    while table[slot] >= 0:
        token_id = table[slot]
        if hashes[token_id] == value and lengths[token_id] == length:
            other = starts[token_id]
            same = True
            for i in range(length):
                if codes[other + i] != codes[start + i]:
                    same = False
                    break
            if same:
                return token_id
        slot = (slot + 1) & ((1 << slot_bits) - 1)
    return -1


def _add_special_tokens(tokenizer: HFTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """CONTROL/UNKNOWN tokens are special (split out of the text only with parse_special); USER_DEFINED
    tokens are plain added tokens, split out of the text always, as llama.cpp does."""
    kinds = np.asarray(token_types)
    special = np.flatnonzero(np.isin(kinds, (TOKEN_CONTROL, TOKEN_UNKNOWN))).tolist()
    user_defined = np.flatnonzero(kinds == TOKEN_USER_DEFINED).tolist()
    if special:
        tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    if user_defined:
        tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])


# ---------------------------------------------------------------------------- Hugging Face
def hf_folder_tokenizer_args(folder: Path) -> dict[str, Any]:
    """Keyword arguments of ``Tokenizer`` for a Hugging Face folder holding ``tokenizer.json``."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TokenizerMetadataError(f"{path} is not readable JSON: {exc}", path) from None
    if not isinstance(spec, dict):
        raise TokenizerMetadataError(f"{path}: expected a JSON object", path)
    tokenizer = _hf_tokenizer_from_str(text, path)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    generation = _read_json(folder / "generation_config.json")

    kind, strip_first_space = _hf_kind(spec)
    model_spec = spec.get("model") or {}
    added = {entry["id"]: entry for entry in spec.get("added_tokens") or []}
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    pieces = []
    for token_id in range(vocab_size):
        token = tokenizer.id_to_token(token_id)
        if token is None:
            pieces.append(b"")
        elif token_id in added:
            pieces.append(token.encode())
        elif kind == "byte_level":
            pieces.append(byte_level_token_bytes(token))
        elif kind == "sentencepiece":
            pieces.append(sentencepiece_token_bytes(token, bool(model_spec.get("byte_fallback"))))
        else:
            prefix = model_spec.get("continuing_subword_prefix") or ""
            pieces.append((token[len(prefix):] if prefix and token.startswith(prefix) else token).encode())

    def token_id_of(key: str) -> int | None:
        token = _json_token(config.get(key)) or _json_token(special_map.get(key))
        return None if token is None else tokenizer.token_to_id(token)

    bos_id, eos_id, pad_id = token_id_of("bos_token"), token_id_of("eos_token"), token_id_of("pad_token")
    eog_ids = {eos_id}
    extra_eos = generation.get("eos_token_id")
    eog_ids |= set(extra_eos) if isinstance(extra_eos, list) else {extra_eos}
    eog_ids |= {tokenizer.token_to_id(text) for text in EOG_TOKEN_TEXTS}
    eog_ids -= {None}
    add_bos = len(tokenizer.encode("", add_special_tokens=True).ids) > 0
    special_ids = [token_id for token_id, entry in added.items() if entry.get("special")]
    return dict(hf_tokenizer=tokenizer, pieces=pieces, special_ids=special_ids, bos_id=bos_id, eos_id=eos_id,
                pad_id=pad_id, add_bos=add_bos, eog_ids=eog_ids, strip_first_space=strip_first_space,
                bytes_exact=kind != "other", uses_post_processor=True,
                chat_template=_hf_chat_template(folder, config))


def _hf_tokenizer_from_str(text: str, path: Path) -> HFTokenizer:
    """``tokenizers.Tokenizer.from_str``, its refusals (an Exception, or a Rust panic, which Python sees as a
    BaseException named PanicException) as TokenizerMetadataError."""
    try:
        return HFTokenizer.from_str(text)
    except BaseException as exc:
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise       # KeyboardInterrupt, SystemExit: not the file's fault
        raise TokenizerMetadataError(f"{path}: the tokenizers library cannot build it: {exc}", path) from None


def _component_types(node: Any) -> list[dict]:
    """A normalizer/pre-tokenizer/decoder spec and the specs nested in its Sequence."""
    if not isinstance(node, dict):
        return []
    nested = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers") or []
    return [node] + [part for child in nested for part in _component_types(child)]


def _hf_kind(spec: dict) -> tuple[str, bool]:
    """("byte_level" | "sentencepiece" | "other", strip the first space when decoding)."""
    decoder = _component_types(spec.get("decoder"))
    decoder_types = {part.get("type") for part in decoder}
    pre_types = {part.get("type") for part in _component_types(spec.get("pre_tokenizer"))}
    if "ByteLevel" in decoder_types or ((spec.get("model") or {}).get("type") == "BPE" and "ByteLevel" in pre_types):
        return "byte_level", False
    replaces_space = any(part.get("type") == "Replace" and part.get("content") == " " for part in decoder)
    if "Metaspace" in decoder_types or "ByteFallback" in decoder_types or replaces_space:
        metaspace = next((part for part in decoder if part.get("type") == "Metaspace"), {})
        strips = "Strip" in decoder_types or metaspace.get("prepend_scheme", "never") != "never" \
            or bool(metaspace.get("add_prefix_space"))
        return "sentencepiece", strips
    return "other", False


def _hf_chat_template(folder: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _json_token(value: Any) -> str | None:
    """A token given in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or {} when the file is absent."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
