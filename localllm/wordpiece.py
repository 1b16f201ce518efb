"""BERT WordPiece tokenizers built with ``tokenizers`` from a GGUF vocabulary or a ``vocab.txt``.

llama.cpp's converter stores a BERT vocabulary (``tokenizer.ggml.model == "bert"``)
in "phantom space" form: a word-initial piece ``the`` becomes ``▁the``, a
continuation piece ``##ing`` becomes ``ing``, control tokens (``[CLS]``...) stay
as they are. ``wordpiece_from_gguf`` turns that back into the Hugging Face
WordPiece vocabulary and assembles the same pipeline a BERT ``tokenizer.json``
describes: BertNormalizer, BertPreTokenizer, WordPiece, and the
``[CLS] $A [SEP]`` template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

PHANTOM_SPACE = "\u2581"
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL = 1, 3


def wordpiece_tokenizer(vocab: dict[str, int], *, unk_token: str, cls_token: str, sep_token: str,
                        special_tokens: list[str], lowercase: bool) -> Tokenizer:
    """A BERT tokenizer: ``[CLS] text [SEP]`` (``[CLS] a [SEP] b [SEP]`` for pairs)."""
    for role, token in (("unk_token", unk_token), ("cls_token", cls_token), ("sep_token", sep_token)):
        if token not in vocab:
            raise ValueError(f"WordPiece vocabulary has no {role} '{token}'")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=unk_token, continuing_subword_prefix="##",
                                    max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, vocab[cls_token]), (sep_token, vocab[sep_token])],
    )
    return tokenizer


def wordpiece_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a GGUF ``bert`` vocabulary (``tokenizer.ggml.*`` keys as llama.cpp writes them).

    GGUF does not record ``do_lower_case``; the vocabulary tells: one with
    (almost) no upper-case pieces belongs to an uncased (lower-casing) model.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model != "bert":
        raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}, expected 'bert' (WordPiece)")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    phantom = any(t.startswith(PHANTOM_SPACE) for t in tokens)

    vocab: dict[str, int] = {}
    pieces: list[str] = []
    for token_id, (token, token_type) in enumerate(zip(tokens, types)):
        if token_type == TOKEN_TYPE_CONTROL or not phantom:
            piece = token
        elif token.startswith(PHANTOM_SPACE):
            piece = token[len(PHANTOM_SPACE):]
        else:
            piece = "##" + token
        pieces.append(piece)
        vocab.setdefault(piece, token_id)

    def special(keys: tuple[str, ...], fallback: str) -> str:
        for key in keys:
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            if token_id is not None and 0 <= int(token_id) < len(pieces):
                return pieces[int(token_id)]
        return fallback

    control = [pieces[i] for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL]
    normal = [piece for piece, t in zip(pieces, types) if t == TOKEN_TYPE_NORMAL]
    cased_pieces = sum(piece != piece.lower() for piece in normal)
    lowercase = cased_pieces < 0.01 * len(normal)  # a cased vocabulary has thousands ("The", "Paris", ...)
    return wordpiece_tokenizer(
        vocab,
        unk_token=special(("unknown_token_id",), "[UNK]"),
        cls_token=special(("cls_token_id", "bos_token_id"), "[CLS]"),
        sep_token=special(("seperator_token_id", "eos_token_id"), "[SEP]"),
        special_tokens=control,
        lowercase=lowercase,
    )


def wordpiece_from_vocab_txt(path: str | Path, tokenizer_config: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face BERT folder that has a ``vocab.txt`` but no ``tokenizer.json``."""
    config = tokenizer_config or {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(lines):
        vocab.setdefault(token, token_id)

    def name(key: str, default: str) -> str:
        value = config.get(key, default)
        return value.get("content", default) if isinstance(value, dict) else str(value)

    names = {key: name(key, default) for key, default in (
        ("unk_token", "[UNK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"),
        ("pad_token", "[PAD]"), ("mask_token", "[MASK]"))}
    return wordpiece_tokenizer(
        vocab,
        unk_token=names["unk_token"],
        cls_token=names["cls_token"],
        sep_token=names["sep_token"],
        special_tokens=[t for t in names.values() if t in vocab],
        lowercase=bool(config.get("do_lower_case", True)),
    )
