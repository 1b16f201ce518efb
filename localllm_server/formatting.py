"""Engine events -> OpenAI response objects and stream chunks (pure functions, no I/O).

The shapes follow ../shared/API.md: ``chatcmpl-``/``cmpl-`` ids, ``created``
in unix seconds, the model name as requested, ``system_fingerprint``, usage.
Events are ``localllm.generate.GenerationEvent`` objects (or anything with the
same attributes), paired with the choice index they belong to.
"""
from __future__ import annotations

import base64
import copy
import sys
import time
import uuid
from array import array
from dataclasses import dataclass, field

SYSTEM_FINGERPRINT = "fp_localllm"


def new_id(prefix: str) -> str:
    """A unique id: ``chatcmpl-<32 hex>``, ``cmpl-<32 hex>``; Responses API ids take "_" (``resp_``, ``msg_``)."""
    separator = "_" if prefix in ("resp", "msg", "fc", "rs") else "-"
    return f"{prefix}{separator}{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ResponseHeader:
    """What every object and chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> "ResponseHeader":
        return cls(new_id(prefix), int(time.time()), model)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> dict:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens served from the KV cache (not prefilled again);
    ``reasoning_tokens`` (the thought's share of the completion) when the thought was parsed."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


# --------------------------------------------------------------------------- collecting events

@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


class Collector:
    """Accumulates (index, event) pairs into finished choices and the completion token count."""

    def __init__(self, n_choices: int):
        self.choices = [ChoiceState() for _ in range(n_choices)]
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.reasoning_tokens: int | None = None     # None unless the thought was parsed

    def add(self, index: int, event) -> None:
        choice = self.choices[index]
        choice.text.append(event.text)
        choice.thinking.append(getattr(event, "thinking", ""))
        choice.token_ids.extend(event.token_ids)
        if event.logprobs:
            choice.logprobs.extend(event.logprobs)
        if event.finish_reason:
            choice.finish_reason = event.finish_reason
            self.completion_tokens += final_completion_tokens(event)
            self.cached_tokens = max(self.cached_tokens, final_cached_tokens(event))
            self.reasoning_tokens = add_reasoning_tokens(self.reasoning_tokens, event)


def add_reasoning_tokens(total: int | None, event) -> int | None:
    """``total`` plus the reasoning tokens of the choice a final event closes (None while none were parsed)."""
    count = getattr(event.usage, "reasoning_tokens", None) if event.usage is not None else None
    return total if count is None else (total or 0) + count


def final_completion_tokens(event) -> int:
    """Generated tokens of the choice a final event closes."""
    return event.usage.completion_tokens if event.usage is not None else 0


def final_cached_tokens(event) -> int:
    """Prompt tokens the choice a final event closes took from the KV cache."""
    return getattr(event.usage, "cached_tokens", 0) if event.usage is not None else 0


# --------------------------------------------------------------------------- logprobs

def _token_logprob(record) -> dict:
    return {"token": record.text, "logprob": record.logprob, "bytes": list(record.bytes)}


def chat_logprob_content(records) -> list[dict]:
    """OpenAI chat ``logprobs.content`` entries: token, logprob, bytes, top_logprobs."""
    return [{**_token_logprob(r), "top_logprobs": [_token_logprob(t) for t in r.top]} for r in records]


def completion_logprobs(records, text_offset: int = 0) -> dict:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs (dicts), text_offset.

    ``top_logprobs[i]`` holds the requested alternatives plus the chosen token
    itself (OpenAI: "up to logprobs+1 elements"); the first prompt token of an
    echo has no logprob (null). ``text_offset`` is each token's character
    offset in the choice's text, starting at ``text_offset``.
    """
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for record in records:
        tokens.append(record.text)
        token_logprobs.append(record.logprob)
        if record.logprob is None:
            tops.append(None)
        else:
            top = {t.text: t.logprob for t in record.top}
            top.setdefault(record.text, record.logprob)
            tops.append(top)
        offsets.append(text_offset)
        text_offset += len(record.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


# --------------------------------------------------------------------------- chat

def parse_calls(text: str, make_parser) -> tuple[str, list]:
    """``(content, calls)`` of a whole output through a fresh tool-call parser (``(text, [])`` without one)."""
    if make_parser is None:
        return text, []
    parser = make_parser()
    parser.push(text)
    parser.finish()
    return parser.content, parser.calls


def tool_call_object(call) -> dict:
    """``{"id", "type": "function", "function": {"name", "arguments"}}`` of a parsed call."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}


def with_calls(finish_reason: str | None, calls: list) -> str | None:
    """``tool_calls`` when the output ended normally after calls; a cut output stays ``length``."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def thinking_fields(thinking: str) -> dict:
    """The thought under both names clients read: ``reasoning_content`` (llama.cpp, DeepSeek) and
    ``reasoning`` (Ollama, vLLM); nothing when there is none."""
    return {"reasoning_content": thinking, "reasoning": thinking} if thinking else {}


def chat_message(content: str, calls: list, thinking: str = "") -> dict:
    """The assistant message: ``content`` (null when there are only calls), the thought when there is one,
    and ``tool_calls`` when there are."""
    message = {"role": "assistant", "content": content if content or not calls else None, **thinking_fields(thinking)}
    if calls:
        message["tool_calls"] = [tool_call_object(call) for call in calls]
    return message


def chat_completion(header: ResponseHeader, collector: Collector, prompt_tokens: int, want_logprobs: bool,
                    make_parser=None) -> dict:
    """The non-streamed ``chat.completion`` object.

    make_parser: a factory of tool-call stream parsers (``localllm.tools.ToolCallStreamParser``)
        when the request's calls are parsed; each choice's text goes through a fresh one.
    """
    choices = []
    for index, choice in enumerate(collector.choices):
        content, calls = parse_calls("".join(choice.text), make_parser)
        choices.append({
            "index": index,
            "message": chat_message(content, calls, "".join(choice.thinking)),
            "logprobs": {"content": chat_logprob_content(choice.logprobs)} if want_logprobs else None,
            "finish_reason": with_calls(choice.finish_reason, calls),
        })
    return dict(envelope(header, "chat.completion", choices), usage=usage(prompt_tokens, collector.completion_tokens,
                                                                      collector.cached_tokens,
                                                                      collector.reasoning_tokens))


def envelope(header: ResponseHeader, object_type: str, choices: list[dict]) -> dict:
    """The fields every chat / text completion object and chunk starts with."""
    return {"id": header.id, "object": object_type, "created": header.created, "model": header.model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}


def stream_chunk(header: ResponseHeader, object_type: str, choices: list[dict], include_usage: bool,
                 usage_value=None) -> dict:
    """A streamed chunk; ``usage`` is present (null until the last chunk) only when asked for."""
    chunk = envelope(header, object_type, choices)
    if include_usage:
        chunk["usage"] = usage_value
    return chunk


def chat_chunk(header: ResponseHeader, choices: list[dict], include_usage: bool, usage_value=None) -> dict:
    """One ``chat.completion.chunk``; ``usage`` is present (null until the last chunk) only when asked for."""
    return stream_chunk(header, "chat.completion.chunk", choices, include_usage, usage_value)


def chat_delta(index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None) -> dict:
    return {"index": index, "delta": delta,
            "logprobs": {"content": chat_logprob_content(logprobs)} if logprobs else None,
            "finish_reason": finish_reason}


def tool_call_deltas(pieces: list) -> list[dict]:
    """Parser output (content strings and ``ToolCallDelta`` s) -> ``delta`` objects, one each.

    A call's first delta is ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}``;
    its argument text follows in ``{"index", "function": {"arguments": <fragment>}}`` deltas.
    """
    deltas = []
    for piece in pieces:
        if isinstance(piece, str):
            deltas.append({"content": piece})
            continue
        if piece.id is not None:
            deltas.append({"tool_calls": [{"index": piece.index, "id": piece.id, "type": "function",
                                           "function": {"name": piece.name, "arguments": ""}}]})
        if piece.arguments_fragment:
            deltas.append({"tool_calls": [{"index": piece.index,
                                           "function": {"arguments": piece.arguments_fragment}}]})
    return deltas


def chat_stream(header: ResponseHeader, events, n_choices: int, prompt_tokens: int, include_usage: bool,
                make_parser=None):
    """The chunk sequence of a streamed chat completion (dicts; framing is streaming.py's job).

    Per choice: a first chunk with ``role``, content deltas, a final chunk with
    an empty delta and ``finish_reason``. Then, with ``include_usage``, one
    chunk with ``choices: []`` and the usage. With ``make_parser`` (tool calls
    parsed), each choice's text goes through its own parser: text outside calls
    streams as content, calls as ``tool_calls`` deltas (:func:`tool_call_deltas`);
    an event's logprobs ride on the next chunk of its choice.
    """
    for index in range(n_choices):
        yield chat_chunk(header, [chat_delta(index, {"role": "assistant", "content": ""})], include_usage)
    parsers = [make_parser() for _ in range(n_choices)] if make_parser is not None else None
    pending = [[] for _ in range(n_choices)]
    completion_tokens = cached_tokens = 0
    reasoning_tokens = None
    for index, event in events:
        pending[index] += event.logprobs or []
        thinking = getattr(event, "thinking", "")
        deltas = [thinking_fields(thinking)] if thinking else []
        if parsers is None:
            deltas += [{"content": event.text}] if event.text or (event.logprobs and not thinking) else []
        else:
            deltas += tool_call_deltas(parsers[index].push(event.text) if event.text else [])
            if event.finish_reason:
                deltas += tool_call_deltas(parsers[index].finish())
        for delta in deltas:
            yield chat_chunk(header, [chat_delta(index, delta, logprobs=pending[index])], include_usage)
            pending[index] = []
        if event.finish_reason:
            completion_tokens += final_completion_tokens(event)
            cached_tokens = max(cached_tokens, final_cached_tokens(event))
            reasoning_tokens = add_reasoning_tokens(reasoning_tokens, event)
            calls = parsers[index].calls if parsers is not None else []
            yield chat_chunk(header, [chat_delta(index, {}, with_calls(event.finish_reason, calls),
                                                 logprobs=pending[index])], include_usage)
            pending[index] = []
    if include_usage:
        yield chat_chunk(header, [], True, usage(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens))


# --------------------------------------------------------------------------- completions

def text_completion(header: ResponseHeader, collector: Collector, prompt_tokens: int, want_logprobs: bool) -> dict:
    """The non-streamed ``text_completion`` object."""
    choices = [{"index": index, "text": "".join(choice.text),
                "logprobs": completion_logprobs(choice.logprobs) if want_logprobs else None,
                "finish_reason": choice.finish_reason}
               for index, choice in enumerate(collector.choices)]
    return dict(envelope(header, "text_completion", choices), usage=usage(prompt_tokens, collector.completion_tokens,
                                                                      collector.cached_tokens))


def completion_chunk(header: ResponseHeader, choices: list[dict], include_usage: bool, usage_value=None) -> dict:
    return stream_chunk(header, "text_completion", choices, include_usage, usage_value)


def completion_stream(header: ResponseHeader, events, n_choices: int, prompt_tokens: int, include_usage: bool,
                      want_logprobs: bool):
    """The chunk sequence of a streamed text completion: text pieces, a final chunk per choice, usage."""
    offsets = [0] * n_choices
    completion_tokens = cached_tokens = 0
    for index, event in events:
        if event.text or event.logprobs:
            logprobs = completion_logprobs(event.logprobs or [], offsets[index]) if want_logprobs else None
            offsets[index] += sum(len(r.text) for r in event.logprobs or [])
            yield completion_chunk(header, [{"index": index, "text": event.text, "logprobs": logprobs,
                                             "finish_reason": None}], include_usage)
        if event.finish_reason:
            completion_tokens += final_completion_tokens(event)
            cached_tokens = max(cached_tokens, final_cached_tokens(event))
            yield completion_chunk(header, [{"index": index, "text": "", "logprobs": None,
                                             "finish_reason": event.finish_reason}], include_usage)
    if include_usage:
        yield completion_chunk(header, [], True, usage(prompt_tokens, completion_tokens, cached_tokens))


# --------------------------------------------------------------------------- responses (/v1/responses)

def response_usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0,
                   reasoning_tokens: int | None = None) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens or 0},
            "total_tokens": input_tokens + output_tokens}


