"""Middleware: request ids, body size limit, CORS, API key, and request metrics.

- ``X-Request-Id``: echoed when the client sends one, else a fresh id; on every response.
- Bodies declared larger than ``settings.max_body_bytes`` (``max_upload_bytes`` for Ollama's
  /api/blobs uploads) get 413 before they are read
  (``body.read_json`` enforces the limit again for bodies without a Content-Length).
- CORS, as Ollama does it: browsers may call from the origins of ``DEFAULT_ORIGINS`` (localhost,
  127.0.0.1 and 0.0.0.0 on any port; desktop-app and editor schemes) and from those added with
  ``LOCALLLM_ORIGINS`` (``settings.cors_origins``: exact origins, ``*`` wildcards, or ``*`` alone for
  any). A request whose ``Origin`` is not allowed gets 403 (so a web page elsewhere cannot make the
  server pull, delete or generate, even without reading the answer); an allowed one gets
  ``Access-Control-Allow-Origin`` and ``Vary: Origin``, and its preflight (``OPTIONS`` with
  ``Access-Control-Request-Method``) is answered 204 here, without the API key.
- With ``settings.api_key`` set, every route but ``GET /``, ``HEAD /`` and ``/health``
  needs ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (what the Anthropic SDK sends)
  (401 ``Invalid API key`` otherwise, with
  ``WWW-Authenticate: Bearer``). The key is compared in constant time (SHA-256 digests of the
  header's bytes and the key's, then ``hmac.compare_digest``), so neither its length nor a
  matching prefix shows in the time of a refusal.
"""
from __future__ import annotations

import hashlib
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

# Ollama's envconfig.AllowedOrigins: these are always allowed, LOCALLLM_ORIGINS adds to them.
DEFAULT_ORIGINS = tuple(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
                        for scheme in ("http", "https") for port in ("", ":*")) + \
    ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
# Ollama's CORS configuration (gin-contrib/cors defaults for methods and max age)
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
ALLOW_HEADERS = ", ".join((
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "X-Request-Id", "OpenAI-Beta",
    "x-stainless-arch", "x-stainless-async", "x-stainless-custom-poll-interval", "x-stainless-helper-method",
    "x-stainless-lang", "x-stainless-os", "x-stainless-package-version", "x-stainless-poll-helper",
    "x-stainless-retry-count", "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-timeout",
    "X-Request-Timeout", "X-Session-Id",                              # a request's own limit; replica affinity
    "x-api-key", "anthropic-version", "anthropic-beta", "anthropic-dangerous-direct-browser-access"))   # Anthropic SDK
PREFLIGHT_MAX_AGE = "43200"   # seconds a browser may cache a preflight answer (12 h)


class OriginPolicy:
    """Which browser origins may call the server: ``DEFAULT_ORIGINS`` plus ``extra`` (exact origins, patterns
    with one ``*`` matching any text, as gin's AllowWildcard, or ``*`` alone for every origin)."""

    def __init__(self, extra: list[str] | tuple[str, ...] = ()):
        patterns = [origin.strip() for origin in (*extra, *DEFAULT_ORIGINS) if origin.strip()]
        self.any_origin = "*" in patterns
        self.exact = frozenset(p for p in patterns if "*" not in p)
        self.wildcards = [tuple(p.split("*", 1)) for p in patterns if "*" in p and p != "*"]

    def allows(self, origin: str) -> bool:
        if self.any_origin or origin in self.exact:
            return True
        return any(len(origin) >= len(head) + len(tail) and origin.startswith(head) and origin.endswith(tail)
                   for head, tail in self.wildcards)


