"""Error types and the two wire shapes: the OpenAI envelope (/v1, and by default) and Ollama's (/api).

Resources raise :class:`APIError` (or let library exceptions through); the
handlers registered in ``app.create_app`` turn them into responses. No
resource builds an error body itself. ``to_api_error`` is the one map from
library exceptions to HTTP statuses.
"""
from __future__ import annotations

import json
import re

import falcon

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
               503: "api_error", 504: "api_error", 507: "api_error"}

# Library ValueErrors start with the parameter they concern ("top_logprobs must be between 0 and 20").
_LEADING_PARAM = re.compile(r"^`?([a-z_]+(?:\[[^\]]*\])?)`? (?:must|is|are|needs|values|keys|token)\b")
KNOWN_PARAMS = frozenset({
    "model", "messages", "prompt", "suffix", "input", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty",
    "logit_bias", "seed", "stop", "stop_token_ids", "logprobs", "top_logprobs", "n", "echo", "num_ctx",
    "dimensions", "encoding_format", "tokens", "response_format", "tools", "tool_choice", "options"})

# Library ValueErrors that always concern one request field (matched by name: no heavy imports here).
PARAM_OF_ERROR = {"UnsupportedSchema": "response_format", "ChatTemplateError": "messages",
                  "InputTooLong": "input"}


class APIError(Exception):
    """An error with an HTTP status, a message, and (OpenAI) the parameter and code it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ERROR_TYPES.get(status, "api_error" if status >= 500
                                                        else "invalid_request_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def openai_body(error: APIError) -> dict:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.code}}


def ollama_body(error: APIError) -> dict:
    return {"error": error.message}


# Anthropic's error types by status (its docs' list; 503 as Ollama maps it, beside Anthropic's own 529).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
ANTHROPIC_PATH = "/v1/messages"


def anthropic_body(error: APIError) -> dict:
    """Anthropic's envelope: ``{"type": "error", "error": {"type", "message"}}`` (also a stream's ``error`` event)."""
    kind = ANTHROPIC_ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def body_for(path: str, error: APIError) -> dict:
    """The error body shape the route family expects: Ollama's under /api, Anthropic's under /v1/messages,
    OpenAI's elsewhere."""
    if path.startswith("/api/"):
        return ollama_body(error)
    if path.rstrip("/") == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return anthropic_body(error)
    return openai_body(error)


def param_of(message: str) -> str | None:
    """The request parameter a library error message starts with, if it names one."""
    match = _LEADING_PARAM.match(message)
    if not match:
        return None
    name = match.group(1)
    return name if name.split("[")[0] in KNOWN_PARAMS else None


def to_api_error(exc: BaseException, prompt_param: str = "messages") -> APIError:
    """Map library exceptions to HTTP errors (one place).

    ``prompt_param`` names the request field a too-long prompt came from
    (``messages`` for chat, ``prompt`` for completions).
    """
    from localllm.engine import RequestTimeout, ServerBusy, ServerShuttingDown
    from localllm.formats.errors import ModelFormatError
    from localllm.kv_cache import ContextLengthExceeded
    from localllm.store import DiskFull, DownloadFailed, InvalidModelName, ModelNotFound, PullError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelNotFound):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, ServerShuttingDown):
        return APIError(503, str(exc), code="server_shutting_down")
    if isinstance(exc, ServerBusy):
        return APIError(503, str(exc), code="server_busy")
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), code="request_timeout")
    if isinstance(exc, InvalidModelName):
        return APIError(400, str(exc), param="model", code="invalid_model_name")
    if isinstance(exc, ModelFormatError):      # a broken model file: the request named a model that cannot load
        return APIError(400, str(exc), param="model", code="invalid_model_file")
    if isinstance(exc, ValueError) and type(exc).__name__ in PARAM_OF_ERROR:
        return APIError(400, str(exc), param=PARAM_OF_ERROR[type(exc).__name__])
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, str(exc), param=param_of(str(exc)))
    if isinstance(exc, DiskFull):
        return APIError(507, str(exc), param="model", code="insufficient_storage")
    if isinstance(exc, DownloadFailed):          # the package index or URL failed: a bad gateway, not us
        return APIError(502, str(exc), param="model", code="download_failed")
    if isinstance(exc, PullError):
        return APIError(500, str(exc), param="model", code="pull_failed", error_type="api_error")
    if isinstance(exc, FileNotFoundError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def handle_exception(req: falcon.Request, resp: falcon.Response, exc: BaseException, params) -> None:
    """Falcon error handler for every exception that is not a falcon.HTTPError."""
    if isinstance(exc, falcon.HTTPError):
        handle_http_error(req, resp, exc, params)
        return
    path = req.path.rstrip("/")
    prompt_param = ("prompt" if path.endswith(("/v1/completions", "/api/generate"))
                    else "input" if path.endswith("/v1/responses") else "messages")
    error = to_api_error(exc, prompt_param)
    if error.status >= 500:
        req.context.error = exc                   # middleware logs it
    resp.status = error.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body_for(req.path, error))


def handle_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params) -> None:
    """Falcon's own errors (404 route, 405, 413 ...) in our shapes."""
    status = exc.status_code
    message = exc.description or exc.title or "error"
    if status == 404 and not exc.description:
        message = f"route {req.method} {req.path} not found"
    elif status == 405 and not exc.description:
        message = f"method {req.method} is not allowed on {req.path}"
    error = APIError(status, message)
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body_for(req.path, error))
    for name, value in (exc.headers or {}).items():
        resp.set_header(name, value)
