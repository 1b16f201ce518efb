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

The other way, for a gateway upstream with ``format = "anthropic"`` answering ``/v1/chat/completions``:

* a chat-completions body -> a Messages request (:func:`messages_request`): system and developer messages ->
  ``system``; user text and image parts -> ``text`` and ``image`` blocks; an assistant's ``tool_calls`` ->
  ``tool_use`` blocks; ``tool`` messages -> ``tool_result`` blocks at the head of the next user turn (turns of
  one role merged, as Anthropic alternates them); ``max_completion_tokens`` / ``max_tokens`` (else the
  upstream's default, Anthropic requires one), ``stop`` -> ``stop_sequences``, ``temperature``, ``top_p``,
  ``top_k``; function tools -> ``input_schema`` tools; ``tool_choice`` auto / required / none / a function ->
  auto / any / none / tool, ``parallel_tool_calls: false`` -> ``disable_parallel_tool_use``;
  ``response_format`` json_schema -> ``output_config.format``; ``reasoning_effort`` none -> thinking disabled,
  low / medium / high -> thinking enabled with a budget of 1024 / 4096 / 16384 tokens (the inverse of
  :func:`reasoning_effort`; left out when ``max_tokens`` leaves no room for it); ``user`` ->
  ``metadata.user_id``. ``seed``, penalties and ``logit_bias`` have no Anthropic counterpart and are dropped;
  ``n`` > 1, ``logprobs``, JSON mode (``json_object``), non-function tools and audio or file parts cannot be
  served (:class:`Untranslatable`). A previous turn's ``reasoning_content`` is not sent (Anthropic takes back
  only the signed thinking blocks it wrote);
* a message -> a chat completion (:func:`completion_from_message`): text blocks -> ``content``, thinking ->
  ``reasoning_content``, ``tool_use`` -> ``tool_calls`` (``input`` as the arguments' JSON text); stop_reason
  end_turn / stop_sequence / max_tokens / tool_use / refusal -> finish_reason stop / stop / length /
  tool_calls / content_filter; usage -> prompt tokens (input + cache reads and writes) and completion tokens;
* Anthropic's stream events -> chat chunks (:class:`ChunkTranslator`), one event at a time, then a usage chunk
  and ``[DONE]`` at ``message_stop``; an ``error`` event -> the OpenAI error payload.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Iterable, Iterator

from ..errors import APIError, anthropic_body
from . import formatting
from .request import MIN_THINKING_BUDGET, MessagesRequest

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


# =========================================================================== the other way: chat -> Anthropic

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                "pause_turn": "stop", "refusal": "content_filter", "model_context_window_exceeded": "length"}
# reasoning_effort -> thinking.budget_tokens, so that reasoning_effort() reads each budget back as its effort
THINKING_BUDGETS = {"low": MIN_THINKING_BUDGET, "medium": EFFORT_BUDGETS[0][0], "high": EFFORT_BUDGETS[1][0]}


class Untranslatable(ValueError):
    """A chat request that an Anthropic Messages API cannot serve (what, and why)."""


def _text_of(content, where: str) -> str:
    """A system, developer or tool message's content (a string, or text parts) as one text."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(part.get("text", "")) for part in content)
    raise Untranslatable(f"{where}: only text content can be sent to an Anthropic upstream here")


def _image_block(part: dict, where: str) -> dict:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
        media_type, _, data = url[5:].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise Untranslatable(f"{where}: an image must be a data: URL (base64) or an http(s) URL")


def _blocks(content, where: str) -> list[dict]:
    """A user's or assistant's content -> Anthropic content blocks (empty text left out: Anthropic refuses it)."""
    if content is None or isinstance(content, str):
        return [formatting.text_block(content)] if content else []
    if not isinstance(content, list):
        raise Untranslatable(f"{where}: content must be a string or a list of parts")
    blocks = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append(formatting.text_block(str(part["text"])))
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{where}[{index}]"))
        else:
            raise Untranslatable(f"{where}[{index}]: a {kind!r} part cannot be sent to an Anthropic upstream")
    return blocks


def _tool_use(call: dict, fallback_id: str) -> dict:
    """An assistant's chat ``tool_calls`` entry -> a ``tool_use`` block (arguments: JSON text, or an object)."""
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    arguments = function.get("arguments")
    arguments = arguments if isinstance(arguments, dict) else \
        formatting.tool_input(arguments) if isinstance(arguments, str) else {}
    return formatting.tool_use_block(str(call.get("id") or fallback_id), str(function.get("name", "")), arguments)


