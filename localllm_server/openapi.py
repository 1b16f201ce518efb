"""GET /openapi.json: every route the app serves, what each accepts and every answer it gives.

Routes come from the app's own router (``falcon.inspect``), so none is missed.
Request bodies of the /v1 and helper routes are the JSON schemas of the same
``schemas`` fields that parse them; the /api bodies are built here from the
names and values ``ollama_api.parsing`` checks. A schema-valid request is one the
server takes, except where a rule cannot be written in JSON Schema (a tool named
twice, ``tool_choice`` naming a function not in ``tools``, token ids past the
vocabulary, a prompt longer than the context...): those are 400s, said in the
descriptions.

Every response is described: 200 with its media type and body (JSON; server-sent
events under /v1, one JSON object per event; NDJSON under /api, documented as
the array of its lines), and each error status with the error body of its route
family (the OpenAI envelope outside /api, ``{"error": "..."}`` under /api, Anthropic's
``{"type": "error", "error": {...}}`` under /v1/messages).
"""
from __future__ import annotations

import re

import falcon.inspect

from . import schemas, schemas_responses
from .anthropic_api import request as anthropic_request
from .errors import ANTHROPIC_PATH
from .ollama_api import parsing

TITLE = "localllm"
JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain"

# --------------------------------------------------------------------------- errors

OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"], "description": "the request parameter at fault"},
        "code": {"type": ["string", "null"], "description": "e.g. model_not_found, context_length_exceeded"}}}}}
OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"], "properties": {
        "type": {"enum": ["invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                          "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error"]},
        "message": {"type": "string"}}}}}
ERROR_REASONS = {
    400: "invalid request: bad JSON, a wrong type or value (the message names the parameter), a prompt longer "
         "than the context (code context_length_exceeded), or a feature the model lacks",
    401: "an API key is configured and the request has no valid `Authorization: Bearer` or `x-api-key` key",
    403: "the request's Origin header names a web origin the server does not allow (LOCALLLM_ORIGINS)",
    404: "no model of that name in the store",
    413: "request body larger than the server's limit",
    502: "the model's download source (the package index or URL) failed; a later pull resumes",
    503: "server busy (the queue of pending requests is full) or shutting down; try again after Retry-After",
    504: "the request ran past LOCALLLM_REQUEST_TIMEOUT",
    507: "the disk is full (or a file size limit was hit) while pulling or creating a model; the store is as it was",
}
PULLING = {("POST", "/api/pull"), ("POST", "/api/create")}

# --------------------------------------------------------------------------- OpenAI answers

_NUMBER_OR_NULL = {"type": ["number", "null"]}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": {"type": "integer", "minimum": 0}, "completion_tokens": {"type": "integer", "minimum": 0},
    "total_tokens": {"type": "integer", "minimum": 0},
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}},
    "completion_tokens_details": {"type": "object", "properties": {"reasoning_tokens": {"type": "integer"}}}}}
_TOKEN_LOGPROB = {"type": "object", "required": ["token", "logprob", "bytes"], "properties": {
    "token": {"type": "string"}, "logprob": {"type": "number"},
    "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}}}
CHAT_LOGPROBS = {"anyOf": [{"type": "null"}, {"type": "object", "required": ["content"], "properties": {
    "content": {"type": "array", "items": {**_TOKEN_LOGPROB, "properties": {
        **_TOKEN_LOGPROB["properties"], "top_logprobs": {"type": "array", "items": _TOKEN_LOGPROB}}}}}}]}
CHAT_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string", "description": "a JSON object as text"}}}}}
_REASONING_TEXT = {"type": "string", "description": "the thought of a reasoning model"}
FINISH_REASON = {"enum": ["stop", "length", "tool_calls", None]}
_COMPLETION_ENVELOPE = {
    "id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
    "system_fingerprint": {"type": "string"}}
CHAT_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                   "properties": {**_COMPLETION_ENVELOPE, "object": {"const": "chat.completion"}, "choices": {
                       "type": "array", "items": {"type": "object", "required": ["index", "message", "finish_reason"],
                                                  "properties": {
                           "index": {"type": "integer", "minimum": 0},
                           "message": {"type": "object", "required": ["role", "content"], "properties": {
                               "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                               "reasoning_content": _REASONING_TEXT, "reasoning": _REASONING_TEXT,
                               "tool_calls": {"type": "array", "items": CHAT_TOOL_CALL}}},
                           "logprobs": CHAT_LOGPROBS, "finish_reason": FINISH_REASON}}},
                       "usage": USAGE}}
CHAT_CHUNK = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
    **_COMPLETION_ENVELOPE, "object": {"const": "chat.completion.chunk"},
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "delta", "finish_reason"],
                                           "properties": {
        "index": {"type": "integer", "minimum": 0},
        "delta": {"type": "object", "properties": {
            "role": {"const": "assistant"}, "content": {"type": "string"},
            "reasoning_content": _REASONING_TEXT, "reasoning": _REASONING_TEXT,
            "tool_calls": {"type": "array", "items": {"type": "object", "required": ["index"], "properties": {
                "index": {"type": "integer", "minimum": 0}, "id": {"type": "string"}, "type": {"const": "function"},
                "function": {"type": "object", "properties": {"name": {"type": "string"},
                                                              "arguments": {"type": "string"}}}}}}}},
        "logprobs": CHAT_LOGPROBS, "finish_reason": FINISH_REASON}}},
    "usage": {"anyOf": [{"type": "null"}, USAGE],
              "description": "with stream_options.include_usage: null, then the totals in a last chunk with no "
                             "choices"}}}
