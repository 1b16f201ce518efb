"""What every /api resource has: the engine, the body size limit, the app's metrics."""
from __future__ import annotations

from . import parsing

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class Resource:
    def __init__(self, engine, settings=None):
        self.engine = engine
        self.max_body_bytes = getattr(settings, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)

    def body(self, req) -> dict:
        """The request's JSON object (413 past the size limit, 400 when missing or malformed)."""
        return parsing.read_body(req, self.max_body_bytes)


def count_tokens(req, route: str, prompt_tokens: int, completion_tokens: int) -> None:
    """Add a request's tokens to the app's metrics (``GET /metrics``), when the app keeps them."""
    metrics = getattr(req.context, "metrics", None)
    if metrics is not None:
        metrics.add_tokens(route, prompt_tokens, completion_tokens)