def _turns(messages) -> tuple[str, list[dict]]:
    """Chat messages -> (the system text, Anthropic turns: one role after the other, tool results first)."""
    if not isinstance(messages, list):
        raise Untranslatable("messages must be a list")
    system, turns = [], []

    def add(role: str, blocks: list[dict]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})

    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.append(_text_of(content, where))
        elif role == "user":
            add("user", _blocks(content, f"{where}.content"))
        elif role == "assistant":
            calls = [_tool_use(call, f"toolu_{index}_{n}")
                     for n, call in enumerate(message.get("tool_calls") or []) if isinstance(call, dict)]
            add("assistant", _blocks(content, f"{where}.content") + calls)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": str(message.get("tool_call_id", "")),
                          "content": _text_of(content, where)}])
        else:
            raise Untranslatable(f"{where}: a {role!r} message cannot be sent to an Anthropic upstream")
    for turn in turns:                              # a user turn's tool results come before its text
        if turn["role"] == "user":
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return "\n".join(text for text in system if text), turns


def _tool(tool, index: int) -> dict:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not function.get("name"):
        raise Untranslatable(f"tools[{index}]: only function tools (with a name) can be sent to an Anthropic upstream")
    out = {"name": function["name"], "input_schema": function.get("parameters") or {"type": "object",
                                                                                    "properties": {}}}
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice, parallel) -> dict | None:
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        out = {"type": "tool", "name": name} if name else None
    else:
        out = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]} \
            if choice in ("auto", "required", "none") else None
    if parallel is False:
        out = dict(out or {"type": "auto"}, disable_parallel_tool_use=True)
    return out


def messages_request(chat: dict, default_max_tokens: int) -> dict:
    """The Messages request for a chat-completions ``chat`` body (an :class:`Untranslatable` when it asks for
    what the Messages API cannot do). ``default_max_tokens``: when the chat sets no limit."""
    if chat.get("n") not in (None, 1):
        raise Untranslatable("n > 1: an Anthropic upstream gives one answer per request")
    if chat.get("logprobs") or chat.get("top_logprobs"):
        raise Untranslatable("logprobs: an Anthropic upstream does not give them")
    response_format = chat.get("response_format") if isinstance(chat.get("response_format"), dict) else {}
    if response_format.get("type") == "json_object":
        raise Untranslatable("response_format json_object: an Anthropic upstream has no JSON mode "
                             "(a json_schema response_format is sent as its output_config.format)")
    system, turns = _turns(chat.get("messages"))
    max_tokens = chat.get("max_completion_tokens") or chat.get("max_tokens") or default_max_tokens
    out: dict = {"model": chat.get("model"), "max_tokens": max_tokens, "messages": turns}
    if system:
        out["system"] = system
    for name in ("temperature", "top_p", "top_k"):
        if chat.get(name) is not None:
            out[name] = chat[name]
    stop = chat.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if chat.get("tools"):
        out["tools"] = [_tool(tool, index) for index, tool in enumerate(chat["tools"])]
        choice = _tool_choice(chat.get("tool_choice"), chat.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        out["output_config"] = {"format": {"type": "json_schema", "schema": schema or {"type": "object"}}}
    effort = chat.get("reasoning_effort")
    if effort in ("none", "minimal"):
        out["thinking"] = {"type": "disabled"}
    elif effort in THINKING_BUDGETS and isinstance(max_tokens, int):
        budget = min(THINKING_BUDGETS[effort], max_tokens - 1)
        if budget >= MIN_THINKING_BUDGET:
            out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if isinstance(chat.get("user"), str):
        out["metadata"] = {"user_id": chat["user"]}
    if chat.get("stream"):
        out["stream"] = True
    return out


def chat_usage(usage: dict | None) -> dict:
    """An Anthropic usage object -> OpenAI's (the prompt counts the cache reads and writes too)."""
    usage = usage if isinstance(usage, dict) else {}
    read = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) + read
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": read}}


