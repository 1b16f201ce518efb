"""Route table: every URL the server answers, in one place."""
from __future__ import annotations


def register(app, engine, settings) -> None:
    from . import misc, ollama_api, openai_api

    openai_api.register(app, engine, settings)
    ollama_api.register(app, engine, settings)
    misc.register(app, engine, settings)