COMPLETION_LOGPROBS = {"anyOf": [{"type": "null"}, {"type": "object", "required": [
    "tokens", "token_logprobs", "top_logprobs", "text_offset"], "properties": {
    "tokens": {"type": "array", "items": {"type": "string"}},
    "token_logprobs": {"type": "array", "items": _NUMBER_OR_NULL},
    "top_logprobs": {"type": "array", "items": {"anyOf": [
        {"type": "null"}, {"type": "object", "additionalProperties": {"type": "number"}}]}},
    "text_offset": {"type": "array", "items": {"type": "integer"}}}}]}
_TEXT_CHOICE = {"type": "object", "required": ["index", "text", "logprobs", "finish_reason"], "properties": {
    "index": {"type": "integer", "minimum": 0}, "text": {"type": "string"}, "logprobs": COMPLETION_LOGPROBS,
    "finish_reason": FINISH_REASON}}
TEXT_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                   "properties": {**_COMPLETION_ENVELOPE, "object": {"const": "text_completion"},
                                  "choices": {"type": "array", "items": _TEXT_CHOICE}, "usage": USAGE}}
TEXT_CHUNK = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
    **_COMPLETION_ENVELOPE, "object": {"const": "text_completion"},
    "choices": {"type": "array", "items": _TEXT_CHOICE}, "usage": {"anyOf": [{"type": "null"}, USAGE]}}}
EMBEDDINGS = {"type": "object", "required": ["object", "model", "data", "usage"], "properties": {
    "object": {"const": "list"}, "model": {"type": "string"},
    "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"], "properties": {
        "object": {"const": "embedding"}, "index": {"type": "integer", "minimum": 0},
        "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                {"type": "string", "description": "base64 of little-endian float32"}]}}}},
    "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
        "prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}}
MODEL_OBJECT = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}}}
MODEL_LIST = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": MODEL_OBJECT}}}
_OUTPUT_ITEM = {"type": "object", "required": ["type", "id", "status"], "properties": {
    "type": {"enum": ["message", "reasoning", "function_call"]}, "id": {"type": "string"},
    "status": {"enum": ["in_progress", "completed", "incomplete"]}, "role": {"const": "assistant"},
    "content": {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
        "type": {"enum": ["output_text", "reasoning_text"]}, "text": {"type": "string"}}}},
    "call_id": {"type": "string"}, "name": {"type": "string"}, "arguments": {"type": "string"}}}
RESPONSE_OBJECT = {"type": "object", "required": ["id", "object", "created_at", "status", "model", "output"],
                   "properties": {
    "id": {"type": "string"}, "object": {"const": "response"}, "created_at": {"type": "integer"},
    "status": {"enum": ["in_progress", "completed", "incomplete"]}, "error": {"type": "null"},
    "model": {"type": "string"}, "output": {"type": "array", "items": _OUTPUT_ITEM},
    "usage": {"anyOf": [{"type": "null"}, {"type": "object", "required": [
        "input_tokens", "output_tokens", "total_tokens"], "properties": {
        "input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"}}}]}}}
