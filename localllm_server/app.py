"""The Falcon WSGI app: ``create_app(engine, settings)`` wires routes, middleware and error handlers.

Resources only translate: parse (``schemas``), call the library's engine,
format (``formatting``). ``get_app()`` builds the app for any WSGI server
(``gunicorn 'localllm_server.app:get_app()'``); ``server.serve`` runs it on waitress.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import falcon

from . import errors

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
RETRY_AFTER_SECONDS = 1          # the Retry-After of a 503 (queue full, shutting down)


@dataclass
class Settings:
    """Server settings (the engine has its own: localllm.engine.EngineSettings)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None                  # LOCALLLM_API_KEY: required as a Bearer token when set
    max_body_bytes: int = 32 * 1024 * 1024      # larger bodies get 413
    # waitress worker threads, one per request being answered (a stream holds its thread to the end).
    # None: enough for every request the engine decodes or queues (server.threads_for), so that the
    # requests beyond the engine's queue get their 503 at once instead of waiting unseen in waitress.
    threads: int | None = None
    cors_origins: list[str] = field(default_factory=list)
    shutdown_grace: float = 10.0                # SIGTERM: seconds in-flight requests may still take
    channel_timeout: float = 120.0              # a connection idle this long (no byte either way) is closed

    @classmethod
    def from_env(cls) -> "Settings":
        """``LOCALLLM_HOST`` (host:port), ``LOCALLLM_API_KEY``, ``LOCALLLM_THREADS``,
        ``LOCALLLM_MAX_BODY_BYTES``, ``LOCALLLM_ORIGINS`` (comma-separated CORS origins),
        ``LOCALLLM_SHUTDOWN_GRACE`` (seconds), ``LOCALLLM_CHANNEL_TIMEOUT`` (seconds)."""
        from localllm.engine import env_number

        host, port = parse_host(os.environ.get("LOCALLLM_HOST", ""))
        origins = [o.strip() for o in os.environ.get("LOCALLLM_ORIGINS", "").split(",") if o.strip()]
        threads = env_number("LOCALLLM_THREADS", "0")
        settings = cls(host=host, port=port, api_key=os.environ.get("LOCALLLM_API_KEY") or None,
                       threads=threads or None,
                       max_body_bytes=env_number("LOCALLLM_MAX_BODY_BYTES", str(32 * 1024 * 1024)),
                       cors_origins=origins,
                       shutdown_grace=env_number("LOCALLLM_SHUTDOWN_GRACE", "10", float),
                       channel_timeout=env_number("LOCALLLM_CHANNEL_TIMEOUT", "120", float))
        settings.check()
        return settings

    def check(self) -> None:
        """A ValueError naming the setting (and its variable) that is out of range."""
        limits = [("threads", "LOCALLLM_THREADS", self.threads is None or self.threads >= 1, "at least 1"),
                  ("max_body_bytes", "LOCALLLM_MAX_BODY_BYTES", self.max_body_bytes >= 1, "at least 1"),
                  ("shutdown_grace", "LOCALLLM_SHUTDOWN_GRACE", self.shutdown_grace >= 0, "0 or more"),
                  ("channel_timeout", "LOCALLLM_CHANNEL_TIMEOUT", self.channel_timeout > 0, "more than 0")]
        for name, variable, ok, bound in limits:
            if not ok:
                raise ValueError(f"{name} ({variable}) must be {bound}, got {getattr(self, name)!r}")


def parse_host(value: str) -> tuple[str, int]:
    """``LOCALLLM_HOST``: "host:port", "host", ":port", "http://host:port", "[::1]:port" -> (host, port)."""
    value = value.strip()
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme):]
    value = value.rstrip("/")
    if not value:
        return DEFAULT_HOST, DEFAULT_PORT
    if value.startswith("["):                              # [::1]:port
        host, _, rest = value[1:].partition("]")
        return host, int(rest.lstrip(":") or DEFAULT_PORT)
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, DEFAULT_PORT
    if ":" in host:                                        # a bare IPv6 address, no port
        return value, DEFAULT_PORT
    return host or DEFAULT_HOST, int(port)


def create_app(engine, settings: Settings | None = None) -> falcon.App:
    """The WSGI app serving ``engine`` (a localllm.engine.Engine)."""
    from localllm.engine import ServerBusy

    from . import routes
    from .middleware import Metrics, middleware_for

    settings = settings or Settings.from_env()
    app = falcon.App(middleware=middleware_for(settings, Metrics()), cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, errors.handle_exception)
    app.add_error_handler(falcon.HTTPError, errors.handle_http_error)
    app.add_error_handler(ServerBusy, handle_unavailable)
    routes.register(app, engine, settings)
    return app


def handle_unavailable(req: falcon.Request, resp: falcon.Response, exc: BaseException, params) -> None:
    """A 503 (queue full, shutting down) in the route family's envelope, with ``Retry-After``."""
    errors.handle_exception(req, resp, exc, params)
    resp.set_header("Retry-After", str(RETRY_AFTER_SECONDS))


def get_app() -> falcon.App:
    """App with a default engine and settings from the environment (for gunicorn and friends)."""
    from localllm.engine import Engine
    return create_app(Engine(), Settings.from_env())
