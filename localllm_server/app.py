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


@dataclass
class Settings:
    """Server settings (the engine has its own: localllm.engine.EngineSettings)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None                  # LOCALLLM_API_KEY: required as a Bearer token when set
    max_body_bytes: int = 32 * 1024 * 1024      # larger bodies get 413
    threads: int = 16                            # waitress worker threads (one per request being answered)
    cors_origins: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> "Settings":
        """``LOCALLLM_HOST`` (host:port), ``LOCALLLM_API_KEY``, ``LOCALLLM_THREADS``,
        ``LOCALLLM_MAX_BODY_BYTES``, ``LOCALLLM_ORIGINS`` (comma-separated CORS origins)."""
        host, port = parse_host(os.environ.get("LOCALLLM_HOST", ""))
        origins = [o.strip() for o in os.environ.get("LOCALLLM_ORIGINS", "").split(",") if o.strip()]
        return cls(host=host, port=port, api_key=os.environ.get("LOCALLLM_API_KEY") or None,
                   threads=int(os.environ.get("LOCALLLM_THREADS", "16")),
                   max_body_bytes=int(os.environ.get("LOCALLLM_MAX_BODY_BYTES", str(32 * 1024 * 1024))),
                   cors_origins=origins)


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
    from . import routes
    from .middleware import Metrics, middleware_for

    settings = settings or Settings.from_env()
    app = falcon.App(middleware=middleware_for(settings, Metrics()), cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, errors.handle_exception)
    app.add_error_handler(falcon.HTTPError, errors.handle_http_error)
    routes.register(app, engine, settings)
    return app


def get_app() -> falcon.App:
    """App with a default engine and settings from the environment (for gunicorn and friends)."""
    from localllm.engine import Engine
    return create_app(Engine(), Settings.from_env())
