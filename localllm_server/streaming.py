"""Framing for streamed responses: Server-Sent Events (OpenAI) and NDJSON (Ollama)."""
from __future__ import annotations

import json
from typing import Iterable, Iterator


def sse_event(payload: dict | str) -> bytes:
    """One SSE event: ``data: <json>\\n\\n``."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


SSE_DONE = b"data: [DONE]\n\n"


def ndjson_line(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")


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
