"""Request validation, in one place: JSON bodies -> typed request objects, or a 400 naming the parameter.

Each route's body is described by a list of :class:`Field` s. A field has a
JSON schema (``openapi.py`` publishes it) and a parser that returns the typed
value or raises :class:`~localllm_server.errors.APIError` naming the field.
Unknown fields are ignored, as OpenAI does; ``null`` means "not given", and a
sampling parameter that is not given stays ``None`` so that the model's own
defaults (Modelfile ``PARAMETER`` lines) apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import APIError, bad_request
from .schemas_tools import (CHAT_TOOL_SCHEMA, TOOL_CALL_SCHEMA, TOOL_CHOICE_SCHEMA, check_format_and_tools, parse_tool_call,
                            parse_tool_choice, parse_tools, resolve_tool_choice)

MAX_STOP = 16
MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 128
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1          # what the sampler's generator takes
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_MESSAGE_KEYS = ("reasoning_content", "reasoning", "thinking")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


@dataclass(frozen=True)
class Field:
    """One body field: its JSON schema and its parser ``parse(value, param) -> typed value``."""

    name: str
    schema: dict
    parse: Callable[[Any, str], Any]
    description: str = ""
    required: bool = False


# --------------------------------------------------------------------------- scalar parsers

def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _range_message(param: str, low, high) -> str:
    if low is not None and high is not None:
        return f"{param} must be between {_fmt(low)} and {_fmt(high)}"
    return f"{param} must be >= {_fmt(low)}" if low is not None else f"{param} must be <= {_fmt(high)}"


def number(description: str, low: float | None = None, high: float | None = None, **schema) -> tuple:
    def parse(value, param):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad_request(f"{param} must be a number", param)
        if (low is not None and value < low) or (high is not None and value > high):
            raise bad_request(_range_message(param, low, high), param)
        return float(value)
    bounds = {k: v for k, v in (("minimum", low), ("maximum", high)) if v is not None}
    return {"type": "number", **bounds, **schema}, parse, description


def integer(description: str, low: int | None = None, high: int | None = None, **schema) -> tuple:
    def parse(value, param):
        value = as_integer(value)
        if value is None:
            raise bad_request(f"{param} must be an integer", param)
        if (low is not None and value < low) or (high is not None and value > high):
            raise bad_request(_range_message(param, low, high), param)
        return value
    bounds = {k: v for k, v in (("minimum", low), ("maximum", high)) if v is not None}
    return {"type": "integer", **bounds, **schema}, parse, description


def boolean(description: str) -> tuple:
    def parse(value, param):
        if not isinstance(value, bool):
            raise bad_request(f"{param} must be a boolean", param)
        return value
    return {"type": "boolean"}, parse, description


def string(description: str, non_empty: bool = False) -> tuple:
    def parse(value, param):
        if not isinstance(value, str):
            raise bad_request(f"{param} must be a string", param)
        if non_empty and not value:
            raise bad_request(f"{param} must not be empty", param)
        return value
    return {"type": "string"}, parse, description


def choice(description: str, values: tuple[str, ...]) -> tuple:
    def parse(value, param):
        if value not in values:
            raise bad_request(f"{param} must be one of {', '.join(repr(v) for v in values)}", param)
        return value
    return {"type": "string", "enum": list(values)}, parse, description


def make_field(name: str, spec: tuple, required: bool = False) -> Field:
    schema, parse, description = spec
    return Field(name, schema, parse, description, required)


def parse_fields(body: dict, fields: list[Field], prefix: str = "") -> dict:
    """Typed values of ``fields`` from ``body`` (absent or null -> None; required ones must be there)."""
    values = {}
    for f in fields:
        value = body.get(f.name)
        param = prefix + f.name
        if value is None:
            if f.required:
                raise bad_request(f"{param} is required", param)
            values[f.name] = None
            continue
        values[f.name] = f.parse(value, param)
    return values


# --------------------------------------------------------------------------- structured parsers

def _parse_model(value, param):
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{param} must be a non-empty string", param)
    return value.strip()


# localllm.store's names (NAME_PART, TAG, MAX_NAME_PARTS): [namespace/...]name[:tag], no paths
_NAME_PART, _TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}", r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
MODEL_NAME_PATTERN = rf"^(?:{_NAME_PART}/){{0,4}}{_NAME_PART}(?::{_TAG})?$"
MODEL_SCHEMA = {"type": "string", "pattern": MODEL_NAME_PATTERN}
MODEL = make_field("model", (MODEL_SCHEMA, _parse_model, "a model name of the store (name[:tag], e.g. smollm2:135m)"),
                   required=True)


def _parse_stop(value, param):
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"{param} must be a string or a list of strings", param)
    if len(stops) > MAX_STOP:
        raise bad_request(f"{param} may hold at most {MAX_STOP} strings", param)
    if any(not s for s in stops):
        raise bad_request(f"{param} strings must not be empty", param)
    return stops or None                          # [] = not given: the model's own stop strings stay


STOP_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1}}]}


def _parse_logit_bias(value, param):
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object mapping token ids to biases", param)
    bias = {}
    for key, amount in value.items():
        text = str(key).strip()
        if not (text.isdigit() or (text.startswith("-") and text[1:].isdigit())):
            raise bad_request(f"{param} keys must be token ids (integers), got {key!r}", param)
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
            raise bad_request(f"{param} values must be numbers, got {amount!r} for token {text}", param)
        if not -100 <= amount <= 100:
            raise bad_request(f"{param} values must be between -100 and 100, got {_fmt(amount)} for token {text}",
                              param)
        bias[int(text)] = float(amount)
    return bias


def as_integer(value):
    """``value`` as an int if it is one in JSON Schema's sense (``3`` or ``3.0``, not ``true``), else None."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parse_token_ids(value, param):
    ids = [as_integer(t) for t in value] if isinstance(value, list) else None
    if ids is None or any(t is None for t in ids):
        raise bad_request(f"{param} must be a list of integer token ids", param)
    value = ids
    if any(t < 0 for t in value):
        raise bad_request(f"{param} token ids must be non-negative", param)
    return value


