"""Tool calls in model output: incremental parsing of the common formats.

Formats recognised (the text is what the detokenizer writes, special tokens included):

* Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number
  of blocks, with text around them. ``"parameters"`` is accepted for ``"arguments"``.
  A block without arguments is a call with ``{}``.
* Llama 3.1 JSON: the output *starts* with (or follows ``<|python_tag|>`` with) an object
  ``{"name": ..., "parameters": {...}}``; several may follow each other, separated by
  ``;`` or whitespace. As this format has no marker, the object only counts as a call
  when it has ``name`` and ``parameters``/``arguments`` and, if the tools are known,
  ``name`` is one of them; otherwise it stays text.
* Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` and the newer
  ``[TOOL_CALLS]name[ARGS]{...}``.
* Harmony (gpt-oss): a message to a function, the recipient in the channel header or in the
  role, then the arguments up to ``<|call|>`` (an end-of-generation token, so usually not in
  the text)::

      <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>
      <|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{...}<|call|>

  (``<|start|>assistant`` is absent from a message the output starts with.) The header up to
  ``<|message|>`` is dropped; a header that ends the message (``<|end|>``) or starts another
  (``<|start|>``) before ``<|message|>`` is not a call, and stays text.

``arguments_json`` is the model's own text of the arguments value (so streamed fragments
concatenate to exactly the non-streamed string); when a model writes the arguments as a
JSON *string* holding JSON, the decoded string is used. Content is the text outside the
calls with leading and trailing whitespace removed.

:class:`ToolCallStreamParser` is the one implementation: ``parse_tool_calls`` feeds it the
whole text. Streaming therefore reassembles to exactly the non-streamed result, for any
chunking. Output cut short (``max_tokens``) can leave the last call's arguments incomplete.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Iterable

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARKER, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
PYTHON_TAG = "<|python_tag|>"
HARMONY_RECIPIENT, HARMONY_MESSAGE, HARMONY_CALL = "to=functions.", "<|message|>", "<|call|>"
# a Harmony call's beginning, longest first: the header before the recipient is part of the call
HARMONY_MARKERS = ("<|start|>assistant<|channel|>commentary " + HARMONY_RECIPIENT,
                   "<|channel|>commentary " + HARMONY_RECIPIENT, "<|start|>assistant " + HARMONY_RECIPIENT,
                   HARMONY_RECIPIENT)
HARMONY_HEADER_BREAKS = ("<|end|>", "<|start|>", "<|call|>", "<|return|>")
MARKERS = (HERMES_OPEN, MISTRAL_MARKER, PYTHON_TAG) + HARMONY_MARKERS
ARGUMENT_KEYS = ("arguments", "parameters")
_WHITESPACE = " \t\r\n"
_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_HARMONY_NAME = re.compile(r"[A-Za-z0-9_$\-]+")


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id, ``call_`` + 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    """One parsed call: ``arguments_json`` is always a string (JSON text when the model wrote valid JSON)."""

    id: str
    name: str
    arguments_json: str

    def to_openai(self, index: int | None = None) -> dict:
        """``{"id", "type": "function", "function": {"name", "arguments"}}`` (plus ``index`` if given)."""
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}
        if index is not None:
            out["index"] = index
        return out

    def to_ollama(self) -> dict:
        """Ollama's ``{"function": {"name", "arguments": <object>}}`` (``{}`` if the arguments do not parse)."""
        try:
            arguments = json.loads(self.arguments_json)
        except ValueError:
            arguments = {}
        if not isinstance(arguments, dict):
            arguments = {}
        return {"function": {"name": self.name, "arguments": arguments}}


@dataclass
class ToolCallDelta:
    """A piece of a streamed call: the first one of a call has ``id`` and ``name``; later ones only text."""

    index: int
    id: str | None
    name: str | None
    arguments_fragment: str

    def to_openai(self) -> dict:
        """The ``delta.tool_calls[]`` entry of a chat.completion.chunk."""
        out: dict = {"index": self.index}
        function: dict = {"arguments": self.arguments_fragment}
        if self.id is not None:
            out["id"], out["type"] = self.id, "function"
            function = {"name": self.name, "arguments": self.arguments_fragment}
        out["function"] = function
        return out


class _Malformed(Exception):
    """The text at this position is not the JSON the format needs (the block is then plain text)."""