RESPONSE_EVENT = {"type": "object", "required": ["type", "sequence_number"], "properties": {
    "type": {"type": "string", "description": "response.created, response.output_text.delta, ..., "
                                              "response.completed; error for an error after the stream began"},
    "sequence_number": {"type": "integer", "minimum": 0}, "response": RESPONSE_OBJECT}}
TOKENIZE = {"type": "object", "required": ["tokens", "count", "max_model_len"], "properties": {
    "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}, "count": {"type": "integer"},
    "max_model_len": {"type": "integer"}}}
DETOKENIZE = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}
HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"enum": ["ok", "warming up"]}, "steps": {"type": "array"}}}
OPENAPI = {"type": "object", "required": ["openapi", "info", "paths"]}


def sse_events(data_schema: dict, named: bool = False) -> dict:
    """One server-sent event: ``data`` is JSON of ``data_schema`` (or an in-band error), or ``[DONE]``."""
    json_data = {"type": "string", "contentMediaType": JSON,
                 "contentSchema": {"anyOf": [data_schema, OPENAI_ERROR if not named else RESPONSE_EVENT]}}
    data = json_data if named else {"anyOf": [{"const": "[DONE]"}, json_data]}
    return {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}


# --------------------------------------------------------------------------- Anthropic answers

_ANTHROPIC_USAGE = {"type": "object", "required": ["input_tokens", "output_tokens"], "properties": {
    "input_tokens": {"type": "integer", "minimum": 0, "description": "prompt tokens prefilled for this request"},
    "output_tokens": {"type": "integer", "minimum": 0},
    "cache_creation_input_tokens": {"type": "integer", "minimum": 0},
    "cache_read_input_tokens": {"type": "integer", "minimum": 0,
                                "description": "prompt tokens taken from the KV cache (input_tokens + these = the "
                                               "prompt)"}}}
_ANTHROPIC_BLOCK = {"anyOf": [
    {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"},
                                                                    "text": {"type": "string"}}},
    {"type": "object", "required": ["type", "thinking"], "properties": {
        "type": {"const": "thinking"}, "thinking": {"type": "string"}, "signature": {"type": "string"}}},
    {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
        "type": {"const": "tool_use"}, "id": {"type": "string"}, "name": {"type": "string"},
        "input": {"type": "object"}}}]}
_STOP_REASON = {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use", None]}
ANTHROPIC_MESSAGE = {"type": "object", "required": ["id", "type", "role", "model", "content", "stop_reason",
                                                    "stop_sequence", "usage"], "properties": {
    "id": {"type": "string"}, "type": {"const": "message"}, "role": {"const": "assistant"},
    "model": {"type": "string"}, "content": {"type": "array", "items": _ANTHROPIC_BLOCK},
    "stop_reason": _STOP_REASON, "stop_sequence": {"type": ["string", "null"]}, "usage": _ANTHROPIC_USAGE}}
ANTHROPIC_EVENT = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                      "message_delta", "message_stop", "error"],
             "description": "also the SSE event name; error (the error envelope) for an error after the stream "
                            "began"},
    "message": ANTHROPIC_MESSAGE, "index": {"type": "integer", "minimum": 0}, "content_block": _ANTHROPIC_BLOCK,
    "delta": {"type": "object", "properties": {
        "type": {"enum": ["text_delta", "thinking_delta", "input_json_delta"]}, "text": {"type": "string"},
        "thinking": {"type": "string"}, "partial_json": {"type": "string"}, "stop_reason": _STOP_REASON,
        "stop_sequence": {"type": ["string", "null"]}}},
    "usage": _ANTHROPIC_USAGE, "error": ANTHROPIC_ERROR["properties"]["error"]}}
ANTHROPIC_COUNT = {"type": "object", "required": ["input_tokens"], "properties": {
    "input_tokens": {"type": "integer", "minimum": 0}}}


def named_sse_events(event_schema: dict) -> dict:
    """One server-sent event ``event: <type>`` whose ``data`` is JSON of ``event_schema`` (no ``[DONE]``)."""
    return {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "contentMediaType": JSON, "contentSchema": event_schema},
        "event": {"type": "string"}}}


# --------------------------------------------------------------------------- Ollama answers

_OLLAMA_LOGPROB = {"type": "object", "required": ["token", "logprob"], "properties": {
    "token": {"type": "string"}, "logprob": {"type": "number"}, "bytes": {"type": "array"},
    "top_logprobs": {"type": "array"}}}