def _parse_stream_options(value, param):
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object", param)
    include = value.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise bad_request(f"{param}.include_usage must be a boolean", f"{param}.include_usage")
    return {"include_usage": bool(include)}


def _parse_response_format(value, param):
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request(f"{param}.type must be one of 'text', 'json_object', 'json_schema'", param)
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request(f"{param}.json_schema must be an object with a `schema` object", param)
    return dict(value)


# Ollama-style `options` (an extension of the /v1 routes); names as Ollama spells them.
OPTION_FIELDS = [
    make_field("num_ctx", integer("context window (tokens) for this request", 1)),
    make_field("num_predict", integer("maximum tokens to generate (-1: until the context is full)", -1)),
    make_field("temperature", number("sampling temperature", 0)),
    make_field("top_k", integer("keep the k most likely tokens (0: off)", 0)),
    make_field("top_p", number("nucleus sampling mass", 0, 1)),
    make_field("min_p", number("minimum probability relative to the best token", 0, 1)),
    make_field("repeat_penalty", number("llama.cpp repetition penalty (1: off)", 0, exclusiveMinimum=0)),
    make_field("repeat_last_n", integer("tokens the repeat penalty looks back (-1: whole context)", -1)),
    make_field("frequency_penalty", number("OpenAI frequency penalty", -2, 2)),
    make_field("presence_penalty", number("OpenAI presence penalty", -2, 2)),
    make_field("seed", integer("random seed (-1: random)", MIN_SEED, MAX_SEED)),
    make_field("stop", (STOP_SCHEMA, _parse_stop, "stop sequences")),
]


def _parse_options(value, param):
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object", param)
    for name in ("repeat_penalty",):
        if value.get(name) is not None and isinstance(value[name], (int, float)) and value[name] <= 0:
            raise bad_request(f"{param}.{name} must be > 0", f"{param}.{name}")
    parsed = parse_fields(value, OPTION_FIELDS, prefix=f"{param}.")
    if parsed.get("seed") == -1:
        parsed["seed"] = None
    parsed["max_tokens"] = parsed.pop("num_predict")
    if parsed["max_tokens"] is not None and parsed["max_tokens"] < 0:
        parsed["max_tokens"] = None
    return {k: v for k, v in parsed.items() if v is not None}


OPTIONS = make_field("options", ({"type": "object", "properties": {f.name: f.schema for f in OPTION_FIELDS}},
                                 _parse_options, "Ollama-style options (extension): num_ctx, top_k, min_p, "
                                                 "repeat_penalty, repeat_last_n, ..."))

