"""One way in: every request body is read here, and every resource is built one way.

:func:`read_json` is the only reader of request bodies, on every route family
(/v1, /api, /tokenize ...), so a limit added here holds everywhere:

* at most ``max_bytes`` bytes are read; a longer body is a 413 (the middleware
  refuses a declared ``Content-Length`` over the limit before any byte is read;
  this catches chunked bodies, which declare none);
* the body must be one JSON object (RFC 8259 JSON in UTF-8, UTF-16 or UTF-32):
  empty, malformed, non-standard constants (``NaN``, ``Infinity``), nesting too
  deep to parse, or any other JSON value is a 400;
* the ``Content-Type`` is not required to be ``application/json``: OpenAI's and
  Ollama's own servers read the body as JSON whatever the header says, and
  ``curl -d`` sends ``application/x-www-form-urlencoded``.

:class:`Resource` is the base of every resource that needs the engine: it keeps
``engine`` and ``settings`` and reads bodies and counts tokens the same way on
every route.
"""
from __future__ import annotations

import json

from .errors import APIError

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
MISSING_BODY = "missing request body"
NOT_AN_OBJECT = "the request body must be a JSON object"


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_json(req, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> dict:
    """The request body as a JSON object: 413 past ``max_bytes``; 400 when missing, not JSON, or not an object."""
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise APIError(413, f"request body is larger than the limit of {max_bytes} bytes")
    if not raw.strip():
        raise APIError(400, MISSING_BODY)
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise APIError(400, "invalid JSON in the request body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"invalid JSON in the request body: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, NOT_AN_OBJECT)
    return body


class Resource:
    """What every resource serving the engine has: ``engine``, ``settings``, :meth:`body` and :meth:`count_tokens`."""

    def __init__(self, engine, settings=None):
        self.engine = engine
        self.settings = settings
        self.max_body_bytes = getattr(settings, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)

    def body(self, req) -> dict:
        """The request's JSON object (:func:`read_json` under the server's size limit), or the one already read
        for this request (``req.context.json_body``: the gateway reads the body before the local resource)."""
        cached = getattr(req.context, "json_body", None)
        if cached is not None:
            return cached
        return read_json(req, self.max_body_bytes)

    @staticmethod
    def count_tokens(req, route: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Add a request's tokens to the app's metrics (``GET /metrics``), when the app keeps them."""
        count_tokens(req, route, prompt_tokens, completion_tokens)


def count_tokens(req, route: str, prompt_tokens: int, completion_tokens: int) -> None:
    """Add a request's tokens to the app's metrics (``GET /metrics``), when the app keeps them."""
    metrics = getattr(req.context, "metrics", None)
    if metrics is not None:
        metrics.add_tokens(route, prompt_tokens, completion_tokens)
