"""Tokenizer (built on the ``tokenizers`` library) and an incremental, UTF-8-safe detokenizer.

Two sources:

* a GGUF vocabulary (``Tokenizer.from_gguf_metadata``), following llama.cpp's rules
  (``llama-vocab.cpp``):
    - ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges; the
      pre-tokenizer regexes are chosen by ``tokenizer.ggml.pre`` (see ``tokenizer_build.PRE_TOKENIZERS``).
    - ``tokenizer.ggml.model == "llama"``: SentencePiece style. Pieces are merged by score
      (the highest-scoring pair first), characters missing from the vocabulary fall back
      to ``<0xAB>`` byte tokens, spaces become "▁" and, with ``add_space_prefix``, every
      text run (at the start and after a special token) gets a leading "▁".
  Tokens of type CONTROL (3) and UNKNOWN (2) are special tokens: written in the text they
  become one token when ``parse_special`` is true. USER_DEFINED (4) tokens always do.
* a Hugging Face folder (``Tokenizer.from_hf_folder``): ``tokenizer.json`` as is, with
  ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``generation_config.json``
  for the BOS/EOS/PAD tokens and the chat template. Padding and truncation stored in
  ``tokenizer.json`` are switched off (callers decide how to handle long inputs). For these,
  ``add_bos`` means "run the tokenizer's post-processor": it adds whatever the model
  declares (``[CLS] ... [SEP]`` for BERT, ``<|begin_of_text|>`` for Llama 3); ``add_bos``
  defaults to true when that post-processor adds anything.

Decoding is exact: the text of a list of ids is the UTF-8 decoding of the concatenated
``token_bytes`` (byte-level BPE: the GPT-2 byte<->unicode map reversed; SentencePiece:
"▁" -> " ", ``<0xAB>`` -> ``b"\\xab"``). No "clean up tokenization spaces" pass is made.
With ``add_space_prefix`` the one space the encoder added in front of the text is removed
from the first token (after an optional leading BOS). WordPiece-style HF tokenizers are
decoded by ``tokenizers`` itself.

End of generation (``eog_ids``) follows llama.cpp: the EOS, EOT and EOM ids, the FIM
pad/repo/separator tokens, and every token whose text is one of ``tokenizer_build.EOG_TOKEN_TEXTS``.
"""
from __future__ import annotations

import codecs
import re
import threading
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as HFTokenizer

from localllm.tokenizer_build import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNDEFINED, TOKEN_UNKNOWN,
                                      TOKEN_UNUSED, TOKEN_USER_DEFINED, byte_level_token_bytes, bytes_to_unicode,
                                      gguf_tokenizer_args, hf_folder_tokenizer_args, sentencepiece_token_bytes)

__all__ = ["Tokenizer", "IncrementalDetokenizer", "bytes_to_unicode", "byte_level_token_bytes",
           "sentencepiece_token_bytes", "TOKEN_UNDEFINED", "TOKEN_NORMAL", "TOKEN_UNKNOWN", "TOKEN_CONTROL",
           "TOKEN_USER_DEFINED", "TOKEN_UNUSED", "TOKEN_BYTE"]