STOP = make_field("stop", (STOP_SCHEMA, _parse_stop, "stop sequences (not included in the output)"))

SAMPLING_FIELDS = [
    make_field("temperature", number("sampling temperature (0: greedy); default: the model's", 0, 2)),
    make_field("top_p", number("nucleus sampling mass; default: the model's", 0, 1)),
    make_field("frequency_penalty", number("penalty per earlier occurrence in the output", -2, 2)),
    make_field("presence_penalty", number("penalty for any earlier occurrence in the output", -2, 2)),
    make_field("seed", integer("random seed for reproducible sampling", MIN_SEED, MAX_SEED)),
    make_field("n", integer("number of choices (at most the server's parallel sequences, else 400)", 1, MAX_N)),
    make_field("logit_bias", ({"type": "object", "propertyNames": {"pattern": r"^\s*-?[0-9]+\s*$"},
                               "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                              _parse_logit_bias, "token id (as a string) -> bias in -100..100")),
    STOP,
    make_field("stream", boolean("stream the answer as server-sent events")),
    make_field("stream_options", ({"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
                                  _parse_stream_options, "include_usage: send a last chunk with the usage")),
    make_field("user", string("end-user id (accepted, not used)")),
    make_field("top_k", integer("extension: keep the k most likely tokens", 0)),
    make_field("min_p", number("extension: minimum probability relative to the best token", 0, 1)),
    make_field("repeat_penalty", number("extension: llama.cpp repetition penalty", 0, exclusiveMinimum=0)),
    OPTIONS,
]

SETTING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                "frequency_penalty", "presence_penalty", "logit_bias", "seed", "stop", "logprobs", "top_logprobs",
                "n", "num_ctx")


def generation_settings(values: dict) -> dict:
    """Keyword settings for ``Model.make_params``: options first, top-level fields over them; None = default."""
    settings = {key: None for key in SETTING_KEYS}
    settings.update(values.get("options") or {})
    for key in SETTING_KEYS:
        if values.get(key) is not None:
            settings[key] = values[key]
    if settings.get("repeat_penalty") is not None and settings["repeat_penalty"] <= 0:
        raise bad_request("repeat_penalty must be > 0", "repeat_penalty")
    return settings


# --------------------------------------------------------------------------- chat

def _parse_content_part(part, param) -> tuple[dict, int]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{param}.text must be a string", param)
        return {"type": "text", "text": part["text"]}, 0
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise bad_request(f"{param}.image_url.url must be a string (a data: URI or an http(s) URL)", param)
        return {"type": "image_url", "image_url": {"url": url}}, 1
    raise bad_request(f"{param}.type must be 'text' or 'image_url', got {kind!r}", param)


def _parse_message(message, param) -> tuple[dict, int]:
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object with `role` and `content`", param)
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise bad_request(f"{param}.role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}", f"{param}.role")
    content = message.get("content")
    n_images = 0
    if isinstance(content, list):
        parts = [_parse_content_part(p, f"{param}.content[{i}]") for i, p in enumerate(content)]
        content = [p for p, _ in parts]
        n_images = sum(n for _, n in parts)
    elif content is None:
        if role != "assistant":
            raise bad_request(f"{param}.content is required for role {role!r}", f"{param}.content")
        content = ""
    elif not isinstance(content, str):
        raise bad_request(f"{param}.content must be a string or a list of content parts", f"{param}.content")
    parsed = {"role": "system" if role == "developer" else role, "content": content}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise bad_request(f"{param}.{key} must be a string", f"{param}.{key}")
            parsed[key] = message[key]
    if message.get("tool_calls") is not None:
        if role != "assistant" or not isinstance(message["tool_calls"], list):
            raise bad_request(f"{param}.tool_calls must be a list, on an assistant message", f"{param}.tool_calls")
        parsed["tool_calls"] = [parse_tool_call(call, f"{param}.tool_calls[{i}]")
                                for i, call in enumerate(message["tool_calls"])]
    for key in REASONING_MESSAGE_KEYS:           # an earlier turn's thought, as each client names it
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise bad_request(f"{param}.{key} must be a string", f"{param}.{key}")
            parsed[key] = message[key]
    if role == "tool" and "tool_call_id" not in parsed:
        raise bad_request(f"{param}.tool_call_id is required for role 'tool'", f"{param}.tool_call_id")
    return parsed, n_images


def _parse_messages(value, param):
    if not isinstance(value, list):
        raise bad_request(f"`{param}` must be a list of messages", param)
    if not value:
        raise bad_request(f"`{param}` must not be empty", param)
    return [_parse_message(m, f"{param}[{i}]") for i, m in enumerate(value)]


TEXT_PART_SCHEMA = {"type": "object", "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
IMAGE_PART_SCHEMA = {"type": "object", "required": ["type", "image_url"], "properties": {
    "type": {"const": "image_url"},
    "image_url": {"anyOf": [{"type": "string", "minLength": 1, "description": "a data: URI or an http(s) URL"},
                            {"type": "object", "required": ["url"],
                             "properties": {"url": {"type": "string", "minLength": 1},
                                            "detail": {"enum": ["auto", "low", "high"]}}}]}},
    "description": "an image: a data: URI (PNG, JPEG, WebP, GIF) or an http(s) URL the server fetches "
                   "(a 400 on models without vision)"}
CONTENT_SCHEMA = {"anyOf": [{"type": "string"},
                            {"type": "array", "items": {"anyOf": [TEXT_PART_SCHEMA, IMAGE_PART_SCHEMA]}}]}
_OPTIONAL_STRING = {"type": ["string", "null"]}
_MESSAGE_EXTRAS = {"name": _OPTIONAL_STRING, **{key: _OPTIONAL_STRING for key in REASONING_MESSAGE_KEYS}}
MESSAGE_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user"]}, "content": CONTENT_SCHEMA, **_MESSAGE_EXTRAS,
        "tool_call_id": _OPTIONAL_STRING, "tool_calls": {"type": "null"}}},
    {"type": "object", "required": ["role"], "properties": {
        "role": {"const": "assistant"}, "content": {"anyOf": [CONTENT_SCHEMA, {"type": "null"}]}, **_MESSAGE_EXTRAS,
        "tool_call_id": _OPTIONAL_STRING,
        "tool_calls": {"anyOf": [{"type": "array", "items": TOOL_CALL_SCHEMA}, {"type": "null"}]}}},
    {"type": "object", "required": ["role", "content", "tool_call_id"], "properties": {
        "role": {"const": "tool"}, "content": CONTENT_SCHEMA, "tool_call_id": {"type": "string"}, **_MESSAGE_EXTRAS,
        "tool_calls": {"type": "null"}},
     "description": "a tool's result: tool_call_id names the call it answers"}]}
