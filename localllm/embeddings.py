"""Sentence embeddings: tokenize -> encoder (BERT) -> pooling -> optional truncation and L2 normalization.

``load_embedding_model`` opens a Hugging Face folder (sentence-transformers
layout: pooling mode, ``max_seq_length``, Normalize module) or a GGUF ``bert``
file (the form Ollama ships all-minilm in) and returns an
:class:`EmbeddingModel`. Its ``embed`` gives what sentence-transformers'
``encode`` gives for the same model: inputs longer than ``max_seq_length``
are cut to their first ``max_seq_length - 2`` tokens between ``[CLS]`` and
``[SEP]``. Sentences go through the encoder in batches of similar length, and
each one's vector is the same bits whatever else is in the request (the
encoder and the pooling compute every sentence from its own tokens alone).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers

from .formats.gguf import read_gguf
from .formats.safetensors import POOLING_MODES, read_hf_folder
from .models import bert
from .tokenizer import Tokenizer
from .wordpiece import wordpiece_from_gguf, wordpiece_from_vocab_txt

# GGUF general.architecture values that load_embedding_model reads
ENCODER_ARCHITECTURES = bert.ARCHITECTURES
# GGUF bert.pooling_type (llama.cpp's enum llama_pooling_type) -> pooling mode
GGUF_POOLING_TYPES = {0: "mean", 1: "mean", 2: "cls", 3: "lasttoken"}  # 0 = none: embed as mean
# At most this many tokens (batch x its longest length) go through the encoder at once.
MAX_BATCH_TOKENS = 8192


class InputTooLong(ValueError):
    """An input has more tokens than ``max_seq_length`` and truncation was not allowed."""

    def __init__(self, index: int, n_tokens: int, max_seq_length: int):
        super().__init__(f"input {index} has {n_tokens} tokens, more than the model's max_seq_length "
                         f"{max_seq_length} (pass truncate=True to cut it)")
        self.index = index
        self.n_tokens = n_tokens
        self.max_seq_length = max_seq_length


class SentenceTokenizer:
    """Text or content token ids -> model input ids: ``prefix + content + suffix`` (``[CLS] ... [SEP]``).

    The special tokens the model adds around one sequence are read off the
    tokenizer's own post-processor once, so truncation can cut the content and
    keep them, as Hugging Face tokenizers do.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, lowercase: bool = False):
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.lowercase = lowercase
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        probe = "hello world"
        content = tokenizer.encode(probe, add_special_tokens=False).ids
        full = tokenizer.encode(probe).ids
        for start in range(len(full) - len(content) + 1):
            if full[start:start + len(content)] == content:
                self.prefix, self.suffix = full[:start], full[start + len(content):]
                break
        else:
            raise ValueError("cannot locate the text between the tokenizer's special tokens")

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def content_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def with_specials(self, content: list[int], max_length: int | None = None) -> list[int]:
        """``prefix + content + suffix``, the content cut so that the whole fits ``max_length``."""
        if max_length is not None:
            content = content[:max(0, max_length - self.n_special)]
        return [*self.prefix, *content, *self.suffix]