def finish_reason_of(stop_reason: str | None, has_calls: bool) -> str:
    """A message's ``stop_reason`` as the chat's ``finish_reason``."""
    return "tool_calls" if has_calls and stop_reason in ("tool_use", "end_turn") else \
        STOP_REASONS.get(stop_reason, "stop")


def completion_from_message(message: dict, model: str) -> dict:
    """An Anthropic message -> a chat completion answered by ``model``."""
    blocks = [block for block in message.get("content") or [] if isinstance(block, dict)]
    text = "".join(str(block.get("text", "")) for block in blocks if block.get("type") == "text")
    thinking = "".join(str(block.get("thinking", "")) for block in blocks if block.get("type") == "thinking")
    calls = [{"id": block.get("id"), "type": "function",
              "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {},
                                                                              ensure_ascii=False)}}
             for block in blocks if block.get("type") == "tool_use"]
    answer: dict = {"role": "assistant", "content": text if text or not calls else None}
    if thinking:
        answer["reasoning_content"] = thinking
    if calls:
        answer["tool_calls"] = calls
    return {"id": f"chatcmpl-{message.get('id') or uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": answer, "logprobs": None,
                         "finish_reason": finish_reason_of(message.get("stop_reason"), bool(calls))}],
            "usage": chat_usage(message.get("usage"))}


def error_from_anthropic(raw: bytes) -> dict:
    """An Anthropic error answer (its envelope, or any text) -> OpenAI's envelope (its type kept)."""
    try:
        error = json.loads(raw)["error"]
        message, kind = str(error["message"]), str(error.get("type") or "api_error")
    except (ValueError, KeyError, TypeError):
        message, kind = raw.decode("utf-8", "replace"), "api_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class ChunkTranslator:
    """Anthropic stream events -> chat chunk payloads (dicts, and "[DONE]" after ``message_stop``)."""

    def __init__(self, model: str):
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.calls: dict[int, int] = {}       # a tool_use block's index -> its tool_calls index
        self.usage: dict = {}                 # Anthropic's usage, as the events tell it

    def feed(self, event: dict) -> list:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") if isinstance(event.get("message"), dict) else {}
            if message.get("id"):
                self.id = f"chatcmpl-{message['id']}"
            self._add_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") if isinstance(event.get("content_block"), dict) else {}
            if block.get("type") == "tool_use":
                position = self.calls[event.get("index")] = len(self.calls)
                return [self._chunk({"tool_calls": [{"index": position, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") if isinstance(event.get("delta"), dict) else {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "thinking_delta":
                return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
            if delta.get("type") == "input_json_delta" and event.get("index") in self.calls:
                return [self._chunk({"tool_calls": [{"index": self.calls[event["index"]],
                                                     "function": {"arguments": delta.get("partial_json", "")}}]})]
            return []
        if kind == "message_delta":
            self._add_usage(event.get("usage"))
            reason = (event.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, finish_reason_of(reason, bool(self.calls)))]
        if kind == "message_stop":
            return [{"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [], "usage": chat_usage(self.usage)}, "[DONE]"]
        if kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            return [{"error": {"message": str(error.get("message", "the upstream's stream failed")),
                               "type": str(error.get("type", "api_error")), "param": None, "code": None}}, "[DONE]"]
        return []                             # ping, content_block_stop, signature deltas, ...

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def _add_usage(self, usage) -> None:
        if isinstance(usage, dict):
            self.usage.update({key: value for key, value in usage.items() if isinstance(value, int)})