_OLLAMA_METRICS = {name: {"type": "integer", "minimum": 0} for name in (
    "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")}
_OLLAMA_LINE = {"model": {"type": "string"}, "created_at": {"type": "string"}, "done": {"type": "boolean"},
                "done_reason": {"type": "string"}, "thinking": {"type": "string"},
                "logprobs": {"type": "array", "items": _OLLAMA_LOGPROB}, **_OLLAMA_METRICS}
OLLAMA_CHAT_LINE = {"type": "object", "required": ["model", "created_at", "message", "done"], "properties": {
    **_OLLAMA_LINE, "message": {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"const": "assistant"}, "content": {"type": "string"}, "thinking": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object", "required": ["function"], "properties": {
            "function": {"type": "object", "required": ["name", "arguments"], "properties": {
                "name": {"type": "string"}, "arguments": {"type": "object"}}}}}}}}}}
OLLAMA_GENERATE_LINE = {"type": "object", "required": ["model", "created_at", "response", "done"], "properties": {
    **_OLLAMA_LINE, "response": {"type": "string"},
    "context": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}
STATUS_LINE = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string"}, "digest": {"type": "string"}, "total": {"type": "integer"},
    "completed": {"type": "integer"}}}


def ndjson_lines(line_schema: dict) -> dict:
    """An NDJSON body read as the array of its lines (each ``line_schema``, or an in-band ``{"error"}``)."""
    return {"type": "array", "items": {"anyOf": [line_schema, OLLAMA_ERROR]},
            "description": "one JSON object per line; an error after the stream began is a last {\"error\"} line"}


_DETAILS = {"type": "object", "properties": {
    "parent_model": {"type": "string"}, "format": {"type": "string"}, "family": {"type": "string"},
    "families": {"type": ["array", "null"]}, "parameter_size": {"type": "string"},
    "quantization_level": {"type": "string"}}}
_STORE_MODEL = {"type": "object", "required": ["name", "model", "size", "digest", "details"], "properties": {
    "name": {"type": "string"}, "model": {"type": "string"}, "modified_at": {"type": "string"},
    "size": {"type": "integer"}, "digest": {"type": "string"}, "details": _DETAILS}}
TAGS = {"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": _STORE_MODEL}}}
PS = {"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": {
    **_STORE_MODEL, "properties": {**_STORE_MODEL["properties"], "expires_at": {"type": "string"},
                                   "size_vram": {"type": "integer"}, "context_length": {"type": ["integer", "null"]}}}}}}
SHOW = {"type": "object", "required": ["details", "model_info", "capabilities"], "properties": {
    "modelfile": {"type": "string"}, "parameters": {"type": "string"}, "license": {"type": "string"},
    "system": {"type": "string"}, "template": {"type": "string"}, "details": _DETAILS,
    "model_info": {"type": "object"}, "capabilities": {"type": "array", "items": {"type": "string"}},
    "modified_at": {"type": "string"}, "messages": {"type": "array"}}}
