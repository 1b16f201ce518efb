"""``serve()``: run the app on waitress (what ``localllm serve`` calls), and shut it down gracefully.

Load limits, each holding one client's misbehaviour to that client:

- A request is read whole by waitress's event loop before a worker thread takes it, so a client
  that trickles its request holds a connection, never a thread; a connection with no byte either
  way for ``channel_timeout`` seconds is closed. Bodies beyond twice ``max_body_bytes`` (at least
  1 MiB more) are refused by waitress as they arrive (a declared length at once, from the headers);
  the app answers 413 for the rest. Uploads to /api/blobs have their own limit, ``max_upload_bytes``
  (``BodyLimitedChannel``: waitress's one limit, chosen by the request's path).
- A streamed response holds its worker thread until the engine's last event is written to the
  connection's output buffer. The engine never waits for a reader: a slow reader's output waits
  in its own buffer (in memory, then a temporary file), and only past ``outbuf_high_watermark``
  bytes does its own thread wait for it to read.
- Enough threads for every request the engine decodes or queues (``threads_for``): past its queue
  the engine answers 503 with ``Retry-After`` at once, instead of requests waiting unseen for a thread.

Behind a reverse proxy: ``X-Forwarded-For``, ``-Proto``, ``-Host`` and ``-Port`` are honoured only from
``settings.trusted_proxy`` (``LOCALLLM_TRUSTED_PROXY``; its last hop is the client address the app sees);
from any other peer waitress removes them before the app runs.
"""
from __future__ import annotations

import signal
import sys
import threading
import time

from .app import Settings, create_app

QUICK_ROUTE_THREADS = 8          # threads beyond the engine's slots and queue: /api/tags, /health ... while it is full
OUTBUF_HIGH_WATERMARK = 16 * 1024 * 1024   # bytes of unread response before a slow reader's own thread waits
INBUF_OVERFLOW = 512 * 1024                # request bytes kept in memory; beyond, a temporary file
FINAL_FLUSH_SECONDS = 5.0        # after the grace: time for the streams' final error events to go out
TRUSTED_PROXY_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port")


def threads_for(engine_settings) -> int:
    """Worker threads for an engine: one per request it decodes or queues, plus a few for quick routes."""
    return engine_settings.n_slots + engine_settings.max_queue + QUICK_ROUTE_THREADS


def waitress_server(app, settings: Settings):
    """A waitress server for ``app``, bound to ``settings.host:settings.port`` (port 0: any free one)."""
    from waitress.server import create_server

    threads = settings.threads or 16
    proxy = {}
    if settings.trusted_proxy:
        proxy = dict(trusted_proxy=settings.trusted_proxy, trusted_proxy_count=1,
                     trusted_proxy_headers=" ".join(TRUSTED_PROXY_HEADERS))
    # channel_request_lookahead keeps reading the socket during a request, so that a client
    # that goes away is noticed (environ["waitress.client_disconnected"]) and its generation stops.
    server = create_server(app, host=settings.host, port=settings.port, threads=threads,
                           channel_request_lookahead=1, ident="localllm", clear_untrusted_proxy_headers=True,
                           connection_limit=threads + 100,
                           channel_timeout=settings.channel_timeout,
                           cleanup_interval=max(1, min(30, int(settings.channel_timeout / 2))),
                           max_request_body_size=json_body_limit(settings),
                           inbuf_overflow=INBUF_OVERFLOW,
                           outbuf_high_watermark=OUTBUF_HIGH_WATERMARK, **proxy)
    server.channel_class = body_limited_channel(json_body_limit(settings),
                                                getattr(settings, "max_upload_bytes", json_body_limit(settings)))
    return server


def json_body_limit(settings: Settings) -> int:
    """What waitress refuses outright on every route but uploads: twice max_body_bytes, at least 1 MiB more
    (the app's own 413 below that says which limit)."""
    return settings.max_body_bytes + max(settings.max_body_bytes, 1 << 20)


