"""The opt-in response cache: answers to deterministic requests, under a byte budget and a time to live.

A request is deterministic when it says ``temperature: 0`` or gives a ``seed``. Its key is the SHA-256 of the
route path, the whole request (JSON with sorted keys, so the order of fields does not matter) and the member
that answered. A hit replays the stored answer: a JSON body, or a stream's events in their order.
Least recently used entries are dropped first when the budget is spent; an entry older than the TTL is a miss.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


def is_deterministic(body: dict) -> bool:
    """Whether the same request gives the same answer: ``temperature`` 0 or a ``seed``."""
    temperature = body.get("temperature")
    return body.get("seed") is not None or (isinstance(temperature, (int, float)) and temperature == 0)


def request_key(path: str, body: dict, member: str) -> str:
    """The cache key of ``body`` sent to ``path`` and answered by ``member``."""
    normalized = json.dumps([path, body, member], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """What a hit replays: the member that answered, and the JSON body or the stream's events (raw bytes), in
    ``format`` ("openai", or "anthropic": an Anthropic upstream's message passed through on /v1/messages)."""

    model: str
    body: bytes | None = None
    events: tuple[bytes, ...] | None = None
    format: str = "openai"

    @property
    def size(self) -> int:
        return len(self.model) + len(self.body or b"") + sum(len(e) for e in self.events or ())


class ResponseCache:
    """A thread-safe LRU map key -> CachedAnswer, at most ``max_bytes`` in answers, each kept ``ttl_seconds``."""

    def __init__(self, max_bytes: int, ttl_seconds: float, clock=time.monotonic):
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return None
            stored_at, answer = item
            if self.clock() - stored_at > self.ttl_seconds:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return answer

    def put(self, key: str, answer: CachedAnswer) -> bool:
        """Store ``answer`` (False when it alone is larger than the budget: not stored)."""
        if answer.size > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (self.clock(), answer)
            self.bytes += answer.size
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            return True

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: str) -> None:
        _, answer = self._entries.pop(key)
        self.bytes -= answer.size