EMBED = {"type": "object", "required": ["model", "embeddings"], "properties": {
    "model": {"type": "string"}, "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    **{k: _OLLAMA_METRICS[k] for k in ("total_duration", "load_duration", "prompt_eval_count")}}}
EMBEDDING = {"type": "object", "required": ["embedding"], "properties": {
    "embedding": {"type": "array", "items": {"type": "number"}}}}
VERSION = {"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}}

# --------------------------------------------------------------------------- Ollama request bodies

_MODEL_NAME = {**schemas.MODEL_SCHEMA, "description": "a model name of the store ([namespace/]name[:tag])"}
_KEEP_ALIVE = {"anyOf": [
    {"type": "number", "description": "seconds (negative: keep loaded)"},
    {"type": "string", "pattern": parsing.DURATION_PATTERN,
     "description": "a Go duration (\"5m\", \"1h30m\", \"-1\") or a number of seconds"}],
    "description": "how long the model stays loaded after the request (0: unload it)"}
_OPTION_SCHEMAS = {f.name: {**f.schema, "description": f.description} for f in schemas.OPTION_FIELDS}
OLLAMA_OPTIONS = {"type": "object", "additionalProperties": False, "properties": {
    **{name: _OPTION_SCHEMAS[name] for name in parsing.GENERATION_OPTIONS},
    **{name: {"description": "accepted, no effect here"} for name in sorted(parsing.IGNORED_OPTIONS)},
    "num_keep": {"type": "integer", "minimum": -1, "description": "leading prompt tokens kept when the window "
                                                                  "is cut or shifted (-1: the whole prompt start)"},
    **{name: {"description": "accepted, no effect here"} for name in sorted(parsing.MIROSTAT_TUNING)},
    **{name: {"enum": [value, None], "description": "only the value that turns it off"}
       for name, value in parsing.NEUTRAL_OPTIONS.items()}},
    "description": "generation options under Ollama's names; an unknown name is a 400"}
_FORMAT = {"anyOf": [{"enum": ["json", ""]}, {"type": "object", "description": "a JSON schema the grammar can enforce"},
                     {"type": "null"}]}
_THINK = {"anyOf": [{"type": "boolean"}, {"enum": list(schemas.REASONING_EFFORTS)}, {"type": "null"}],
          "description": "a reasoning model's thinking on/off or effort (400 for a model that does not think)"}
_NO_IMAGES = {"type": ["array", "null"], "maxItems": 0,
              "description": "images: no model here has a vision encoder (a non-empty list is a 400)"}
_LOGPROB_FIELDS = {"logprobs": {"type": "boolean"},
                   "top_logprobs": {"type": "integer", "minimum": 0, "maximum": schemas.MAX_TOP_LOGPROBS}}
_OLLAMA_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "minLength": 1}, "content": {"type": ["string", "null"]}, "images": _NO_IMAGES,
    "tool_calls": {"type": ["array", "null"], "items": {"type": "object"}}, "tool_name": {"type": "string"},
    "thinking": {"type": "string"}}}
_OLLAMA_TOOLS = {"type": ["array", "null"], "items": {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"}, "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
        "parameters": {"type": ["object", "null"]}}}}}, "description": "function names must differ (else 400)"}
_STREAM = {"type": "boolean", "description": "NDJSON lines (default true) or one JSON object"}
_CONTEXT_FIELDS = {
    "truncate": {"type": "boolean", "description": "cut a prompt longer than the window (default true; false: 400)"},
    "shift": {"type": "boolean", "description": "let the answer go past the window by shifting it (default true)"}}
_MODEL_REQUIRED = {"anyOf": [{"required": ["model"]}, {"required": ["name"]}]}
CREATE_MESSAGE_ROLES = ("system", "user", "assistant")          # localllm.modelfile.MESSAGE_ROLES


def ollama_body(properties: dict, required_model: bool = True, required: tuple = ()) -> dict:
    body = {"type": "object", "properties": {"model": _MODEL_NAME, **properties}}
    if required_model:
        body["properties"]["name"] = {**_MODEL_NAME, "description": "older clients' name for `model`"}
        body.update(_MODEL_REQUIRED)
    if required:
        body["required"] = list(required)
    return body