def pool_sentences(hidden: np.ndarray, offsets: np.ndarray, mode: str) -> np.ndarray:
    """Sentence vectors from packed token vectors, as sentence-transformers' Pooling computes them.

    hidden (n, dim), sentence s is rows ``offsets[s]:offsets[s + 1]`` -> (b, dim).
    Each sentence is pooled from its own rows only (a sentence without tokens gets zeros).
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode '{mode}' (expected one of {', '.join(POOLING_MODES)})")
    vectors = np.zeros((len(offsets) - 1, hidden.shape[-1]), np.float32)     # (b, dim)
    for s, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        if stop == start:
            continue
        tokens = hidden[start:stop]                                           # (m, dim)
        m = np.float32(stop - start)
        if mode == "cls":
            vectors[s] = tokens[0]
        elif mode == "lasttoken":
            vectors[s] = tokens[-1]
        elif mode == "max":
            vectors[s] = tokens.max(axis=0)
        elif mode == "mean":
            vectors[s] = tokens.sum(axis=0) / m
        elif mode == "mean_sqrt_len_tokens":
            vectors[s] = tokens.sum(axis=0) / np.sqrt(m)
        else:  # weightedmean: token i (from 1) weighs i
            weights = np.arange(1, stop - start + 1, dtype=np.float32)           # (m,)
            vectors[s] = (tokens * weights[:, None]).sum(axis=0) / weights.sum()
    return vectors


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """:func:`pool_sentences` over a padded batch: hidden (b, L, dim), mask (b, L) with 1 on real tokens -> (b, dim)."""
    mask = np.asarray(mask).astype(bool)
    offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
    return pool_sentences(hidden[mask], offsets, mode)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero), like torch's F.normalize."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class EmbeddingModel:
    """A sentence-embedding model: ``embed(texts) -> (n, dim)`` float32."""

    capabilities = ("embedding",)

    def __init__(self, name: str, encoder: bert.BertModel, tokenizer: SentenceTokenizer, pooling: str,
                 max_seq_length: int, has_normalize_module: bool = True):
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling '{pooling}' is not one of {', '.join(POOLING_MODES)}")
        if not 0 < max_seq_length <= encoder.config.n_ctx_train:
            raise ValueError(f"max_seq_length {max_seq_length} must lie in 1..{encoder.config.n_ctx_train} "
                             f"(the model's learned positions)")
        if max_seq_length <= tokenizer.n_special:
            raise ValueError(f"max_seq_length {max_seq_length} leaves no room for text "
                             f"besides {tokenizer.n_special} special tokens")
        self.name = name
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_seq_length = max_seq_length
        self.has_normalize_module = has_normalize_module  # the model was trained to be used normalized
        self.dim = encoder.config.dim

    def __repr__(self) -> str:
        return (f"EmbeddingModel(name={self.name!r}, dim={self.dim}, max_seq_length={self.max_seq_length}, "
                f"pooling={self.pooling!r})")

    # ---- inputs

    def _content_ids(self, texts) -> list[list[int]]:
        """Normalize ``texts`` (str | list[str] | list[list[int]]) to content token ids per input."""
        if isinstance(texts, str):
            return self.tokenizer.content_ids([texts])
        if not isinstance(texts, Sequence) and not isinstance(texts, np.ndarray):
            raise TypeError(f"texts must be a string, a list of strings or a list of token id lists, "
                            f"got {type(texts).__name__}")
        items = list(texts)
        if all(isinstance(t, str) for t in items):
            return self.tokenizer.content_ids(items)
        content = []
        for index, item in enumerate(items):
            if isinstance(item, str):
                raise TypeError("texts must be all strings or all token id lists, not a mix")
            ids = np.asarray(item)
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise TypeError(f"texts[{index}] must be a string or a list of token ids (ints)")
            if ids.size and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
                raise ValueError(f"texts[{index}]: token ids must lie in 0..{self.tokenizer.vocab_size - 1}")
            content.append([int(i) for i in ids])
        return content

    def _input_ids(self, texts, truncate: bool) -> list[list[int]]:
        sequences = []
        for index, content in enumerate(self._content_ids(texts)):
            n_tokens = len(content) + self.tokenizer.n_special
            if n_tokens > self.max_seq_length and not truncate:
                raise InputTooLong(index, n_tokens, self.max_seq_length)
            sequences.append(self.tokenizer.with_specials(content, self.max_seq_length))
        return sequences

    def count_tokens(self, texts) -> list[int]:
        """Tokens each input has for the model, special tokens included, before any truncation."""
        return [len(c) + self.tokenizer.n_special for c in self._content_ids(texts)]

    # ---- embedding

    def embed(self, texts, normalize: bool = True, truncate: bool = True, dimensions: int | None = None,
              batch_size: int = 32) -> np.ndarray:
        """Embed strings (or token id lists without special tokens) -> float32 ``(n, dim or dimensions)``.

        ``truncate``: cut inputs over ``max_seq_length`` tokens (keeping the
        closing special token); when False such an input raises
        :class:`InputTooLong`. ``dimensions``: keep the first ``dimensions``
        components (then normalize, if ``normalize``).
        """
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer))
                                       or not 1 <= dimensions <= self.dim):
            raise ValueError(f"dimensions must be an integer in 1..{self.dim}, got {dimensions!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        sequences = self._input_ids(texts, truncate)
        vectors = np.zeros((len(sequences), self.dim), np.float32)
        order = np.argsort([len(s) for s in sequences], kind="stable")       # similar lengths batch together
        start = 0
        while start < len(order):
            longest = len(sequences[order[min(start + batch_size, len(order)) - 1]])
            count = max(1, min(batch_size, MAX_BATCH_TOKENS // max(longest, 1)))
            batch = order[start:start + count]
            vectors[batch] = self._embed_batch([sequences[i] for i in batch])
            start += count
        if dimensions is not None:
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
        return l2_normalize(vectors) if normalize else vectors

    def _embed_batch(self, sequences: list[list[int]]) -> np.ndarray:
        hidden, offsets = self.encoder.encode(sequences)                      # (n, dim), (b + 1,)
        return pool_sentences(hidden, offsets, self.pooling)                  # (b, dim)


# --------------------------------------------------------------------------- loading

def load_embedding_model(path: str | Path, *, max_seq_length: int | None = None, name: str | None = None,
                         backend: str = "auto") -> EmbeddingModel:
    """Open an embedding model: a Hugging Face folder or a ``.gguf`` file (architecture ``bert``).

    ``max_seq_length`` overrides the model's own limit (sentence-transformers'
    ``max_seq_length``; for GGUF, ``bert.context_length``).
    """
    path = Path(path)
    if path.is_dir():
        return _load_hf(path, max_seq_length, name, backend)
    if path.is_file():
        return _load_gguf(path, max_seq_length, name, backend)
    raise FileNotFoundError(f"no embedding model at {path} (expected a Hugging Face folder or a .gguf file)")


def _load_hf(folder: Path, max_seq_length: int | None, name: str | None, backend: str) -> EmbeddingModel:
    hf = read_hf_folder(folder)
    config = bert.config_from_hf(hf.config)
    encoder = bert.BertModel(config, bert.weights_from_hf(hf.tensors), backend=backend)
    st = hf.sentence_transformers
    if hf.tokenizer_file is not None:
        raw_tokenizer = Tokenizer.from_hf_folder(folder).hf_tokenizer
    elif hf.vocab_file is not None:
        raw_tokenizer = wordpiece_from_vocab_txt(hf.vocab_file, hf.tokenizer_config)
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")
    tokenizer = SentenceTokenizer(raw_tokenizer, lowercase=bool(st and st.do_lower_case))
    if max_seq_length is None:
        max_seq_length = st.max_seq_length if st and st.max_seq_length else None
    if max_seq_length is None:
        model_max = hf.tokenizer_config.get("model_max_length")
        limit = int(model_max) if isinstance(model_max, (int, float)) and model_max < 1e6 else config.n_ctx_train
        max_seq_length = min(limit, config.n_ctx_train)
    if name is None:
        name = folder.parent.name if folder.name in ("model", "") else folder.name
    return EmbeddingModel(name, encoder, tokenizer, pooling=(st.pooling if st and st.pooling else "mean"),
                          max_seq_length=max_seq_length, has_normalize_module=bool(st and st.normalize))


def _load_gguf(path: Path, max_seq_length: int | None, name: str | None, backend: str) -> EmbeddingModel:
    gguf = read_gguf(path)
    config = bert.config_from_gguf(gguf)
    weights = {n: t for n, t in gguf.tensors.items() if not n.startswith("cls.")}
    encoder = bert.BertModel(config, weights, backend=backend)
    tokenizer = SentenceTokenizer(wordpiece_from_gguf(gguf.metadata))
    pooling_type = int(gguf.arch_key("pooling_type", 1))
    if pooling_type not in GGUF_POOLING_TYPES:
        raise ValueError(f"{path.name}: bert.pooling_type {pooling_type} is not an embedding pooling "
                         f"(supported: 0 none, 1 mean, 2 cls, 3 last)")
    return EmbeddingModel(name or str(gguf.metadata.get("general.name") or path.stem), encoder, tokenizer,
                          pooling=GGUF_POOLING_TYPES[pooling_type],
                          max_seq_length=max_seq_length or config.n_ctx_train, has_normalize_module=True)
