"""The Falcon WSGI app: ``create_app(engine, settings)`` wires routes, middleware and error handlers.

Resources only translate: parse (``schemas``), call the library's engine,
format (``formatting``). ``get_app()`` builds the app for any WSGI server
(``gunicorn 'localllm_server.app:get_app()'``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import falcon

from . import errors


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 11434
    api_key: str | None = None                  # LOCALLLM_API_KEY: required as a Bearer token when set
    max_body_bytes: int = 32 * 1024 * 1024      # larger bodies get 413
    threads: int = 16                            # waitress worker threads
    cors_origins: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> "Settings":
        host, port = parse_host(os.environ.get("LOCALLLM_HOST", ""))
        return cls(host=host, port=port, api_key=os.environ.get("LOCALLLM_API_KEY") or None,
                   threads=int(os.environ.get("LOCALLLM_THREADS", "16")))


def parse_host(value: str) -> tuple[str, int]:
    """``LOCALLLM_HOST``: "host:port", "host", ":port", "http://host:port" -> (host, port)."""
    value = value.strip()
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme):]
    value = value.rstrip("/")
    if not value:
        return "127.0.0.1", 11434
    if value.startswith("["):                              # [::1]:port
        host, _, rest = value[1:].partition("]")
        return host, int(rest.lstrip(":") or 11434)
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, 11434
    return host or "127.0.0.1", int(port)


def create_app(engine, settings: Settings | None = None) -> falcon.App:
    """The WSGI app serving ``engine`` (a localllm.engine.Engine)."""
    from .middleware import middleware_for
    settings = settings or Settings.from_env()
    app = falcon.App(middleware=middleware_for(settings), cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, errors.handle_exception)
    app.add_error_handler(falcon.HTTPError, errors.handle_http_error)
    from . import routes
    routes.register(app, engine, settings)
    return app


def get_app() -> falcon.App:
    """App with a default engine and settings from the environment (for gunicorn and friends)."""
    from localllm.engine import Engine
    return create_app(Engine(), Settings.from_env())