OLLAMA_BODIES = {
    ("POST", "/api/chat"): ("Chat (Ollama)", ollama_body({
        "messages": {"type": ["array", "null"], "items": _OLLAMA_MESSAGE,
                     "description": "no messages: the model is loaded (or unloaded with keep_alive 0)"},
        "tools": _OLLAMA_TOOLS, "format": _FORMAT, "options": OLLAMA_OPTIONS, "stream": _STREAM,
        "keep_alive": _KEEP_ALIVE, "think": _THINK, **_LOGPROB_FIELDS, **_CONTEXT_FIELDS})),
    ("POST", "/api/generate"): ("Generate (Ollama)", ollama_body({
        "prompt": {"type": "string", "description": "empty: the model is loaded (or unloaded with keep_alive 0)"},
        "suffix": {"type": "string", "description": "fill-in-the-middle (models with FIM tokens; else 400)"},
        "system": {"type": "string"}, "template": {"type": "string", "description": "a jinja2 chat template"},
        "context": {"type": "array", "items": {"type": "integer", "minimum": 0},
                    "description": "an earlier answer's context (token ids below the vocabulary size)"},
        "raw": {"type": "boolean"}, "format": _FORMAT, "images": _NO_IMAGES, "options": OLLAMA_OPTIONS,
        "stream": _STREAM, "keep_alive": _KEEP_ALIVE, "think": _THINK, **_LOGPROB_FIELDS, **_CONTEXT_FIELDS})),
    ("POST", "/api/embed"): ("Embed (Ollama)", ollama_body({
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        "truncate": {"type": "boolean"}, "dimensions": {"type": ["integer", "null"], "minimum": 1},
        "options": OLLAMA_OPTIONS, "keep_alive": _KEEP_ALIVE})),
    ("POST", "/api/embeddings"): ("Embedding, legacy (Ollama)", ollama_body({
        "prompt": {"type": ["string", "null"]}, "options": OLLAMA_OPTIONS, "keep_alive": _KEEP_ALIVE})),
    ("POST", "/api/show"): ("Model details (Ollama)", ollama_body({})),
    ("POST", "/api/pull"): ("Pull a model (Ollama)", ollama_body({"stream": _STREAM, "insecure": {"type": "boolean"}})),
    ("POST", "/api/copy"): ("Copy a model (Ollama)", ollama_body(
        {"source": _MODEL_NAME, "destination": _MODEL_NAME}, required_model=False, required=("source", "destination"))),
    ("DELETE", "/api/delete"): ("Delete a model (Ollama)", ollama_body({})),
    ("POST", "/api/create"): ("Create a model (Ollama)", {**ollama_body({
        "from": {"type": "string", "pattern": r"\S",
                 "description": "a store name, or a .gguf file / Hugging Face folder on the server"},
        "modelfile": {"type": "string", "description": "a whole Modelfile (older clients)"},
        "quantize": {"type": ["string", "null"], "description": "q8_0, q4_0, q4_1, q5_0, q5_1 (HF folders)"},
        "template": {"type": "string", "description": "a jinja2 chat template (an Ollama Go template is a 400)"},
        "system": {"type": "string"},
        "parameters": {"type": "object", "additionalProperties": False, "description": "Modelfile PARAMETERs",
                       "properties": {name: _OPTION_SCHEMAS[name] for name in parsing.GENERATION_OPTIONS}},
        "messages": {"type": "array", "items": {"type": "object", "required": ["role"], "properties": {
            "role": {"enum": list(CREATE_MESSAGE_ROLES)}, "content": {"type": "string"}}}},
        "license": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "files": {"type": ["object", "null"], "additionalProperties": {"type": "string",
                                                                       "pattern": "^sha256:[0-9a-f]{64}$"},
                  "description": "file name -> digest of a file uploaded with POST /api/blobs/<digest> (a .gguf "
                                 "model, and an mmproj .gguf projector for a vision model)"},
        "projector": {"type": "string", "description": "a vision projector on the server (mmproj .gguf or a Hugging "
                                                       "Face folder): what a Modelfile's second FROM names"},
        "stream": _STREAM}), "allOf": [{"anyOf": [{"required": ["from"]}, {"required": ["modelfile"]}]}]}),
}

# --------------------------------------------------------------------------- operations

OPENAI_BODIES = {
    ("POST", "/v1/chat/completions"): ("Chat completion (OpenAI)", schemas.CHAT_FIELDS),
    ("POST", "/v1/completions"): ("Text completion (OpenAI legacy)", schemas.COMPLETION_FIELDS),
    ("POST", "/v1/embeddings"): ("Embeddings (OpenAI)", schemas.EMBEDDING_FIELDS),
    ("POST", "/v1/responses"): ("Responses API (OpenAI; stateless)", schemas_responses.RESPONSES_FIELDS),
    ("POST", "/tokenize"): ("Text or a conversation -> token ids", schemas.TOKENIZE_FIELDS, schemas.TOKENIZE_RULES),
    ("POST", "/detokenize"): ("Token ids -> text", schemas.DETOKENIZE_FIELDS),
    ("POST", "/v1/messages"): ("Messages (Anthropic)", anthropic_request.MESSAGES_FIELDS),
    ("POST", "/v1/messages/count_tokens"): ("Count a message's prompt tokens (Anthropic)",
                                            anthropic_request.COUNT_TOKENS_FIELDS),
}
SUMMARIES = {
    ("GET", "/"): "'localllm is running'",
    ("HEAD", "/"): "liveness probe",
    ("GET", "/health"): "health check",
    ("GET", "/openapi.json"): "this document",
    ("GET", "/metrics"): "Prometheus metrics",
    ("GET", "/v1/models"): "list models (OpenAI)",
    ("GET", "/v1/models/{model}"): "one model (OpenAI)",
    ("GET", "/api/tags"): "models in the store (Ollama)",
    ("GET", "/api/ps"): "loaded models (Ollama)",
    ("GET", "/api/version"): "server version (Ollama)",
    ("HEAD", "/api/blobs/{digest}"): "does the server have this file (200) or not (404) (Ollama)",
    ("POST", "/api/blobs/{digest}"): "upload a file for /api/create's files: 201 once its sha256 is the digest (Ollama)",
}
# (method, path) -> the status of its success when it is not 200
SUCCESS_STATUS = {("POST", "/api/blobs/{digest}"): "201"}
# (method, path) -> its request body when it is not JSON
RAW_BODIES = {("POST", "/api/blobs/{digest}"): {"application/octet-stream": {"schema": {"type": "string",
                                                                                         "format": "binary"}}}}
