"""POST /v1/responses bodies -> the chat request they mean, or a 400 naming the parameter.

The Responses API is served as a chat completion: ``instructions`` become the first
system message; ``input`` (a string, or items) becomes the conversation:

* messages ``{"role", "content"}`` with content a string or parts ``input_text`` /
  ``output_text`` (``refusal`` too) -> chat messages with text parts; ``input_image``
  (``image_url``: a data: URI or an http(s) URL) -> an image part (a 400 on models without
  vision, ``localllm_server.images``), ``input_file`` / ``input_audio`` are refused;
* ``function_call`` items ``{call_id, name, arguments}`` -> an assistant message's
  ``tool_calls`` (consecutive calls, and an assistant message just before them, share one);
* ``function_call_output`` items ``{call_id, output}`` -> ``tool`` messages;
* ``reasoning`` items (a thought sent back, its ``content`` reasoning_text or its ``summary``)
  -> the ``reasoning_content`` of the assistant turn that follows them.

Function tools come flattened (``{"type": "function", "name", "parameters", ...}``) and
``tool_choice`` names a function as ``{"type": "function", "name"}``; ``text.format``
(``text`` / ``json_object`` / ``json_schema`` with ``name``, ``schema``, ``strict``) is the
chat ``response_format``. The server keeps no state: ``previous_response_id`` and
``conversation`` are refused, ``store`` is accepted and nothing is stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import bad_request
from .schemas import (MAX_SEED, MIN_SEED, MODEL, OPTIONS, REASONING_EFFORTS, ChatRequest, boolean,
                      generation_settings, integer, make_field, number, parse_fields, string)
from .schemas_tools import (FUNCTION_SCHEMA, NamedFunction, check_format_and_tools, check_tool_names, parse_function,
                            resolve_tool_choice)

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
UNSUPPORTED_PARTS = ("input_file", "input_audio")

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"enum": list(TEXT_PARTS)}, "text": {"type": "string"}}}
_REFUSAL_PART = {"type": "object", "required": ["type", "refusal"],
                 "properties": {"type": {"const": "refusal"}, "refusal": {"type": "string"}}}
_IMAGE_PART = {"type": "object", "required": ["type"], "properties": {
    "type": {"const": "input_image"}, "image_url": {"type": "string", "minLength": 1},
    "detail": {"enum": ["auto", "low", "high"]}},
    "description": "an image: image_url a data: URI or an http(s) URL (a 400 on models without vision)"}
_REASONING_PARTS = {"type": ["array", "null"], "items": {"type": "object", "required": ["text"],
                                                         "properties": {"text": {"type": "string"}}}}
INPUT_ITEM_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": list(MESSAGE_ROLES)},
        "content": {"anyOf": [{"type": "string"},
                              {"type": "array", "items": {"anyOf": [_TEXT_PART, _REFUSAL_PART, _IMAGE_PART]}}]}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string"}}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": {"type": "string"},
        "output": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}},
    {"type": "object", "required": ["type"], "properties": {
        "type": {"const": "reasoning"}, "content": _REASONING_PARTS, "summary": _REASONING_PARTS}}]}
INPUT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": INPUT_ITEM_SCHEMA}]}
RESPONSE_TOOL_SCHEMA = {**FUNCTION_SCHEMA, "required": ["type", "name"],
                        "properties": {"type": {"const": "function"}, **FUNCTION_SCHEMA["properties"]}}
RESPONSE_TOOL_CHOICE_SCHEMA = {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["type", "name"],
    "properties": {"type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"}}}]}
TEXT_SCHEMA = {"type": "object", "properties": {"format": {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "schema"], "properties": {
        "type": {"const": "json_schema"}, "name": {"type": ["string", "null"]}, "schema": {"type": "object"},
        "strict": {"type": ["boolean", "null"]}, "description": {"type": "string"}}},
    {"type": "null"}]}}}


# --------------------------------------------------------------------------- input

def _text_of_part(part, param: str, role: str) -> dict:
    """A content part -> a chat part: text, or an image (``input_image``: its ``image_url``, a data: URI or an
    http(s) URL; ``file_id`` needs a files API this server does not have)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS or kind == "refusal":
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise bad_request(f"{param}.text must be a string", "input")
        return {"type": "text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if part.get("file_id") is not None and url is None:
            raise bad_request(f"{param}: input_image by file_id is not supported (no files API); send image_url "
                              "(a data: URI or an http(s) URL)", "input")
        if not isinstance(url, str) or not url:
            raise bad_request(f"{param}.image_url must be a string (a data: URI or an http(s) URL)", "input")
        return {"type": "image_url", "image_url": {"url": url}, "where": param}
    if kind in UNSUPPORTED_PARTS:
        raise bad_request(f"{param}: {kind} is not supported", "input")
    raise bad_request(f"{param}.type must be 'input_text', 'output_text' or 'input_image', got {kind!r}", "input")


def _message(item: dict, param: str) -> tuple[dict, int]:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise bad_request(f"{param}.role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}", "input")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": "system" if role == "developer" else role, "content": content}, 0
    if not isinstance(content, list):
        raise bad_request(f"{param}.content must be a string or a list of content parts", "input")
    parts = [_text_of_part(part, f"{param}.content[{i}]", role) for i, part in enumerate(content)]
    images = sum(1 for part in parts if part["type"] == "image_url")
    return {"role": "system" if role == "developer" else role, "content": parts}, images


def _string(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{param}.{key} must be a string", "input")
    return value


def _call_output(item: dict, param: str) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        parts = [_text_of_part(part, f"{param}.output[{i}]", "tool") for i, part in enumerate(output)]
        if any(part["type"] != "text" for part in parts):
            raise bad_request(f"{param}.output: images in function call outputs are not supported", "input")
        return "\n".join(part["text"] for part in parts)
    raise bad_request(f"{param}.output must be a string or a list of input_text parts", "input")


def parse_input(value, param: str = "input") -> tuple[list[dict], int]:
    """``input`` -> (chat messages, number of images)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], 0
    if not isinstance(value, list) or not value:
        raise bad_request(f"{param} must be a string or a non-empty list of input items", param)
    messages: list[dict] = []
    n_images = 0
    calls_open = False                      # the last message is an assistant message that may take more calls
    thought = None                          # a reasoning item's text, for the next assistant turn
    for index, item in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", param)
        kind = item.get("type", "message")
        if kind == "reasoning":
            thought = _reasoning_text(item, where)
            continue
        if kind == "message":
            message, images = _message(item, where)
            if message["role"] == "assistant" and thought:
                message["reasoning_content"] = thought
            messages.append(message)
            n_images += images
            calls_open = message["role"] == "assistant"
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where),
                                 "arguments": _string(item, "arguments", where)}}
            if not calls_open:
                messages.append({"role": "assistant", "content": None})
                if thought:
                    messages[-1]["reasoning_content"] = thought
            messages[-1].setdefault("tool_calls", []).append(call)
            calls_open = True
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _call_output(item, where)})
            calls_open = False
        elif kind == "item_reference":
            raise bad_request(f"{where}: item_reference is not supported (the server keeps no state)", param)
        else:
            raise bad_request(f"{where}.type must be 'message', 'function_call', 'function_call_output' or "
                              f"'reasoning', got {kind!r}", param)
        thought = None
    return messages, n_images


def _reasoning_text(item: dict, param: str) -> str:
    """The text of a ``reasoning`` input item: its ``content`` (reasoning_text parts), else its ``summary``."""
    texts = []
    for key in ("content", "summary"):
        parts = item.get(key) or []
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                  for p in parts):
            raise bad_request(f"{param}.{key} must be a list of parts with text", "input")
        texts = [p["text"] for p in parts]
        if texts:
            break
    return "\n".join(texts)


def _parse_reasoning(value, param):
    """``reasoning``: ``{"effort": none|minimal|low|medium|high, "summary": ...}`` -> the effort (or None)."""
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object", param)
    effort = value.get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad_request(f"{param}.effort must be one of {', '.join(repr(e) for e in REASONING_EFFORTS)}",
                          f"{param}.effort")
    return effort


# --------------------------------------------------------------------------- tools, tool_choice, text

def parse_response_tools(value, param):
    """Flattened function tools -> chat tools ``[{"type": "function", "function": {...}}]``."""
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a list of function tools", param)
    tools = []
    for index, tool in enumerate(value):
        where = f"{param}[{index}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise bad_request(f"{where}.type must be 'function' (other tool types are not supported), got {kind!r}",
                              param)
        tools.append({"type": "function", "function": parse_function(tool, param, where)})
    return check_tool_names(tools, param)


def parse_response_tool_choice(value, param):
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return NamedFunction(value["name"])
    raise bad_request(f"{param} must be 'none', 'auto', 'required' or {{\"type\": \"function\", \"name\": ...}}",
                      param)


def parse_text(value, param):
    """``text`` -> (the chat response_format or None, the ``text`` object the response repeats)."""
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object", param)
    spec = value.get("format")
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad_request(f"{param}.format.type must be one of 'text', 'json_object', 'json_schema'", param)
    if kind != "json_schema":
        return {"type": kind}
    schema, name, strict = spec.get("schema"), spec.get("name"), spec.get("strict")
    if not isinstance(schema, dict):
        raise bad_request(f"{param}.format.schema must be a JSON schema object", param)
    if name is not None and not isinstance(name, str):
        raise bad_request(f"{param}.format.name must be a string", param)
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"{param}.format.strict must be a boolean", param)
    return {"type": "json_schema", "json_schema": {"name": name or "response", "schema": schema,
                                                   "strict": bool(strict)}}


def _stateless(what: str):
    def parse(value, param):
        raise bad_request(f"{param} is not supported: the server keeps no state ({what})", param)
    return parse


def _parse_metadata(value, param):
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise bad_request(f"{param} must be an object of string values", param)
    return value


RESPONSES_FIELDS = [
    MODEL,
    make_field("input", (INPUT_SCHEMA, parse_input, "text, or message / function_call / function_call_output "
                                                    "items"), required=True),
    make_field("instructions", string("a system message put before the input")),
    make_field("max_output_tokens", integer("maximum tokens to generate (default: until the context is full)", 1)),
    make_field("temperature", number("sampling temperature (0: greedy); default: the model's", 0, 2)),
    make_field("top_p", number("nucleus sampling mass; default: the model's", 0, 1)),
    make_field("tools", ({"type": "array", "items": RESPONSE_TOOL_SCHEMA}, parse_response_tools,
                         "function tools (flattened: type, name, description, parameters, strict)")),
    make_field("tool_choice", (RESPONSE_TOOL_CHOICE_SCHEMA, parse_response_tool_choice,
                               "none, auto (default with tools), required (a forced call), or "
                               "{\"type\": \"function\", \"name\"} (that call forced)")),
    make_field("parallel_tool_calls", boolean("required: allow several forced calls (default: one)")),
    make_field("text", (TEXT_SCHEMA, parse_text, "format: text, json_object, or json_schema {name, schema, "
                                                 "strict}")),
    make_field("stream", boolean("stream server-sent events (response.created ... response.completed)")),
    make_field("store", boolean("accepted; nothing is stored")),
    make_field("metadata", ({"type": "object", "additionalProperties": {"type": "string"}}, _parse_metadata,
                            "repeated in the response")),
    make_field("user", string("end-user id (accepted, not used)")),
    make_field("previous_response_id", ({"type": "null"}, _stateless("send the whole conversation as input"),
                                        "not supported: 400 (stateless)")),
    make_field("conversation", ({"type": "null"}, _stateless("send the whole conversation as input"),
                                "not supported: 400 (stateless)")),
    make_field("reasoning", ({"type": "object", "properties": {"effort": {"enum": [*REASONING_EFFORTS, None]}}},
                             _parse_reasoning, "reasoning models: effort none turns thinking off, other values on "
                                               "(default: the model's); summary is accepted, not produced")),
    make_field("seed", integer("extension: random seed for reproducible sampling", MIN_SEED, MAX_SEED)),
    make_field("top_k", integer("extension: keep the k most likely tokens", 0)),
    make_field("min_p", number("extension: minimum probability relative to the best token", 0, 1)),
    make_field("repeat_penalty", number("extension: llama.cpp repetition penalty", 0, exclusiveMinimum=0)),
    OPTIONS,
]


@dataclass
class ResponsesRequest:
    chat: ChatRequest                                  # what is generated, as a chat completion request
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[dict] = field(default_factory=list)    # flattened, as the response repeats them
    tool_choice: object = "auto"                       # as the response repeats it
    text_format: dict = field(default_factory=lambda: {"type": "text"})
    parallel_tool_calls: bool = False
    metadata: dict = field(default_factory=dict)
    user: str | None = None
    reasoning_effort: str | None = None

    @property
    def model(self) -> str:
        return self.chat.model


def parse_responses(body: dict) -> ResponsesRequest:
    """POST /v1/responses body -> ResponsesRequest."""
    values = parse_fields(body, RESPONSES_FIELDS)
    messages, n_images = values["input"]
    if values["instructions"]:
        messages = [{"role": "system", "content": values["instructions"]}] + messages
    tools = values["tools"] or []
    tool_choice = resolve_tool_choice(values["tool_choice"], tools)
    response_format = values["text"]
    check_format_and_tools(response_format, tool_choice, param="text")
    values["max_tokens"], values["logprobs"] = values["max_output_tokens"], False
    chat = ChatRequest(model=values["model"], messages=messages, n_images=n_images, stream=bool(values["stream"]),
                       include_usage=False, settings=generation_settings(values), response_format=response_format,
                       tools=tools, tool_choice=tool_choice, parallel_tool_calls=bool(values["parallel_tool_calls"]),
                       reasoning_effort=values["reasoning"])
    choice = values["tool_choice"]
    flat_tools = [{"type": "function", **tool["function"], "strict": bool(given.get("strict"))}
                  for tool, given in zip(tools, body.get("tools") or [])]
    return ResponsesRequest(
        chat=chat, instructions=values["instructions"], max_output_tokens=values["max_output_tokens"],
        tools=flat_tools, tool_choice={"type": "function", "name": choice.name} if isinstance(choice, NamedFunction)
        else (choice or "auto"), text_format=_text_format(response_format),
        parallel_tool_calls=bool(values["parallel_tool_calls"]), metadata=values["metadata"] or {},
        user=values["user"], reasoning_effort=values["reasoning"])


def _text_format(response_format: dict | None) -> dict:
    """The ``text.format`` object the response repeats."""
    if not response_format or response_format["type"] != "json_schema":
        return {"type": (response_format or {}).get("type", "text")}
    spec = response_format["json_schema"]
    return {"type": "json_schema", "name": spec["name"], "schema": spec["schema"], "strict": spec["strict"]}
