"""Anthropic Messages <-> OpenAI chat completions, for ``/v1/messages`` through the gateway (pure functions).

A gateway's routes and upstreams speak the OpenAI chat API; a ``/v1/messages`` request whose ``model`` is a
route or ``<upstream>/<model>`` is translated into a chat-completions body (:func:`chat_body`), answered by
``Gateway.run("/chat/completions", ...)`` with the routes' fallback rules, and its answer translated back:

* a chat completion -> a message (:func:`message_from_completion`): ``reasoning_content`` -> a ``thinking``
  block, ``content`` -> a ``text`` block, ``tool_calls`` -> ``tool_use`` blocks; ``finish_reason`` stop /
  length / tool_calls -> ``stop_reason`` end_turn / max_tokens / tool_use (``stop_sequence`` when the
  upstream names the stop string that ended it, as vLLM's ``stop_reason`` does); usage -> input/output tokens;
* a stream of chat chunks -> Anthropic's events (:class:`StreamTranslator`), one chunk at a time: the first
  chunk -> ``message_start`` and ``ping``; ``reasoning_content`` / ``content`` / ``tool_calls`` deltas ->
  ``content_block_start`` / ``content_block_delta`` (thinking_delta, text_delta, input_json_delta) /
  ``content_block_stop``; ``[DONE]`` -> ``message_delta`` (stop reason, usage) and ``message_stop``; an
  in-band error (the gateway's, after a cut) -> an ``error`` event that ends the stream.

The request is validated by the local parser first (:func:`~.request.parse_messages_request`), so a bad
body is the same 400 whichever model it names.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from ..errors import APIError, anthropic_body
from . import formatting
from .request import MessagesRequest, ThinkingBudget

FINISH_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "function_call": "tool_use", "content_filter": "end_turn"}
# thinking.budget_tokens -> the chat's reasoning_effort (below the first bound: "low", ...)
EFFORT_BUDGETS = ((4096, "low"), (16384, "medium"))


# --------------------------------------------------------------------------- request

def reasoning_effort(body: dict) -> str | None:
    """``thinking`` (and ``output_config.effort``) -> the chat's ``reasoning_effort`` (None: not sent).

    disabled -> "none"; enabled -> ``output_config.effort`` if given, else by its budget (< 4096 low,
    < 16384 medium, else high); adaptive or absent -> ``output_config.effort`` if given."""
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
    effort = {"xhigh": "high", "max": "high"}.get(config.get("effort"), config.get("effort"))
    if thinking.get("type") == "disabled":
        return "none"
    if thinking.get("type") == "enabled" and effort is None:
        budget = thinking["budget_tokens"]
        return next((name for bound, name in EFFORT_BUDGETS if budget < bound), "high")
    return effort


def _openai_message(message: dict) -> dict:
    """A chat message of the parsed request as OpenAI's API takes it: text-only part lists as a string,
    an assistant's empty content as null."""
    message = dict(message)
    content = message.get("content")
    if isinstance(content, list) and all(part.get("type") == "text" for part in content):
        text = "".join(part["text"] for part in content)
        message["content"] = text if text or message["role"] != "assistant" else None
    return message


def chat_body(body: dict, request: MessagesRequest) -> dict:
    """The chat-completions body for an Anthropic ``body`` (``request``: the same body parsed, so valid)."""
    chat = request.chat
    out: dict = {"model": chat.model, "messages": [_openai_message(m) for m in chat.messages],
                 "max_tokens": body["max_tokens"]}
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    if request.stop_sequences:
        out["stop"] = list(request.stop_sequences)
    if chat.tools:
        out["tools"] = chat.tools
        choice = chat.tool_choice
        out["tool_choice"] = choice if choice in ("auto", "required", "none") else \
            {"type": "function", "function": {"name": choice}}
        disable = (body.get("tool_choice") or {}).get("disable_parallel_tool_use")
        if disable is not None:
            out["parallel_tool_calls"] = not disable
    if chat.response_format is not None:
        out["response_format"] = chat.response_format
    effort = reasoning_effort(body)
    if effort is not None:
        out["reasoning_effort"] = effort
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str):
        out["user"] = user
    if chat.stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


# --------------------------------------------------------------------------- answer

def usage_of(usage: dict | None) -> dict:
    """An OpenAI usage object -> Anthropic's (cached prompt tokens as cache_read_input_tokens)."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    cached = details.get("cached_tokens") or 0
    return formatting.usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0, cached)


def stop_of(choice: dict, finish_reason: str | None, has_calls: bool,
            stop_sequences: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a choice; a stop string is known only when the upstream names it
    (``stop_reason``, as vLLM sends it) and it is one of ``stop_sequences``."""
    matched = choice.get("stop_reason")
    if finish_reason == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    if has_calls and finish_reason in ("stop", "tool_calls"):
        return "tool_use", None
    return FINISH_REASONS.get(finish_reason, "end_turn"), None