# (method, path) -> {media type: body schema} of its 200 answer; None: no body
SUCCESS = {
    ("GET", "/"): {TEXT: {"type": "string"}},
    ("HEAD", "/"): None,
    ("GET", "/health"): {JSON: HEALTH},
    ("GET", "/openapi.json"): {JSON: OPENAPI},
    ("GET", "/metrics"): {TEXT: {"type": "string", "description": "Prometheus text format 0.0.4"}},
    ("POST", "/tokenize"): {JSON: TOKENIZE},
    ("POST", "/detokenize"): {JSON: DETOKENIZE},
    ("POST", "/v1/chat/completions"): {JSON: CHAT_COMPLETION, SSE: sse_events(CHAT_CHUNK)},
    ("POST", "/v1/completions"): {JSON: TEXT_COMPLETION, SSE: sse_events(TEXT_CHUNK)},
    ("POST", "/v1/embeddings"): {JSON: EMBEDDINGS},
    ("POST", "/v1/responses"): {JSON: RESPONSE_OBJECT, SSE: sse_events(RESPONSE_EVENT, named=True)},
    ("POST", "/v1/messages"): {JSON: ANTHROPIC_MESSAGE, SSE: named_sse_events(ANTHROPIC_EVENT)},
    ("POST", "/v1/messages/count_tokens"): {JSON: ANTHROPIC_COUNT},
    ("GET", "/v1/models"): {JSON: MODEL_LIST},
    ("GET", "/v1/models/{model}"): {JSON: MODEL_OBJECT},
    ("POST", "/api/chat"): {JSON: OLLAMA_CHAT_LINE, NDJSON: ndjson_lines(OLLAMA_CHAT_LINE)},
    ("POST", "/api/generate"): {JSON: OLLAMA_GENERATE_LINE, NDJSON: ndjson_lines(OLLAMA_GENERATE_LINE)},
    ("POST", "/api/embed"): {JSON: EMBED},
    ("POST", "/api/embeddings"): {JSON: EMBEDDING},
    ("GET", "/api/tags"): {JSON: TAGS},
    ("GET", "/api/ps"): {JSON: PS},
    ("GET", "/api/version"): {JSON: VERSION},
    ("POST", "/api/show"): {JSON: SHOW},
    ("POST", "/api/pull"): {JSON: STATUS_LINE, NDJSON: ndjson_lines(STATUS_LINE)},
    ("POST", "/api/create"): {JSON: STATUS_LINE, NDJSON: ndjson_lines(STATUS_LINE)},
    ("POST", "/api/copy"): None,
    ("DELETE", "/api/delete"): None,
    ("HEAD", "/api/blobs/{digest}"): None,
    ("POST", "/api/blobs/{digest}"): None,
}
GENERATING = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
              ("POST", "/v1/messages"),
              ("POST", "/v1/embeddings"), ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/embed"),
              ("POST", "/api/embeddings")}
PUBLIC = {("GET", "/"), ("HEAD", "/"), ("GET", "/health")}
NO_MODEL = {("GET", "/"), ("HEAD", "/"), ("GET", "/health"), ("GET", "/openapi.json"), ("GET", "/metrics"),
            ("GET", "/v1/models"), ("GET", "/api/tags"), ("GET", "/api/ps"), ("GET", "/api/version")}


