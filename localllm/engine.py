"""The engine: the one place with threads.

One worker thread per loaded model owns that model's weights and KV cache.
Requests are submitted from any thread (the HTTP server's) and queued; the
worker admits them as sequence slots free up and advances *all* live
sequences of its model with one batched ``generate.step`` per iteration
(continuous batching). Each request gets its events through its own queue.
A model that is loading never blocks the workers of models already loaded.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
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


class RequestCancelled(RuntimeError):
    pass


@dataclass
class EngineSettings:
    n_slots: int = int(os.environ.get("LOCALLLM_NUM_PARALLEL", "4"))      # sequences decoded together per model
    max_queue: int = int(os.environ.get("LOCALLLM_MAX_QUEUE", "64"))      # waiting requests before 503
    keep_alive: float = float(os.environ.get("LOCALLLM_KEEP_ALIVE", DEFAULT_KEEP_ALIVE))
    backend: str = "auto"
    num_ctx: int | None = None
    prefill_chunk: int = 256


class RequestHandle:
    """Iterate to receive a request's GenerationEvents; ``cancel()`` stops it within one step."""

    def __init__(self, prompt: list[int], params: GenerationParams, num_ctx: int):
        self.prompt = prompt
        self.params = params
        self.num_ctx = num_ctx
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.sequences = []
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

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
        self.keep_alive = settings.keep_alive
        self.last_used = time.monotonic()
        self.stopped = False
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

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
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

    def _run(self) -> None:
        while True:
            with self.condition:
                if self.stopped:
                    break
                for handle in [h for h in self.active if h.cancelled.is_set()]:
                    self._finish(handle)           # a client went away: free its slots now
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
                handle.events.put(RequestCancelled("the model was unloaded"))
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
                    model.keep_alive = self.settings.keep_alive if keep_alive is None else keep_alive
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
        """Requests per loaded text model: ``{name: {"active": decoding, "pending": waiting for a slot}}``."""
        with self._lock:
            workers = dict(self.workers)
        stats = {}
        for key, worker in workers.items():
            with worker.condition:
                stats[key] = {"active": len(worker.active), "pending": len(worker.pending)}
        return stats

    # -- requests ----------------------------------------------------------------------------------------
    def submit(self, name: str, prompt: list[int], params: GenerationParams, num_ctx: int | None = None,
               keep_alive: float | None = None) -> RequestHandle:
        """Queue a generation request; iterate the returned handle for its events.

        ``keep_alive`` applies once the request is queued, so a 0 unloads the
        model after this request instead of racing it.
        """
        model = self.load(name)
        if not isinstance(model, api.Model):
            raise TypeError(f"model '{name}' is an embedding model and cannot generate text")
        params.validate()
        handle = RequestHandle(prompt, params, num_ctx or model.n_ctx)
        if handle.num_ctx > model.config.n_ctx_train:
            raise ValueError(f"num_ctx {handle.num_ctx} is larger than the model's training context "
                             f"{model.config.n_ctx_train}")
        from .generate import plan_context
        plan_context(len(prompt), params.max_tokens, handle.num_ctx)   # ContextLengthExceeded before queueing
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

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            workers = list(self.workers.values())
            self.workers.clear()
            self.embedders.clear()
        for worker in workers:
            worker.stop()