class Tokenizer:
    """Text <-> token ids for one model. Build it with ``from_gguf_metadata`` or ``from_hf_folder``.

    Attributes: ``vocab_size``, ``bos_id``/``eos_id``/``pad_id`` (int or None), ``bos_token``/
    ``eos_token`` (their text, for chat templates), ``add_bos`` (encode's default), ``eog_ids``
    (end-of-generation ids), ``special_ids`` (ids skipped by ``skip_special``), ``chat_template``
    (the model's template text or None) and ``hf_tokenizer`` (the ``tokenizers.Tokenizer``).
    """

    def __init__(self, hf_tokenizer: HFTokenizer, *, pieces: list[bytes], special_ids: Iterable[int],
                 bos_id: int | None, eos_id: int | None, pad_id: int | None, add_bos: bool,
                 eog_ids: Iterable[int], strip_first_space: bool, bytes_exact: bool,
                 uses_post_processor: bool, chat_template: str | None = None,
                 fim_ids: dict[str, int] | None = None):
        self.hf_tokenizer = hf_tokenizer
        self._pieces = pieces
        self.vocab_size = len(pieces)
        self.special_ids = frozenset(special_ids)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.bos_token = self._text_of(bos_id)
        self.eos_token = self._text_of(eos_id)
        self.add_bos = bool(add_bos)
        self.eog_ids = frozenset(i for i in eog_ids if i is not None and 0 <= i < self.vocab_size)
        # fill-in-the-middle: {"fim_pre", "fim_suf", "fim_mid"} ids, or None when the model has no FIM tokens
        self.fim_ids = fim_ids
        self.chat_template = chat_template
        self._strip_first_space = strip_first_space
        self._bytes_exact = bytes_exact
        self._uses_post_processor = uses_post_processor
        self._plain_tokenizer: HFTokenizer | None = None
        self._plain_lock = threading.Lock()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> "Tokenizer":
        """Build from GGUF metadata (``tokenizer.ggml.*`` keys as plain Python values)."""
        return cls(**gguf_tokenizer_args(metadata))

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> "Tokenizer":
        """Build from a Hugging Face folder holding ``tokenizer.json``."""
        return cls(**hf_folder_tokenizer_args(Path(folder)))

    # ---------------------------------------------------------------- encode
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        add_bos: None -> ``self.add_bos``. For GGUF vocabularies it prepends ``bos_id``; for HF
            folders it runs the tokenizer's post-processor (e.g. BERT's ``[CLS] ... [SEP]``).
        parse_special: special tokens written in the text (``"<|im_start|>"``) become one token;
            false encodes them as plain text (user-defined tokens are always matched).

        A lone surrogate in ``text`` is encoded as U+FFFD. A byte-level vocabulary that lacks a byte
        (SmolLM2 has no token for 0xF1, the lead byte of U+40000..U+7FFFF) drops it, as llama.cpp does.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = without_lone_surrogates(text)
        add = self.add_bos if add_bos is None else bool(add_bos)
        tokenizer = self.hf_tokenizer if parse_special else self._plain()
        if self._uses_post_processor:
            return tokenizer.encode(text, add_special_tokens=add).ids
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if add:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def _plain(self) -> HFTokenizer:
        """A twin of ``hf_tokenizer`` that does not split special tokens out of the text."""
        with self._plain_lock:
            if self._plain_tokenizer is None:
                plain = _sharing_twin(self.hf_tokenizer)
                plain.encode_special_tokens = True
                self._plain_tokenizer = plain
            return self._plain_tokenizer

    # ---------------------------------------------------------------- decode
    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes ``token_id`` stands for (special tokens: their UTF-8 text)."""
        return self._pieces[self._check_id(token_id)]

    def token_text(self, token_id: int) -> str:
        """Readable text of one token (U+FFFD where it holds part of a UTF-8 character)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of a whole sequence of ids (starting at the beginning of a text)."""
        ids = [self._check_id(i) for i in ids]
        if not self._bytes_exact:
            return self.hf_tokenizer.decode(ids, skip_special_tokens=skip_special)
        pieces = _PieceStream(self, skip_special, at_text_start=True)
        return b"".join(pieces.next(i) for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special: bool = False, *, at_text_start: bool = False) -> "IncrementalDetokenizer":
        """An incremental detokenizer for a stream of generated ids.

        at_text_start: the ids begin a text, so SentencePiece's added leading space is removed
            (as ``decode`` does); leave false for continuations of a prompt.
        """
        return IncrementalDetokenizer(self, skip_special, at_text_start=at_text_start)

    # ---------------------------------------------------------------- helpers
    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return int(token_id)

    def _text_of(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._pieces[token_id].decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"add_bos={self.add_bos}, eog_ids={sorted(self.eog_ids)})")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """``text`` with every lone surrogate (which UTF-8 cannot carry; JSON's "\\ud800" escape makes one)
    replaced by U+FFFD, as Go's JSON decoder (Ollama) does."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)


def _sharing_twin(tokenizer: HFTokenizer) -> HFTokenizer:
    """A second ``tokenizers.Tokenizer`` with the same model, normalizer, pre-tokenizer, post-processor,
    decoder (shared, not copied: a 262k-token vocabulary takes seconds to serialize) and added tokens."""
    twin = HFTokenizer(tokenizer.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        component = getattr(tokenizer, part)
        if component is not None:
            setattr(twin, part, component)
    added = tokenizer.get_added_tokens_decoder()
    runs: list[tuple[bool, list]] = []  # consecutive ids of one kind, added in id order so new ids match
    for token_id in sorted(added):
        token = added[token_id]
        if runs and runs[-1][0] == token.special:
            runs[-1][1].append(token)
        else:
            runs.append((token.special, [token]))
    for special, tokens in runs:
        (twin.add_special_tokens if special else twin.add_tokens)(tokens)
    same_ids = {i: t.content for i, t in twin.get_added_tokens_decoder().items()} == \
        {i: t.content for i, t in added.items()}
    return twin if same_ids else HFTokenizer.from_str(tokenizer.to_str())


class _PieceStream:
    """Token ids -> their bytes, skipping special tokens if asked and removing the
    SentencePiece prefix space from the first token (after an optional leading BOS)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool, at_text_start: bool):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._strip_pending = at_text_start and tokenizer._strip_first_space
        self._count = 0

    def next(self, token_id: int) -> bytes:
        tokenizer = self._tokenizer
        leading_bos = self._count == 0 and token_id == tokenizer.bos_id
        self._count += 1
        special = token_id in tokenizer.special_ids
        piece = b"" if (self._skip_special and special) else tokenizer._pieces[token_id]
        if self._strip_pending and not leading_bos:
            self._strip_pending = False
            if not special and piece.startswith(b" "):
                piece = piece[1:]
        return piece


class IncrementalDetokenizer:
    """Turns generated token ids into text as they come, never splitting a UTF-8 character.

    ``push(id)`` returns the newly completed text, ``flush()`` what is still held back (an
    incomplete character comes out as U+FFFD), ``text`` everything emitted so far. The
    concatenation of all pushes and the flush equals ``Tokenizer.decode`` of the ids (with
    ``at_text_start=True``).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, *, at_text_start: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self.text = ""
        if tokenizer._bytes_exact:
            self._pieces = _PieceStream(tokenizer, skip_special, at_text_start)
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._ids: list[int] = []

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes (may be empty)."""
        token_id = self._tokenizer._check_id(token_id)
        if self._tokenizer._bytes_exact:
            new = self._utf8.decode(self._pieces.next(token_id))
        else:
            self._ids.append(token_id)
            full = self._tokenizer.decode(self._ids, skip_special=self._skip_special)
            if full.endswith("\ufffd") or not full.startswith(self.text):
                return ""
            new = full[len(self.text):]
        self.text += new
        return new

    def flush(self) -> str:
        """Emit whatever is held back at the end of the stream."""
        if self._tokenizer._bytes_exact:
            new = self._utf8.decode(b"", final=True)
        else:
            full = self._tokenizer.decode(self._ids, skip_special=self._skip_special)
            new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += new
        return new