MESSAGES = make_field("messages", ({"type": "array", "minItems": 1, "items": MESSAGE_SCHEMA},
                                   _parse_messages, "the conversation"), required=True)
RESPONSE_FORMAT_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
            "strict": {"type": ["boolean", "null"]}}}}}]}

CHAT_FIELDS = [
    MODEL, MESSAGES,
    make_field("max_tokens", integer("maximum tokens to generate (default: until the context is full)", 1)),
    make_field("max_completion_tokens", integer("same as max_tokens (takes precedence)", 1)),
    *SAMPLING_FIELDS,
    make_field("logprobs", boolean("return the log-probability of each output token")),
    make_field("top_logprobs", integer("alternatives per token (needs logprobs)", 0, MAX_TOP_LOGPROBS)),
    make_field("response_format", (RESPONSE_FORMAT_SCHEMA,
        _parse_response_format, "output format: text, json_object, json_schema {name, schema, strict}; with tools "
                                "only when tool_choice is 'none' (else 400)")),
    make_field("tools", ({"type": "array", "items": CHAT_TOOL_SCHEMA}, parse_tools,
                         "functions the model may call (rendered into the prompt)")),
    make_field("tool_choice", (TOOL_CHOICE_SCHEMA, parse_tool_choice,
                               "none: no tools; auto: the model decides (default with tools); required: a call "
                               "is forced by the grammar; a named function: that call is forced, its arguments "
                               "constrained by its parameters schema")),
    make_field("parallel_tool_calls", boolean("required: allow several forced calls (default: one)")),
    make_field("reasoning_effort", choice("reasoning models: none turns thinking off; other values turn it on "
                                          "(the template sees reasoning_effort); default: the model's",
                                          REASONING_EFFORTS)),
]


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    n_images: int
    stream: bool
    include_usage: bool
    settings: dict = field(default_factory=dict)   # keyword settings for Model.make_params (None = default)
    response_format: dict | None = None
    tools: list[dict] = field(default_factory=list)     # [{"type": "function", "function": {...}}], checked
    tool_choice: str = "none"                           # "none", "auto", "required" or the forced function's name
    parallel_tool_calls: bool = False
    reasoning_effort: str | None = None                 # None: the model's default


