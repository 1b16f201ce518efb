"""The engine: the one place with threads.

One worker thread per loaded model owns that model's weights and KV cache.
Requests are submitted from any thread (the HTTP server's) and queued; the
worker admits them as sequence slots free up and advances *all* live
sequences of its model with one batched ``generate.step`` per iteration
(continuous batching). Each request gets its events through its own queue.
A model that is loading never blocks the workers of models already loaded.

Limits: at most ``max_queue`` requests wait per model (more get ``ServerBusy``);
a request may carry a timeout (``LOCALLLM_REQUEST_TIMEOUT`` by default) after
which it ends with ``RequestTimeout`` and frees its slots. A request's event
queue is filled by the worker and never blocks it: a reader that falls behind
holds at most its own request's events (``n * max_tokens`` of them).
``begin_shutdown()`` refuses new requests while the running ones finish;
``close(error)`` ends whatever still runs with ``error``.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from . import api
from .generate import GenerationEvent, GenerationParams, make_sequences, release, step
from .kv_cache import NoFreeSlot

DEFAULT_KEEP_ALIVE = 300.0   # seconds a model stays loaded after its last request
FOREVER_SECONDS = (2**63 - 1) / 1e9    # "loaded forever" (negative keep_alive): Ollama's max duration, ~292 years
_DONE = object()


def _keep_alive_seconds(keep_alive: float | None) -> float | None:
    """Negative keep-alive means forever (as in Ollama)."""
    if keep_alive is None:
        return None
    return float("inf") if keep_alive < 0 else float(keep_alive)


class ServerBusy(RuntimeError):
    """Too many requests are waiting (HTTP 503)."""


class ServerShuttingDown(ServerBusy):
    """The engine is shutting down: new requests are refused, and those still running at the end are stopped."""


class RequestCancelled(RuntimeError):
    pass


class RequestTimeout(RuntimeError):
    """A request ran past its timeout; it was stopped and its slots freed."""


def env_number(name: str, default: str, kind=int):
    """The environment variable ``name`` read as ``kind`` (a ValueError naming the variable if it is not one)."""
    value = os.environ.get(name, "").strip() or default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """``timeout`` as positive seconds, or None for no limit (0 means none too)."""
    if timeout is None or timeout == 0:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 \
            or timeout == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds (or 0 for none), got {timeout!r}")
    return float(timeout)


@dataclass
class EngineSettings:
    """How the engine schedules; the defaults come from the environment when the settings are made."""

    n_slots: int = field(default_factory=lambda: env_number("LOCALLLM_NUM_PARALLEL", "4"))   # decoded together
    max_queue: int = field(default_factory=lambda: env_number("LOCALLLM_MAX_QUEUE", "64"))   # waiting before 503
    keep_alive: float = field(default_factory=lambda: env_number("LOCALLLM_KEEP_ALIVE", str(DEFAULT_KEEP_ALIVE),
                                                                 float))
    backend: str = "auto"
    num_ctx: int | None = None
    prefill_chunk: int = 256
    request_timeout: float | None = field(                    # seconds a request may run (None, 0: no limit)
        default_factory=lambda: env_number("LOCALLLM_REQUEST_TIMEOUT", "0", float))

    def __post_init__(self):
        self.request_timeout = check_timeout(self.request_timeout, "request_timeout (LOCALLLM_REQUEST_TIMEOUT)")
        if self.max_queue < 0:
            raise ValueError(f"max_queue (LOCALLLM_MAX_QUEUE) must be 0 or more, got {self.max_queue}")
        if self.n_slots < 1:
            raise ValueError(f"n_slots (LOCALLLM_NUM_PARALLEL) must be at least 1, got {self.n_slots}")


class RequestHandle:
    """Iterate to receive a request's GenerationEvents; ``cancel()`` stops it within one step."""

    def __init__(self, prompt: list[int], params: GenerationParams, num_ctx: int, timeout: float | None = None):
        self.prompt = prompt
        self.params = params
        self.num_ctx = num_ctx
        # Unbounded on purpose: the worker must never wait for a reader. At most n * max_tokens events + the end.
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.sequences = []
        self.submitted_at = time.perf_counter()
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def cancel(self) -> None:
        self.cancelled.set()

    def timed_out(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def timeout_error(self) -> RequestTimeout:
        return RequestTimeout(f"the request ran past its timeout of {self.timeout:g} seconds and was stopped")

    def __iter__(self) -> Iterator[GenerationEvent]:
        while True:
            item = self.events.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class ModelWorker:
    """Owns one loaded model; runs the batching loop in its own thread."""

    def __init__(self, model: api.Model, settings: EngineSettings):
        self.model = model
        self.settings = settings
        self.pending: list[RequestHandle] = []
        self.active: list[RequestHandle] = []
        self.condition = threading.Condition()
        self.keep_alive = _keep_alive_seconds(settings.keep_alive)    # LOCALLLM_KEEP_ALIVE=-1: forever, as Ollama
        self.last_used = time.monotonic()
        self.stopped = False
        self.stop_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"localllm-{model.name}", daemon=True)
        self.thread.start()

    @property
    def expires_at(self) -> float:
        return self.last_used + self.keep_alive

    def submit(self, handle: RequestHandle) -> None:
        with self.condition:
            if len(self.pending) >= self.settings.max_queue:
                raise ServerBusy("server busy, please try again.  maximum pending requests exceeded")
            self.pending.append(handle)
            self.last_used = time.monotonic()
            self.condition.notify()

    def stop(self, error: BaseException | None = None) -> None:
        """End the worker after its current step; requests still queued or running get ``error``
        (default: RequestCancelled, the model was unloaded)."""
        with self.condition:
            self.stopped = True
            self.stop_error = error
            self.condition.notify()

    def busy(self) -> bool:
        with self.condition:
            return bool(self.pending or self.active)

    # -- worker thread ----------------------------------------------------------------------------------
    def _admit(self) -> None:
        model = self.model
        still_waiting = []
        for handle in self.pending:
            if handle.cancelled.is_set():
                handle.events.put(_DONE)
                continue
            if handle.num_ctx > model.n_ctx:
                if self.active:                    # grow the window once the running requests are done
                    still_waiting.append(handle)
                    continue
                model.set_context(handle.num_ctx)
            if model.cache.free_slots < handle.params.n:
                still_waiting.append(handle)
                continue
            try:
                handle.sequences = make_sequences(handle.prompt, handle.params, model.tokenizer, model.cache,
                                                  min(handle.num_ctx, model.n_ctx))
            except NoFreeSlot:
                self._release_partial(handle)
                still_waiting.append(handle)
                continue
            except Exception as exc:               # context overflow, bad settings: this request only
                self._release_partial(handle)
                handle.events.put(exc)
                handle.events.put(_DONE)
                continue
            self.active.append(handle)
        self.pending = still_waiting

    def _release_partial(self, handle: RequestHandle) -> None:
        """Give back the slots of a request that could not be admitted whole."""
        release(self.model.cache, handle.sequences)
        handle.sequences = []

    def _finish(self, handle: RequestHandle, error: BaseException | None = None) -> None:
        release(self.model.cache, handle.sequences)
        if error is not None:
            handle.events.put(error)
        handle.events.put(_DONE)
        self.active.remove(handle)
        self.last_used = time.monotonic()

    def _expire(self) -> None:
        """End the requests past their deadline, running or still waiting."""
        now = time.monotonic()
        for handle in [h for h in self.active if h.timed_out(now)]:
            self._finish(handle, handle.timeout_error())
        for handle in [h for h in self.pending if h.timed_out(now)]:
            self.pending.remove(handle)
            handle.events.put(handle.timeout_error())
            handle.events.put(_DONE)

    def _run(self) -> None:
        while True:
            with self.condition:
                if self.stopped:
                    break
                for handle in [h for h in self.active if h.cancelled.is_set()]:
                    self._finish(handle)           # a client went away: free its slots now
                self._expire()
                self._admit()
                if not self.active:
                    self.condition.wait(timeout=0.5)
                    continue
                live = list(self.active)
            sequences = [seq for handle in live for seq in handle.sequences]
            owner = {id(seq): handle for handle in live for seq in handle.sequences}
            try:
                events = step(self.model.network, self.model.cache, sequences, self.settings.prefill_chunk)
            except Exception as exc:               # a failing step ends the requests in it, not the worker
                with self.condition:
                    for handle in live:
                        self._finish(handle, exc)
                continue
            for seq, event in events:
                owner[id(seq)].events.put(event)
            with self.condition:
                for handle in live:
                    if all(seq.finished for seq in handle.sequences):
                        self._finish(handle)
        with self.condition:
            for handle in self.pending + self.active:
                handle.events.put(self.stop_error or RequestCancelled("the model was unloaded"))
                handle.events.put(_DONE)
            self.pending, self.active = [], []


