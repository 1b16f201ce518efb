"""Building a ``Tokenizer`` from GGUF metadata or a Hugging Face folder.

The GGUF rules follow llama.cpp's ``llama-vocab.cpp``: which regexes split the text before
BPE (``tokenizer.ggml.pre``), the default special ids and ``add_bos``, and which tokens end
generation. Everything is built on ``tokenizers`` models; nothing here tokenizes by hand.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from localllm.tokenizer import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED,
                                Tokenizer, byte_level_token_bytes, sentencepiece_token_bytes)

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
def build_from_gguf_metadata(cls: type[Tokenizer], metadata: dict[str, Any]) -> Tokenizer:
    """See ``Tokenizer.from_gguf_metadata``."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise ValueError("GGUF metadata has no 'tokenizer.ggml.model'")
    if model not in ("gpt2", "llama"):
        raise ValueError(f"unsupported tokenizer.ggml.model '{model}' (supported: 'gpt2', 'llama')")
    tokens = _token_list(metadata)
    n_tokens = len(tokens)
    token_types = _per_token(metadata, "tokenizer.ggml.token_type", n_tokens, TOKEN_NORMAL)

    special = _special_ids(metadata, model, n_tokens)
    eog_ids = _eog_ids(tokens, token_types, special)  # may mark more tokens CONTROL, as llama.cpp does

    if model == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre") or "default"
        if pre not in _PRE_TYPES:
            raise ValueError(f"unknown tokenizer.ggml.pre '{pre}' for a 'gpt2' vocabulary "
                             f"(known: {', '.join(sorted(_PRE_TYPES))})")
        regex_key, ignore_merges, add_bos = _PRE_TYPES[pre]
        hf_tokenizer = _byte_level_bpe(tokens, metadata.get("tokenizer.ggml.merges") or [],
                                       PRE_TOKENIZERS[regex_key], ignore_merges)
        pieces = [_gguf_piece(text, kind, byte_level_token_bytes) for text, kind in zip(tokens, token_types)]
        add_space_prefix = False
    else:
        scores = _per_token(metadata, "tokenizer.ggml.scores", n_tokens, 0.0)
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        unk_id = special["unknown"]
        hf_tokenizer = _sentencepiece_bpe(tokens, token_types, scores, add_space_prefix,
                                          None if unk_id is None else tokens[unk_id])
        add_bos = True
        pieces = [_gguf_piece(text, kind, lambda t: sentencepiece_token_bytes(t, byte_fallback=True))
                  for text, kind in zip(tokens, token_types)]

    _add_special_tokens(hf_tokenizer, tokens, token_types)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos)) and special["bos"] is not None
    special_ids = [i for i, kind in enumerate(token_types) if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    return cls(hf_tokenizer, pieces=pieces, special_ids=special_ids, bos_id=special["bos"],
               eos_id=special["eos"], pad_id=special["padding"], add_bos=add_bos, eog_ids=eog_ids,
               strip_first_space=add_space_prefix, bytes_exact=True, uses_post_processor=False,
               chat_template=metadata.get("tokenizer.chat_template"), fim_ids=_fim_ids(metadata, special))


def _fim_ids(metadata: dict[str, Any], special: dict[str, int | None]) -> dict[str, int] | None:
    """Prefix/suffix/middle ids (``fim_*_token_id``, the older ``prefix/suffix/middle_token_id`` keys, or
    the token texts llama.cpp recognises, already folded into ``special``); None unless all three exist."""
    ids = {}
    for name, old in (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle")):
        value = special.get(name)
        if value is None:
            value = metadata.get(f"tokenizer.ggml.{old}_token_id")
        if value is not None:
            ids[name] = int(value)
    return ids if len(ids) == 3 else None


def _token_list(metadata: dict[str, Any]) -> list[str]:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("GGUF metadata 'tokenizer.ggml.tokens' is missing or empty")
    tokens = [text if text else f"[EMPTY_{i}]" for i, text in enumerate(tokens)]
    seen: dict[str, int] = {}
    for token_id, text in enumerate(tokens):
        if text in seen:
            raise ValueError(f"tokenizer.ggml.tokens: duplicate token {text!r} at ids {seen[text]} and {token_id}")
        seen[text] = token_id
    return tokens


def _per_token(metadata: dict[str, Any], key: str, n_tokens: int, default: Any) -> list:
    values = metadata.get(key)
    if values is None:
        return [default] * n_tokens
    if len(values) < n_tokens:
        raise ValueError(f"GGUF metadata '{key}' has {len(values)} entries for {n_tokens} tokens")
    return list(values[:n_tokens])


def _special_ids(metadata: dict[str, Any], model: str, n_tokens: int) -> dict[str, int | None]:
    """Special ids from the metadata; llama.cpp's SentencePiece defaults (bos 1, eos 2, unk 0)."""
    defaults = {"bos": 1, "eos": 2, "unknown": 0} if model == "llama" else {}
    special: dict[str, int | None] = {}
    for name, key in _SPECIAL_ID_KEYS.items():
        default = defaults.get(name)
        value = metadata.get(key, default)
        if value is None or not 0 <= int(value) < n_tokens:
            value = default if default is not None and default < n_tokens else None
        special[name] = None if value is None else int(value)
    return special


def _eog_ids(tokens: list[str], token_types: list[int], special: dict[str, int | None]) -> set[int]:
    """End-of-generation ids as llama.cpp collects them. Tokens it recognises by name (FIM and
    end-of-generation tokens) become CONTROL tokens, as llama.cpp does."""
    index = {text: i for i, text in enumerate(tokens)}
    found_by_name = set()
    for name, texts in _FIM_TEXTS.items():
        match = next((index[t] for t in texts if t in index), None)
        if special.get(name) is None and match is not None:
            special[name] = match
            found_by_name.add(match)
    named_eog = {index[text] for text in EOG_TOKEN_TEXTS if text in index}
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


def _gguf_piece(text: str, kind: int, normal_bytes) -> bytes:
    """token_bytes of one GGUF token: llama.cpp's token_to_piece with special tokens rendered."""
    if kind in (TOKEN_NORMAL, TOKEN_BYTE):
        return normal_bytes(text) if kind == TOKEN_NORMAL else sentencepiece_token_bytes(text, True)
    if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
        return text.encode()
    return b""  # UNUSED / UNDEFINED tokens render as nothing


def _byte_level_bpe(tokens: list[str], merges: list[str], regexes: tuple[str, ...],
                    ignore_merges: bool) -> HFTokenizer:
    vocab = {text: i for i, text in enumerate(tokens)}
    pairs = []
    for merge in merges:
        split = merge.find(" ", 1)
        if split > 0:
            pairs.append((merge[:split], merge[split + 1:]))
    tokenizer = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens: list[str], token_types: list[int], scores: list[float],
                       add_space_prefix: bool, unk_token: str | None) -> HFTokenizer:
    """SentencePiece-style BPE: merges ranked by the score of the merged piece, byte fallback."""
    vocab = {text: i for i, text in enumerate(tokens)}
    mergeable = {text for text, kind in zip(tokens, token_types) if kind in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for merged_id, merged in enumerate(tokens):
        if merged not in mergeable:
            continue
        for split in range(1, len(merged)):
            left, right = merged[:split], merged[split:]
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[merged_id]), merged_id, vocab[left], vocab[right], left, right))
    ranked.sort()
    model = models.BPE(vocab, [(left, right) for *_, left, right in ranked], unk_token=unk_token,
                       fuse_unk=True, byte_fallback=True)
    tokenizer = HFTokenizer(model)
    spaces = [normalizers.Replace(" ", "\u2581")]
    tokenizer.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("\u2581")] if add_space_prefix else []) + spaces)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tokenizer


def _add_special_tokens(tokenizer: HFTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """CONTROL/UNKNOWN tokens are special (matched only with parse_special); USER_DEFINED always match."""
    added = []
    for text, kind in zip(tokens, token_types):
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            added.append(AddedToken(text, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=False))
    if added:
        tokenizer.add_special_tokens(added)


# ---------------------------------------------------------------------------- Hugging Face
def build_from_hf_folder(cls: type[Tokenizer], folder: Path) -> Tokenizer:
    """See ``Tokenizer.from_hf_folder``."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    text = path.read_text(encoding="utf-8")
    spec = json.loads(text)
    tokenizer = HFTokenizer.from_str(text)
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
    return cls(tokenizer, pieces=pieces, special_ids=special_ids, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
               add_bos=add_bos, eog_ids=eog_ids, strip_first_space=strip_first_space,
               bytes_exact=kind != "other", uses_post_processor=True,
               chat_template=_hf_chat_template(folder, config))


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
