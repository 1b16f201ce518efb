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

gpt-oss writes OpenAI's Harmony channel format instead of tags (the template renders
``<|start|>assistant`` as the generation prompt)::

    <|channel|>analysis<|message|>THOUGHT<|end|><|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

The same pieces describe it as data (:data:`HARMONY`): the thought is opened by
``<|channel|>analysis<|message|>`` and closed by ``<|end|>``; the answer is introduced by the
header ``<|channel|>final<|message|>`` (after a thought, by the next message's start
``<|start|>assistant`` and that header), which is stripped, and ends at ``<|end|>``
(``<|return|>`` ends the generation). A template with ``<|channel|>`` in it is detected as
Harmony. Its thought cannot be turned off (as in Ollama and llama.cpp, ``think`` false or
True keeps the template's default effort, "medium"); an effort goes to the template's
``reasoning_effort`` variable ("minimal" as "low", the nearest level it knows).

Whitespace: the thought is given without the whitespace that surrounds it inside the tags,
and the answer after a thought without its leading whitespace.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

TAG_PAIRS = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))
HARMONY_MARKER = "<|channel|>"          # a chat template with it writes the Harmony channel format
THINK_SWITCH = "enable_thinking"
EFFORTS = ("none", "minimal", "low", "medium", "high")
_WHITESPACE = " \t\r\n"


class ThinkingNotSupported(ValueError):
    """Thinking was asked of a model whose chat template has no thought block."""


@dataclass(frozen=True)
class ReasoningFormat:
    """What the thought parser of one request needs (``GenerationParams.reasoning``).

    open_tag, close_tag: what opens and closes the thought.
    starts_open: the prompt already opened the thought (the output begins inside it).
    answer_header: what introduces the answer ("" for tag formats: the answer is what follows
        the thought); stripped. When set, the answer at the start of the output, or after the
        thought with ``message_start`` before it, must come with it: other text there is given
        as it is (a tool call in another channel, say).
    message_start: what begins each message after the first (Harmony ``<|start|>assistant``);
        a thought may be followed by more thoughts, each ``message_start + open_tag``.
    answer_end: tags that end the answer; what follows them is not given out.
    """

    open_tag: str = "<think>"
    close_tag: str = "</think>"
    starts_open: bool = False
    answer_header: str = ""
    message_start: str = ""
    answer_end: tuple[str, ...] = ()


HARMONY = ReasoningFormat(open_tag="<|channel|>analysis<|message|>", close_tag="<|end|>",
                          answer_header="<|channel|>final<|message|>", message_start="<|start|>assistant",
                          answer_end=("<|end|>", "<|return|>"))


@dataclass(frozen=True)
class ThinkingSupport:
    """How a chat template thinks.

    open_tag, close_tag: its thought tags (the format's).
    has_switch: it has Qwen 3's ``enable_thinking`` switch.
    fmt: the parser format when thinking (the tags alone unless the template writes another format).
    can_disable: thinking can be turned off (False: think false keeps the model's default).
    efforts: the efforts the template's ``reasoning_effort`` takes, each request value mapped to
        one (None: passed as they are).
    """

    open_tag: str
    close_tag: str
    has_switch: bool
    fmt: ReasoningFormat | None = None
    can_disable: bool = True
    efforts: dict | None = None

    @property
    def format(self) -> ReasoningFormat:
        return self.fmt or ReasoningFormat(self.open_tag, self.close_tag)


HARMONY_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high"}


