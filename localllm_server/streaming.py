"""Framing for streamed responses: Server-Sent Events (OpenAI) and NDJSON (Ollama).

A streamed response body is a WSGI iterator: ``ClosingStream`` runs a
callback when the server closes it, which is how a client that went away
cancels its generation (waitress closes the body iterator when a write to a
closed connection fails). ``prime`` pulls the first item before the response
starts, so that errors raised before any output (queue full, context too
long, unknown model) still get their HTTP status instead of an in-band error.

``UnbufferedStreams`` marks every SSE and NDJSON response ``X-Accel-Buffering: no``, so that a
reverse proxy (nginx) passes each event on as it comes instead of collecting a buffer's worth.
"""
from __future__ import annotations

import itertools
import json
from typing import Iterable, Iterator

SSE_DONE = b"data: [DONE]\n\n"
SSE_CONTENT_TYPE = "text/event-stream"
NDJSON_CONTENT_TYPE = "application/x-ndjson"


def sse_event(payload: dict | str) -> bytes:
    """One SSE event: ``data: <json>\\n\\n``."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


def sse_body(chunks: Iterable[dict]) -> Iterator[bytes]:
    """Frame ``chunks`` as SSE events, then ``data: [DONE]``.

    An error raised after the first event (the 200 status is already sent)
    becomes an in-band ``data: {"error": {...}}`` event, followed by
    ``data: [DONE]`` as OpenAI clients expect.
    """
    from .errors import openai_body, to_api_error

    try:
        for chunk in chunks:
            yield sse_event(chunk)
    except Exception as exc:                  # the status line is gone: report the error in the stream
        yield sse_event(openai_body(to_api_error(exc)))
    yield SSE_DONE


def ndjson_line(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")


def prime(iterable: Iterable) -> Iterator:
    """Start ``iterable`` now: its first item is fetched (errors raise here); all items are yielded later."""
    iterator = iter(iterable)
    for first in iterator:
        return itertools.chain([first], iterator)
    return iter(())


class ClosingStream:
    """A WSGI body iterator that runs ``on_close`` when the server closes it (client gone or done)."""

    def __init__(self, chunks: Iterable[bytes], on_close=None):
        self._chunks: Iterator[bytes] = iter(chunks)
        self._on_close = on_close

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        close = getattr(self._chunks, "close", None)
        if close:
            close()


def respond_stream(resp, body: Iterable[bytes], on_close=None, content_type: str = SSE_CONTENT_TYPE) -> None:
    """Send ``body`` (already framed) as a streamed, uncached response; ``on_close`` runs when the server closes
    it. (``X-Accel-Buffering: no`` comes from ``UnbufferedStreams``, for every stream alike.)"""
    resp.content_type = content_type
    resp.set_header("Cache-Control", "no-cache")
    resp.stream = ClosingStream(body, on_close=on_close)


def is_stream_content_type(content_type: str | None) -> bool:
    """Whether a response's Content-Type is one of the streamed ones (parameters such as charset ignored)."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    return media_type in (SSE_CONTENT_TYPE, NDJSON_CONTENT_TYPE)


class UnbufferedStreams:
    """Falcon middleware: ``X-Accel-Buffering: no`` on every SSE and NDJSON response, whichever route made it,
    so that nginx forwards each event at once even where ``proxy_buffering`` is on."""

    def process_response(self, req, resp, resource, req_succeeded: bool) -> None:
        if is_stream_content_type(resp.content_type):
            resp.set_header("X-Accel-Buffering", "no")
