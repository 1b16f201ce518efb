"""The OpenAI-compatible routes under /v1."""
from __future__ import annotations

from .chat import ChatCompletions
from .completions import Completions
from .embeddings import Embeddings
from .models import Model, Models
from .responses import Responses

ROUTES = [
    ("/v1/chat/completions", ChatCompletions),
    ("/v1/completions", Completions),
    ("/v1/embeddings", Embeddings),
    ("/v1/responses", Responses),
    ("/v1/models", Models),
    ("/v1/models/{model:path}", Model),
]


def register(app, engine, settings) -> None:
    """Add the /v1 routes to ``app``, serving ``engine``."""
    for path, resource in ROUTES:
        app.add_route(path, resource(engine, settings))