def response_fields(request, params) -> dict:
    """What a response object repeats of its request (a ``schemas_responses.ResponsesRequest``);
    ``params`` (the GenerationParams used) gives the effective temperature and top_p."""
    return {"instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata, "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": getattr(request, "reasoning_effort", None), "summary": None}, "store": False,
            "temperature": params.sampling.temperature, "text": {"format": request.text_format},
            "tool_choice": request.tool_choice, "tools": request.tools, "top_p": params.sampling.top_p,
            "truncation": "disabled", "user": request.user}


def response_object(header: ResponseHeader, fields: dict, status: str, output: list[dict],
                    usage_value: dict | None) -> dict:
    """A ``response`` object; ``status`` "in_progress", "completed" or "incomplete" (cut by max_output_tokens)."""
    return {"id": header.id, "object": "response", "created_at": header.created, "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": header.model, "output": output, **fields, "usage": usage_value}


def message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def reasoning_item(item_id: str, thinking: str, status: str) -> dict:
    """The thought as a ``reasoning`` output item: its text in ``content[0]`` (``reasoning_text``), no summary."""
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": thinking}],
            "status": status}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def item_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def response_output(text: str, finish_reason: str | None, make_parser=None, thinking: str = "") -> list[dict]:
    """The ``output`` items of a whole generation: the thought (if any), the message (unless there are only
    calls), then the calls."""
    content, calls = parse_calls(text, make_parser)
    status = item_status(finish_reason)
    items = [reasoning_item(new_id("rs"), thinking, status)] if thinking else []
    items += [message_item(new_id("msg"), content, status)] if content or not calls else []
    items += [function_call_item(new_id("fc"), call.id, call.name, call.arguments_json, status) for call in calls]
    return items


