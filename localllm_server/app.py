"""The Falcon WSGI app: ``create_app(engine, settings)`` wires routes, middleware and error handlers.

Resources only translate: parse (``schemas``), call the library's engine,
format (``formatting``). ``get_app()`` builds the app for any WSGI server
(``gunicorn 'localllm_server.app:get_app()'``); ``server.serve`` runs it on waitress.

Behind a reverse proxy (``deploy/nginx/localllm.conf``): every streamed response says
``X-Accel-Buffering: no`` (``streaming.UnbufferedStreams``); ``LOCALLLM_REPLICA_NAME`` names this
process in an ``X-Localllm-Replica`` header on every response (which replica answered); ``LOCALLLM_TRUSTED_PROXY``
is the one peer address whose ``X-Forwarded-*`` headers waitress honours; ``LOCALLLM_ACCESS_LOG=1`` logs one
line per request with the client address and URL as the app sees them (after the trusted proxy's headers).
"""
from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field

import falcon

from . import errors

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
RETRY_AFTER_SECONDS = 1          # the Retry-After of a 503 (queue full, shutting down)
REPLICA_HEADER = "X-Localllm-Replica"
access_log = logging.getLogger("localllm_server.access")


@dataclass
class Settings:
    """Server settings (the engine has its own: localllm.engine.EngineSettings)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None                  # LOCALLLM_API_KEY: required as a Bearer token when set
    max_body_bytes: int = 32 * 1024 * 1024      # larger bodies get 413
    max_upload_bytes: int = 64 * 1024 ** 3      # POST /api/blobs/<digest>: a model or projector file (Ollama's uploads)
    # waitress worker threads, one per request being answered (a stream holds its thread to the end).
    # None: enough for every request the engine decodes or queues (server.threads_for), so that the
    # requests beyond the engine's queue get their 503 at once instead of waiting unseen in waitress.
    threads: int | None = None
    cors_origins: list[str] = field(default_factory=list)
    shutdown_grace: float = 10.0                # SIGTERM: seconds in-flight requests may still take
    channel_timeout: float = 120.0              # a connection idle this long (no byte either way) is closed
    # The address of the reverse proxy whose X-Forwarded-For/-Proto/-Host/-Port headers are honoured ("*": any
    # peer); from any other peer those headers are removed. None: no proxy is trusted.
    trusted_proxy: str | None = None
    replica_name: str | None = None             # sent as X-Localllm-Replica on every response when set
    access_log: bool = False                    # one log line per request (logger "localllm_server.access")
    # The gateway's TOML file (upstreams, routes, cache, budgets) or a loaded gateway.GatewayConfig; None: LOCALLLM_GATEWAY
    # if set (localllm_server.gateway.gateway_for), else no gateway.
    gateway: object = None

    @classmethod
    def from_env(cls) -> "Settings":
        """``LOCALLLM_HOST`` (host:port), ``LOCALLLM_API_KEY``, ``LOCALLLM_THREADS``,
        ``LOCALLLM_MAX_BODY_BYTES``, ``LOCALLLM_MAX_UPLOAD_BYTES`` (/api/blobs), ``LOCALLLM_ORIGINS`` (comma-separated CORS origins),
        ``LOCALLLM_SHUTDOWN_GRACE`` (seconds), ``LOCALLLM_CHANNEL_TIMEOUT`` (seconds), ``LOCALLLM_TRUSTED_PROXY``
        (an IP address or ``*``), ``LOCALLLM_REPLICA_NAME``, ``LOCALLLM_ACCESS_LOG`` (``1`` to log requests),
        ``LOCALLLM_GATEWAY`` (the gateway's TOML file)."""
        from localllm.engine import env_number

        host, port = parse_host(os.environ.get("LOCALLLM_HOST", ""))
        origins = [o.strip() for o in os.environ.get("LOCALLLM_ORIGINS", "").split(",") if o.strip()]
        threads = env_number("LOCALLLM_THREADS", "0")
        settings = cls(host=host, port=port, api_key=os.environ.get("LOCALLLM_API_KEY") or None,
                       threads=threads or None,
                       max_body_bytes=env_number("LOCALLLM_MAX_BODY_BYTES", str(32 * 1024 * 1024)),
                       max_upload_bytes=env_number("LOCALLLM_MAX_UPLOAD_BYTES", str(64 * 1024 ** 3)),
                       cors_origins=origins,
                       shutdown_grace=env_number("LOCALLLM_SHUTDOWN_GRACE", "10", float),
                       channel_timeout=env_number("LOCALLLM_CHANNEL_TIMEOUT", "120", float),
                       trusted_proxy=os.environ.get("LOCALLLM_TRUSTED_PROXY", "").strip() or None,
                       replica_name=os.environ.get("LOCALLLM_REPLICA_NAME", "").strip() or None,
                       access_log=env_flag("LOCALLLM_ACCESS_LOG"),
                       gateway=os.environ.get("LOCALLLM_GATEWAY", "").strip() or None)
        settings.check()
        return settings

    def check(self) -> None:
        """A ValueError naming the setting (and its variable) that is out of range."""
        limits = [("threads", "LOCALLLM_THREADS", self.threads is None or self.threads >= 1, "at least 1"),
                  ("max_body_bytes", "LOCALLLM_MAX_BODY_BYTES", self.max_body_bytes >= 1, "at least 1"),
                  ("max_upload_bytes", "LOCALLLM_MAX_UPLOAD_BYTES", self.max_upload_bytes >= 1, "at least 1"),
                  ("shutdown_grace", "LOCALLLM_SHUTDOWN_GRACE", self.shutdown_grace >= 0, "0 or more"),
                  ("channel_timeout", "LOCALLLM_CHANNEL_TIMEOUT", self.channel_timeout > 0, "more than 0")]
        for name, variable, ok, bound in limits:
            if not ok:
                raise ValueError(f"{name} ({variable}) must be {bound}, got {getattr(self, name)!r}")
        if self.trusted_proxy is not None and self.trusted_proxy != "*":
            try:
                ipaddress.ip_address(self.trusted_proxy)
            except ValueError:
                raise ValueError("trusted_proxy (LOCALLLM_TRUSTED_PROXY) must be the proxy's IP address as the server "
                                 f"sees it (e.g. 127.0.0.1) or '*', got {self.trusted_proxy!r}") from None
        if self.replica_name is not None and not is_header_token(self.replica_name):
            raise ValueError("replica_name (LOCALLLM_REPLICA_NAME) must be printable ASCII without spaces, got "
                             f"{self.replica_name!r}")


def env_flag(name: str) -> bool:
    """``1``/``true``/``yes``/``on`` -> True, unset/``0``/``false``/``no``/``off`` -> False; else a ValueError."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {os.environ[name]!r}")


def is_header_token(value: str) -> bool:
    return bool(value) and all(33 <= ord(c) <= 126 for c in value)


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

    from .streaming import UnbufferedStreams

    settings = settings or Settings.from_env()
    middleware = [*middleware_for(settings, Metrics()), UnbufferedStreams(), ProxyMiddleware(settings)]
    app = falcon.App(middleware=middleware, cors_enable=False)
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


class ProxyMiddleware:
    """What a reverse proxy in front of several replicas needs: ``X-Localllm-Replica`` (``settings.replica_name``)
    on every response, and with ``settings.access_log`` one line per request: the client address, method and URL
    as the app sees them (a trusted proxy's ``X-Forwarded-*`` applied by the WSGI server), status, request id."""

    def __init__(self, settings: Settings):
        self.replica_name = settings.replica_name
        self.access_log = settings.access_log

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        if self.replica_name:
            resp.set_header(REPLICA_HEADER, self.replica_name)
        if self.access_log:
            request_id = getattr(req.context, "request_id", "-")
            access_log.info('%s "%s %s" %s %s', req.remote_addr, req.method, req.url,
                            falcon.http_status_to_code(resp.status), request_id)


def get_app() -> falcon.App:
    """The app for a WSGI server other than waitress: ``gunicorn 'localllm_server.app:get_app()'``.

    The engine and settings come from the environment (``LOCALLLM_MODELS``, ``LOCALLLM_NUM_PARALLEL``, ...), as for
    ``localllm serve``. Each call builds its own engine: under gunicorn each worker process loads its own copy of
    every model it serves (memory grows with ``--workers``; use one worker and ``--threads N``, and more replicas
    behind a proxy rather than more workers). Never ``--preload``: the engine's threads do not survive the fork.
    ``LOCALLLM_HOST``, ``LOCALLLM_THREADS`` and ``LOCALLLM_TRUSTED_PROXY`` are waitress settings: gunicorn has
    ``--bind``, ``--threads`` and ``--forwarded-allow-ips``.
    """
    from localllm.engine import Engine

    settings = Settings.from_env()
    if settings.access_log:
        log_to_stderr(access_log)
    return create_app(Engine(), settings)


def log_to_stderr(logger: logging.Logger) -> None:
    """Send ``logger``'s INFO records to stderr, one plain line each (once per logger)."""
    if not any(getattr(handler, "localllm_stderr", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.localllm_stderr = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
