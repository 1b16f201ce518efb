"""Constrained decoding with llguidance: JSON mode, JSON schema, regex and Lark grammars.

A :class:`Constraint` is an immutable, validated llguidance grammar. It is what
``GenerationParams.constraint`` holds; ``generate.make_sequences`` calls
``constraint.make_processor(tokenizer)`` once per choice and the sampler runs
the returned :class:`GrammarProcessor` last in its logits-processor chain::

    logits (vocab_size,) -> ... -> GrammarProcessor: feed the newly accepted token
    to the llguidance matcher, compute the next-token bitmask, set every token the
    grammar forbids to -inf -> log_softmax / sampler

Once the grammar is complete the mask allows only the tokenizer's end-of-generation
tokens (``Tokenizer.eog_ids``), so the sequence ends with finish_reason "stop".
A ``max_tokens`` limit can still cut the output short (finish_reason "length").

Choices made here (see ``JSON_OPTIONS``):

* JSON whitespace is bounded, not free: wherever JSON allows whitespace, the output may
  have none, one space, or one newline followed by up to 20 spaces/tabs of indentation
  (``JSON_WHITESPACE``). Compact (``{"a": 1}``) and pretty-printed JSON both fit, so
  a small model keeps the layout it was trained on (forcing one-line JSON made
  SmolLM2-135M ramble more), but it can never loop on whitespace: every
  whitespace run is followed by a JSON token.
* Object properties come in the order the schema's ``properties`` lists them
  (llguidance's rule), so ``{"name": ..., "arguments": ...}`` always starts with the name.
* A schema keyword llguidance cannot enforce (``if``/``then``, ``not``, ``uniqueItems``,
  ``contains``, ``dependentRequired``, ``propertyNames``, unknown ``format`` values,
  look-around in ``pattern``, remote ``$ref`` ...) raises :class:`UnsupportedSchema`
  when the constraint is built, whatever ``strict`` says: a constraint is never
  silently weaker than what was asked. Annotations (``title``, ``description``,
  ``default``, ``examples``) are ignored, as JSON Schema allows.

>>> from localllm import constrain
>>> c = constrain.json_schema({"type": "object", "properties": {"age": {"type": "integer"}}})
>>> model.generate("Age of a toddler as JSON:", constraint=c, max_tokens=20)   # doctest: +SKIP
'{"age": 2}'
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

import llguidance
from llguidance import LLMatcher

# At each place JSON allows whitespace: nothing, one space, or one newline plus up to 20 spaces/tabs of indent.
JSON_WHITESPACE = r"(\n[ \t]{0,20})| "
JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}
ANY_JSON_OBJECT = {"type": "object"}
JSON_KINDS = ("json_object", "json_schema", "tool_call")
TOOL_CALL_SUFFIX_TOKENS = 8      # room for a tool-call format's closing text ("\n</tool_call>")


class UnsupportedSchema(ValueError):
    """The JSON schema (or grammar) cannot be enforced; the message says which part and why."""


class ConstraintViolation(RuntimeError):
    """A token reached the grammar that it does not accept (the mask was bypassed), or llguidance failed."""


@dataclass(frozen=True)
class Constraint:
    """A validated llguidance grammar that token masks are computed from.

    grammar: the llguidance grammar text (``LLMatcher.grammar_from_*`` output).
    kind: what it came from: "json_object", "json_schema", "regex", "lark" or "tool_call".
    Build it with the factories (:func:`json_object`, :func:`json_schema`, :func:`regex`,
    :func:`lark`, ``tools.tool_call_constraint``), which validate up front.
    """

    grammar: str
    kind: str
    answer_header: str = ""   # reasoning formats with channels (Harmony): the header this output follows instead
                              # of the format's answer header (a forced call is a commentary message, not final)

    def make_processor(self, tokenizer, max_new_tokens: int | None = None) -> "GrammarProcessor":
        """A fresh logits processor (own matcher state) for one sequence generated with ``tokenizer``.

        max_new_tokens: the sequence's token budget. When given, JSON constraints close the
            JSON in time (see :class:`JsonCloser`), so output cut by ``max_tokens`` still parses.
        """
        closer = None
        if self.kind in JSON_KINDS and max_new_tokens:
            closer = JsonCloser(tokenizer, suffix_tokens=TOOL_CALL_SUFFIX_TOKENS if self.kind == "tool_call" else 0)
        return GrammarProcessor(self.matcher(tokenizer), tokenizer.vocab_size, max_new_tokens, closer)

    def matcher(self, tokenizer) -> LLMatcher:
        """A new llguidance matcher for this grammar over ``tokenizer`` (a ``localllm.tokenizer.Tokenizer``)."""
        matcher = LLMatcher(llg_tokenizer(tokenizer), self.grammar, log_level=0)
        if matcher.is_error():
            raise UnsupportedSchema(f"{self.kind} grammar rejected by llguidance: {matcher.get_error()}")
        return matcher


def _validated(grammar: str, kind: str, what: str) -> Constraint:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise UnsupportedSchema(f"{what} cannot be enforced: {messages[0]}")
    return Constraint(grammar, kind)


def json_object() -> Constraint:
    """JSON mode: any JSON object (OpenAI ``response_format: {"type": "json_object"}``, Ollama ``format: "json"``)."""
    return json_schema(ANY_JSON_OBJECT, kind="json_object")


def json_schema(schema: dict, strict: bool = True, name: str | None = None, *, kind: str = "json_schema") -> Constraint:
    """Output that validates against the JSON ``schema`` (a dict, draft 2020-12 keywords).

    strict: accepted for OpenAI compatibility; the schema is enforced either way and an
        unsupported keyword raises :class:`UnsupportedSchema` either way.
    name: the schema's name (OpenAI ``json_schema.name``), used in error messages only.
    """
    label = f"json_schema '{name}'" if name else "json_schema"
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{label}: the schema must be a JSON object, got {type(schema).__name__}")
    if not isinstance(strict, bool):
        raise ValueError(f"{label}: strict must be a boolean")
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise UnsupportedSchema(f"{label} cannot be enforced: {exc}") from exc
    return _validated(grammar, kind, label)


def regex(pattern: str) -> Constraint:
    """Output that fully matches ``pattern`` (Rust ``regex`` syntax: no look-around, no back-references)."""
    if not isinstance(pattern, str):
        raise ValueError("regex pattern must be a string")
    return _validated(LLMatcher.grammar_from_regex(pattern), "regex", f"regex {pattern!r}")


def lark(grammar: str, kind: str = "lark", answer_header: str = "") -> Constraint:
    """Output that the Lark-style grammar accepts (llguidance's dialect: ``start`` rule, ``%json {...}``,
    special tokens as ``<|name|>``). ``answer_header``: see :class:`Constraint`."""
    if not isinstance(grammar, str):
        raise ValueError("lark grammar must be a string")
    constraint = _validated(LLMatcher.grammar_from_lark(grammar), kind, f"{kind} grammar")
    return replace(constraint, answer_header=answer_header) if answer_header else constraint


def schema_json_grammar_fragment(schema: dict) -> str:
    """``%json {...}`` text for embedding ``schema`` in a Lark grammar, with this module's JSON_OPTIONS."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"the schema must be a JSON object, got {type(schema).__name__}")
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