def message_from_completion(completion: dict, model: str, stop_sequences: list[str],
                            message_id: str | None = None) -> dict:
    """A chat completion -> an Anthropic message answered by ``model``."""
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    thinking = message.get("reasoning_content") or message.get("reasoning") or ""
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    content = [formatting.thinking_block(thinking)] if thinking else []
    content += [formatting.text_block(text)] if text or not calls else []
    content += [formatting.tool_use_block(call.get("id") or f"toolu_{index}", call["function"]["name"],
                                          formatting.tool_input(call["function"].get("arguments")))
                for index, call in enumerate(calls)]
    reason, stop = stop_of(choice, choice.get("finish_reason"), bool(calls), stop_sequences)
    return formatting.message_object(message_id or formatting.new_message_id(), model, content, reason, stop,
                                     usage_of(completion.get("usage")))


def error_from_openai(status: int, raw: bytes) -> dict:
    """An upstream's error answer (OpenAI's envelope, or any text) -> Anthropic's envelope."""
    try:
        payload = json.loads(raw)
        message = payload["error"]["message"] if isinstance(payload.get("error"), dict) else payload["error"]
    except (ValueError, KeyError, TypeError, AttributeError):
        message = raw.decode("utf-8", "replace")
    return anthropic_body(APIError(status, str(message)))


# --------------------------------------------------------------------------- stream

def sse_payloads(chunks: Iterable[bytes]) -> Iterator[object]:
    """The data of each SSE event in ``chunks`` (each chunk whole events): a dict, or the string "[DONE]"."""
    for chunk in chunks:
        for line in chunk.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                yield "[DONE]"
                continue
            try:
                yield json.loads(data)
            except (ValueError, UnicodeDecodeError):
                yield {"error": {"message": "the upstream sent an event that is not JSON"}}


class StreamTranslator:
    """OpenAI chat chunks -> Anthropic stream events (dicts whose ``type`` is the SSE event name)."""

    def __init__(self, model: str, stop_sequences: list[str], message_id: str | None = None):
        self.model, self.stop_sequences = model, stop_sequences
        self.message_id = message_id or formatting.new_message_id()
        self.started = False
        self.ended = False
        self.index = -1                        # the last block started
        self.open_kind: str | None = None      # "thinking" | "text" | "tool_use" while a block is open
        self.call_blocks: dict[int, int] = {}  # the chunk's tool_calls index -> its block index
        self.texts = 0
        self.finish_reason: str | None = None
        self.choice: dict = {}
        self.usage: dict | None = None

    def feed(self, payload) -> list[dict]:
        """The events for one chunk's data (a dict, or "[DONE]")."""
        if self.ended:
            return []
        events = [] if self.started else self._start()
        if payload == "[DONE]":
            return events + self._finish()
        if not isinstance(payload, dict):
            return events
        if "error" in payload:
            error = payload["error"] if isinstance(payload["error"], dict) else {"message": str(payload["error"])}
            self.ended = True
            return events + [anthropic_body(APIError(502, str(error.get("message", "upstream error"))))]
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        for choice in payload.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            if thinking:
                events += self._delta("thinking", formatting.thinking_block(""),
                                      {"type": "thinking_delta", "thinking": thinking})
            if delta.get("content"):
                events += self._delta("text", formatting.text_block(""),
                                      {"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason, self.choice = choice["finish_reason"], choice
        return events

    def finish_missing(self) -> list[dict]:
        """The events when the chunks ended without ``[DONE]`` (the gateway sends its error event first)."""
        if self.ended:
            return []
        self.ended = True
        return [anthropic_body(APIError(502, "the upstream stream ended before it finished"))]

    def _start(self) -> list[dict]:
        self.started = True
        message = formatting.message_object(self.message_id, self.model, [], None, None, formatting.usage(0, 0))
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _call(self, call: dict) -> list[dict]:
        events = []
        position = call.get("index", len(self.call_blocks))
        function = call.get("function") or {}
        if position not in self.call_blocks:
            events += self._open("tool_use", formatting.tool_use_block(
                call.get("id") or f"toolu_{self.message_id}_{position}", function.get("name") or "", {}))
            self.call_blocks[position] = self.index
        if function.get("arguments"):
            events.append({"type": "content_block_delta", "index": self.call_blocks[position],
                           "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}})
        return events

    def _delta(self, kind: str, empty_block: dict, delta: dict) -> list[dict]:
        events = self._open(kind, empty_block) if self.open_kind != kind else []
        return events + [{"type": "content_block_delta", "index": self.index, "delta": delta}]

    def _open(self, kind: str, block: dict) -> list[dict]:
        events = self._close()
        self.texts += kind == "text"
        self.index += 1
        self.open_kind = kind
        return events + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _close(self) -> list[dict]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _finish(self) -> list[dict]:
        events = []
        if not self.texts and not self.call_blocks:           # no answer: an empty text block, as unstreamed
            events += self._open("text", formatting.text_block(""))
        events += self._close()
        reason, stop = stop_of(self.choice, self.finish_reason, bool(self.call_blocks), self.stop_sequences)
        self.ended = True
        return events + [{"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": stop},
                          "usage": usage_of(self.usage)},
                         {"type": "message_stop"}]


def translate_stream(chunks: Iterable[bytes], model: str, stop_sequences: list[str]) -> Iterator[dict]:
    """Anthropic events for a gateway stream's SSE chunks, each as soon as its chunk arrives."""
    translator = StreamTranslator(model, stop_sequences)
    for payload in sse_payloads(chunks):
        yield from translator.feed(payload)
        if translator.ended:
            return
    yield from translator.finish_missing()
