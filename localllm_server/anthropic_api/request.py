"""Anthropic Messages API bodies -> the chat request they mean, or a 400 naming the parameter.

``/v1/messages`` is served as a chat completion (as ``/v1/responses`` is): the body becomes a
``schemas.ChatRequest`` and generation is the chat route's (``openai_api.chat.prepare``):

* ``system`` (a string or text blocks) -> the first, system message;
* ``messages`` (roles ``user`` / ``assistant``; content a string or blocks) -> chat messages:
  ``text`` blocks -> text parts; ``image`` blocks -> image parts (refused with 400 by models
  without a vision encoder, which is every model here); an assistant's ``tool_use`` blocks ->
  its ``tool_calls`` (``input`` as the arguments' JSON text); a user's ``tool_result`` blocks ->
  ``tool`` messages before the user's own text (``tool_use_id`` -> ``tool_call_id``); an
  assistant's ``thinking`` blocks -> its ``reasoning_content``; ``redacted_thinking`` is dropped;
* ``max_tokens`` (required), ``stop_sequences``, ``temperature``, ``top_p``, ``top_k`` -> the
  generation settings (``max_tokens`` counts the thought too, as Anthropic's does);
* ``tools`` (``name``, ``description``, ``input_schema``) -> function tools; ``tool_choice``
  ``auto`` / ``any`` / ``tool`` (``name``) / ``none`` -> "auto" / "required" / that function /
  "none"; ``disable_parallel_tool_use`` false with ``any`` lets the grammar take several calls;
* ``thinking`` ``{"type": "enabled", "budget_tokens"}`` turns a reasoning model's thought on,
  ``{"type": "disabled"}`` off, ``{"type": "adaptive"}`` leaves the model's default
  (``localllm.reasoning``); the budget is checked as Anthropic checks it (at least 1024, below
  ``max_tokens``) but the thought is not cut at it; ``output_config.effort`` is the effort (as
  Ollama reads it); a model that does not think ignores all of this;
* ``output_config.format`` ``{"type": "json_schema", "schema"}`` constrains the answer to that
  JSON schema (the chat's ``response_format`` json_schema);
* ``metadata`` is accepted and not used.

Unknown fields are ignored (as Anthropic's beta fields would be by an older server); tools of
Anthropic's own server-side types (``web_search_...``, ``bash_...``) are refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import bad_request
from ..schemas import (MAX_STOP, MODEL, ChatRequest, Field, as_integer, boolean, generation_settings, integer,
                       make_field, number, parse_fields)
from ..schemas_tools import (PARAMETERS_SCHEMA, TOOL_NAME, NamedFunction, check_format_and_tools, parse_function,
                            resolve_tool_choice)

ROLES = ("user", "assistant")
USER_BLOCKS = ("text", "image", "tool_result")
ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}     # "tool" names the function
MIN_THINKING_BUDGET = 1024
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}   # -> the chat's

# --------------------------------------------------------------------------- JSON schemas (for /openapi.json)

_TEXT_BLOCK = {"type": "object", "required": ["type", "text"],
               "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_IMAGE_SOURCE = {"anyOf": [
    {"type": "object", "required": ["type", "media_type", "data"], "properties": {
        "type": {"const": "base64"}, "media_type": {"type": "string"}, "data": {"type": "string"}}},
    {"type": "object", "required": ["type", "url"], "properties": {
        "type": {"const": "url"}, "url": {"type": "string"}}}]}
_IMAGE_BLOCK = {"type": "object", "required": ["type", "source"],
                "properties": {"type": {"const": "image"}, "source": _IMAGE_SOURCE},
                "description": "an image (refused with 400 by models without a vision encoder)"}
_TOOL_RESULT_BLOCK = {"type": "object", "required": ["type", "tool_use_id"], "properties": {
    "type": {"const": "tool_result"}, "tool_use_id": {"type": "string"},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [_TEXT_BLOCK, _IMAGE_BLOCK]}}]},
    "is_error": {"type": "boolean"}}}
_TOOL_USE_BLOCK = {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
    "type": {"const": "tool_use"}, "id": {"type": "string"}, "name": {"type": "string", "minLength": 1},
    "input": {"type": "object"}}}
_THINKING_BLOCK = {"type": "object", "required": ["type", "thinking"], "properties": {
    "type": {"const": "thinking"}, "thinking": {"type": "string"}, "signature": {"type": "string"}}}
_REDACTED_THINKING_BLOCK = {"type": "object", "required": ["type"], "properties": {
    "type": {"const": "redacted_thinking"}, "data": {"type": "string"}}}
MESSAGE_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"const": "user"}, "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
            "anyOf": [_TEXT_BLOCK, _IMAGE_BLOCK, _TOOL_RESULT_BLOCK]}}]}}},
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"const": "assistant"}, "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
            "anyOf": [_TEXT_BLOCK, _TOOL_USE_BLOCK, _THINKING_BLOCK, _REDACTED_THINKING_BLOCK]}}]}}}]}
SYSTEM_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_BLOCK}]}
TOOL_SCHEMA = {"type": "object", "required": ["name", "input_schema"], "properties": {
    "type": {"const": "custom"}, "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
    "description": {"type": "string"}, "input_schema": PARAMETERS_SCHEMA},
    "description": "tool names must differ within tools (else 400)"}
_PARALLEL = {"disable_parallel_tool_use": {"type": "boolean"}}
TOOL_CHOICE_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["auto", "any", "none"]}, **_PARALLEL}},
    {"type": "object", "required": ["type", "name"], "properties": {
        "type": {"const": "tool"}, "name": {"type": "string"}, **_PARALLEL}}],
    "description": "auto (default with tools), any (a call is forced), tool (that tool's call is forced), none; "
                   "a forced call needs an input_schema the grammar can enforce (else 400)"}
THINKING_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["type", "budget_tokens"], "properties": {
        "type": {"const": "enabled"}, "budget_tokens": {"type": "integer", "minimum": MIN_THINKING_BUDGET}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["disabled", "adaptive"]}}}],
    "description": "reasoning models: the thought on (enabled), off (disabled) or the model's default (adaptive, "
                   "the default); budget_tokens must be below max_tokens (else 400) and does not cut the thought"}
OUTPUT_CONFIG_SCHEMA = {"type": "object", "properties": {
    "effort": {"enum": [*EFFORTS, None], "description": "a reasoning model's effort (xhigh and max as high)"},
    "format": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["type", "schema"], "properties": {
        "type": {"const": "json_schema"}, "schema": {"type": "object"}}}],
        "description": "structured output: the answer is JSON of this schema (with tools only when tool_choice "
                       "is none, else 400)"}}}
STOP_SEQUENCES_SCHEMA = {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1}}
METADATA_SCHEMA = {"type": "object", "properties": {"user_id": {"type": ["string", "null"]}}}


# --------------------------------------------------------------------------- messages

def _string(block: dict, key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string", "messages")
    return value


def _image_part(block: dict, where: str) -> dict:
    """An ``image`` block -> the chat's image part (a data: URL, or the URL given)."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type, data = _string(source, "media_type", f"{where}.source"), _string(source, "data", f"{where}.source")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        return {"type": "image_url", "image_url": {"url": _string(source, "url", f"{where}.source")}}
    raise bad_request(f"{where}.source.type must be 'base64' or 'url', got {kind!r}", "messages")


