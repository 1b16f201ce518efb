"""What the /v1 resources share: the loaded text model, submitting prompts, answering in SSE."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import falcon

from .. import streaming
from ..errors import APIError


def load_model(engine, name: str):
    """(store entry, loaded model) for ``name``.

    Only store names are served: the engine is given the store entry, so a
    request naming a path (``../x.gguf``, a folder) never reaches the disk.
    """
    entry = engine.store.get(name)              # InvalidModelName (400), ModelNotFound (404)
    return entry, engine.load(entry)


def text_model(engine, name: str):
    """(store entry, loaded text-generation model) for ``name`` (404 if unknown, 400 if it only embeds)."""
    entry, model = load_model(engine, name)
    if "completion" not in model.capabilities:
        raise APIError(400, f"model '{name}' is an embedding model and cannot generate text", param="model",
                       code="model_not_supported")
    return entry, model


def client_disconnected(req: falcon.Request) -> Callable[[], bool] | None:
    """waitress's check for a client that closed its connection (None under other servers)."""
    return req.env.get("waitress.client_disconnected")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    if any(t >= vocab_size for t in ids):
        raise APIError(400, f"{param} token ids must be below the vocabulary size {vocab_size}", param=param)
    return ids


class Submission:
    """The engine requests behind one HTTP request (one per prompt), read as one stream.

    ``events()`` yields ``(choice index, GenerationEvent)``: prompt ``i``'s
    choice ``j`` has index ``i * n + j``. Prompts are generated concurrently
    (the engine batches them); their events are read prompt after prompt.
    Every request is cancelled when the stream ends early, fails, or the
    client goes away; ``on_finish(prompt_tokens, completion_tokens)`` runs once at the end. ``timeout``:
    the request's own limit in seconds (``X-Request-Timeout``), None for the server's.
    """

    def __init__(self, engine, entry, prompts: list[list[int]], params, num_ctx: int, n: int,
                 on_finish: Callable[[int, int], None] | None = None, timeout: float | None = None):
        self.n = n
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.completion_tokens = 0
        self.handles = []
        self._on_finish = on_finish
        try:
            for ids in prompts:
                self.handles.append(engine.submit(entry, ids, params, num_ctx, timeout=timeout))
        except BaseException:
            self.cancel()
            raise

    def events(self, disconnected: Callable[[], bool] | None = None) -> Iterator[tuple[int, object]]:
        try:
            for position, handle in enumerate(self.handles):
                for event in handle:
                    if event.finish_reason and event.usage is not None:
                        self.completion_tokens += event.usage.completion_tokens
                    yield position * self.n + event.index, event
                    if disconnected is not None and disconnected():
                        return
        finally:
            self.cancel()
            if self._on_finish is not None:
                self._on_finish(self.prompt_tokens, self.completion_tokens)
                self._on_finish = None

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


def respond_sse(resp: falcon.Response, chunks: Iterable[dict], on_close: Callable[[], None]) -> None:
    """Send ``chunks`` as a server-sent event stream; ``on_close`` runs when the server closes it."""
    streaming.respond_stream(resp, streaming.sse_body(chunks), on_close)


def metrics_hook(req: falcon.Request, route: str):
    """A Submission ``on_finish`` that counts tokens in the app's metrics (if any)."""
    metrics = getattr(req.context, "metrics", None)
    if metrics is None:
        return None
    return lambda prompt_tokens, completion_tokens: metrics.add_tokens(route, prompt_tokens, completion_tokens)