class Engine:
    """Loads models on first use, keeps them for ``keep_alive`` seconds, and runs their workers."""

    def __init__(self, settings: EngineSettings | None = None, store=None):
        from .store import ModelStore
        self.settings = settings or EngineSettings()
        self.store = store or ModelStore()
        self.workers: dict[str, ModelWorker] = {}
        self.embedders: dict[str, object] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._reaper = threading.Thread(target=self._reap, name="localllm-keepalive", daemon=True)
        self._closed = threading.Event()
        self._shutting_down = threading.Event()
        self._reaper.start()

    # -- models ------------------------------------------------------------------------------------------
    def _canonical(self, name: str) -> tuple[str, object]:
        """(key, entry): store entry for names, the path itself for .gguf paths / folders."""
        path, entry = api.resolve(name, self.store)
        return (entry.name if entry else str(path)), (entry or path)

    def load(self, name: str, keep_alive: float | None = None):
        """The loaded model for ``name`` (a Model or an EmbeddingModel), loading it if needed.

        ``keep_alive``: seconds to stay loaded after the last request (0: unload
        when idle, negative: forever); None keeps the current setting.
        """
        key, source = self._canonical(name)
        keep_alive = _keep_alive_seconds(keep_alive)
        with self._lock:
            if key in self.workers:
                worker = self.workers[key]
                if keep_alive is not None:
                    worker.keep_alive = keep_alive
                worker.last_used = time.monotonic()
                return worker.model
            if key in self.embedders:
                embedder = self.embedders[key]
                if keep_alive is not None:
                    embedder.keep_alive = keep_alive
                embedder.last_used = time.monotonic()
                return embedder
            if self._shutting_down.is_set():
                raise ServerShuttingDown("the server is shutting down: no model is loaded any more")
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:                                       # only requests for this model wait for its load
            with self._lock:
                if key in self.workers:
                    return self.workers[key].model
                if key in self.embedders:
                    return self.embedders[key]
            model = api.load(source, backend=self.settings.backend, num_ctx=self.settings.num_ctx,
                             n_slots=self.settings.n_slots, store=self.store)
            with self._lock:
                if isinstance(model, api.Model):
                    worker = ModelWorker(model, self.settings)
                    if keep_alive is not None:
                        worker.keep_alive = keep_alive
                    self.workers[key] = worker
                else:
                    model.last_used = time.monotonic()
                    model.keep_alive = _keep_alive_seconds(self.settings.keep_alive) if keep_alive is None else keep_alive
                    self.embedders[key] = model
        return model

    def unload(self, name: str) -> bool:
        key, _ = self._canonical(name)
        with self._lock:
            worker = self.workers.pop(key, None)
            embedder = self.embedders.pop(key, None)
        if worker:
            worker.stop()
        return bool(worker or embedder)

    def warming_up(self) -> list[str]:
        """Slow first-use steps under way (kernel compiles), as ``progress.slow_step`` names them."""
        from .progress import state
        return state()

    def loaded(self) -> list[dict]:
        """What /api/ps reports: name, model handle, expiry (unix seconds)."""
        now_wall, now_mono = time.time(), time.monotonic()
        forever = now_wall + FOREVER_SECONDS

        def wall(expiry: float) -> float:
            return min(forever, now_wall + (expiry - now_mono))

        with self._lock:
            rows = [{"name": key, "model": w.model, "expires_at": wall(w.expires_at)}
                    for key, w in self.workers.items()]
            rows += [{"name": key, "model": m, "expires_at": wall(m.last_used + m.keep_alive)}
                     for key, m in self.embedders.items()]
        return rows

    def stats(self) -> dict[str, dict[str, int]]:
        """Requests per loaded text model: ``{name: {"active": decoding, "pending": waiting for a slot,
        "sequences": live sequences holding a KV-cache slot, "free_slots": slots free}}``."""
        with self._lock:
            workers = dict(self.workers)
        stats = {}
        for key, worker in workers.items():
            with worker.condition:
                stats[key] = {"active": len(worker.active), "pending": len(worker.pending),
                              "sequences": sum(len(h.sequences) for h in worker.active),
                              "free_slots": worker.model.cache.free_slots}
        return stats

    def busy(self) -> bool:
        """Whether any request is queued or running."""
        with self._lock:
            workers = list(self.workers.values())
        return any(worker.busy() for worker in workers)

    # -- requests ----------------------------------------------------------------------------------------
    def submit(self, name: str, prompt: list[int], params: GenerationParams, num_ctx: int | None = None,
               keep_alive: float | None = None, timeout: float | None = None) -> RequestHandle:
        """Queue a generation request; iterate the returned handle for its events.

        ``keep_alive`` applies once the request is queued, so a 0 unloads the
        model after this request instead of racing it. ``timeout``: seconds the
        request may take from now, waiting included (the settings'
        ``request_timeout``, when set, still bounds it); past it the handle raises ``RequestTimeout`` after
        the events sent so far. Raises ``ServerBusy`` when the model's queue is
        full and ``ServerShuttingDown`` after ``begin_shutdown()``.
        """
        limits = [self.settings.request_timeout, None if timeout is None else check_timeout(timeout)]
        timeout = min((t for t in limits if t is not None), default=None)   # the server's limit still holds
        if self._shutting_down.is_set():
            raise ServerShuttingDown("the server is shutting down and takes no new requests")
        model = self.load(name)
        if not isinstance(model, api.Model):
            raise TypeError(f"model '{name}' is an embedding model and cannot generate text")
        params.validate()
        handle = RequestHandle(prompt, params, num_ctx or model.n_ctx, timeout)
        if handle.num_ctx > model.config.n_ctx_train:
            raise ValueError(f"num_ctx {handle.num_ctx} is larger than the model's training context "
                             f"{model.config.n_ctx_train}")
        from .generate import plan_context
        plan_context(len(prompt), params.max_tokens, handle.num_ctx, params.context_shift)   # before queueing
        if params.n > model.cache.n_slots:
            raise ValueError(f"n must be at most {model.cache.n_slots} (the number of parallel sequences)")
        key, _ = self._canonical(name)
        for _ in range(3):
            with self._lock:                  # the reaper takes this lock too: a queued request keeps it loaded
                worker = self.workers.get(key)
                if worker is not None:
                    worker.submit(handle)
                    break
            self.load(name)                   # reaped between load and queueing: load again
        else:
            raise RequestCancelled(f"model '{name}' was unloaded while the request was queued")
        if keep_alive is not None:
            worker.keep_alive = _keep_alive_seconds(keep_alive)
        return handle

    def embed(self, name: str, texts, keep_alive: float | None = None, **options):
        model = self.load(name, keep_alive)
        embed_lock = getattr(model, "_engine_lock", None)
        if embed_lock is None:
            embed_lock = model._engine_lock = threading.Lock()
        with embed_lock:
            result = model.embed(texts, **options)
        model.last_used = time.monotonic()
        return result

    def _reap(self) -> None:
        while not self._closed.wait(1.0):
            now = time.monotonic()
            with self._lock:
                idle = [k for k, w in self.workers.items() if not w.busy() and w.expires_at <= now]
                idle_embedders = [k for k, m in self.embedders.items() if m.last_used + m.keep_alive <= now]
                workers = [self.workers.pop(k) for k in idle]
                for k in idle_embedders:
                    self.embedders.pop(k)
            for worker in workers:
                worker.stop()

    def begin_shutdown(self) -> None:
        """Refuse new requests (``ServerShuttingDown``); those queued or running go on."""
        self._shutting_down.set()

    def close(self, error: BaseException | None = None) -> None:
        """Stop every worker; requests still queued or running end with ``error``
        (default: RequestCancelled, the model was unloaded)."""
        self._shutting_down.set()
        self._closed.set()
        with self._lock:
            workers = list(self.workers.values())
            self.workers.clear()
            self.embedders.clear()
        for worker in workers:
            worker.stop(error)