def _tool_result(block: dict, where: str) -> tuple[dict, int]:
    """A ``tool_result`` block -> (a ``tool`` message, number of images in it)."""
    content = block.get("content", "")
    if isinstance(content, str):
        parts, n_images = content, 0
    elif isinstance(content, list):
        parts, n_images = [], 0
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": _string(part, "text", f"{where}.content[{index}]")})
            elif kind == "image":
                parts.append(_image_part(part, f"{where}.content[{index}]"))
                n_images += 1
            else:
                raise bad_request(f"{where}.content[{index}].type must be 'text' or 'image', got {kind!r}", "messages")
    else:
        raise bad_request(f"{where}.content must be a string or a list of text blocks", "messages")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise bad_request(f"{where}.is_error must be a boolean", "messages")
    return {"role": "tool", "tool_call_id": _string(block, "tool_use_id", where), "content": parts}, n_images


def _tool_call(block: dict, where: str) -> dict:
    """A ``tool_use`` block -> a chat ``tool_calls`` entry (the input object as JSON text)."""
    name = _string(block, "name", where)
    if not name:
        raise bad_request(f"{where}.name must not be empty", "messages")
    arguments = block.get("input")
    if not isinstance(arguments, dict):
        raise bad_request(f"{where}.input must be an object", "messages")
    return {"id": _string(block, "id", where), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _message(message, where: str) -> tuple[list[dict], int]:
    """One Anthropic message -> (chat messages, number of images): a user's tool results come first as
    ``tool`` messages, then its own text; an assistant's text, calls and thought are one message."""
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with `role` and `content`", "messages")
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role must be 'user' or 'assistant', got {role!r}", f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}], 0
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content blocks", f"{where}.content")
    allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
    parts, results, calls, thoughts, n_images = [], [], [], [], 0
    for index, block in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            raise bad_request(f"{at}.type must be one of {', '.join(repr(k) for k in allowed)} in {role} "
                              f"messages, got {kind!r}", "messages")
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", at)})
        elif kind == "image":
            parts.append(_image_part(block, at))
            n_images += 1
        elif kind == "tool_result":
            result, images = _tool_result(block, at)
            results.append(result)
            n_images += images
        elif kind == "tool_use":
            calls.append(_tool_call(block, at))
        elif kind == "thinking":
            thoughts.append(_string(block, "thinking", at))
    if role == "user":
        return results + ([{"role": "user", "content": parts}] if parts or not results else []), n_images
    assistant = {"role": "assistant", "content": parts}
    if calls:
        assistant["tool_calls"] = calls
    if thoughts:
        assistant["reasoning_content"] = "\n".join(thoughts)
    return [assistant], n_images


def parse_messages(value, param: str) -> tuple[list[dict], int]:
    """``messages`` -> (chat messages, number of images)."""
    if not isinstance(value, list):
        raise bad_request(f"`{param}` must be a list of messages", param)
    if not value:
        raise bad_request(f"`{param}` must not be empty", param)
    messages, n_images = [], 0
    for index, message in enumerate(value):
        converted, images = _message(message, f"{param}[{index}]")
        messages += converted
        n_images += images
    return messages, n_images


def parse_system(value, param: str) -> str:
    """``system``: a string, or text blocks (joined with newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                       and isinstance(b.get("text"), str) for b in value):
        return "\n".join(block["text"] for block in value)
    raise bad_request(f"{param} must be a string or a list of text blocks", param)


# --------------------------------------------------------------------------- tools, settings

def parse_tools(value, param: str) -> list[dict]:
    """Anthropic tools -> chat tools ``[{"type": "function", "function": {name, description, parameters}}]``."""
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a list of tools", param)
    tools = []
    for index, tool in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(tool, dict):
            raise bad_request(f"{where} must be an object", param)
        kind = tool.get("type", "custom")
        if kind not in ("custom", None):
            raise bad_request(f"{where}.type {kind!r} is not supported (only custom tools, with an input_schema)",
                              param)
        schema = tool.get("input_schema")
        kind = schema.get("type") if isinstance(schema, dict) else None
        if kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise bad_request(f"{where}.input_schema must be a JSON schema with \"type\": \"object\"", param)
        function = {"name": tool.get("name"), "description": tool.get("description"), "parameters": schema}
        tools.append({"type": "function", "function": parse_function(function, param, where)})
    names = [tool["function"]["name"] for tool in tools]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise bad_request(f"{param}[{index}].name '{name}' is defined twice", param)
    return tools


@dataclass(frozen=True)
class ToolChoice:
    choice: object                  # "auto" | "required" | "none" | NamedFunction
    parallel: bool                  # several forced calls allowed (any, without disable_parallel_tool_use)


def parse_tool_choice(value, param: str) -> ToolChoice:
    kind = value.get("type") if isinstance(value, dict) else None
    disable_parallel = value.get("disable_parallel_tool_use") if isinstance(value, dict) else None
    if disable_parallel is not None and not isinstance(disable_parallel, bool):
        raise bad_request(f"{param}.disable_parallel_tool_use must be a boolean", param)
    if isinstance(kind, str) and kind in TOOL_CHOICES:
        return ToolChoice(TOOL_CHOICES[kind], kind == "any" and not disable_parallel)
    if kind == "tool" and isinstance(value.get("name"), str) and TOOL_NAME.fullmatch(value["name"]):
        return ToolChoice(NamedFunction(value["name"]), False)
    raise bad_request(f"{param} must be {{\"type\": \"auto\" | \"any\" | \"none\"}} or "
                      f"{{\"type\": \"tool\", \"name\": ...}}", param)


def parse_thinking(value, param: str):
    """``thinking`` -> ThinkingBudget (enabled), "none" (disabled) or None (adaptive: the model's default)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "disabled":
        return "none"
    if kind == "adaptive":
        return None
    if kind == "enabled":
        budget = as_integer(value.get("budget_tokens"))
        if budget is None or budget < MIN_THINKING_BUDGET:
            raise bad_request(f"{param}.budget_tokens must be an integer >= {MIN_THINKING_BUDGET}",
                              f"{param}.budget_tokens")
        return ThinkingBudget(budget)
    raise bad_request(f"{param}.type must be 'enabled', 'disabled' or 'adaptive', got {kind!r}", param)


@dataclass(frozen=True)
class ThinkingBudget:
    tokens: int


@dataclass(frozen=True)
class OutputConfig:
    effort: str | None                       # the chat's reasoning effort
    response_format: dict | None             # the chat's json_schema response_format


def parse_output_config(value, param: str) -> OutputConfig:
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object", param)
    effort = value.get("effort")
    if effort is not None and not (isinstance(effort, str) and effort in EFFORTS):
        raise bad_request(f"{param}.effort must be one of {', '.join(repr(e) for e in EFFORTS)}", f"{param}.effort")
    spec = value.get("format")
    if spec is None:
        return OutputConfig(EFFORTS.get(effort), None)
    if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(spec.get("schema"), dict):
        raise bad_request(f"{param}.format must be {{\"type\": \"json_schema\", \"schema\": {{...}}}}",
                          f"{param}.format")
    return OutputConfig(EFFORTS.get(effort), {"type": "json_schema", "json_schema": {
        "name": "response", "schema": spec["schema"], "strict": True}})


def _parse_stop_sequences(value, param: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request(f"{param} must be a list of strings", param)
    if len(value) > MAX_STOP:
        raise bad_request(f"{param} may hold at most {MAX_STOP} strings", param)
    if any(not s for s in value):
        raise bad_request(f"{param} strings must not be empty", param)
    return list(value)


def _parse_metadata(value, param: str) -> dict:
    user_id = value.get("user_id") if isinstance(value, dict) else None
    if not isinstance(value, dict) or (user_id is not None and not isinstance(user_id, str)):
        raise bad_request(f"{param} must be an object (user_id: a string)", param)
    return value


MESSAGES = make_field("messages", ({"type": "array", "minItems": 1, "items": MESSAGE_SCHEMA}, parse_messages,
                                   "the conversation: user and assistant turns"), required=True)
SYSTEM = make_field("system", (SYSTEM_SCHEMA, parse_system, "the system prompt (a string or text blocks)"))
TOOLS = make_field("tools", ({"type": "array", "items": TOOL_SCHEMA}, parse_tools,
                             "tools the model may call (rendered into the prompt)"))
TOOL_CHOICE = make_field("tool_choice", (TOOL_CHOICE_SCHEMA, parse_tool_choice, TOOL_CHOICE_SCHEMA["description"]))
THINKING = make_field("thinking", (THINKING_SCHEMA, parse_thinking, THINKING_SCHEMA["description"]))
OUTPUT_CONFIG = make_field("output_config", (OUTPUT_CONFIG_SCHEMA, parse_output_config,
                                             "effort (reasoning models, when thinking is not disabled) and format "
                                             "(structured output)"))

COUNT_TOKENS_FIELDS: list[Field] = [MODEL, MESSAGES, SYSTEM, TOOLS, TOOL_CHOICE, THINKING, OUTPUT_CONFIG]
MESSAGES_FIELDS: list[Field] = [
    MODEL, MESSAGES,
    make_field("max_tokens", integer("maximum tokens to generate (the thought included)", 1), required=True),
    SYSTEM,
    make_field("stop_sequences", (STOP_SEQUENCES_SCHEMA, _parse_stop_sequences,
                                  "strings that end the answer (stop_reason stop_sequence; not included)")),
    make_field("temperature", number("sampling temperature (0: greedy); default: the model's", 0, 1)),
    make_field("top_p", number("nucleus sampling mass; default: the model's", 0, 1)),
    make_field("top_k", integer("keep the k most likely tokens (0: off); default: the model's", 0)),
    make_field("stream", boolean("stream server-sent events (message_start ... message_stop)")),
    TOOLS, TOOL_CHOICE, THINKING, OUTPUT_CONFIG,
    make_field("metadata", (METADATA_SCHEMA, _parse_metadata, "accepted, not used")),
]


@dataclass
class MessagesRequest:
    chat: ChatRequest                                    # what is generated, as a chat completion request
    stop_sequences: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.chat.model


def parse_messages_request(body: dict, count_only: bool = False) -> MessagesRequest:
    """POST /v1/messages body (or /v1/messages/count_tokens with ``count_only``) -> MessagesRequest."""
    values = parse_fields(body, COUNT_TOKENS_FIELDS if count_only else MESSAGES_FIELDS)
    for name in ("max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream", "metadata"):
        values.setdefault(name, None)
    messages, n_images = values["messages"]
    if values["system"]:
        messages = [{"role": "system", "content": values["system"]}] + messages
    tools = values["tools"] or []
    tool_choice = values["tool_choice"] or ToolChoice(None, False)
    if tool_choice.choice == "required" and not tools:
        raise bad_request("tool_choice 'any' needs at least one tool in tools", "tool_choice")
    output = values["output_config"] or OutputConfig(None, None)
    think = values["thinking"]
    if isinstance(think, ThinkingBudget):
        if values["max_tokens"] is not None and think.tokens >= values["max_tokens"]:
            raise bad_request("thinking.budget_tokens must be below max_tokens", "thinking.budget_tokens")
        think = output.effort or True
    elif think is None:
        think = output.effort
    choice = resolve_tool_choice(tool_choice.choice, tools)
    check_format_and_tools(output.response_format, choice, param="output_config.format")
    values["stop"], values["logprobs"] = values["stop_sequences"], False
    chat = ChatRequest(model=values["model"], messages=messages, n_images=n_images, stream=bool(values["stream"]),
                       include_usage=False, settings=generation_settings(values),
                       response_format=output.response_format, tools=tools, tool_choice=choice,
                       parallel_tool_calls=tool_choice.parallel, reasoning_effort=think)
    return MessagesRequest(chat, values["stop_sequences"] or [])
