"""``serve()``: run the app on waitress (what ``localllm serve`` calls)."""
from __future__ import annotations

import signal
import sys

from .app import Settings, create_app


def waitress_server(app, settings: Settings):
    """A waitress server for ``app``, bound to ``settings.host:settings.port`` (port 0: any free one)."""
    from waitress.server import create_server

    # channel_request_lookahead keeps reading the socket during a request, so that a client
    # that goes away is noticed (environ["waitress.client_disconnected"]) and its generation stops.
    return create_server(app, host=settings.host, port=settings.port, threads=settings.threads,
                         channel_request_lookahead=1, ident="localllm", clear_untrusted_proxy_headers=True)


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
    return waitress_server(create_app(engine, settings), settings), engine


def serve(settings: Settings | None = None, engine=None) -> None:
    """Serve the OpenAI- and Ollama-compatible API until Ctrl-C (or SIGTERM), then shut down cleanly.

    Binds ``settings.host:settings.port`` (default 127.0.0.1:11434; ``LOCALLLM_HOST=host:port``).
    """
    settings = settings or Settings.from_env()
    own_engine = engine is None
    server, engine = make_server(settings, engine)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"localllm listening on http://{host}:{getattr(server, 'effective_port', settings.port)}", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    try:
        server.run()
    except KeyboardInterrupt:
        print("localllm shutting down", file=sys.stderr, flush=True)
    finally:
        server.close()
        if own_engine:
            engine.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
