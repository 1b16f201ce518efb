"""Ollama's native API under /api: chat, generate, embeddings, and model management.

Request bodies and answers follow Ollama (see ../shared/API.md): NDJSON streams
(``application/x-ndjson``, streaming on unless ``"stream": false``), durations in
nanoseconds, errors as ``{"error": "..."}``. Model names are store names only
(``name[:tag]``); paths are refused. ``register`` adds the routes to a Falcon app.
"""
from __future__ import annotations

from .chat import ChatResource
from .embed import EmbeddingsResource, EmbedResource
from .generate import GenerateResource
from .models import (BlobsResource, CopyResource, CreateResource, DeleteResource, PsResource, PullResource,
                     ShowResource, TagsResource)
from .version import VersionResource


def register(app, engine, settings) -> None:
    """Add the /api routes serving ``engine`` to ``app``."""
    app.add_route("/api/chat", ChatResource(engine, settings))
    app.add_route("/api/generate", GenerateResource(engine, settings))
    app.add_route("/api/embed", EmbedResource(engine, settings))
    app.add_route("/api/embeddings", EmbeddingsResource(engine, settings))
    app.add_route("/api/tags", TagsResource(engine, settings))
    app.add_route("/api/show", ShowResource(engine, settings))
    app.add_route("/api/ps", PsResource(engine, settings))
    app.add_route("/api/copy", CopyResource(engine, settings))
    app.add_route("/api/delete", DeleteResource(engine, settings))
    app.add_route("/api/pull", PullResource(engine, settings))
    app.add_route("/api/create", CreateResource(engine, settings))
    app.add_route("/api/blobs/{digest}", BlobsResource(engine, settings))
    app.add_route("/api/version", VersionResource())