# ----------------------------------------------------------------------------- API request fields


def from_response_format(response_format: Any) -> Constraint | None:
    """The constraint for an OpenAI ``response_format`` (None for absent or ``{"type": "text"}``).

    ``{"type": "json_object"}`` -> :func:`json_object`; ``{"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}`` -> :func:`json_schema`. Bad shapes raise ValueError naming
    the field; unenforceable schemas raise :class:`UnsupportedSchema` (a ValueError too).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format.json_schema must be an object with a 'schema'")
        schema = spec.get("schema", ANY_JSON_OBJECT)
        strict = spec.get("strict")
        return json_schema(schema, strict=bool(strict) if strict is not None else False, name=spec.get("name"))
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def from_ollama_format(format: Any) -> Constraint | None:
    """The constraint for Ollama's ``format``: ``"json"`` (JSON mode), a JSON schema object, or ""/None (none)."""
    if format is None or format == "":
        return None
    if format == "json":
        return json_object()
    if isinstance(format, dict):
        return json_schema(format)
    raise ValueError(f"format must be \"json\" or a JSON schema object, got {format!r}")


# ----------------------------------------------------------------------------- tokenizer bridge


_LLG_TOKENIZERS: "weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_LLG_LOCK = threading.Lock()


class _TokenizerBridge:
    """What ``llguidance.TokenizerWrapper`` needs, taken from a localllm Tokenizer.

    Token bytes come from ``Tokenizer.token_bytes`` (exactly what the detokenizer
    writes), so the grammar sees the same bytes the user gets.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False, parse_special=False)


def llg_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for a localllm Tokenizer (built once per Tokenizer object, ~0.1 s)."""
    with _LLG_LOCK:
        cached = _LLG_TOKENIZERS.get(tokenizer)
        if cached is None:
            eog = sorted(tokenizer.eog_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
            if not eog:
                raise ValueError("the tokenizer has no end-of-generation token: constrained output could not stop")
            cached = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerBridge(tokenizer)), eos_token=eog)
            _LLG_TOKENIZERS[tokenizer] = cached
        return cached


