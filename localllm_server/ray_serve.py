"""Ray Serve: replicas that each own an engine, behind a router that sends a prompt where its prefix is cached.

``pip install localllm[ray]``. The application has two deployments:

- ``LocalllmReplica`` (autoscaled): one ``localllm.engine.Engine`` and the Falcon app of ``localllm serve``
  (``create_app``), driven as a WSGI app by ``forward``: the request comes in as a ``ForwardedRequest``, the
  response goes back as a ``ResponseHead`` then the body's chunks, as the app yields them (streams included).
  Every route is the app's own; nothing here knows what a chat completion is.
- ``LocalllmIngress`` (one replica, no CPU): the HTTP entry point behind Ray Serve's proxy. It reads the body,
  computes the prompt's prefix blocks and session key (``routing_keys``), and forwards the request to a replica
  through a handle whose request router is ``PrefixCacheRouter``. A replica that dies before the first byte of its
  answer reached the client is replaced by another (``RETRY_ATTEMPTS`` in all); a stream that had started ends
  with an error event in its own framing (SSE or NDJSON), as when ``localllm serve`` shuts down under it.

How the router learns which replica caches what: it remembers what it sent where. The ingress turns the
prompt-making fields of the JSON body (``PROMPT_FIELDS``: system, instructions, tools, then the messages, input or
prompt item by item) into one canonical text, cuts it into ``PROMPT_BLOCK_CHARS`` blocks and chains their hashes
from a seed that is the model's name (block i's hash covers the model and blocks 0..i, so one hash stands for a
whole prefix, and two models never share one). When a request is routed, ``PrefixIndex`` records its hashes for
that replica (LRU-bounded); the next turn of the conversation repeats the history, so its first hashes name the
replica that prefilled it and holds it in its KV cache or prompt cache. No tokenizer or chat template runs in the
router, and the replicas report nothing: the index is exact for what this router routed, blind to what another
ingress replica routed and to what a replica's prompt cache dropped since.
A session key (the ``X-Session-Id`` header, else the body's ``prompt_cache_key`` or ``user``) is a shortcut: a
session's requests go to the replica its last one went to, even when their prompts share no prefix.

Choice, per request: the replica of its session, else those holding the longest recorded prefix, unless that
replica runs ``imbalance_threshold`` more requests than the least loaded one; then any replica, the least loaded
first, ties going to the replica holding the fewest recorded blocks (so new conversations spread). A preferred
replica at its ``max_ongoing_requests`` is passed over as well (Ray Serve's own capacity check).

``localllm serve --ray`` runs this application on the Ray cluster it finds (``RAY_ADDRESS``, a cluster started
with ``ray start`` on this machine, or a new local one); ``serve run deploy/ray/serve_config.yaml`` runs it with the
autoscaling bounds and router settings of a config file (``build_app`` is its import path).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import signal
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

log = logging.getLogger("localllm_server.ray_serve")

APP_NAME = "localllm"
REPLICA_DEPLOYMENT = "LocalllmReplica"
INGRESS_DEPLOYMENT = "LocalllmIngress"
SESSION_HEADER = "x-session-id"
PROMPT_FIELDS = ("system", "instructions", "tools", "messages", "input", "prompt")
SESSION_FIELDS = ("prompt_cache_key", "user")    # body fields that name a conversation when no header does
PROMPT_BLOCK_CHARS = 64                          # characters of canonical prompt text per hashed block
MAX_PROMPT_BLOCKS = 4096                         # blocks hashed per request (256 K characters)
RETRY_ATTEMPTS = 3                               # replicas tried for a request whose replica died before answering
RETRY_AFTER_SECONDS = 1

# Defaults of the router (request_router_kwargs) and of the deployments; deploy/ray/serve_config.yaml spells the
# same values out.
DEFAULT_MAX_PREFIX_ENTRIES = 200_000             # recorded block hashes (about 100 bytes each)
DEFAULT_MAX_SESSIONS = 50_000
DEFAULT_IMBALANCE_THRESHOLD = 4                  # ongoing requests more than the least loaded replica's
REPLICA_MAX_ONGOING_REQUESTS = 6                 # per replica: LOCALLLM_NUM_PARALLEL (4) decoding and 2 waiting
REPLICA_AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
INGRESS_MAX_ONGOING_REQUESTS = 1000              # each open stream is one ongoing request of the ingress


# ---- what the ingress sends a replica --------------------------------------------------------------------------

@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it, plus what the router needs (session key, prompt blocks)."""

    method: str
    path: str                                   # below the route prefix, e.g. /v1/chat/completions
    query_string: str = ""
    headers: tuple[tuple[str, str], ...] = ()   # lower-case names, in order
    body: bytes = b""
    client: str = ""                            # the peer address Ray Serve's proxy saw
    scheme: str = "http"
    server: tuple[str, int] = ("127.0.0.1", 80)
    root_path: str = ""                         # the application's route prefix (WSGI SCRIPT_NAME)
    session: str | None = None
    prompt_blocks: tuple[int, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ResponseHead:
    """The status and headers of a replica's answer (the first item ``forward`` yields)."""

    status: int
    headers: tuple[tuple[str, str], ...]


def prompt_text(body: dict) -> str:
    """The prompt-making fields of a request body as one text whose prefixes follow the prompt's: each field in
    ``PROMPT_FIELDS`` order, a list item by item, so that a conversation's next turn (more messages) starts with
    the whole text of the turn before."""
    parts = []
    for name in PROMPT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        parts.append(f"\x1d{name}\x1d")
        for item in value if isinstance(value, list) else [value]:
            parts.append(json.dumps(item, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\x1e")
    return "".join(parts)


def chained_block_hashes(text: str, seed: str = "", block_chars: int = PROMPT_BLOCK_CHARS,
                         max_blocks: int = MAX_PROMPT_BLOCKS) -> tuple[int, ...]:
    """The hash of every whole ``block_chars`` block of ``text``, each covering ``seed``, its block and all before
    it (64-bit BLAKE2b, the same in every process); a trailing partial block is left out."""
    hashes, previous = [], hashlib.blake2b(seed.encode("utf-8"), digest_size=8).digest()
    for start in range(0, min(len(text) // block_chars, max_blocks) * block_chars, block_chars):
        digest = hashlib.blake2b(previous + text[start:start + block_chars].encode("utf-8"), digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little"))
        previous = digest
    return tuple(hashes)


def parse_json_object(body: bytes) -> dict | None:
    """The body as a JSON object, or None (the replica's app answers the 400 for a body it cannot read)."""
    try:
        value = json.loads(body) if body else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def routing_keys(headers: dict[str, str], body: bytes) -> tuple[str | None, tuple[int, ...]]:
    """(session key, prompt block hashes) of a request: the session from ``X-Session-Id``, else the body's
    ``prompt_cache_key`` or ``user``; the blocks from the body's prompt fields (none for a body without any)."""
    document = parse_json_object(body)
    session = headers.get(SESSION_HEADER) or None
    if session is None and document is not None:
        session = next((document[f] for f in SESSION_FIELDS if isinstance(document.get(f), str) and document[f]),
                       None)
    if document is None or not any(document.get(name) is not None for name in PROMPT_FIELDS):
        return session, ()
    return session, chained_block_hashes(prompt_text(document), seed=str(document.get("model")))


# ---- the router ------------------------------------------------------------------------------------------------

class PrefixIndex:
    """Which replica was sent which prompt prefix: chained block hash -> the replicas it went to, the least
    recently recorded hash dropped first beyond ``max_entries``. ``blocks_held[replica]`` counts the hashes that
    name a replica (its share of the recorded history)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_PREFIX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_prefix_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.owners: OrderedDict[int, set[str]] = OrderedDict()
        self.blocks_held: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.owners)

    def record(self, blocks: tuple[int, ...], replica: str) -> None:
        for block in blocks:
            replicas = self.owners.pop(block, None) or set()
            if replica not in replicas:
                replicas.add(replica)
                self.blocks_held[replica] = self.blocks_held.get(replica, 0) + 1
            self.owners[block] = replicas
        while len(self.owners) > self.max_entries:
            _, dropped = self.owners.popitem(last=False)
            for name in dropped:
                self.blocks_held[name] -= 1

    def longest_prefixes(self, blocks: tuple[int, ...], replicas) -> dict[str, int]:
        """{replica: how many leading blocks of ``blocks`` it was sent} for those of ``replicas`` sent any."""
        wanted, found = set(replicas), {}
        for length in range(len(blocks), 0, -1):            # longest first: a hash stands for its whole prefix
            for name in self.owners.get(blocks[length - 1], ()):
                if name in wanted and name not in found:
                    found[name] = length
            if len(found) == len(wanted):
                break
        return found

    def forget(self, replica: str) -> None:
        """Drop a replica that is gone (its blocks stay recorded for the others)."""
        for block in [b for b, names in self.owners.items() if replica in names]:
            names = self.owners[block]
            names.discard(replica)
            if not names:
                del self.owners[block]
        self.blocks_held.pop(replica, None)


class PrefixCacheRouter(RequestRouter):
    """A Ray Serve request router: the session's replica, else the one holding the longest recorded prefix of the
    prompt, else the least loaded (see the module docstring). ``request_router_kwargs``: ``max_prefix_entries``,
    ``max_sessions``, ``imbalance_threshold`` (None: never passed over for load below its capacity)."""

    def initialize_state(self, max_prefix_entries: int = DEFAULT_MAX_PREFIX_ENTRIES,
                         max_sessions: int = DEFAULT_MAX_SESSIONS,
                         imbalance_threshold: int | None = DEFAULT_IMBALANCE_THRESHOLD) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if imbalance_threshold is not None and imbalance_threshold < 1:
            raise ValueError(f"imbalance_threshold must be at least 1 (or null), got {imbalance_threshold}")
        self.index = PrefixIndex(max_prefix_entries)
        self.sessions: OrderedDict[str, str] = OrderedDict()   # session key -> replica, least recent first
        self.max_sessions = max_sessions
        self.imbalance_threshold = imbalance_threshold

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks for Ray Serve to try in order (in each, the least loaded replica that has room, ties to the first):
        the preferred replicas if any, then every replica, the least loaded and then those holding the fewest
        recorded blocks first."""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True   # every rank full: wait before the next round
        loads = await self.current_loads(candidate_replicas)
        spread = sorted(candidate_replicas, key=lambda r: (loads[r.replica_id] is None, loads[r.replica_id] or 0,
                                                           self.index.blocks_held.get(r.replica_id.unique_id, 0)))
        forwarded = forwarded_request_of(pending_request)
        preferred = self.preferred_replicas(forwarded, spread, loads) if forwarded is not None else []
        return [preferred, spread] if preferred else [spread]

    async def current_loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int | None]:
        """Ongoing requests per replica: Ray Serve's recent figure, else asked now (None: it did not answer)."""
        loads = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in replicas}
        unknown = [r for r in replicas if loads[r.replica_id] is None]
        if unknown:
            for replica, load in await self._probe_queue_lens(unknown, 0):
                loads[replica.replica_id] = load
        return loads

    def preferred_replicas(self, request: ForwardedRequest, candidates: list[RunningReplica],
                           loads: dict[ReplicaID, int | None]) -> list[RunningReplica]:
        """The session's replica, else those holding the longest recorded prefix of the prompt; without those
        running ``imbalance_threshold`` more requests than the least loaded candidate."""
        by_name = {replica.replica_id.unique_id: replica for replica in candidates}
        session_replica = self.sessions.get(request.session) if request.session else None
        if session_replica in by_name:
            preferred = [by_name[session_replica]]
        else:
            matched = self.index.longest_prefixes(request.prompt_blocks, by_name)
            if not matched:
                return []
            longest = max(matched.values())
            preferred = [r for r in candidates if matched.get(r.replica_id.unique_id) == longest]
        if self.imbalance_threshold is None:
            return preferred
        least = min((load for load in loads.values() if load is not None), default=0)
        return [r for r in preferred if (loads[r.replica_id] or 0) - least < self.imbalance_threshold]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        forwarded = forwarded_request_of(pending_request)
        if forwarded is None:
            return
        self.index.record(forwarded.prompt_blocks, replica_id.unique_id)
        if forwarded.session:
            self.sessions.pop(forwarded.session, None)
            self.sessions[forwarded.session] = replica_id.unique_id
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = {replica_id.unique_id for replica_id in self._replica_id_set}
        super().update_replicas(replicas)
        for name in gone - {replica_id.unique_id for replica_id in self._replica_id_set}:
            self._forget(name)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def _forget(self, name: str) -> None:
        self.index.forget(name)
        for session in [s for s, replica in self.sessions.items() if replica == name]:
            del self.sessions[session]


def forwarded_request_of(pending_request: PendingRequest | None) -> ForwardedRequest | None:
    """The request's ``ForwardedRequest``, found by its fields: Ray Serve sends the router to the ingress with its
    whole module pickled by value, so the router's ``ForwardedRequest`` is a copy of the class the ingress uses."""
    if pending_request is None:
        return None
    return next((arg for arg in pending_request.args if hasattr(arg, "prompt_blocks") and hasattr(arg, "session")),
                None)


# ---- the replica: the Falcon app as a WSGI app -----------------------------------------------------------------

def wsgi_environ(request: ForwardedRequest, disconnected) -> dict:
    """The WSGI environ of ``request``. ``X-Forwarded-*`` headers are dropped (the client address is the one Ray
    Serve's proxy saw); ``disconnected()`` is offered where the app looks for waitress's disconnect check, so a
    client that went away stops its generation here too."""
    environ = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": request.root_path.encode("utf-8").decode("latin-1"),
        "PATH_INFO": request.path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": request.query_string,
        "SERVER_NAME": request.server[0],
        "SERVER_PORT": str(request.server[1]),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": request.client,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": request.scheme,
        "wsgi.input": io.BytesIO(request.body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "waitress.client_disconnected": disconnected,
        "CONTENT_LENGTH": str(len(request.body)),
    }
    for name, value in request.headers:
        if name.startswith("x-forwarded-") or name in ("content-length", "forwarded"):
            continue
        key = "CONTENT_TYPE" if name == "content-type" else "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


_END = object()


class LocalllmReplica:
    """One engine and the app of ``localllm serve``, configured from the environment (``LOCALLLM_MODELS``,
    ``LOCALLLM_NUM_PARALLEL``, ...); ``preload`` models are loaded before the replica takes requests. It names
    itself in ``X-Localllm-Replica`` with its Ray Serve replica id."""

    def __init__(self, preload: list[str] | tuple[str, ...] = ()):
        from localllm.engine import Engine

        from .app import Settings, access_log, create_app, log_to_stderr
        from .server import threads_for

        settings = Settings.from_env()
        settings.replica_name = serve.get_replica_context().replica_tag
        if settings.access_log:
            log_to_stderr(access_log)
        self.engine = Engine()
        self.app = create_app(self.engine, settings)
        # one thread per request being answered, as waitress has (a stream holds its thread to the end)
        self.executor = ThreadPoolExecutor(threads_for(self.engine.settings), thread_name_prefix="localllm-wsgi")
        for name in preload:
            self.engine.load(name)

    async def forward(self, request: ForwardedRequest):
        """Answer ``request`` with the app: a ``ResponseHead``, then the body's chunks as the app yields them.
        Cancelled (the client went away), the app's body is closed, which cancels its generation."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:                 # the loop is gone (replica stopping): nobody reads any more
                pass

        loop.run_in_executor(self.executor, self._respond, wsgi_environ(request, cancelled.is_set), emit,
                             cancelled.is_set)
        try:
            while (item := await items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def _respond(self, environ: dict, emit, cancelled) -> None:
        """In a worker thread: run the WSGI app and emit its head, its chunks, then ``_END``."""
        head: list = []

        def start_response(status: str, headers, exc_info=None):
            if exc_info is not None and head:
                raise exc_info[1].with_traceback(exc_info[2])
            head[:] = [ResponseHead(int(status.split(" ", 1)[0]), tuple(headers))]
            return self._no_write

        try:
            body = self.app(environ, start_response)
            try:
                started = False
                for chunk in body:
                    if not started:
                        emit(head[0])
                        started = True
                    if chunk:
                        emit(bytes(chunk))
                    if cancelled():
                        break
                if not started:
                    emit(head[0])
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        except Exception as exc:                 # the app handles its own errors: this is a bug in the bridge
            log.exception("WSGI call failed")
            emit(exc)
        finally:
            emit(_END)

    @staticmethod
    def _no_write(data: bytes) -> None:
        raise NotImplementedError("the WSGI write() callable is not supported: return the body instead")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


# ---- the ingress -----------------------------------------------------------------------------------------------

class LocalllmIngress:
    """Forwards every HTTP request to a replica (chosen by ``PrefixCacheRouter``) and relays its answer."""

    def __init__(self, replicas):
        from .app import Settings

        self.replicas = replicas.options(stream=True)
        # LOCALLLM_MAX_BODY_BYTES: the app answers 413 past it; the ingress stops reading where waitress would
        limit = Settings.from_env().max_body_bytes
        self.max_body_bytes = limit + max(limit, 1 << 20)

    async def __call__(self, request):
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self.max_body_bytes:
                return error_response(route_path(request.scope), 413,
                                      f"the request body is larger than {self.max_body_bytes} bytes")
        forwarded = forwarded_request(request.scope, bytes(body))
        failure = None
        for _ in range(RETRY_ATTEMPTS):
            answer = self.replicas.forward.remote(forwarded)
            try:
                head = await answer.__anext__()
                first = await anext(answer, None)     # the head and the first chunk come together from the app
            except asyncio.CancelledError:         # the client went away first: stop the replica's work
                answer.cancel()
                raise
            except RayActorError as exc:           # the replica died before a byte went out: try another one
                log.warning("replica lost before answering %s %s, retrying: %s", forwarded.method, forwarded.path,
                            type(exc).__name__)
                failure = exc
                continue
            except (BackPressureError, DeploymentUnavailableError) as exc:
                return error_response(forwarded.path, 503, str(exc))
            return streaming_response(head, relay(answer, first, forwarded.path, head.headers),
                                      dict(forwarded.headers).get("x-request-id"))
        return error_response(forwarded.path, 503, f"no replica could answer the request ({type(failure).__name__})")


def route_path(scope: dict) -> str:
    """The path below the application's route prefix (ASGI's ``root_path``), e.g. /v1/chat/completions."""
    root_path, path = scope.get("root_path") or "", scope["path"]
    if root_path and path.startswith(root_path):
        return path[len(root_path):] or "/"
    return path


def forwarded_request(scope: dict, body: bytes) -> ForwardedRequest:
    """The ``ForwardedRequest`` for an ASGI request ``scope`` and its ``body``."""
    headers = tuple((name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in scope["headers"])
    session, blocks = routing_keys(dict(headers), body)
    client = scope.get("client") or ("", 0)
    server = scope.get("server") or ("127.0.0.1", 80)
    return ForwardedRequest(method=scope["method"], path=route_path(scope),
                            query_string=scope.get("query_string", b"").decode("latin-1"), headers=headers, body=body,
                            client=client[0], scheme=scope.get("scheme", "http"),
                            server=(server[0], int(server[1] or 80)), root_path=scope.get("root_path") or "",
                            session=session, prompt_blocks=blocks)


def streaming_response(head: ResponseHead, body, request_id: str | None):
    """The replica's answer as the ingress's response: its status and headers, ``body`` sent as it comes. The app
    echoes the request's ``X-Request-Id``, which Ray Serve's proxy sets and sends back itself: not twice."""
    from starlette.responses import StreamingResponse

    response = StreamingResponse(body, status_code=head.status)
    response.raw_headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in head.headers
                            if not (name.lower() == "x-request-id" and value == request_id)]
    return response


async def relay(answer, first: bytes | None, path: str, headers: tuple[tuple[str, str], ...]):
    """The body of a replica's answer; if the replica dies mid-stream, an error event in the stream's framing."""
    finished = False
    try:
        if first:
            yield first
        async for chunk in answer:
            yield chunk
        finished = True
    except RayActorError as exc:
        finished = True
        log.warning("replica lost in the middle of answering %s: %s", path, type(exc).__name__)
        content_type = next((value for name, value in headers if name.lower() == "content-type"), "")
        yield stream_error(path, content_type, "the replica answering this request stopped")
    finally:
        if not finished:                          # the client went away: stop the replica's generation
            answer.cancel()


def stream_error(path: str, content_type: str, message: str) -> bytes:
    """A final error event for a stream that cannot go on: SSE for /v1 (Anthropic's ``event: error`` under
    /v1/messages), an NDJSON line for /api; nothing for other bodies (the connection just ends)."""
    from .errors import APIError, body_for
    from .streaming import NDJSON_CONTENT_TYPE, SSE_CONTENT_TYPE, SSE_DONE, ndjson_line, sse_event

    error = body_for(path, APIError(503, message))
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == NDJSON_CONTENT_TYPE:
        return ndjson_line(error)
    if media_type != SSE_CONTENT_TYPE:
        return b""
    if error.get("type") == "error":                # Anthropic's envelope
        return f"event: error\ndata: {json.dumps(error)}\n\n".encode()
    return sse_event(error) + SSE_DONE


def error_response(path: str, status: int, message: str):
    """An error answered by the ingress itself, in the envelope of the route family (OpenAI, Ollama, Anthropic)."""
    from starlette.responses import JSONResponse

    from .errors import APIError, body_for

    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse(body_for(path, APIError(status, message)), status_code=status, headers=headers)


# ---- the application -------------------------------------------------------------------------------------------

replica_deployment = serve.deployment(
    LocalllmReplica, name=REPLICA_DEPLOYMENT, max_ongoing_requests=REPLICA_MAX_ONGOING_REQUESTS,
    autoscaling_config=REPLICA_AUTOSCALING,
    request_router_config=RequestRouterConfig(
        request_router_class=PrefixCacheRouter,
        request_router_kwargs={"max_prefix_entries": DEFAULT_MAX_PREFIX_ENTRIES, "max_sessions": DEFAULT_MAX_SESSIONS,
                               "imbalance_threshold": DEFAULT_IMBALANCE_THRESHOLD}))
ingress_deployment = serve.deployment(LocalllmIngress, name=INGRESS_DEPLOYMENT, num_replicas=1,
                                      max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
                                      ray_actor_options={"num_cpus": 0})


def application(preload: list[str] = (), replica_options: dict | None = None):
    """The bound application: the ingress in front of the replicas (``replica_options``: Ray Serve deployment
    options of the replicas, e.g. ``ray_actor_options``, ``autoscaling_config``)."""
    replicas = replica_deployment.options(**replica_options) if replica_options else replica_deployment
    return ingress_deployment.bind(replicas.bind(list(preload)))


def build_app(args: dict | None = None):
    """The application builder of ``serve run`` / ``serve deploy`` (``import_path:
    localllm_server.ray_serve:build_app``). ``args``: ``preload``, the model names each replica loads before it
    takes requests (default none: a model loads on its first request, as with ``localllm serve``)."""
    args = dict(args or {})
    preload = args.pop("preload", None) or []
    if args:
        raise ValueError(f"unknown application argument(s) {', '.join(sorted(args))}: the only one is 'preload'")
    if isinstance(preload, str) or not all(isinstance(name, str) and name for name in preload):
        raise ValueError(f"preload must be a list of model names, got {preload!r}")
    return application(preload)


def replica_environment() -> dict[str, str]:
    """The variables a replica needs from the environment of ``localllm serve --ray`` (a replica runs in a Ray
    worker, whose environment is the one ``ray start`` had)."""
    return {name: value for name, value in os.environ.items()
            if name.startswith(("LOCALLLM_", "NUMBA_")) and name not in ("LOCALLLM_HOST", "LOCALLLM_THREADS")}


def replica_cpus_and_slots(nodes_cpus: list[float], threads: int) -> tuple[int, int]:
    """(CPUs per replica, how many replicas fit): a replica asks Ray for the CPUs its kernels use
    (``NUMBA_NUM_THREADS``, else every core of this machine), at most a whole node's."""
    if not nodes_cpus or max(nodes_cpus) < 1:
        raise ValueError("the Ray cluster has no node with a CPU to run a replica on")
    cpus = max(1, min(threads, int(max(nodes_cpus))))
    return cpus, sum(int(node // cpus) for node in nodes_cpus)


def serve_with_ray(settings) -> None:
    """``localllm serve --ray``: run the application on the Ray cluster this machine belongs to (``RAY_ADDRESS``,
    a cluster ``ray start`` made here, else a new local one), Ray Serve's HTTP proxy on ``settings.host:port``.
    Each replica takes the CPUs of one ``localllm serve`` (``NUMBA_NUM_THREADS``, else all cores); the replicas
    autoscale from one to as many as the cluster's nodes hold then. SIGTERM or Ctrl-C deletes the application
    (its replicas finish their requests first) and leaves the cluster."""
    import ray

    ray.init()
    try:
        nodes_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
        threads = int(os.environ.get("NUMBA_NUM_THREADS") or os.cpu_count() or 1)
        cpus, fit = replica_cpus_and_slots(nodes_cpus, threads)
        environment = {**replica_environment(), "NUMBA_NUM_THREADS": str(cpus)}
        options = {"ray_actor_options": {"num_cpus": cpus, "runtime_env": {"env_vars": environment}},
                   "autoscaling_config": {**REPLICA_AUTOSCALING, "max_replicas": max(1, fit)}}
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(replica_options=options), name=APP_NAME, route_prefix="/")
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"localllm listening on http://{host}:{settings.port} (Ray Serve: 1 to {max(1, fit)} replicas of "
              f"{cpus} CPUs)", flush=True)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM,
                                                                                          signal.SIGINT)}
        try:
            while not stop.wait(1.0):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print("localllm shutting down (Ray Serve replicas finish their requests)", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
