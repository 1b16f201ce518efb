"""The /api resources' base: the one resource convention of the server (``localllm_server.body``)."""
from __future__ import annotations

from ..body import DEFAULT_MAX_BODY_BYTES, Resource, count_tokens

__all__ = ["DEFAULT_MAX_BODY_BYTES", "Resource", "count_tokens"]