def _key_digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class Metrics:
    """Counters for ``GET /metrics`` (Prometheus text format)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)            # (method, route, status) -> count
        self.response_seconds = defaultdict(float)  # (method, route) -> sum of seconds to the response start
        self.response_count = defaultdict(int)
        self.prompt_tokens = defaultdict(int)       # route family -> tokens
        self.completion_tokens = defaultdict(int)
        # the gateway's accounting, per (route or model asked for, model that answered)
        self.gateway_requests = defaultdict(int)
        self.gateway_prompt_tokens = defaultdict(int)
        self.gateway_completion_tokens = defaultdict(int)
        self.gateway_cost = defaultdict(float)      # in the currency of the config's prices
        self.gateway_cache_hits = defaultdict(int)  # answers replayed from the cache (no tokens, no cost)
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

    def add_usage(self, route: str, model: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        """One gateway answer: ``route`` is the name the request asked for, ``model`` the member that answered."""
        key = (route, model)
        with self._lock:
            self.gateway_requests[key] += 1
            self.gateway_prompt_tokens[key] += prompt_tokens
            self.gateway_completion_tokens[key] += completion_tokens
            self.gateway_cost[key] += cost

    def add_cache_hit(self, route: str, model: str) -> None:
        with self._lock:
            self.gateway_cache_hits[(route, model)] += 1

    def snapshot(self) -> dict:
        """A consistent copy of every counter."""
        with self._lock:
            return {"requests": dict(self.requests), "response_seconds": dict(self.response_seconds),
                    "response_count": dict(self.response_count), "prompt_tokens": dict(self.prompt_tokens),
                    "completion_tokens": dict(self.completion_tokens), "in_flight": self.in_flight,
                    "gateway_requests": dict(self.gateway_requests),
                    "gateway_prompt_tokens": dict(self.gateway_prompt_tokens),
                    "gateway_completion_tokens": dict(self.gateway_completion_tokens),
                    "gateway_cost": dict(self.gateway_cost), "gateway_cache_hits": dict(self.gateway_cache_hits)}


class RequestMiddleware:
    def __init__(self, settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.origins = OriginPolicy(settings.cors_origins or ())
        self._key_digest = _key_digest(settings.api_key.encode("utf-8")) if settings.api_key else None

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = req.get_header("X-Request-Id") or f"req-{uuid.uuid4().hex}"
        req.context.started = time.perf_counter()
        req.context.metrics = self.metrics
        req.context.request_timeout = None
        self.metrics.started()
        origin = req.get_header("Origin")
        if origin is not None:
            if not self.origins.allows(origin):
                raise APIError(403, f"origin {origin!r} is not allowed to call this server (add it to "
                                    "LOCALLLM_ORIGINS)", code="origin_not_allowed")
            req.context.cors_origin = origin
            if req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method"):
                resp.status = falcon.HTTP_204          # a preflight: answered here, before routing and the key
                resp.complete = True
                return
        length = req.content_length
        limit = body_limit(self.settings, req.path)
        if length is not None and length > limit:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes")
        if self._key_digest is not None and req.method != "OPTIONS" and req.path not in PUBLIC_PATHS:
            self._check_key(req)
        req.context.request_timeout = request_timeout(req.get_header(TIMEOUT_HEADER))

    def _check_key(self, req: falcon.Request) -> None:
        """The key as ``Authorization: Bearer <key>`` (OpenAI, Ollama) or ``x-api-key: <key>`` (Anthropic's SDK);
        one comparison per request: of the Bearer token when one is sent, else of ``x-api-key``."""
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.strip().partition(" ")
        bearer = _header_bytes(token) if scheme.lower() == "bearer" else b""
        sent = bearer or _header_bytes(req.get_header("X-Api-Key") or "")          # a Bearer token first
        matches = hmac.compare_digest(_key_digest(sent), self._key_digest)   # constant time, any length
        if not (sent and matches):
            raise APIError(401, "Invalid API key", code="invalid_api_key")

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        resp.set_header("X-Request-Id", req.context.request_id)
        status = falcon.http_status_to_code(resp.status)
        self._cors_headers(req, resp)
        if status == 401 and self._key_digest is not None:
            resp.set_header("WWW-Authenticate", "Bearer")
        error = getattr(req.context, "error", None)
        if error is not None:
            log.error("%s %s failed (%s)", req.method, req.path, req.context.request_id, exc_info=error)
        self.metrics.finished(req.method, req.uri_template or "unmatched", status,
                              time.perf_counter() - req.context.started)


    def _cors_headers(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.append_header("Vary", "Origin")        # the answer depends on the Origin (caches must not share it)
        origin = getattr(req.context, "cors_origin", None)
        if origin is None:
            return
        resp.set_header("Access-Control-Allow-Origin", "*" if self.origins.any_origin else origin)
        resp.set_header("Access-Control-Expose-Headers", "*")
        if req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method"):
            resp.set_header("Access-Control-Allow-Methods", ALLOW_METHODS)
            resp.set_header("Access-Control-Allow-Headers", ALLOW_HEADERS)
            resp.set_header("Access-Control-Max-Age", PREFLIGHT_MAX_AGE)
            resp.append_header("Vary", "Access-Control-Request-Method")
            resp.append_header("Vary", "Access-Control-Request-Headers")


TIMEOUT_HEADER = "X-Request-Timeout"


def request_timeout(header: str | None) -> float | None:
    """Seconds from ``X-Request-Timeout`` (a request's own limit, below the server's LOCALLLM_REQUEST_TIMEOUT
    when that is set: the engine takes the smaller); None when the header is absent."""
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = float("nan")
    if not (0 < seconds < float("inf")):
        raise APIError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, got {header!r}",
                       param=TIMEOUT_HEADER)
    return seconds


def _header_bytes(value: str) -> bytes:
    """A header's value as the bytes sent (WSGI headers are their latin-1 text), stripped; b"" if it cannot be."""
    try:
        return value.strip().encode("latin-1")
    except UnicodeEncodeError:
        return b""


def middleware_for(settings, metrics: Metrics | None = None) -> list:
    return [RequestMiddleware(settings, metrics or Metrics())]


UPLOAD_PREFIX = "/api/blobs/"        # Ollama's file uploads: model-sized bodies, streamed to disk


def body_limit(settings, path: str) -> int:
    """The largest body a request to ``path`` may have: ``max_upload_bytes`` for /api/blobs uploads,
    ``max_body_bytes`` (JSON requests) elsewhere."""
    if UPLOAD_PREFIX in path:                            # also under a path prefix (/llm/api/blobs/...)
        return getattr(settings, "max_upload_bytes", settings.max_body_bytes)
    return settings.max_body_bytes
