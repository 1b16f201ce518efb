"""Middleware: request ids, body size limit, API key, and request metrics.

- ``X-Request-Id``: echoed when the client sends one, else a fresh id; on every response.
- Bodies declared larger than ``settings.max_body_bytes`` get 413 before they are read
  (``schemas.read_json`` enforces the limit again for bodies without a Content-Length).
- With ``settings.api_key`` set, every route but ``GET /``, ``HEAD /`` and ``/health``
  needs ``Authorization: Bearer <key>`` (401 ``Invalid API key`` otherwise).
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections import defaultdict

import falcon

from .errors import APIError

log = logging.getLogger("localllm_server")
PUBLIC_PATHS = frozenset({"/", "/health"})


class Metrics:
    """Counters for ``GET /metrics`` (Prometheus text format)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)            # (method, route, status) -> count
        self.response_seconds = defaultdict(float)  # (method, route) -> sum of seconds to the response start
        self.response_count = defaultdict(int)
        self.prompt_tokens = defaultdict(int)       # route family -> tokens
        self.completion_tokens = defaultdict(int)
        self.in_flight = 0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[(method, route, status)] += 1
            self.response_seconds[(method, route)] += seconds
            self.response_count[(method, route)] += 1

    def add_tokens(self, route: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens[route] += prompt_tokens
            self.completion_tokens[route] += completion_tokens

    def snapshot(self) -> dict:
        """A consistent copy of every counter."""
        with self._lock:
            return {"requests": dict(self.requests), "response_seconds": dict(self.response_seconds),
                    "response_count": dict(self.response_count), "prompt_tokens": dict(self.prompt_tokens),
                    "completion_tokens": dict(self.completion_tokens), "in_flight": self.in_flight}


class RequestMiddleware:
    def __init__(self, settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = req.get_header("X-Request-Id") or f"req-{uuid.uuid4().hex}"
        req.context.started = time.perf_counter()
        req.context.metrics = self.metrics
        self.metrics.started()
        length = req.content_length
        if length is not None and length > self.settings.max_body_bytes:
            raise APIError(413, f"request body is larger than the limit of {self.settings.max_body_bytes} bytes")
        if self.settings.api_key and req.method != "OPTIONS" and req.path not in PUBLIC_PATHS:
            self._check_key(req)

    def _check_key(self, req: falcon.Request) -> None:
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.settings.api_key.encode()):
            raise APIError(401, "Invalid API key", code="invalid_api_key")

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        resp.set_header("X-Request-Id", req.context.request_id)
        status = falcon.http_status_to_code(resp.status)
        error = getattr(req.context, "error", None)
        if error is not None:
            log.error("%s %s failed (%s)", req.method, req.path, req.context.request_id, exc_info=error)
        self.metrics.finished(req.method, req.uri_template or "unmatched", status,
                              time.perf_counter() - req.context.started)


def middleware_for(settings, metrics: Metrics | None = None) -> list:
    middleware = [RequestMiddleware(settings, metrics or Metrics())]
    if settings.cors_origins:
        middleware.insert(0, falcon.CORSMiddleware(allow_origins=settings.cors_origins, expose_headers="*"))
    return middleware
