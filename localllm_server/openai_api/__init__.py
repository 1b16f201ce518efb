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


# The POST routes a gateway stands in front of (path below /v1, as appended to an upstream's base_url).
GATEWAY_PATHS = ("/chat/completions", "/completions", "/embeddings", "/responses")


def register(app, engine, settings, gateway=None) -> None:
    """Add the /v1 routes to ``app``, serving ``engine``; with ``gateway`` (a ``localllm_server.gateway.Gateway``)
    its dispatch stands in front of the four POST routes and /v1/models lists its upstream models and routes."""
    for path, resource in ROUTES:
        local = resource(engine, settings)
        if gateway is not None and path.removeprefix("/v1") in GATEWAY_PATHS:
            from ..gateway.resource import GatewayDispatch
            local = GatewayDispatch(local, gateway, path.removeprefix("/v1"))
        app.add_route(path, local)