def body_limited_channel(json_limit: int, upload_limit: int):
    """A waitress channel class whose request parser applies ``upload_limit`` to /api/blobs uploads and
    ``json_limit`` to every other request (waitress has one ``max_request_body_size``; it is read, after
    the headers, from the parser's ``adj``, which this parser replaces by one with the path's limit)."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser

    from .middleware import UPLOAD_PREFIX

    class _Limit:
        def __init__(self, adj, limit: int):
            self._adj, self.max_request_body_size = adj, limit

        def __getattr__(self, name):
            return getattr(self._adj, name)

    class BodyLimitedParser(HTTPRequestParser):
        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            limit = upload_limit if UPLOAD_PREFIX in (self.path or "") else json_limit
            self.adj = _Limit(self.adj, limit)

    class BodyLimitedChannel(HTTPChannel):
        parser_class = BodyLimitedParser

    return BodyLimitedChannel


def stop(server, thread=None, timeout: float = 30) -> None:
    """Stop a waitress server whose loop runs in ``thread`` (another thread than the caller's).

    The worker threads finish their current requests first (they still signal
    the loop when done); then the sockets are closed from inside the loop
    thread (a trigger callback), so that no file descriptor is closed under a
    ``select`` running elsewhere. The loop ends when it has no socket left.
    """
    from waitress import wasyncore

    server.task_dispatcher.shutdown(timeout=timeout)
    sockets = getattr(server, "_map", None) or getattr(server, "map", None)
    server.trigger.pull_trigger(lambda: wasyncore.close_all(sockets))
    if thread is not None:
        thread.join(timeout)


def make_server(settings: Settings | None = None, engine=None):
    """A waitress server for the app, bound but not yet running; returns (server, engine)."""
    settings = settings or Settings.from_env()
    if engine is None:
        from localllm.engine import Engine
        engine = Engine()
    if settings.threads is None:
        settings.threads = threads_for(engine.settings)
    return waitress_server(create_app(engine, settings), settings), engine


class GracefulShutdown:
    """Drain a running waitress server: what SIGTERM (and Ctrl-C) do to ``localllm serve``.

    ``request()`` (from a signal handler) starts the drain in its own thread:

    1. stop listening (new connections are refused) and have the engine refuse new requests (503);
    2. wait, up to ``grace`` seconds, for the requests in flight to be answered and their
       output sent (streams run to their end);
    3. past the grace, end what still runs: each stream gets a final error event
       (SSE ``data: {"error": ...}`` then ``data: [DONE]``; NDJSON ``{"error": ...}``),
       answers not yet begun a 503; their output gets ``FINAL_FLUSH_SECONDS`` to go out;
    4. close every connection: the server's loop (``server.run()``) returns.

    A second ``request()`` skips what is left of the grace.
    """

    def __init__(self, server, engine, grace: float):
        self.server = server
        self.engine = engine
        self.grace = grace
        self.started = threading.Event()
        self.forced = threading.Event()
        self.thread: threading.Thread | None = None

    def request(self) -> None:
        if self.started.is_set():
            self.forced.set()
            return
        self.started.set()
        self.thread = threading.Thread(target=self._drain, name="localllm-shutdown", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        from localllm.engine import ServerShuttingDown

        self.engine.begin_shutdown()
        self.server.trigger.pull_trigger(self._stop_listening)
        if not self._wait_until_idle(self.grace):
            self.engine.close(ServerShuttingDown(
                f"the server is shutting down: the request was stopped after the {self.grace:g} s grace period"))
            self._wait_until_idle(FINAL_FLUSH_SECONDS)
        self.server.trigger.pull_trigger(self._close_connections)

    def _stop_listening(self) -> None:
        """In the loop thread: close the listening socket (the server object's own, not its trigger)."""
        from waitress import wasyncore

        wasyncore.dispatcher.close(self.server)

    def _close_connections(self) -> None:
        """In the loop thread: close every connection (writers still waiting on one are woken), then the rest."""
        from waitress import wasyncore
        from waitress.channel import HTTPChannel

        for channel in list(self.server._map.values()):
            if isinstance(channel, HTTPChannel):
                channel.handle_close()
        wasyncore.close_all(self.server._map)

    def _wait_until_idle(self, seconds: float) -> bool:
        """Whether every request was answered and its output sent within ``seconds`` (False if forced)."""
        deadline = time.monotonic() + seconds
        while not self.idle():
            if self.forced.is_set() or time.monotonic() >= deadline:
                return False
            self.forced.wait(0.05)
        return True

    def idle(self) -> bool:
        """No request queued or running in waitress, none received, no response output left to send."""
        from waitress.channel import HTTPChannel

        dispatcher = self.server.task_dispatcher
        if dispatcher.active_count or dispatcher.queue:
            return False
        channels = [c for c in list(self.server._map.values()) if isinstance(c, HTTPChannel)]
        return not any(channel.requests or channel.total_outbufs_len for channel in channels)


def serve(settings: Settings | None = None, engine=None) -> None:
    """Serve the OpenAI- and Ollama-compatible API until SIGTERM or Ctrl-C, then shut down gracefully.

    Binds ``settings.host:settings.port`` (default 127.0.0.1:11434; ``LOCALLLM_HOST=host:port``).
    On SIGTERM or SIGINT: stop listening, let the requests in flight finish for up to
    ``settings.shutdown_grace`` seconds (``LOCALLLM_SHUTDOWN_GRACE``), end the rest with an
    error event, return (a second signal ends them at once). See ``GracefulShutdown``.
    """
    from .app import access_log, log_to_stderr

    settings = settings or Settings.from_env()
    own_engine = engine is None
    if settings.access_log:
        log_to_stderr(access_log)
    server, engine = make_server(settings, engine)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"localllm listening on http://{host}:{getattr(server, 'effective_port', settings.port)}", flush=True)

    shutdown = GracefulShutdown(server, engine, settings.shutdown_grace)

    def on_signal(signum, frame):
        if not shutdown.started.is_set():
            print(f"localllm shutting down (in-flight requests have {settings.shutdown_grace:g} s)",
                  file=sys.stderr, flush=True)
        shutdown.request()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled} if _main_thread() else {}
    try:
        server.run()
    finally:
        server.task_dispatcher.shutdown(timeout=FINAL_FLUSH_SECONDS)
        server.close()
        if own_engine:
            engine.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
