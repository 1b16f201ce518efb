"""Route table: every URL the server answers, in one place."""
from __future__ import annotations


def register(app, engine, settings) -> None:
    from . import anthropic_api, misc, ollama_api, openai_api
    from .gateway import gateway_for

    openai_api.register(app, engine, settings, gateway_for(settings))   # the gateway: LOCALLLM_GATEWAY
    ollama_api.register(app, engine, settings)
    anthropic_api.register(app, engine, settings)
    misc.register(app, engine, settings)