def thinking_support(template_source: str | None) -> ThinkingSupport | None:
    """The thinking support of a chat template's source text, or None when it has no thought block.

    A template thinks when it writes a known tag pair (``<think>`` ... ``</think>``), or has
    Qwen 3's ``enable_thinking`` switch (then ``<think>`` tags are assumed), or writes Harmony
    channels (``<|channel|>``, gpt-oss: :data:`HARMONY`, which cannot be turned off).
    """
    if not template_source:
        return None
    if HARMONY_MARKER in template_source:
        return ThinkingSupport(HARMONY.open_tag, HARMONY.close_tag, has_switch=False, fmt=HARMONY,
                               can_disable=False, efforts=HARMONY_EFFORTS)
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
        return self.support is not None and (self.think is not False or not self.support.can_disable)

    def finish(self, prompt: str) -> tuple[str, ReasoningFormat | None]:
        """(the prompt to generate from, the parser format or None when no thought is parsed).

        Thinking off: a prompt the template did not already end with a closed thought gets one
        (closing the thought the template opened, or an empty one after the generation prompt).
        """
        support = self.support
        if support is None:
            return prompt, None
        tail = prompt.rstrip(_WHITESPACE)
        if not support.can_disable:                 # Harmony: the model thinks whatever was asked
            return prompt, replace(support.format, starts_open=tail.endswith(support.open_tag))
        if not self.enabled:
            if tail.endswith(support.close_tag):
                return prompt, None
            if tail.endswith(support.open_tag):
                return tail + "\n\n" + support.close_tag + "\n\n", None
            return prompt + support.open_tag + "\n\n" + support.close_tag + "\n\n", None
        return prompt, replace(support.format, starts_open=tail.endswith(support.open_tag))


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
        extra["reasoning_effort"] = think if support.efforts is None else support.efforts[think]
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
    not start with the open tag (or the format's answer header) is all answer. With an answer
    header (Harmony), a thought is followed by ``message_start`` and either the header (then
    the answer, up to an ``answer_end`` tag) or another thought (joined to the first by a blank
    line); anything else there is answer text as it is. Text that may be the beginning of a
    tag is held back until the next piece decides, so the split does not depend on how the
    text was cut.
    """

    def __init__(self, fmt: ReasoningFormat):
        self.fmt = fmt
        # start -> thinking -> [between -> thinking ... between ->] answer [-> done], or start -> answer
        self.state = "thinking" if fmt.starts_open else "start"
        self.buf = ""                       # text not yet given out
        self.thinking = ""
        self.content = ""
        self._thought_started = False       # leading whitespace of the thought is dropped
        self._answer_started = False        # leading whitespace of an answer after a thought is dropped
        self._answer_end: tuple[str, ...] = ()   # the end tags of an answer that came with its header
        self._separator = ""                # put before the next thought text (a second thought)
        self.finished = False

    @property
    def in_thought(self) -> bool:
        """Whether the output is inside the thought (or may still open one)."""
        return self.state in ("start", "thinking", "between")

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

    def _routes(self) -> list[tuple[str, str]]:
        """(the text that leads there, the next state) from "start" or "between"."""
        lead = self.fmt.message_start if self.state == "between" else ""
        routes = [(lead + self.fmt.open_tag, "thinking")]
        if self.fmt.answer_header:
            routes.append((lead + self.fmt.answer_header, "answer"))
        return routes

    def _run(self, final: bool) -> tuple[str, str]:
        thinking, content = [], []
        while True:
            state = self.state
            if state in ("start", "between"):
                stripped = self.buf.lstrip(_WHITESPACE)
                routes = self._routes()
                taken = next((route for route in routes if stripped.startswith(route[0])), None)
                if taken is not None:
                    self.buf, self.state = stripped[len(taken[0]):], taken[1]
                    if taken[1] == "thinking":
                        self._thought_started = False
                        self._separator = "\n\n" if (self.thinking or any(thinking)) else ""
                    else:
                        self._answer_started, self._answer_end = False, self.fmt.answer_end
                    continue
                if not stripped or any(tag.startswith(stripped) for tag, _ in routes):
                    if not final:
                        break                               # whitespace or a beginning of a tag: wait
                    if state == "between":                  # a header cut short (max_tokens): no answer text
                        self.buf, self.state = "", "done"
                        break
                if state == "start":
                    self.state, self._answer_started = "answer", True     # no thought: the text as it is
                else:
                    self.buf, self.state, self._answer_started = stripped, "answer", True
                continue
            if state == "thinking":
                if not self._thought_started:
                    self.buf = self.buf.lstrip(_WHITESPACE)
                    self._thought_started = bool(self.buf)
                close = self.fmt.close_tag
                at = self.buf.find(close)
                if at >= 0:
                    self._think(thinking, self.buf[:at].rstrip(_WHITESPACE))
                    self.buf = self.buf[at + len(close):]
                    self.state = "between" if self.fmt.answer_header else "answer"
                    continue
                if final:
                    self._think(thinking, self.buf.rstrip(_WHITESPACE))
                    self.buf = ""
                    break
                keep = _partial_suffix(self.buf, close)
                settled = self.buf[:len(self.buf) - keep].rstrip(_WHITESPACE)   # trailing whitespace waits
                self._think(thinking, settled)
                self.buf = self.buf[len(settled):]
                break
            if state == "done":                             # after the answer's end tag: nothing more
                self.buf = ""
                break
            if not self._answer_started:
                self.buf = self.buf.lstrip(_WHITESPACE)
                self._answer_started = bool(self.buf)
            ends = [(self.buf.find(tag), tag) for tag in self._answer_end if tag in self.buf]
            if ends:
                content.append(self.buf[:min(ends)[0]])
                self.buf, self.state = "", "done"
                break
            keep = 0 if final else max((_partial_suffix(self.buf, tag) for tag in self._answer_end), default=0)
            content.append(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            break
        out = "".join(thinking), "".join(content)
        self.thinking += out[0]
        self.content += out[1]
        return out

    def _think(self, pieces: list[str], text: str) -> None:
        if text:
            pieces.append(self._separator + text)
            self._separator = ""


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
    in the text. When the output does not start inside a thought, its first tokens either open
    the thought or are the grammar's (with an answer header, as Harmony has: spell the header,
    then the grammar's). Inside the thought, a token that would close it and go on with text in
    the same token is not allowed (the grammar would not see that text); whitespace after the
    close tag is dropped, as the parser drops it. With an answer header the thought is followed
    by ``message_start`` and the header, spelled out (any tokenization of them). Once the answer
    starts the grammar's processor runs over the answer tokens with the budget that is left, so
    JSON cut by ``max_tokens`` is still closed in time (``constrain.JsonCloser``).
    """

    def __init__(self, fmt: ReasoningFormat, constraint, tokenizer, max_new_tokens: int | None = None):
        self.fmt = fmt
        self.constraint = constraint
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.open_tag = fmt.open_tag.encode()
        self.close_tag = fmt.close_tag.encode()
        # b"": the tag formats; a constraint may name its own header (a gpt-oss call goes to the commentary channel)
        header = (getattr(constraint, "answer_header", "") or fmt.answer_header) if fmt.answer_header else ""
        self.answer_header = header.encode()
        self.header_after_thought = (fmt.message_start + header).encode() if header else b""
        self.state = "thinking" if fmt.starts_open else "start"    # start -> thinking -> [header ->] answer
        self.pending = b""                    # bytes of a tag being spelled ("start", "header")
        self.pending_tokens = 0               # the tokens that wrote them
        self.thought = b""                    # bytes generated inside the thought
        self.n_seen = 0                       # generated tokens looked at
        self.answer_from: int | None = None   # index of the first answer token in the generated ones
        self.grammar = None                   # the constraint's processor, once the answer starts

    def _grammar(self):
        if self.grammar is None:
            budget = None if self.max_new_tokens is None else max(1, self.max_new_tokens - self.answer_from)
            self.grammar = self.constraint.make_processor(self.tokenizer, max_new_tokens=budget)
        return self.grammar

    def _answer(self, first: int) -> None:
        if first != self.answer_from:             # a grammar made for the first token goes on if that was the answer
            self.grammar = None
        self.state, self.answer_from = "answer", first

    def _see(self, generated: Sequence[int]) -> None:
        table = _token_table(self.tokenizer)
        while self.n_seen < len(generated) and self.state != "answer":
            piece = table[int(generated[self.n_seen])]
            self.n_seen += 1
            if self.state == "start":
                data = self.pending + piece
                if data.startswith(self.open_tag):
                    self.state, self.thought, self.pending = "thinking", data[len(self.open_tag):], b""
                    self.answer_from, self.grammar = None, None
                elif self.answer_header and data == self.answer_header:
                    self._answer(self.n_seen)
                elif data and (self.open_tag.startswith(data) or self.answer_header.startswith(data)):
                    self.pending, self.pending_tokens = data, self.pending_tokens + 1
                else:                                   # not a tag after all: the answer began with it
                    self._answer(self.n_seen - 1 - self.pending_tokens)
            elif self.state == "thinking":
                self.thought += piece
                if self.close_tag in self.thought:
                    if self.answer_header:
                        self.state, self.pending = "header", b""
                    else:
                        self._answer(self.n_seen)
            else:                                       # "header": message_start + answer header, spelled
                data = self.pending + piece
                if data == self.header_after_thought or not self.header_after_thought.startswith(data):
                    self._answer(self.n_seen)             # (a token off the header can only come unmasked)
                else:
                    self.pending = data

    def _spelling(self, tags: tuple[bytes, ...], open_ok: bool) -> np.ndarray:
        """Ids of the tokens that go on spelling one of ``tags`` from ``self.pending`` (``open_ok``:
        or complete the open tag with more text, which goes to the thought)."""
        pending = self.pending

        def select(piece: bytes) -> bool:
            data = pending + piece
            return bool(piece) and (any(tag.startswith(data) for tag in tags)
                                    or (open_ok and data.startswith(self.open_tag)))
        return _tag_tokens(self.tokenizer, ("spell", tags, open_ok, pending), select)

    def __call__(self, logits: np.ndarray, history: Sequence[int], n_prompt: int) -> np.ndarray:
        generated = history[n_prompt:]
        self._see(generated)
        if self.state == "answer":
            return self._grammar()(logits, history, n_prompt + self.answer_from)
        if self.state in ("start", "header"):
            if self.state == "start" and not self.answer_header and not self.pending:
                self.answer_from = 0             # first token: the grammar's, or one opening the thought
                out = self._grammar()(logits, history, n_prompt)
                opening = _tag_tokens(self.tokenizer, ("open", self.open_tag),
                                      lambda p: bool(p) and (p.startswith(self.open_tag) or self.open_tag.startswith(p)))
                out[opening] = logits[opening]
                return out
            if self.state == "start":
                allowed = self._spelling((self.open_tag,) + ((self.answer_header,) if self.answer_header else ()),
                                         open_ok=True)
            else:
                allowed = self._spelling((self.header_after_thought,), open_ok=False)
            out = np.full_like(np.asarray(logits), -np.inf)
            out[allowed] = np.asarray(logits)[allowed]
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