class _ValueScanner:
    """Finds, incrementally, where the JSON value starting at ``start`` ends (without validating it fully)."""

    def __init__(self, buf: str, start: int):
        self.start = start
        self.pos = start
        self.first = buf[start]
        self.depth = 0
        self.in_string = False
        self.escaped = False
        if self.first not in '{["-0123456789tfn':
            raise _Malformed

    @property
    def is_container(self) -> bool:
        return self.first in "{["

    def scan(self, buf: str, final: bool) -> int | None:
        """End index (exclusive) once the value is complete, else None (more text needed)."""
        if self.first not in '{["':                      # number / true / false / null
            pos = self.pos
            while pos < len(buf) and buf[pos] not in ",}] \t\r\n":
                pos += 1
            self.pos = pos
            return pos if pos < len(buf) or final else None
        pos = self.pos
        while pos < len(buf):
            char = buf[pos]
            pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                    if self.first == '"':
                        self.pos = pos
                        return pos
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = pos
                    return pos
        self.pos = pos
        return None


class _CallObject:
    """Walks one ``{"name": ..., "arguments": ...}`` object as text arrives, one event at a time.

    ``i`` only moves past whole parts (a key, the colon, a whole value), so when the block
    turns out not to be a call, the text from the block start to ``i`` is given back as
    content. The first ``name`` and the first ``arguments``/``parameters`` member count.
    """

    def __init__(self, start: int):             # start: index of "{"
        self.i = start + 1
        self.phase = "key"                     # key -> colon -> value -> after -> key ... -> done
        self.key: str | None = None
        self.keys: list[str] = []
        self.scanner: _ValueScanner | None = None
        self.name: str | None = None
        self.name_seen = False
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.args_scanner: _ValueScanner | None = None

    def step(self, buf: str, final: bool) -> str:
        """Advance to the next event: "more" (needs text), "key", "args", "value" or "done"; or raise _Malformed."""
        if self.phase == "value":
            return self._value(buf, final)
        while self.i < len(buf) and buf[self.i] in _WHITESPACE:
            self.i += 1
        if self.i >= len(buf):
            return "more"
        char = buf[self.i]
        if self.phase == "key":
            if char == "}" and not self.keys:
                self.i, self.phase = self.i + 1, "done"
                return "done"
            if char != '"':
                raise _Malformed
            end = _ValueScanner(buf, self.i).scan(buf, final)
            if end is None:
                return "more"
            self.key = _loads(buf[self.i:end])
            self.keys.append(self.key)
            self.i, self.phase = end, "colon"
            return "key"
        if self.phase == "colon":
            if char != ":":
                raise _Malformed
            self.i, self.phase = self.i + 1, "value"
            return self._value(buf, final)
        if self.phase == "after":
            if char == ",":
                self.i, self.phase = self.i + 1, "key"
                return self.step(buf, final)
            if char == "}":
                self.i, self.phase = self.i + 1, "done"
                return "done"
            raise _Malformed
        return "done"

    def _value(self, buf: str, final: bool) -> str:
        if self.scanner is None:
            while self.i < len(buf) and buf[self.i] in _WHITESPACE:
                self.i += 1
            if self.i >= len(buf):
                return "more"
            self.scanner = _ValueScanner(buf, self.i)
            if self.key in ARGUMENT_KEYS and self.args_start is None:
                self.args_start, self.args_scanner = self.i, self.scanner
                return "args"
        end = self.scanner.scan(buf, final)
        if end is None:
            return "more"
        if self.scanner is self.args_scanner:
            self.args_end = end
        elif self.key == "name" and not self.name_seen:
            self.name_seen = True
            value = _loads(buf[self.i:end])
            self.name = value if isinstance(value, str) and value else None
        self.scanner = None
        self.i, self.phase = end, "after"
        return "value"


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        raise _Malformed from None