# ----------------------------------------------------------------------------- the logits processor


class GrammarProcessor:
    """Logits processor ``(logits, history, n_prompt) -> logits`` that masks what the grammar forbids.

    It is called once before each sampled token. ``history[n_prompt:]`` are the tokens
    generated so far; the ones it has not seen yet are fed to the matcher first. One
    instance serves one sequence. With ``max_new_tokens`` and a ``closer``, the last
    tokens of the budget are spent closing the JSON (see :class:`JsonCloser`).
    """

    def __init__(self, matcher: LLMatcher, vocab_size: int, max_new_tokens: int | None = None,
                 closer: "JsonCloser | None" = None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens
        self.closer = closer
        self.n_consumed = 0
        self.bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def advance(self, generated: Sequence[int]) -> None:
        """Feed the tokens of ``generated`` that the matcher has not seen yet."""
        if len(generated) < self.n_consumed:
            raise ConstraintViolation("the generated tokens shrank: one grammar processor serves one sequence")
        new = [int(t) for t in generated[self.n_consumed:]]
        if new and not self.matcher.consume_tokens(new):
            raise ConstraintViolation(f"token(s) {new} rejected by the grammar: {self.matcher.get_error()}")
        if self.closer is not None:
            self.closer.track(new)
        self.n_consumed = len(generated)

    def allowed(self) -> np.ndarray:
        """Boolean mask ``(vocab_size,)`` of the tokens the grammar allows next."""
        return _mask(self.matcher, self.bitmask, self.vocab_size)

    def __call__(self, logits: np.ndarray, history: Sequence[int], n_prompt: int) -> np.ndarray:
        self.advance(history[n_prompt:])
        allowed = self.allowed()
        if self.closer is not None:
            remaining = self.max_new_tokens - self.n_consumed
            allowed = self.closer.restrict(self.matcher, allowed, remaining)
        out = np.full_like(logits, -np.inf)
        width = min(self.vocab_size, logits.shape[-1])   # model rows past the tokenizer's vocabulary stay -inf
        np.copyto(out[..., :width], logits[..., :width], where=allowed[:width])
        return out


def _mask(matcher: LLMatcher, bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
    if matcher.is_error():
        raise ConstraintViolation(f"grammar matcher failed: {matcher.get_error()}")
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")   # token i is bit i % 32 of word i // 32
    return bits[:vocab_size].view(np.bool_)


_CLOSING_TOKEN = re.compile(rb" *([\]}\[{\":,0-9]{1,6}|null|true|false)")


class JsonCloser:
    """Spends the end of a token budget closing the JSON, so output cut by ``max_tokens`` still parses.

    It tracks the JSON nesting of the generated text (open strings, objects, arrays) and
    does nothing while the budget is comfortable. Then, in three stages:

    1. Close to the end it forbids tokens that start a new member, array element or
       container (an unquoted ``,`` ``{`` or ``[``) unless the grammar leaves no other
       choice (a required property), and measures how long a closing takes from here.
    2. Within ``MARGIN`` tokens of that measure it plans a closing at every step, on a
       copy of the matcher: each planned step takes, among the allowed *closing tokens*
       (short tokens made of ``"]}[{:,`` and digits, or ``null``/``true``/``false``), those
       that leave the least to close; when none is allowed (a required key, a pattern, a
       fixed suffix such as ``</tool_call>``) the longest allowed token that is not only
       whitespace. Every planned step goes through llguidance, so the plan obeys the grammar.
    3. When the plan needs the rest of the budget (keeping one token for the end of
       generation and ``SAFETY`` spare), the mask is narrowed to the plan's first step;
       the model still chooses among equally good closing tokens.

    Once the grammar is complete, the end of generation is forced when the budget could
    not hold another element (parallel tool calls). A budget too small for any closing
    still cuts the output.
    """

    PLAN_LIMIT = 64          # longest closing plan looked for
    MARGIN = 12              # plan only when the budget is within this of the cheap estimate
    EXPANSION_WINDOW = 12    # ... and from this many tokens earlier, start no new member, element or container
    SAFETY = 3               # start closing this many tokens early: one free token can add a few steps

    def __init__(self, tokenizer, suffix_tokens: int = 0):
        self.tokenizer = tokenizer
        self.suffix_tokens = suffix_tokens
        self.candidates, self.candidate_bytes, self.token_lengths, self.expands, self.space_only = \
            _closing_tokens(tokenizer)
        self.eog = np.array(sorted(tokenizer.eog_ids), dtype=np.int64)
        self.container_closers = self.candidates[[i for i, piece in enumerate(self.candidate_bytes)
                                                  if b"}" in piece or b"]" in piece]]   # tokens ending an object/array
        self.state = _JsonNesting()
        self.plan_steps: int | None = None      # length of the last closing plan
        self.bitmask = np.zeros((tokenizer.vocab_size + 31) // 32, dtype=np.int32)

    def track(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.state.feed(self.tokenizer.token_bytes(token))

    def restrict(self, matcher: LLMatcher, allowed: np.ndarray, remaining: int) -> np.ndarray:
        """``allowed``, narrowed as the end of the budget requires (see the class docstring)."""
        window = self.suffix_tokens + self.MARGIN
        if allowed[self.eog].any():              # complete; with little budget left, do not start another call
            if remaining > 2 * window:
                return allowed
            narrowed = np.zeros_like(allowed)
            narrowed[self.eog] = allowed[self.eog]
            return narrowed
        limit = min(self.PLAN_LIMIT, remaining + 1)
        estimate = max(self.state.cost(), self.plan_steps or 0)
        if remaining <= estimate + window + self.EXPANSION_WINDOW:
            allowed = self._without_expansions(allowed)
            if self.plan_steps is None:          # first look: the cheap estimate misses required properties
                self.plan_steps, _ = self.plan(matcher, allowed, limit)
                estimate = max(estimate, self.plan_steps)
        if remaining > estimate + window:
            return allowed
        self.plan_steps, first = self.plan(matcher, allowed, limit)
        if first is None or self.plan_steps + 1 + self.SAFETY < remaining:
            return allowed
        narrowed = np.zeros_like(allowed)
        narrowed[first] = True
        return narrowed

    def _without_expansions(self, allowed: np.ndarray) -> np.ndarray:
        """``allowed`` minus tokens that write an unquoted ``,``, ``{`` or ``[`` (unless only whitespace would remain,
        or the grammar cannot close the container here: a required member is still to come)."""
        kept = allowed & ~self.expands[int(self.state.in_string)]
        if not self.state.in_string and not kept[self.container_closers].any():
            return allowed
        return kept if (kept & ~self.space_only).any() else allowed

    def plan(self, matcher: LLMatcher, allowed: np.ndarray, limit: int) -> tuple[int, np.ndarray | None]:
        """(tokens needed until the end of generation may be sampled, the token ids of the plan's first step)."""
        copy = matcher.deep_copy()
        state = self.state.copy()
        first: np.ndarray | None = None
        steps = 0
        while steps < limit:
            if steps:
                allowed = _mask(copy, self.bitmask, self.tokenizer.vocab_size)
            if allowed[self.eog].any():
                return steps, first
            choices = self._best_closing(state, allowed)
            if choices is not None:
                token = int(choices[0])
            else:                                   # the longest allowed token; whitespace only as a last resort
                token = int(np.argmax(np.where(allowed, self.token_lengths, -1)))
            if steps == 0:
                first = choices if choices is not None else np.array([token])
            if not copy.consume_token(token):
                return limit, first
            state.feed(self.tokenizer.token_bytes(token))
            steps += 1
        return steps, first

    def _best_closing(self, state: "_JsonNesting", allowed: np.ndarray) -> np.ndarray | None:
        usable = np.flatnonzero(allowed[self.candidates])
        if usable.size == 0:
            return None
        costs = []
        for index in usable:
            after = state.copy()
            after.feed(self.candidate_bytes[index])
            costs.append((after.cost(), len(self.candidate_bytes[index])))
        best = min(costs)
        if best[0] >= state.cost():              # nothing closes from here: more digits only lengthen a number
            structural = [(i, c) for i, c in zip(usable, costs) if not self.candidate_bytes[i].isdigit()]
            if structural:                       # a step on (",", then a required key) ends it
                best = min(c for _, c in structural)
                return self.candidates[[i for i, c in structural if c[0] == best[0]]]
        return self.candidates[[i for i, c in zip(usable, costs) if c[0] == best[0]]]


class _JsonNesting:
    """How much JSON is open: the container stack, an open string, a pending value or key."""

    __slots__ = ("stack", "in_string", "escaped", "pending")

    def __init__(self):
        self.stack: list[str] = []
        self.in_string = False
        self.escaped = False
        self.pending = False         # after ":" or ",": something must still come

    def copy(self) -> "_JsonNesting":
        other = _JsonNesting()
        other.stack, other.in_string, other.escaped, other.pending = list(self.stack), self.in_string, \
            self.escaped, self.pending
        return other

    def feed(self, data: bytes) -> None:
        for byte in data:
            char = chr(byte)
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string, self.pending = True, False
            elif char in "{[":
                self.stack.append(char)
                self.pending = False
            elif char in "}]":
                if self.stack:
                    self.stack.pop()
                self.pending = False
            elif char in ":,":
                self.pending = True
            elif not char.isspace():
                self.pending = False

    def cost(self) -> int:
        """A cheap estimate of the characters still needed to close everything."""
        return len(self.stack) + int(self.in_string) + 2 * int(self.pending)


_CLOSING_CACHE: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def _closing_tokens(tokenizer) -> tuple[np.ndarray, list[bytes], np.ndarray, np.ndarray, np.ndarray]:
    """Per tokenizer, computed once: ids and bytes of the tokens a closing plan may use, every
    token's byte length (0 for whitespace-only tokens), ``expands[in_string, id]``: does the token write an unquoted
    ``,``, ``{`` or ``[`` when it starts outside (0) or inside (1) a JSON string, and which
    tokens are whitespace only."""
    with _LLG_LOCK:
        cached = _CLOSING_CACHE.get(tokenizer)
        if cached is None:
            pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
            special = tokenizer.special_ids
            ids = [i for i, piece in enumerate(pieces) if i not in special and _CLOSING_TOKEN.fullmatch(piece)]
            space_only = np.array([i not in special and not piece.strip() for i, piece in enumerate(pieces)])
            lengths = np.array([0 if i in special else len(piece) for i, piece in enumerate(pieces)])
            lengths[space_only] = 0                 # never worth a planned step while anything else is allowed
            expands = np.zeros((2, len(pieces)), dtype=bool)
            for i, piece in enumerate(pieces):
                if i not in special and (b"," in piece or b"{" in piece or b"[" in piece):
                    expands[0, i] = _writes_structure(piece, in_string=False)
                    expands[1, i] = _writes_structure(piece, in_string=True)
            cached = (np.array(ids, dtype=np.int64), [pieces[i] for i in ids], lengths, expands, space_only)
            _CLOSING_CACHE[tokenizer] = cached
        return cached


def _writes_structure(piece: bytes, in_string: bool) -> bool:
    escaped = False
    for byte in piece:
        char = chr(byte)
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in ",{[":
            return True
    return False
