"""POST /api/embed (normalized, batched) and the legacy POST /api/embeddings (one prompt, not normalized)."""
from __future__ import annotations

import time

import falcon

from ..errors import APIError
from ..schemas import as_integer
from . import parsing, responses
from .base import Resource, count_tokens


class EmbedResource(Resource):
    def on_post(self, req, resp):
        started = time.perf_counter()
        body = self.body(req)
        name = parsing.model_name(body)
        texts = inputs(body.get("input"))
        truncate = parsing.flag(body, "truncate", True)
        dimensions = body.get("dimensions")
        if dimensions is not None:
            dimensions = as_integer(dimensions)
            if dimensions is None:
                raise APIError(400, "dimensions must be an integer", param="dimensions")
        keep_alive = parsing.keep_alive(body)
        entry = self.engine.store.get(name)
        model, load_seconds = load(self.engine, entry, keep_alive)
        counts = []
        vectors = []
        if texts:
            counts = model.count_tokens(texts) if hasattr(model, "count_tokens") else []
            if truncate and hasattr(model, "max_seq_length"):
                counts = [min(count, model.max_seq_length) for count in counts]
            vectors = self.engine.embed(entry, texts, keep_alive=keep_alive_for(keep_alive), truncate=truncate,
                                        dimensions=dimensions).tolist()
        if keep_alive == 0:
            self.engine.unload(entry)
        count_tokens(req, "api_embed", sum(counts), 0)
        resp.content_type = falcon.MEDIA_JSON
        resp.media = {"model": name, "embeddings": vectors,
                      "total_duration": int((time.perf_counter() - started) * 1e9),
                      "load_duration": int(load_seconds * 1e9), "prompt_eval_count": sum(counts)}


class EmbeddingsResource(Resource):
    """Ollama's older route: ``{model, prompt}`` -> ``{embedding}``, the raw pooled vector (not normalized)."""

    def on_post(self, req, resp):
        body = self.body(req)
        name = parsing.model_name(body)
        prompt = parsing.optional_string(body, "prompt") or ""
        keep_alive = parsing.keep_alive(body)
        entry = self.engine.store.get(name)
        load(self.engine, entry, keep_alive)
        embedding = []
        if prompt:
            embedding = self.engine.embed(entry, [prompt], keep_alive=keep_alive_for(keep_alive),
                                          normalize=False).tolist()[0]
        if keep_alive == 0:
            self.engine.unload(entry)
        resp.content_type = falcon.MEDIA_JSON
        resp.media = {"embedding": embedding}


def inputs(value) -> list[str]:
    """``input``: a string (empty means nothing to embed) or a list of strings."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise APIError(400, "input must be a string or a list of strings", param="input")


def keep_alive_for(keep_alive: float | None) -> float | None:
    return None if keep_alive == 0 else keep_alive


def load(engine, entry, keep_alive):
    """The loaded embedding model and the seconds its load took (400 before loading a text model)."""
    if "embedding" not in responses.capabilities(entry):
        raise APIError(400, f"model '{entry.name}' does not support embeddings: it is a text-generation model",
                       param="model")
    started = time.perf_counter()
    model = engine.load(entry, keep_alive=keep_alive_for(keep_alive))
    return model, time.perf_counter() - started
