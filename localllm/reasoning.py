"""Reasoning ("thinking") models: detection from the chat template, the think switch, and the thought parser.

Models such as Qwen 3 and the DeepSeek-R1 distills write a thought before the answer::

    <think>
    The user asks for ... so the answer is 4.
    </think>

    The answer is 4.

Three pieces, used by the library (``Model.chat(..., think=...)``) and every server route:

* :func:`thinking_support` reads a chat template and says whether (and how) the model thinks:
  the tag pair it writes (``<think>``/``</think>``, Magistral's ``[THINK]``/``[/THINK]``) and
  whether the template has Qwen 3's ``enable_thinking`` switch.
* :class:`ThinkingRequest` (from :func:`thinking_request`) turns a request's ``think`` (True,
  False, None = the model's default, or an effort "none"/"minimal"/"low"/"medium"/"high")
  into template variables (``enable_thinking``, ``reasoning_effort``) and, after rendering,
  into the final prompt and a :class:`ReasoningFormat`. Thinking off uses the template's
  switch where it has one, otherwise the prompt gets an empty, closed thought
  (``<think>\\n\\n</think>\\n\\n``), as llama.cpp does. A template that opens the thought itself
  (DeepSeek-R1: the generation prompt ends with ``<think>\\n``) gives ``starts_open``.
* :class:`ReasoningStreamParser` splits streamed model text into thought and answer, for any
  cutting of the text into pieces (tags split across tokens included), and
  :class:`ConstraintAfterThought` lets the thought run free and applies a grammar
  (``constrain.Constraint``: JSON, JSON schema, forced tool calls) only to what follows it.

Whitespace: the thought is given without the whitespace that surrounds it inside the tags,
and the answer after a thought without its leading whitespace.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

TAG_PAIRS = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))
THINK_SWITCH = "enable_thinking"
EFFORTS = ("none", "minimal", "low", "medium", "high")
_WHITESPACE = " \t\r\n"


class ThinkingNotSupported(ValueError):
    """Thinking was asked of a model whose chat template has no thought block."""


@dataclass(frozen=True)
class ThinkingSupport:
    """How a chat template thinks: its tags and whether it has the ``enable_thinking`` switch."""

    open_tag: str
    close_tag: str
    has_switch: bool


@dataclass(frozen=True)
class ReasoningFormat:
    """What the thought parser of one request needs (``GenerationParams.reasoning``).

    starts_open: the prompt already opened the thought (the output begins inside it).
    """

    open_tag: str = "<think>"
    close_tag: str = "</think>"
    starts_open: bool = False


def thinking_support(template_source: str | None) -> ThinkingSupport | None:
    """The thinking support of a chat template's source text, or None when it has no thought block.

    A template thinks when it writes a known tag pair (``<think>`` ... ``</think>``), or has
    Qwen 3's ``enable_thinking`` switch (then ``<think>`` tags are assumed).
    """
    if not template_source:
        return None
    has_switch = THINK_SWITCH in template_source
    for open_tag, close_tag in TAG_PAIRS:
        if open_tag in template_source or close_tag in template_source:
            return ThinkingSupport(open_tag, close_tag, has_switch)
    if has_switch:
        return ThinkingSupport(*TAG_PAIRS[0], has_switch=True)
    return None


def normalize_think(think: Any, param: str = "think") -> bool | str | None:
    """``think`` checked: None (the model's default), True, False, or an effort in EFFORTS ("none" means False).

    Raises ValueError naming ``param`` for anything else.
    """
    if think is None or isinstance(think, bool):
        return think
    if isinstance(think, str) and think in EFFORTS:
        return False if think == "none" else think
    raise ValueError(f"{param} must be true, false or one of {', '.join(repr(e) for e in EFFORTS)}, got {think!r}")


@dataclass
class ThinkingRequest:
    """One request's thinking: the template variables to render with, then :meth:`finish` on the prompt.

    support: the template's (None: the model does not think; everything passes through).
    think: the normalized request value (None: the model's default, which is to think).
    """

    support: ThinkingSupport | None
    think: bool | str | None = None
    template_extra: dict = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.support is not None and self.think is not False

    def finish(self, prompt: str) -> tuple[str, ReasoningFormat | None]:
        """(the prompt to generate from, the parser format or None when no thought is parsed).

        Thinking off: a prompt the template did not already end with a closed thought gets one
        (closing the thought the template opened, or an empty one after the generation prompt).
        """
        support = self.support
        if support is None:
            return prompt, None
        tail = prompt.rstrip(_WHITESPACE)
        if not self.enabled:
            if tail.endswith(support.close_tag):
                return prompt, None
            if tail.endswith(support.open_tag):
                return tail + "\n\n" + support.close_tag + "\n\n", None
            return prompt + support.open_tag + "\n\n" + support.close_tag + "\n\n", None
        return prompt, ReasoningFormat(support.open_tag, support.close_tag,
                                       starts_open=tail.endswith(support.open_tag))


def thinking_request(template, think: Any = None, param: str = "think") -> ThinkingRequest:
    """The :class:`ThinkingRequest` for ``think`` on a ``ChatTemplate`` (or its source text).

    Raises ValueError for a bad ``think`` and :class:`ThinkingNotSupported` when thinking is
    asked (True or an effort) of a model that does not think. False / "none" on such a model,
    and None on any model, are accepted.
    """
    think = normalize_think(think, param)
    source = template if isinstance(template, str) or template is None else getattr(template, "source", None)
    support = thinking_support(source)
    if support is None:
        if think not in (None, False):
            raise ThinkingNotSupported("this model does not support thinking")
        return ThinkingRequest(None, think)
    extra: dict[str, Any] = {}
    if think is not None and support.has_switch:
        extra[THINK_SWITCH] = think is not False
    if isinstance(think, str):
        extra["reasoning_effort"] = think
    return ThinkingRequest(support, think, extra)


# ----------------------------------------------------------------------------- the thought parser


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag`` (text to hold back)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class ReasoningStreamParser:
    """Splits streamed model text into thought and answer.

    ``push(text)`` returns ``(thinking, content)``: the pieces of each that the new text
    completes; ``finish()`` returns the rest. ``thinking`` and ``content`` hold all of each
    so far. The thought is recognised at the start of the output (after whitespace) when it
    opens with the open tag, or from the first character when ``starts_open``; it ends at the
    first close tag. A thought cut short (``max_tokens``) stays a thought; output that does
    not start with the open tag is all answer. Text that may be the beginning of a tag is held
    back until the next piece decides, so the split does not depend on how the text was cut.
    """

    def __init__(self, fmt: ReasoningFormat):
        self.fmt = fmt
        self.state = "thinking" if fmt.starts_open else "start"   # start -> thinking -> answer, or start -> answer
        self.buf = ""                       # text not yet given out
        self.thinking = ""
        self.content = ""
        self._thought_started = False       # leading whitespace of the thought is dropped
        self._answer_started = False        # leading whitespace of an answer after a thought is dropped
        self.finished = False

    @property
    def in_thought(self) -> bool:
        """Whether the output is inside the thought (or may still open one)."""
        return self.state != "answer"

    def push(self, text: str) -> tuple[str, str]:
        if self.finished:
            raise ValueError("push() after finish()")
        self.buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        if self.finished:
            return "", ""
        self.finished = True
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        thinking, content = [], []
        while True:
            state = self.state
            if state == "start":
                stripped = self.buf.lstrip(_WHITESPACE)
                open_tag = self.fmt.open_tag
                if stripped.startswith(open_tag):
                    self.buf, self.state = stripped[len(open_tag):], "thinking"
                    continue
                if (not stripped or open_tag.startswith(stripped)) and not final:
                    break                                   # whitespace or a beginning of the tag: wait
                self.state, self._answer_started = "answer", True    # no thought: the text as it is
                continue
            if state == "thinking":
                if not self._thought_started:
                    self.buf = self.buf.lstrip(_WHITESPACE)
                    self._thought_started = bool(self.buf)
                at = self.buf.find(self.fmt.close_tag)
                if at >= 0:
                    thinking.append(self.buf[:at].rstrip(_WHITESPACE))
                    self.buf, self.state = self.buf[at + len(self.fmt.close_tag):], "answer"
                    continue
                if final:
                    thinking.append(self.buf.rstrip(_WHITESPACE))
                    self.buf = ""
                    break
                keep = _partial_suffix(self.buf, self.fmt.close_tag)
                body = self.buf[:len(self.buf) - keep]
                settled = body.rstrip(_WHITESPACE)          # trailing whitespace waits: it may end the thought
                thinking.append(settled)
                self.buf = self.buf[len(settled):]
                break
            if not self._answer_started:
                self.buf = self.buf.lstrip(_WHITESPACE)
                self._answer_started = bool(self.buf)
            content.append(self.buf)
            self.buf = ""
            break
        out = "".join(thinking), "".join(content)
        self.thinking += out[0]
        self.content += out[1]
        return out


def split_thought(text: str, fmt: ReasoningFormat) -> tuple[str, str]:
    """(thinking, content) of a whole output (the stream parser fed at once)."""
    parser = ReasoningStreamParser(fmt)
    parser.push(text)
    parser.finish()
    return parser.thinking, parser.content


# ----------------------------------------------------------------------------- constraints after the thought


_TAG_TOKENS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_TAG_LOCK = threading.Lock()


def _token_table(tokenizer) -> list[bytes]:
    with _TAG_LOCK:
        tables = _TAG_TOKENS.setdefault(tokenizer, {})
        if "bytes" not in tables:
            tables["bytes"] = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        return tables["bytes"]


def _tag_tokens(tokenizer, key: tuple, select) -> np.ndarray:
    """Ids of the tokens whose bytes ``select`` accepts, computed once per tokenizer and ``key``."""
    table = _token_table(tokenizer)
    with _TAG_LOCK:
        tables = _TAG_TOKENS[tokenizer]
        if key not in tables:
            tables[key] = np.array([i for i, piece in enumerate(table) if select(piece)], dtype=np.int64)
        return tables[key]


def _ends_tag_with_text(rest: bytes, contains: bool):
    """A token selector: the token completes the tag (``rest`` = the missing end of it) and text
    other than whitespace follows the tag in the same token."""
    def select(piece: bytes) -> bool:
        at = piece.find(rest) if contains else (0 if piece.startswith(rest) else -1)
        return at >= 0 and bool(piece[at + len(rest):].strip())
    return select


class ConstraintAfterThought:
    """Logits processor: the thought runs free, the grammar of ``constraint`` applies to what follows it.

    The thought is found in the generated token bytes as :class:`ReasoningStreamParser` finds it
    in the text. When the output does not start inside a thought, the first token is either the
    grammar's or one that opens the thought. Inside the thought, a token that would close it and
    go on with text in the same token is not allowed (the grammar would not see that text);
    whitespace after the close tag is dropped, as the parser drops it. Once the thought is closed
    the grammar's processor runs over the answer tokens with the budget that is left, so JSON
    cut by ``max_tokens`` is still closed in time (``constrain.JsonCloser``).
    """

    def __init__(self, fmt: ReasoningFormat, constraint, tokenizer, max_new_tokens: int | None = None):
        self.fmt = fmt
        self.constraint = constraint
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.open_tag = fmt.open_tag.encode()
        self.close_tag = fmt.close_tag.encode()
        self.state = "thinking" if fmt.starts_open else "start"
        self.thought = b""                    # bytes generated inside the thought
        self.n_seen = 0                       # generated tokens looked at
        self.answer_from: int | None = None   # index of the first answer token in the generated ones
        self.grammar = None                   # the constraint's processor, once the answer starts

    def _grammar(self):
        if self.grammar is None:
            budget = None if self.max_new_tokens is None else max(1, self.max_new_tokens - self.answer_from)
            self.grammar = self.constraint.make_processor(self.tokenizer, max_new_tokens=budget)
        return self.grammar

    def _see(self, generated: Sequence[int]) -> None:
        table = _token_table(self.tokenizer)
        while self.n_seen < len(generated) and self.state != "answer":
            piece = table[int(generated[self.n_seen])]
            self.n_seen += 1
            if self.state == "start":
                if piece.startswith(self.open_tag):
                    self.state, self.thought = "thinking", piece[len(self.open_tag):]
                    self.grammar = None
                else:
                    self.state, self.answer_from = "answer", self.n_seen - 1
            else:
                self.thought += piece
            if self.state == "thinking" and self.close_tag in self.thought:
                self.state, self.answer_from = "answer", self.n_seen

    def __call__(self, logits: np.ndarray, history: Sequence[int], n_prompt: int) -> np.ndarray:
        generated = history[n_prompt:]
        self._see(generated)
        if self.state == "answer":
            return self._grammar()(logits, history, n_prompt + self.answer_from)
        if self.state == "start":                 # first token: the grammar's, or one opening the thought
            self.answer_from = 0
            out = self._grammar()(logits, history, n_prompt)
            opening = _tag_tokens(self.tokenizer, ("open", self.open_tag), lambda p: p.startswith(self.open_tag))
            out[opening] = logits[opening]
            return out
        out = np.array(logits, copy=True)         # inside the thought: free, but no text glued after the close tag
        out[_tag_tokens(self.tokenizer, ("close", self.close_tag, 0),
                        _ends_tag_with_text(self.close_tag, contains=True))] = -np.inf
        held = _partial_suffix_bytes(self.thought, self.close_tag)
        if held:
            rest = self.close_tag[held:]
            out[_tag_tokens(self.tokenizer, ("close", self.close_tag, held),
                            _ends_tag_with_text(rest, contains=False))] = -np.inf
        return out


def _partial_suffix_bytes(data: bytes, tag: bytes) -> int:
    for length in range(min(len(tag) - 1, len(data)), 0, -1):
        if tag.startswith(data[-length:]):
            return length
    return 0


def constraint_processor(fmt: ReasoningFormat | None, constraint, tokenizer, max_new_tokens: int | None):
    """The logits processor for ``constraint`` on a sequence: after the thought when ``fmt`` is given."""
    if fmt is None:
        return constraint.make_processor(tokenizer, max_new_tokens=max_new_tokens)
    return ConstraintAfterThought(fmt, constraint, tokenizer, max_new_tokens)
