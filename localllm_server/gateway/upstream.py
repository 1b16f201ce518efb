"""Calls to an upstream with the standard library (``http.client``), with timeouts.

``post(upstream, path, body)`` sends the request and returns the open :class:`UpstreamResponse` once its status
line and headers arrived (``path``: "/chat/completions" ... for an OpenAI-format upstream, "/v1/messages" for an
Anthropic-format one). What makes a route try its next member is an :class:`UpstreamFailure`: the connection
refused or broken, no answer within the timeouts, HTTP 429 or 5xx, or a success whose body is not JSON. Any other
status (400, 401, 404 ...) is the caller's mistake and is passed back as :class:`UpstreamRejected`.

The API key goes only into the ``Authorization`` header (OpenAI format) or the ``x-api-key`` header, beside
``anthropic-version`` (Anthropic format); :func:`scrub` takes the keys out of any text (an upstream's error body,
an exception message) before it is logged or answered.
"""
from __future__ import annotations

import http.client
import json
import socket
from typing import Iterator
from urllib.parse import urlsplit

from .config import Upstream

SNIPPET_CHARS = 300              # how much of an upstream's error body an error message quotes


class UpstreamFailure(Exception):
    """The member could not answer: the route moves on. ``status``: the answer if it was the last member."""

    def __init__(self, message: str, status: int = 502, code: str = "upstream_failed"):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class UpstreamRejected(Exception):
    """The upstream refused the request itself (a 4xx other than 429): its status and (scrubbed) body."""

    def __init__(self, status: int, body: bytes, content_type: str | None):
        super().__init__(f"upstream answered HTTP {status}")
        self.status, self.body, self.content_type = status, body, content_type


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class UpstreamResponse:
    """An answer whose status is a success and whose body is still to be read."""

    def __init__(self, upstream: Upstream, connection: http.client.HTTPConnection,
                 response: http.client.HTTPResponse):
        self.upstream = upstream
        self.connection = connection
        self.response = response
        self.content_type = response.getheader("Content-Type")

    def json(self) -> dict:
        """The whole body as a JSON object (an UpstreamFailure when it is cut, late or not a JSON object)."""
        try:
            raw = self.response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise failure_of(self.upstream, exc) from None
        finally:
            self.close()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise UpstreamFailure(f"upstream '{self.upstream.name}' answered with a body that is not a JSON object: "
                                  f"{_snippet(raw, self.upstream)!r}")
        return body

    def events(self) -> Iterator[list[bytes]]:
        """The server-sent events of a streamed answer, as they arrive: each the list of its lines (without
        line ends). Ends at the end of the body; a broken or late connection raises an UpstreamFailure."""
        lines: list[bytes] = []
        try:
            while True:
                line = self.response.readline()
                if not line:
                    break
                line = line.rstrip(b"\r\n")
                if line:
                    lines.append(line)
                elif lines:
                    yield lines
                    lines = []
        except (OSError, http.client.HTTPException) as exc:
            raise failure_of(self.upstream, exc) from None
        if lines:
            yield lines

    def close(self) -> None:
        self.connection.close()


def post(upstream: Upstream, path: str, body: dict, stream: bool) -> UpstreamResponse:
    """POST ``body`` to ``<base_url><path>`` (``path``: "/chat/completions", "/v1/messages" ...)."""
    parts = urlsplit(upstream.base_url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=upstream.connect_timeout)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json",
               "User-Agent": "localllm-gateway"}
    if upstream.is_anthropic:
        headers["anthropic-version"] = upstream.anthropic_version
        if upstream.api_key:
            headers["x-api-key"] = upstream.api_key
    elif upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
    try:
        connection.connect()
        connection.sock.settimeout(upstream.read_timeout)
        connection.request("POST", parts.path.rstrip("/") + path, body=payload, headers=headers)
        response = connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise failure_of(upstream, exc) from None
    status = response.status
    if status < 300:
        return UpstreamResponse(upstream, connection, response)
    try:
        raw = response.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    finally:
        connection.close()
    if status == 429 or status >= 500:
        raise UpstreamFailure(f"upstream '{upstream.name}' answered HTTP {status}: {_snippet(raw, upstream)!r}",
                              status=429 if status == 429 else 502,
                              code="upstream_rate_limited" if status == 429 else "upstream_failed")
    secrets = [upstream.api_key] if upstream.api_key else []
    return_body = scrub(raw.decode("utf-8", "replace"), secrets).encode("utf-8")
    raise UpstreamRejected(status, return_body, response.getheader("Content-Type"))


def failure_of(upstream: Upstream, exc: BaseException) -> UpstreamFailure:
    """The UpstreamFailure for a network error: a timeout is 504, anything else (refused, reset, cut) 502."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return UpstreamFailure(f"upstream '{upstream.name}' did not answer within its timeout "
                               f"(connect {upstream.connect_timeout:g} s, read {upstream.read_timeout:g} s)",
                               status=504, code="upstream_timeout")
    reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
    return UpstreamFailure(f"upstream '{upstream.name}' at {upstream.base_url} failed: "
                           f"{scrub(reason, [upstream.api_key] if upstream.api_key else [])}")


def _snippet(raw: bytes, upstream: Upstream) -> str:
    text = raw[:SNIPPET_CHARS].decode("utf-8", "replace")
    return scrub(text, [upstream.api_key] if upstream.api_key else [])