class ToolCallStreamParser:
    """Splits streamed model text into content deltas (``str``) and :class:`ToolCallDelta` objects.

    ``push(text)`` returns the deltas the new text completes; ``finish()`` the rest.
    Each call gets its own ``index`` (0, 1, ...) and a fresh ``id``; its first delta
    carries ``id`` and ``name`` (and the argument text known so far), later ones append
    to the arguments. ``calls`` holds the calls assembled so far, ``content`` the content
    emitted so far. Every decision is taken at a fixed place in the text, so the result
    does not depend on how the text was cut into pieces.

    tools: the request's tools (OpenAI format) or their names; a bare Llama JSON object
        counts as a call only when it names one of them. None accepts any name.
    """

    def __init__(self, tools: Iterable | None = None):
        self.tool_names = _tool_names(tools)
        self.buf = ""
        self.pos = 0                            # text before pos has been handled
        self.mode = "start"
        self.block_start = 0                    # where the block being parsed began (for giving it back)
        self.call: _CallObject | None = None
        self.args_scanner: _ValueScanner | None = None   # Mistral name[ARGS]{...} arguments
        self.calls: list[ToolCall] = []
        self.content = ""
        self.finished = False
        self._pending_space = ""
        self._emitted_args = 0
        self._committed = False
        self._out: list = []

    # ---------------------------------------------------------------- public
    def push(self, text: str) -> list:
        """Add model text; return the deltas it completes (content strings and ToolCallDelta)."""
        if self.finished:
            raise ValueError("push() after finish()")
        self.buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list:
        """End of the output: flush held-back text and close an unfinished call."""
        if self.finished:
            return []
        self.finished = True
        self._run(final=True)
        if self.call is not None:
            try:
                self._end_call()
            except _Malformed:
                self._content(self.buf[self.block_start:])
        elif self.mode in ("hermes", "mistral", "mistral_name", "harmony_header"):
            self._content(self.buf[self.block_start:])
        elif self.mode in ("mistral_args", "harmony_args"):
            self._emit_args(len(self.buf), final=True)
        elif self.mode in ("text", "start"):
            self._content(self.buf[self.pos:])
        self.pos, self.call = len(self.buf), None
        return self._take()

    # ---------------------------------------------------------------- driver
    def _take(self) -> list:
        out, self._out = self._out, []
        merged: list = []
        for delta in out:
            if isinstance(delta, str) and merged and isinstance(merged[-1], str):
                merged[-1] += delta
            elif delta != "":
                merged.append(delta)
        return merged

    def _run(self, final: bool) -> None:
        while True:
            before = self._state()
            try:
                getattr(self, "_in_" + self.mode)(final)
            except _Malformed:
                self._malformed()
            if self._state() == before:
                return

    def _state(self) -> tuple:
        call = self.call
        return (self.mode, self.pos, len(self._out), id(call), call.i if call else None,
                call.phase if call else None)

    def _malformed(self) -> None:
        """Not the expected JSON. Before a call was emitted, the block's text so far becomes content;
        after, the call is closed with what it has and the rest is handled as text (Hermes: dropped
        up to ``</tool_call>``)."""
        if self._committed:
            self._emit_args(self._args_end(), final=True)
            self._committed = False
            self.pos = self.call.i if self.call is not None else self.pos
            self.call, self.args_scanner = None, None
            self.mode = "hermes_close" if self.mode == "hermes" else "text"
            return
        end = self.call.i if self.call is not None else self.pos
        end = max(end, self.block_start + 1)
        self._content(self.buf[self.block_start:end])
        self.pos, self.mode, self.call = end, "text", None

    # ---------------------------------------------------------------- modes
    def _in_start(self, final: bool) -> None:
        start = self._skip_space(self.pos)
        if start is None:
            return
        if self.buf[start] == "{":
            self._begin_call("bare", start)
        else:
            self.pos, self.mode = start, "text"

    def _in_text(self, final: bool) -> None:
        rest = self.buf[self.pos:]
        found = [(rest.find(m), m) for m in MARKERS if m in rest]
        if found:
            at, marker = min(found)
            self._content(rest[:at])
            self.block_start = self.pos + at
            self.pos = self.block_start + len(marker)
            self.mode = {HERMES_OPEN: "hermes", PYTHON_TAG: "bare_sep", MISTRAL_MARKER: "mistral"}.get(
                marker, "harmony_header")
            return
        keep = 0 if final else _partial_marker_length(rest)
        self._content(rest[:len(rest) - keep])
        self.pos += len(rest) - keep

    def _in_hermes(self, final: bool) -> None:
        if self.call is None:
            start = self._skip_space(self.pos)
            if start is None:
                return
            if self.buf[start] != "{":
                raise _Malformed
            self.call = _CallObject(start)
        if self._advance_call(final, bare=False):
            self.pos, self.call, self.mode = self.call.i, None, "hermes_close"

    def _in_hermes_close(self, final: bool) -> None:
        """After a Hermes call: drop text up to ``</tool_call>``; a new ``<tool_call>`` also ends it."""
        rest = self.buf[self.pos:]
        close, reopen = rest.find(HERMES_CLOSE), rest.find(HERMES_OPEN)
        if reopen >= 0 and (close < 0 or reopen < close):
            self.pos, self.mode = self.pos + reopen, "text"
        elif close >= 0:
            self.pos, self.mode = self.pos + close + len(HERMES_CLOSE), "text"
        elif final:
            self.pos = len(self.buf)

    def _in_bare(self, final: bool) -> None:
        if self._advance_call(final, bare=True):
            self.pos, self.call, self.mode = self.call.i, None, "bare_sep"

    def _in_bare_sep(self, final: bool) -> None:
        """After a bare call or ``<|python_tag|>``: another object may follow (``;`` or whitespace between)."""
        pos = self.pos
        while pos < len(self.buf) and self.buf[pos] in _WHITESPACE + ";":
            pos += 1
        if pos >= len(self.buf):
            if final:
                self.pos = pos
            return
        if self.buf[pos] == "{":
            self._begin_call("bare", pos)
        else:
            self.pos, self.mode = pos, "text"

    def _in_mistral(self, final: bool) -> None:
        start = self._skip_space(self.pos)
        if start is None:
            return
        if self.buf[start] == "[":
            self.pos, self.mode = start + 1, "mistral_array"
        else:
            self.pos, self.mode = start, "mistral_name"

    def _in_mistral_array(self, final: bool) -> None:
        if self.call is None:
            start = self._skip_space(self.pos)
            if start is None:
                return
            char = self.buf[start]
            self.block_start = start
            if char == ",":
                self.pos = start + 1
                return
            if char == "]":
                self.pos, self.mode = start + 1, "text"
                return
            if char != "{":
                raise _Malformed
            self.call = _CallObject(start)
        if self._advance_call(final, bare=False):
            self.pos, self.call = self.call.i, None

    def _in_mistral_name(self, final: bool) -> None:
        rest = self.buf[self.pos:]
        at = rest.find(MISTRAL_ARGS)
        if at < 0:
            head = rest[:len(rest) - _partial_length(rest, MISTRAL_ARGS)]
            if final or (head and not _MISTRAL_NAME.fullmatch(head)):
                raise _Malformed
            return
        name = rest[:at]
        if not _MISTRAL_NAME.fullmatch(name):
            raise _Malformed
        start = self.pos + at + len(MISTRAL_ARGS)
        start = self._skip_space(start)
        if start is None:
            if final:
                raise _Malformed
            return
        self.args_scanner = _ValueScanner(self.buf, start)
        self.pos, self.mode = start, "mistral_args"
        self._commit(name, start)

    def _in_mistral_args(self, final: bool) -> None:
        end = self.args_scanner.scan(self.buf, final)
        self._emit_args(end if end is not None else len(self.buf), final=end is not None)
        if end is not None:
            self.pos, self.mode, self._committed, self.args_scanner = end, "text", False, None

    def _in_harmony_header(self, final: bool) -> None:
        """After ``to=functions.``: the name, the rest of the header up to ``<|message|>``, then the arguments."""
        rest = self.buf[self.pos:]
        name = _HARMONY_NAME.match(rest)
        at = rest.find(HARMONY_MESSAGE)
        breaks = [rest.find(tag) for tag in HARMONY_HEADER_BREAKS if tag in rest]
        if name is None and (rest or final):
            raise _Malformed
        if breaks and (at < 0 or min(breaks) < at):
            raise _Malformed
        if at < 0:
            if final:
                raise _Malformed
            return
        start = self._skip_space(self.pos + at + len(HARMONY_MESSAGE))
        if start is None:
            if final:
                raise _Malformed
            return
        self.args_scanner = _ValueScanner(self.buf, start)
        self.pos, self.mode = start, "harmony_args"
        self._commit(name.group(), start)

    def _in_harmony_args(self, final: bool) -> None:
        end = self.args_scanner.scan(self.buf, final)
        self._emit_args(end if end is not None else len(self.buf), final=end is not None)
        if end is None:
            return
        self.pos, self.mode, self._committed, self.args_scanner = end, "harmony_call", False, None

    def _in_harmony_call(self, final: bool) -> None:
        """After a Harmony call's arguments: its ``<|call|>`` (if the text has it) is dropped."""
        rest = self.buf[self.pos:]
        if rest.startswith(HARMONY_CALL):
            self.pos, self.mode = self.pos + len(HARMONY_CALL), "text"
        elif final or not HARMONY_CALL.startswith(rest):
            self.mode = "text"

    # ---------------------------------------------------------------- calls
    def _begin_call(self, mode: str, start: int) -> None:
        self.block_start, self.pos, self.mode, self.call = start, start, mode, _CallObject(start)

    def _advance_call(self, final: bool, bare: bool) -> bool:
        """Feed the current call object; emit its deltas; True once the object is complete."""
        call = self.call
        while True:
            event = call.step(self.buf, final)
            if bare and not self._committed:
                self._check_bare(call)
            if not self._committed and call.name and call.args_start is not None:
                self._commit(call.name, call.args_start)
            if self._committed and call.args_scanner is not None:
                self._emit_args(self._args_end(), final=call.args_end is not None)
            if event == "done":
                self._end_call()
                return True
            if event == "more":
                return False

    def _check_bare(self, call: _CallObject) -> None:
        """A bare JSON object is a call when its first key is a known ``name`` and its second the arguments."""
        if call.keys and call.keys[0] != "name":
            raise _Malformed
        if call.name_seen and not self._known(call.name):
            raise _Malformed
        if len(call.keys) >= 2 and call.keys[1] not in ARGUMENT_KEYS:
            raise _Malformed

    def _end_call(self) -> None:
        """The object ended (or the output did): emit the call if not yet done, with ``{}`` if it had no arguments."""
        call = self.call
        if not self._committed:
            if not call.name or (self.mode == "bare" and call.args_start is None):
                raise _Malformed
            self._commit(call.name, call.args_start)
        if call.args_start is None:
            self._send_args("{}")
        else:
            self._emit_args(self._args_end(), final=True)
        self._committed = False

    def _args_end(self) -> int:
        """How far the arguments text is known: its end, or as far as its scanner has read."""
        call = self.call
        if call is not None and call.args_end is not None:
            return call.args_end
        scanner = call.args_scanner if call is not None else self.args_scanner
        return scanner.pos if scanner is not None else len(self.buf)

    def _commit(self, name: str, args_start: int | None) -> None:
        call_id = new_call_id()
        self.calls.append(ToolCall(call_id, name, ""))
        self._out.append(ToolCallDelta(len(self.calls) - 1, call_id, name, ""))
        self._committed = True
        self._emitted_args = args_start if args_start is not None else len(self.buf)

    def _emit_args(self, upto: int, final: bool) -> None:
        """Send the argument text from the last emitted point up to ``upto`` (strings and scalars whole)."""
        scanner = self.call.args_scanner if self.call is not None else self.args_scanner
        if scanner is None:
            return
        if not scanner.is_container:
            if final and upto > self._emitted_args:
                text = self.buf[scanner.start:upto]
                if scanner.first == '"':
                    try:
                        text = json.loads(text)
                    except ValueError:
                        pass
                self._send_args(text)
                self._emitted_args = upto
            return
        if upto > self._emitted_args:
            self._send_args(self.buf[self._emitted_args:upto])
            self._emitted_args = upto

    def _send_args(self, text: str) -> None:
        if not text:
            return
        index = len(self.calls) - 1
        self.calls[index].arguments_json += text
        last = self._out[-1] if self._out else None
        if isinstance(last, ToolCallDelta) and last.index == index:
            last.arguments_fragment += text
        else:
            self._out.append(ToolCallDelta(index, None, None, text))

    # ---------------------------------------------------------------- helpers
    def _known(self, name: str | None) -> bool:
        return bool(name) and (self.tool_names is None or name in self.tool_names)

    def _skip_space(self, pos: int) -> int | None:
        while pos < len(self.buf) and self.buf[pos] in _WHITESPACE:
            pos += 1
        return pos if pos < len(self.buf) else None

    def _content(self, text: str) -> None:
        """Emit content; the whole content's leading/trailing whitespace is removed (held back until known)."""
        if not text:
            return
        if not self.content:
            text = text.lstrip(_WHITESPACE)
        body = text.rstrip(_WHITESPACE)
        if body:
            piece = self._pending_space + body
            self._pending_space = text[len(body):]
            self.content += piece
            self._out.append(piece)
        elif self.content:
            self._pending_space += text


def _partial_length(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _partial_marker_length(text: str) -> int:
    """Length of the longest suffix of ``text`` that could be the start of a marker."""
    return max(_partial_length(text, marker) for marker in MARKERS)


def _tool_names(tools) -> set[str] | None:
    if tools is None:
        return None
    names = set()
    for tool in tools:
        if isinstance(tool, str):
            names.add(tool)
        elif isinstance(tool, dict):
            function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
            if isinstance(function.get("name"), str):
                names.add(function["name"])
    return names


def parse_tool_calls(text: str, tools: Iterable | None = None) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of a whole model output (see the module docstring for the formats)."""
    parser = ToolCallStreamParser(tools)
    parser.push(text)
    parser.finish()
    return parser.content, parser.calls