def parse_chat(body: dict) -> ChatRequest:
    """POST /v1/chat/completions body -> ChatRequest."""
    values = parse_fields(body, CHAT_FIELDS)
    if values["max_completion_tokens"] is not None:
        values["max_tokens"] = values["max_completion_tokens"]
    if values["top_logprobs"] and not values["logprobs"]:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    values["logprobs"] = bool(values["logprobs"])
    settings = generation_settings(values)
    messages = [m for m, _ in values["messages"]]
    tools = values["tools"] or []
    tool_choice = resolve_tool_choice(values["tool_choice"], tools)
    check_format_and_tools(values["response_format"], tool_choice)
    return ChatRequest(model=values["model"], messages=messages, n_images=sum(n for _, n in values["messages"]),
                       stream=bool(values["stream"]),
                       include_usage=bool((values["stream_options"] or {}).get("include_usage")),
                       settings=settings, response_format=values["response_format"], tools=tools,
                       tool_choice=tool_choice, parallel_tool_calls=bool(values["parallel_tool_calls"]),
                       reasoning_effort=values["reasoning_effort"])


# --------------------------------------------------------------------------- completions

def _parse_prompt(value, param):
    """string | [string] | [int] | [[int]] -> a list of prompts, each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise bad_request(f"{param} must be a string, a list of strings, or token id arrays", param)
    if all(as_integer(p) is not None for p in value):
        return [_parse_token_ids(value, param)]
    if all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif all(isinstance(p, list) for p in value):
        prompts = [_parse_token_ids(p, f"{param}[{i}]") for i, p in enumerate(value)]
    else:
        raise bad_request(f"{param} must be a string, a list of strings, or token id arrays (not a mix)", param)
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"{param} may hold at most {MAX_PROMPTS} prompts", param)
    return prompts


TOKEN_IDS_SCHEMA = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0},
                    "description": "token ids, each below the model's vocabulary size"}
PROMPT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
                            "items": {"type": "string", "minLength": 1}},
                           TOKEN_IDS_SCHEMA,
                           {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": TOKEN_IDS_SCHEMA}]}
INPUT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                          TOKEN_IDS_SCHEMA, {"type": "array", "minItems": 1, "items": TOKEN_IDS_SCHEMA}]}

COMPLETION_FIELDS = [
    MODEL,
    make_field("prompt", (PROMPT_SCHEMA, _parse_prompt, "prompt text(s) or token id array(s)"), required=True),
    make_field("suffix", string("text after the completion (fill-in-the-middle; models with FIM tokens)")),
    make_field("echo", boolean("prepend the prompt to the output")),
    make_field("max_tokens", integer("maximum tokens to generate (default: until the context is full)", 0)),
    *SAMPLING_FIELDS,
    make_field("logprobs", integer("return this many alternatives per token (and the token's own)",
                                   0, MAX_TOP_LOGPROBS)),
    make_field("best_of", integer("accepted for compatibility; must equal n if given", 1, MAX_N)),
]


@dataclass
class CompletionRequest:
    model: str
    prompts: list                      # each a string or a list of token ids
    suffix: str | None
    echo: bool
    stream: bool
    include_usage: bool
    settings: dict = field(default_factory=dict)


def parse_completion(body: dict) -> CompletionRequest:
    """POST /v1/completions body -> CompletionRequest."""
    values = parse_fields(body, COMPLETION_FIELDS)
    if values["best_of"] is not None and values["best_of"] != (values["n"] or 1):
        raise bad_request("best_of is not supported (it must equal n)", "best_of")
    top = values["logprobs"]
    values["logprobs"], values["top_logprobs"] = top is not None, top
    settings = generation_settings(values)
    settings["echo"] = bool(values["echo"])
    return CompletionRequest(model=values["model"], prompts=values["prompt"], suffix=values["suffix"] or None,
                             echo=bool(values["echo"]), stream=bool(values["stream"]),
                             include_usage=bool((values["stream_options"] or {}).get("include_usage")),
                             settings=settings)


# --------------------------------------------------------------------------- embeddings

def _parse_input(value, param):
    """string | [string] | [int] | [[int]] -> str | list[str] | list[list[int]]."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise bad_request(f"{param} must be a non-empty string list, a string, or token id arrays", param)
    if all(isinstance(p, str) for p in value):
        return list(value)
    if all(as_integer(p) is not None for p in value):
        return [_parse_token_ids(value, param)]
    if all(isinstance(p, list) for p in value):
        return [_parse_token_ids(p, f"{param}[{i}]") for i, p in enumerate(value)]
    raise bad_request(f"{param} must be a string, a list of strings, or token id arrays (not a mix)", param)