def _openapi_path(template: str) -> str:
    """Falcon's ``{model:path}`` -> OpenAPI's ``{model}``."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", template)


def error_statuses(method: str, path: str, has_body: bool) -> list[int]:
    """The error statuses ``method path`` answers with."""
    statuses = [403]
    if has_body:
        statuses += [400, 413]
    if (method, path) not in PUBLIC:
        statuses.append(401)
    if (method, path) not in NO_MODEL:
        statuses += [400, 404]
    if (method, path) in GENERATING:
        statuses += [503, 504]
    if (method, path) in PULLING:
        statuses += [502, 507]
    return sorted(set(statuses))


# The routes a gateway config (localllm_server.gateway) stands in front of: what they may answer besides.
GATEWAY_ROUTES = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
                  ("POST", "/v1/responses")}
GATEWAY_REASONS = {
    429: "with a gateway config: the upstream that was the last hope of the route is rate limited, or the API key's "
         "budget is spent (code insufficient_quota, with Retry-After)",
    502: "with a gateway config: the upstream failed (connection refused or broken, HTTP 5xx, a body that is not "
         "JSON), or every member of the route did (the message gives each member's reason)",
    504: "the request ran past LOCALLLM_REQUEST_TIMEOUT, or (gateway) the upstream did not answer within its "
         "timeouts",
}
GATEWAY_HEADERS = {
    "X-Localllm-Model": {"description": "with a gateway config: the model that answered (a route's member; "
                                        "set before a stream's first event)", "schema": {"type": "string"}},
    "X-Localllm-Cache": {"description": "with a gateway config whose cache is on, for a request with temperature 0 "
                                        "or a seed: whether the answer came from the cache",
                         "schema": {"type": "string", "enum": ["hit", "miss"]}},
}


def responses_of(method: str, path: str, has_body: bool) -> dict:
    content = SUCCESS.get((method, path), {JSON: {}})
    success = {"description": "success"}
    if content:
        success["content"] = {media: {"schema": schema} for media, schema in content.items()}
    gateway = (method, path) in GATEWAY_ROUTES
    if gateway:
        success["headers"] = GATEWAY_HEADERS
    answers = {SUCCESS_STATUS.get((method, path), "200"): success}
    error = {"schema": OLLAMA_ERROR if path.startswith("/api/") else
             ANTHROPIC_ERROR if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/") else OPENAI_ERROR}
    statuses = error_statuses(method, path, has_body)
    for status in sorted(set(statuses) | (set(GATEWAY_REASONS) if gateway else set())):
        reason = GATEWAY_REASONS[status] if gateway and status in GATEWAY_REASONS else ERROR_REASONS[status]
        answers[str(status)] = {"description": reason, "content": {JSON: error}}
    return answers


def _operation(method: str, path: str) -> dict:
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                  for name in re.findall(r"\{(\w+)\}", path)]
    if (method, path) in OPENAI_BODIES:
        summary, fields, *rules = OPENAI_BODIES[(method, path)]
        body = schemas.request_schema(fields, **(rules[0] if rules else {}))
    elif (method, path) in OLLAMA_BODIES:
        summary, body = OLLAMA_BODIES[(method, path)]
    else:
        summary, body = SUMMARIES.get((method, path), f"{method} {path}"), None
    operation: dict = {"summary": summary, "operationId": re.sub(r"\W+", "_", f"{method.lower()} {path}").strip("_"),
                       "responses": responses_of(method, path, body is not None or (method, path) in RAW_BODIES)}
    if parameters:
        operation["parameters"] = parameters
    if (method, path) in RAW_BODIES:
        operation["requestBody"] = {"required": True, "content": RAW_BODIES[(method, path)]}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if (method, path) not in PUBLIC:
        operation["security"] = [{}, {"bearer": []}]
    return operation


def document(app, version: str) -> dict:
    """The OpenAPI 3.1 document of ``app``."""
    paths: dict = {}
    for route in falcon.inspect.inspect_routes(app):
        path = _openapi_path(route.path)
        for method in route.methods:
            if method.internal:
                continue
            paths.setdefault(path, {})[method.method.lower()] = _operation(method.method, path)
    return {"openapi": "3.1.0", "info": {"title": TITLE, "version": version,
                                         "description": "OpenAI- and Ollama-compatible API of localllm. "
                                                        "Request bodies are read as JSON whatever their "
                                                        "Content-Type."},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                          "description": "when the server has an API key"}}},
            "paths": dict(sorted(paths.items()))}
