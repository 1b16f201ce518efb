"""GET /openapi.json: every route the app serves, with its parameters.

Routes come from the app's own router (``falcon.inspect``), so none is
missed; request bodies of the /v1 and helper routes come from the same
``schemas`` fields that validate them. Ollama's /api bodies are listed by
the parameter names ../shared/API.md gives.
"""
from __future__ import annotations

import re

import falcon.inspect

from . import schemas, schemas_responses

TITLE = "localllm"
OPENAI_BODIES = {
    ("POST", "/v1/chat/completions"): ("Chat completion (OpenAI)", schemas.CHAT_FIELDS),
    ("POST", "/v1/completions"): ("Text completion (OpenAI legacy)", schemas.COMPLETION_FIELDS),
    ("POST", "/v1/embeddings"): ("Embeddings (OpenAI)", schemas.EMBEDDING_FIELDS),
    ("POST", "/v1/responses"): ("Responses API (OpenAI; stateless)", schemas_responses.RESPONSES_FIELDS),
    ("POST", "/tokenize"): ("Text or a conversation -> token ids", schemas.TOKENIZE_FIELDS),
    ("POST", "/detokenize"): ("Token ids -> text", schemas.DETOKENIZE_FIELDS),
}
SUMMARIES = {
    ("GET", "/"): "'localllm is running'",
    ("HEAD", "/"): "liveness probe",
    ("GET", "/health"): "health check",
    ("GET", "/openapi.json"): "this document",
    ("GET", "/metrics"): "Prometheus metrics",
    ("GET", "/v1/models"): "list models (OpenAI)",
    ("GET", "/v1/models/{model}"): "one model (OpenAI)",
}
_ANY = {}
_OPTIONS = {"type": "object", "description": "model options: num_ctx, temperature, top_k, top_p, min_p, seed, "
                                             "stop, repeat_penalty, repeat_last_n, num_predict, ..."}
OLLAMA_BODIES = {
    ("POST", "/api/chat"): ("Chat (Ollama)", {
        "model": {"type": "string"}, "messages": {"type": "array", "items": {"type": "object"}},
        "tools": {"type": "array"}, "format": _ANY, "options": _OPTIONS, "stream": {"type": "boolean"},
        "keep_alive": _ANY, "think": _ANY}, ["model"]),
    ("POST", "/api/generate"): ("Generate (Ollama)", {
        "model": {"type": "string"}, "prompt": {"type": "string"}, "suffix": {"type": "string"},
        "system": {"type": "string"}, "template": {"type": "string"}, "context": {"type": "array"},
        "raw": {"type": "boolean"}, "format": _ANY, "images": {"type": "array"}, "options": _OPTIONS,
        "stream": {"type": "boolean"}, "keep_alive": _ANY, "think": _ANY}, ["model"]),
    ("POST", "/api/embed"): ("Embed (Ollama)", {
        "model": {"type": "string"}, "input": _ANY, "truncate": {"type": "boolean"},
        "dimensions": {"type": "integer"}, "options": _OPTIONS, "keep_alive": _ANY}, ["model", "input"]),
    ("POST", "/api/embeddings"): ("Embedding, legacy (Ollama)", {
        "model": {"type": "string"}, "prompt": {"type": "string"}, "options": _OPTIONS}, ["model"]),
    ("POST", "/api/show"): ("Model details (Ollama)", {"model": {"type": "string"}}, ["model"]),
    ("POST", "/api/pull"): ("Pull a model (Ollama)", {"model": {"type": "string"}, "stream": {"type": "boolean"}},
                            ["model"]),
    ("POST", "/api/copy"): ("Copy a model (Ollama)", {"source": {"type": "string"},
                                                      "destination": {"type": "string"}}, ["source", "destination"]),
    ("DELETE", "/api/delete"): ("Delete a model (Ollama)", {"model": {"type": "string"}}, ["model"]),
    ("POST", "/api/create"): ("Create a model (Ollama)", {
        "model": {"type": "string"}, "from": {"type": "string"}, "template": {"type": "string"},
        "system": {"type": "string"}, "parameters": {"type": "object"}, "messages": {"type": "array"},
        "stream": {"type": "boolean"}}, ["model"]),
}
ERROR_RESPONSE = {"description": "error (OpenAI envelope under /v1, {\"error\": message} under /api)"}


def _openapi_path(template: str) -> str:
    """Falcon's ``{model:path}`` -> OpenAPI's ``{model}``."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", template)


def _operation(method: str, path: str) -> dict:
    operation: dict = {"responses": {"200": {"description": "success"}, "4XX": ERROR_RESPONSE}}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"\{(\w+)\}", path)]
    if parameters:
        operation["parameters"] = parameters
    if (method, path) in OPENAI_BODIES:
        summary, fields = OPENAI_BODIES[(method, path)]
        body = schemas.request_schema(fields)
    elif (method, path) in OLLAMA_BODIES:
        summary, properties, required = OLLAMA_BODIES[(method, path)]
        body = {"type": "object", "properties": properties, "required": required}
    else:
        summary, body = SUMMARIES.get((method, path), f"{method} {path}"), None
    operation["summary"] = summary
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
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
                                         "description": "OpenAI- and Ollama-compatible API of localllm"},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "paths": dict(sorted(paths.items()))}