class ResponseStream:
    """The events of a streamed response, as the OpenAI Responses API sends them.

    ``response.created``, ``response.in_progress``; for the thought a ``reasoning`` item: ``output_item.added``,
    ``reasoning_text.delta`` ..., ``reasoning_text.done``, ``output_item.done``; per message item ``output_item.added``,
    ``content_part.added``, ``output_text.delta`` ..., ``output_text.done``, ``content_part.done``,
    ``output_item.done``; per function call ``output_item.added`` (name, empty arguments),
    ``function_call_arguments.delta`` ..., ``function_call_arguments.done``, ``output_item.done``;
    then ``response.completed`` (or ``response.incomplete``) with the whole response.
    Every event has ``type`` and a ``sequence_number`` counting from 0.
    """

    def __init__(self, header: ResponseHeader, fields: dict, make_parser=None):
        self.header, self.fields = header, fields
        self.parser = make_parser() if make_parser is not None else None
        self.sequence = 0
        self.output: list[dict] = []
        self.message: dict | None = None          # the open message item
        self.reasoning: dict | None = None        # the open reasoning item
        self.calls: dict[int, dict] = {}          # open function call items by the parser's call index

    def events(self, events, input_tokens: int):
        """Event dicts for ``(index, GenerationEvent)`` pairs (one choice)."""
        yield self._event("response.created", response=self._response("in_progress", None))
        yield self._event("response.in_progress", response=self._response("in_progress", None))
        reasoning_tokens = None
        for _, event in events:
            if getattr(event, "thinking", ""):
                yield from self._thinking(event.thinking)
            pieces = self.parser.push(event.text) if self.parser is not None and event.text else \
                ([event.text] if event.text else [])
            if event.finish_reason and self.parser is not None:
                pieces += self.parser.finish()
            for piece in pieces:
                yield from self._close_reasoning("completed")
                yield from self._piece(piece)
            if event.finish_reason:
                status = item_status(event.finish_reason)
                yield from self._close_all(status)
                kind = "response.completed" if status == "completed" else "response.incomplete"
                reasoning_tokens = add_reasoning_tokens(reasoning_tokens, event)
                usage_value = response_usage(input_tokens, final_completion_tokens(event), final_cached_tokens(event),
                                             reasoning_tokens)
                yield self._event(kind, response=self._response(status, usage_value))

    # ---------------------------------------------------------------- items
    def _thinking(self, text: str):
        if self.reasoning is None:
            self.reasoning = reasoning_item(new_id("rs"), "", "in_progress")
            yield from self._add(self.reasoning)
        self.reasoning["content"][0]["text"] += text
        yield self._event("response.reasoning_text.delta", **self._where(self.reasoning), content_index=0, delta=text)

    def _close_reasoning(self, status: str):
        item, self.reasoning = self.reasoning, None
        if item is None:
            return
        item["status"] = status
        yield self._event("response.reasoning_text.done", **self._where(item), content_index=0,
                          text=item["content"][0]["text"])
        yield self._event("response.output_item.done", output_index=self.output.index(item), item=item)

    def _piece(self, piece):
        if isinstance(piece, str):
            if self.message is None:
                yield from self._close_calls("completed")
                self.message = message_item(new_id("msg"), "", "in_progress")
                yield from self._add(self.message)
                yield self._event("response.content_part.added", **self._where(self.message), content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []})
            self.message["content"][0]["text"] += piece
            yield self._event("response.output_text.delta", **self._where(self.message), content_index=0,
                              delta=piece, logprobs=[])
            return
        if piece.id is not None:
            yield from self._close_message("completed")
            yield from self._close_calls("completed")
            item = function_call_item(new_id("fc"), piece.id, piece.name, "", "in_progress")
            self.calls[piece.index] = item
            yield from self._add(item)
        if piece.arguments_fragment:
            item = self.calls[piece.index]
            item["arguments"] += piece.arguments_fragment
            yield self._event("response.function_call_arguments.delta", **self._where(item),
                              delta=piece.arguments_fragment)

    def _add(self, item: dict):
        self.output.append(item)
        yield self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))

    def _close_message(self, status: str):
        item, self.message = self.message, None
        if item is None:
            return
        text = item["content"][0]["text"]
        item["status"] = status
        yield self._event("response.output_text.done", **self._where(item), content_index=0, text=text, logprobs=[])
        yield self._event("response.content_part.done", **self._where(item), content_index=0,
                          part={"type": "output_text", "text": text, "annotations": []})
        yield self._event("response.output_item.done", output_index=self.output.index(item), item=item)

    def _close_calls(self, status: str):
        items, self.calls = list(self.calls.values()), {}
        for item in items:
            item["status"] = status
            yield self._event("response.function_call_arguments.done", **self._where(item), name=item["name"],
                              arguments=item["arguments"])
            yield self._event("response.output_item.done", output_index=self.output.index(item), item=item)

    def _close_all(self, status: str):
        yield from self._close_reasoning(status)
        if not any(item["type"] != "reasoning" for item in self.output):   # no answer: an empty message, as
            self.message = message_item(new_id("msg"), "", "in_progress")   # non-streamed
            yield from self._add(self.message)
        yield from self._close_message(status)
        yield from self._close_calls(status)

    # ---------------------------------------------------------------- framing helpers
    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _response(self, status: str, usage_value: dict | None) -> dict:
        return response_object(self.header, self.fields, status, [dict(item) for item in self.output], usage_value)

    def _event(self, kind: str, **payload) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **copy.deepcopy(payload)}   # items change later
        self.sequence += 1
        return event


# --------------------------------------------------------------------------- embeddings and models

def float32_base64(vector) -> str:
    """Base64 of the little-endian float32 bytes of ``vector`` (OpenAI's ``encoding_format: base64``)."""
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embeddings_response(model: str, vectors: list[list[float]], encoding_format: str, prompt_tokens: int) -> dict:
    encode = float32_base64 if encoding_format == "base64" else list
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def model_object(entry) -> dict:
    """A store entry as an OpenAI model object (``owned_by``: the namespace, else ``library``)."""
    base = entry.name.rsplit(":", 1)[0]
    return {"id": entry.name, "object": "model", "created": int(entry.modified_at.timestamp()),
            "owned_by": base.split("/")[0] if "/" in base else "library"}


def models_list(entries) -> dict:
    return {"object": "list", "data": [model_object(e) for e in entries]}