EMBEDDING_FIELDS = [
    MODEL,
    make_field("input", (INPUT_SCHEMA, _parse_input, "text(s) or token id array(s) to embed"), required=True),
    make_field("encoding_format", choice("float list, or base64 of little-endian float32", ("float", "base64"))),
    make_field("dimensions", integer("keep the first n components, then renormalize (at most the model's)", 1)),
    make_field("truncate", boolean("extension: cut inputs longer than the model's limit (default true)")),
    make_field("user", string("end-user id (accepted, not used)")),
]


@dataclass
class EmbeddingsRequest:
    model: str
    input: Any
    encoding_format: str
    dimensions: int | None
    truncate: bool


def parse_embeddings(body: dict) -> EmbeddingsRequest:
    """POST /v1/embeddings body -> EmbeddingsRequest."""
    values = parse_fields(body, EMBEDDING_FIELDS)
    return EmbeddingsRequest(values["model"], values["input"], values["encoding_format"] or "float",
                             values["dimensions"], True if values["truncate"] is None else values["truncate"])


# --------------------------------------------------------------------------- tokenize / detokenize

TOKENIZE_FIELDS = [
    MODEL,
    make_field("prompt", string("text to tokenize")),
    make_field("messages", ({"type": "array", "minItems": 1, "items": MESSAGE_SCHEMA}, _parse_messages,
                            "a conversation, rendered with the model's chat template first")),
    make_field("add_special_tokens", boolean("add the model's BOS/CLS tokens (prompt only; default true)")),
    make_field("add_generation_prompt", boolean("messages only: end with the assistant header (default true)")),
]

TOKENIZE_RULES = {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}   # exactly one of them

DETOKENIZE_FIELDS = [
    MODEL,
    make_field("tokens", ({"type": "array", "items": {"type": "integer", "minimum": 0}}, _parse_token_ids,
                          "token ids, each below the model's vocabulary size"),
               required=True),
]


@dataclass
class TokenizeRequest:
    model: str
    prompt: str | None
    messages: list[dict] | None
    add_special_tokens: bool
    add_generation_prompt: bool


def parse_tokenize(body: dict) -> TokenizeRequest:
    """POST /tokenize body: ``model`` and ``prompt`` (text) or ``messages`` (a conversation)."""
    values = parse_fields(body, TOKENIZE_FIELDS)
    if (values["prompt"] is None) == (values["messages"] is None):
        raise bad_request("give exactly one of `prompt` and `messages`", "prompt")
    messages = [m for m, _ in values["messages"]] if values["messages"] is not None else None
    return TokenizeRequest(values["model"], values["prompt"], messages,
                           True if values["add_special_tokens"] is None else values["add_special_tokens"],
                           True if values["add_generation_prompt"] is None else values["add_generation_prompt"])


def parse_detokenize(body: dict) -> tuple[str, list[int]]:
    """POST /detokenize body -> (model, token ids)."""
    values = parse_fields(body, DETOKENIZE_FIELDS)
    return values["model"], values["tokens"]


def request_schema(fields: list[Field], **rules) -> dict:
    """The JSON schema of a body described by ``fields`` (for /openapi.json); ``rules``: schema keywords about
    several fields (``TOKENIZE_RULES``)."""
    properties = {f.name: {**f.schema, "description": f.description} if f.description else f.schema
                  for f in fields}
    schema = {"type": "object", "properties": properties, **rules}
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    return schema
