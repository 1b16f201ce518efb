"""One generation request of /api/chat or /api/generate against the engine: load, submit, stream or collect.

The first engine event is awaited before the response starts, so errors found while
the prompt is admitted still get their own status code. Streams cancel the engine
request when the client goes away (``ClosingStream``). ``keep_alive: 0`` asks for
the model to be unloaded once it is idle after this request. A prompt cut to fit the
context window (``Run.truncated``) says so in the final line and in a response header.
"""
from __future__ import annotations

import time
from typing import Iterator

import falcon

from ..errors import APIError, to_api_error
from ..streaming import ClosingStream, ndjson_line
from . import parsing, responses
from .base import count_tokens

NDJSON = "application/x-ndjson"


class Run:
    """A model loaded for one request (``load_seconds`` measured), then one generation submitted to the engine."""

    def __init__(self, engine, entry, keep_alive: float | None, name: str):
        self.started = time.perf_counter()
        self.name = name                      # as requested: Ollama echoes it in every line
        self.engine = engine
        self.entry = entry
        self.expire_after = keep_alive == 0
        self.keep_alive = None if self.expire_after else keep_alive
        self.model = engine.load(entry, keep_alive=self.keep_alive)
        self.load_seconds = time.perf_counter() - self.started
        self.handle = None
        self.truncation: dict = {}            # the final line's truncation fields, when the prompt was cut

    def truncated(self, tokens: int, messages: int | None = None) -> None:
        """Record that ``tokens`` prompt tokens (``messages`` chat messages) were left out to fit the window."""
        self.truncation = responses.truncation(tokens, messages)

    def submit(self, prompt_ids: list[int], params, num_ctx: int, timeout: float | None = None) -> Iterator:
        """Queue the generation; ``timeout``: the request's own limit in seconds (None: the server's)."""
        self.handle = self.engine.submit(self.entry, prompt_ids, params, num_ctx=num_ctx, keep_alive=self.keep_alive,
                                         timeout=timeout)
        return iter(self.handle)

    def metrics(self, final_event) -> dict:
        """The final line's durations and counts (and truncation fields, if the prompt was cut)."""
        return {**responses.metrics(time.perf_counter() - self.started, self.load_seconds,
                                    final_event.usage if final_event else None,
                                    final_event.timings if final_event else None),
                **self.truncation}

    def finish(self) -> None:
        """Cancel the engine request if it still runs; unload the model when idle if keep_alive was 0."""
        if self.handle is not None:
            self.handle.cancel()
        if self.expire_after:
            expire(self.engine, self.entry)


def expire(engine, entry) -> None:
    """Let ``entry``'s loaded model go as soon as no request uses it (keep_alive 0), without loading it."""
    if any(row["name"] == entry.name for row in engine.loaded()):
        engine.load(entry, keep_alive=0)


class Output:
    """How a route turns engine events into the fields of its lines (chat: ``message``; generate: ``response``)."""

    def piece(self, event) -> list[dict]:
        """Streaming: the lines (0 or more) for an event's new text and logprobs."""
        raise NotImplementedError

    def end(self, text: str, event, token_ids: list[int], records: list, thinking: str = "") -> list[dict]:
        """The last lines: any not yet sent, then the final line's fields (``done_reason``, metrics...).

        Streaming: ``text``, ``thinking`` are "" and ``records`` empty (already sent); otherwise they
        are the whole output (``thinking``: the thought of a reasoning model). ``event`` is the final engine event (None if the request was
        cancelled); ``token_ids`` every generated id.
        """
        raise NotImplementedError


def respond(req, resp, run: Run, events: Iterator, stream: bool, output: Output, route: str) -> None:
    """Answer with NDJSON lines (``stream``) or one JSON object, the fields made by ``output``.

    A client that goes away cancels the engine request (``ClosingStream`` when streaming;
    waitress's disconnect check between events otherwise). The tokens count in the app's
    metrics under ``route``. A cut prompt (``run.truncation``) sets ``X-Localllm-Prompt-Truncated``.
    """
    model = run.name
    disconnected = req.env.get("waitress.client_disconnected")
    try:
        first = next(events, None)            # waits for admission: errors here keep their status code
    except BaseException:
        run.finish()
        raise

    if run.truncation:
        resp.set_header(responses.TRUNCATED_HEADER, str(run.truncation["truncated_prompt_tokens"]))

    def all_events():
        if first is not None:
            yield first
        yield from events

    if not stream:
        try:
            texts, thoughts, token_ids, records, last = [], [], [], [], None
            for event in all_events():
                texts.append(event.text)
                thoughts.append(getattr(event, "thinking", ""))
                token_ids.extend(event.token_ids)
                records.extend(event.logprobs or [])
                last = event if event.finish_reason else last
                if disconnected is not None and disconnected():
                    break
        finally:
            run.finish()
        count(req, route, last)
        resp.content_type = falcon.MEDIA_JSON
        resp.media = line(model, output.end("".join(texts), last, token_ids, records, "".join(thoughts))[-1],
                          done=True)
        return

    def lines():
        token_ids = []
        try:
            for event in all_events():
                token_ids.extend(event.token_ids)
                for fields in output.piece(event):
                    yield ndjson_line(line(model, fields, done=False))
                if event.finish_reason:
                    count(req, route, event)
                    *before, final = output.end("", event, token_ids, [])
                    for fields in before:
                        yield ndjson_line(line(model, fields, done=False))
                    yield ndjson_line(line(model, final, done=True))
        except Exception as exc:              # the response has begun: report in-band, as Ollama does
            yield ndjson_line({"error": to_api_error(exc).message})

    resp.content_type = NDJSON
    resp.stream = ClosingStream(lines(), on_close=run.finish)


def count(req, route: str, final_event) -> None:
    if final_event is not None and final_event.usage is not None:
        count_tokens(req, route, final_event.usage.prompt_tokens, final_event.usage.completion_tokens)


def line(model: str, fields: dict, done: bool) -> dict:
    return {"model": model, "created_at": responses.created_at(), **fields, "done": done}


def load_only(resp, model: str, done_reason: str, fields: dict) -> None:
    """The answer to a request with nothing to generate: the model was loaded (or unloaded)."""
    resp.content_type = falcon.MEDIA_JSON
    resp.media = {**line(model, fields, done=True), "done_reason": done_reason}


def context_settings(body: dict) -> tuple[bool, bool, int]:
    """(truncate, shift, num_keep) of a request: cut a prompt that does not fit (``truncate``, default true),
    let the answer shift the window (``shift``, default true as in Ollama), and the leading tokens both keep
    (``options.num_keep``: Ollama's default 4; -1 keeps the start of the prompt)."""
    from localllm.context_window import DEFAULT_NUM_KEEP

    truncate, shift = parsing.flag(body, "truncate", True), parsing.flag(body, "shift", True)
    options = body.get("options")
    num_keep = options.get("num_keep") if isinstance(options, dict) else None
    if num_keep is None:
        return truncate, shift, DEFAULT_NUM_KEEP
    if isinstance(num_keep, float) and num_keep.is_integer():
        num_keep = int(num_keep)
    if isinstance(num_keep, bool) or not isinstance(num_keep, int) or num_keep < -1:
        raise APIError(400, "options.num_keep must be an integer >= -1 (-1 keeps the start of the prompt)",
                       param="options.num_keep")
    return truncate, shift, num_keep


def require_text_model(entry, name: str, action: str) -> None:
    if "completion" not in responses.capabilities(entry):
        raise APIError(400, f"model '{name}' does not support {action}", param="model")
