"""Which model answers a request, and the fallback chain that gets an answer.

A request's ``model`` names one of three things (:meth:`Gateway.resolve`):

* a route of the config: its members, tried in order;
* ``<upstream>/<model>`` where ``<upstream>`` is a configured upstream: that upstream, the model renamed through
  its ``models`` mapping;
* anything else: a local model of the store (served by the local resources, unchanged).

:meth:`Gateway.run` tries the members in order and moves to the next one on: a connection error, a timeout,
HTTP 429 or 5xx (:class:`~.upstream.UpstreamFailure`), a body that is not JSON, a local prompt longer than the
model's context (``ContextLengthExceeded``), a local server busy or past its time, an Anthropic-format upstream
asked for what its API cannot do (embeddings, ``n`` > 1, logprobs ...), and, when the route opts in
(``fallback_on_invalid_json``), a local answer that is not valid JSON for the request's JSON format (chat's
``response_format``, the Responses API's ``text.format``). A stream is committed with its first event: from
then on a failure is an error event that ends it, never a restart on another member. So that the JSON check
can apply to a stream, a local member's stream is then buffered whole and checked before its first byte is
sent (then replayed event by event); without the opt-in, streams pass through as they come. Every answer
names the member that gave it in its ``model`` field.

An Anthropic-format upstream (``format = "anthropic"``) answers chat completions through
``anthropic_api.openai_bridge`` (the request, the message and its stream events translated), and a
``/v1/messages`` request (``native``, the body as the client sent it) as it is, its answer in Anthropic's
shapes (``Answer.format`` "anthropic").

The answer's usage (prompt and completion tokens, cost from the upstream's prices) goes to ``record`` once
the answer is complete. Deterministic requests are cached when the config enables it (:mod:`.cache`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..anthropic_api import openai_bridge
from ..errors import APIError, anthropic_body, openai_body, to_api_error
from . import upstream as upstream_calls
from .budgets import Budgets
from .cache import CachedAnswer, ResponseCache, is_deterministic, request_key
from .config import GatewayConfig, Route, Upstream
from .upstream import UpstreamFailure, UpstreamRejected, scrub

STREAM_END_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
USAGE_CHUNK_PATHS = ("/chat/completions", "/completions")     # streams that can end with a usage chunk
ANTHROPIC_PATH = "/v1/messages"                                # below an Anthropic-format upstream's base_url


@dataclass(frozen=True)
class Member:
    """One model a request can go to: ``name`` as clients and answers see it."""

    name: str
    model: str                           # the local store name, or the upstream's own model name
    upstream: Upstream | None = None     # None: a local model

    @property
    def is_local(self) -> bool:
        return self.upstream is None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.upstream.cost(prompt_tokens, completion_tokens) if self.upstream else 0.0


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolved to: ``label`` (the name asked for) and the members to try."""

    label: str
    members: tuple[Member, ...]
    fallback_on_invalid_json: bool = False


@dataclass
class LocalAnswer:
    """What the local resource answered: a JSON body, or the SSE byte chunks of a stream (one event each)."""

    body: dict | None = None
    chunks: Iterable[bytes] | None = None
    close: Callable[[], None] | None = None


@dataclass
class Answer:
    """The gateway's answer: a JSON body (``status``) or a stream of SSE bytes, and who gave it."""

    model: str
    body: bytes | None = None
    stream: Iterator[bytes] | None = None
    status: int = 200
    content_type: str = "application/json"
    cache: str | None = None             # "hit" | "miss" when the request could be cached, else None
    close: Callable[[], None] | None = None
    format: str = "openai"               # "anthropic": an Anthropic upstream's answer to a /v1/messages request


# record(label, member name, prompt_tokens, completion_tokens, cost)
Recorder = Callable[[str, str, int, int, float], None]
LocalCall = Callable[[str, dict], LocalAnswer]


def usage_of(payload: dict) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a response or stream event, if it carries a usage object."""
    usage = payload.get("usage")
    if not isinstance(usage, dict) and isinstance(payload.get("response"), dict):
        usage = payload["response"].get("usage")             # Responses API: response.completed
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def rename_model(payload: dict, name: str) -> bool:
    """Set ``model`` (and a Responses API event's ``response.model``) to ``name``; whether anything changed."""
    changed = False
    for holder in (payload, payload.get("response")):
        if isinstance(holder, dict) and "model" in holder and holder["model"] != name:
            holder["model"] = name
            changed = True
    return changed


class StreamRelay:
    """Re-frames one stream's events as they pass: ``model`` renamed, usage read (and the usage chunk the
    gateway asked for dropped when the client did not ask for it), the end of the stream noticed."""

    def __init__(self, model: str, drop_usage_chunk: bool, named_events: bool):
        self.model = model
        self.drop_usage_chunk = drop_usage_chunk
        self.named_events = named_events    # Responses API framing: `event:` lines, no [DONE]
        self.usage: tuple[int, int] | None = None
        self.finished = False               # [DONE] or a terminal Responses event seen
        self.failed = False                 # an in-band error event passed
        self.sequence = 0

    def frame(self, lines: list[bytes]) -> bytes | None:
        """The event to forward for the event made of ``lines`` (None: dropped)."""
        out = []
        for line in lines:
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.finished = True
                else:
                    line = self._data_line(payload, line)
                    if line is None:
                        return None
            out.append(line)
        return b"\n".join(out) + b"\n\n"

    def _data_line(self, payload: bytes, line: bytes) -> bytes | None:
        try:
            event = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return line
        if not isinstance(event, dict):
            return line
        usage = usage_of(event)
        if usage is not None:
            self.usage = usage
        if isinstance(event.get("sequence_number"), int):
            self.sequence = event["sequence_number"] + 1
        if event.get("type") in STREAM_END_TYPES:
            self.finished = True
        if "error" in event or event.get("type") == "error":
            self.failed = True
        changed = rename_model(event, self.model)
        if self.drop_usage_chunk and "usage" in event:
            if event.get("choices") == [] and event["usage"] is not None:
                return None                             # the usage chunk the client did not ask for
            del event["usage"]
            changed = True
        if not changed:
            return line
        return b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8")

    def error_event(self, error: APIError) -> bytes:
        """The in-band error that ends a stream already under way (then ``[DONE]`` outside the Responses API)."""
        self.failed = True
        if self.named_events:
            event = {"type": "error", "sequence_number": self.sequence, "code": error.code,
                     "message": error.message, "param": error.param}
            return f"event: error\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode("utf-8")
        return b"data: " + json.dumps(openai_body(error), ensure_ascii=False).encode("utf-8") + b"\n\ndata: [DONE]\n\n"


class AnthropicUsage:
    """The usage of an Anthropic message as its stream tells it (``message_start``, then ``message_delta``)."""

    def __init__(self):
        self.fields: dict = {}

    def read(self, event: dict) -> None:
        usage = (event.get("message") or {}).get("usage") if event.get("type") == "message_start" else \
            event.get("usage") if event.get("type") == "message_delta" else None
        if isinstance(usage, dict):
            self.fields.update({key: value for key, value in usage.items() if isinstance(value, int)})

    @property
    def tokens(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens, the prompt counting the cache reads and writes; None before any usage."""
        return usage_of({"usage": openai_bridge.chat_usage(self.fields)}) if self.fields else None

    def read_chunk(self, chunk: bytes) -> None:
        """Read the events of a chunk of SSE bytes (whole events)."""
        for event in openai_bridge.sse_payloads([chunk]):
            if isinstance(event, dict):
                self.read(event)


class AnthropicRelay:
    """An Anthropic-format upstream's stream passed on as it comes: ``message.model`` renamed in
    ``message_start``, the usage read from it and ``message_delta``, ``message_stop`` noticed."""

    def __init__(self, model: str):
        self.model = model
        self.anthropic_usage = AnthropicUsage()
        self.finished = False               # message_stop seen
        self.failed = False                 # an error event passed

    @property
    def usage(self) -> tuple[int, int] | None:
        return self.anthropic_usage.tokens

    def frame(self, lines: list[bytes]) -> bytes:
        out = []
        for line in lines:
            if line.startswith(b"data:"):
                line = self._data_line(line)
            out.append(line)
        return b"\n".join(out) + b"\n\n"

    def _data_line(self, line: bytes) -> bytes:
        try:
            event = json.loads(line[5:])
        except (ValueError, UnicodeDecodeError):
            return line
        if not isinstance(event, dict):
            return line
        self.anthropic_usage.read(event)
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict) \
                and event["message"].get("model") != self.model:
            event["message"]["model"] = self.model
            return b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8")
        if kind == "message_stop":
            self.finished = True
        elif kind == "error":
            self.failed = True
        return line

    def error_event(self, error: APIError) -> bytes:
        """The ``error`` event that ends a stream already under way (Anthropic's envelope)."""
        self.failed = True
        return f"event: error\ndata: {json.dumps(anthropic_body(error), ensure_ascii=False)}\n\n".encode("utf-8")


def chat_events_from_anthropic(events: Iterator[list[bytes]], translator) -> Iterator[list[bytes]]:
    """An Anthropic stream's events (each its lines) -> chat-chunk events (``data: ...`` lines), as they come."""
    for lines in events:
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            try:
                event = json.loads(line[5:])
            except (ValueError, UnicodeDecodeError):
                event = {"type": "error", "error": {"message": "the upstream sent an event that is not JSON"}}
            for payload in translator.feed(event) if isinstance(event, dict) else []:
                data = b"[DONE]" if payload == "[DONE]" else json.dumps(payload, ensure_ascii=False).encode("utf-8")
                yield [b"data: " + data]


# The local errors that move a route on: the prompt is too long for the model, the engine is busy, past the
# request's time or shutting down. Any other error (a bad parameter, an unknown model, a bug) is answered.
LOCAL_FALLBACK_CODES = frozenset({"context_length_exceeded", "server_busy", "request_timeout",
                                  "server_shutting_down"})


def local_fallback_reason(exc: BaseException) -> str | None:
    """Why a local member's error moves a route on, or None when it is the answer."""
    error = to_api_error(exc)
    return error.message if error.code in LOCAL_FALLBACK_CODES else None


def json_format(path: str, body: dict) -> dict | None:
    """The JSON format ``body`` asks its answer in: ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "schema"}`` (chat's ``response_format``; the Responses API's ``text.format``), else None."""
    if path == "/responses":
        text = body.get("text") if isinstance(body.get("text"), dict) else {}
        spec = text.get("format") if isinstance(text.get("format"), dict) else {}
        schema = spec.get("schema")
    else:
        spec = body.get("response_format") if isinstance(body.get("response_format"), dict) else {}
        schema = (spec.get("json_schema") or {}).get("schema") if isinstance(spec.get("json_schema"), dict) else None
    if spec.get("type") not in ("json_object", "json_schema"):
        return None
    return {"type": spec["type"], "schema": schema if isinstance(schema, dict) else None}


def answer_texts(path: str, answer: dict) -> list[str]:
    """The answer texts of a chat completion (per choice) or a Responses API response (per message item);
    a choice that only calls tools has none."""
    if path == "/responses":
        return ["".join(str(part.get("text", "")) for part in item.get("content") or []
                        if isinstance(part, dict) and part.get("type") == "output_text")
                for item in answer.get("output") or [] if isinstance(item, dict) and item.get("type") == "message"]
    return [content for choice in answer.get("choices") or []
            if isinstance(content := (choice.get("message") or {}).get("content"), str)]


def invalid_json_reason(body: dict, answer: dict, path: str = "/chat/completions") -> str | None:
    """Why an answer's text does not satisfy the request's JSON format (None: it does, or none was asked)."""
    spec = json_format(path, body)
    if spec is None:
        return None
    for content in answer_texts(path, answer):
        try:
            value = json.loads(content)
        except ValueError as exc:
            return f"the answer is not valid JSON ({exc})"
        if spec["type"] == "json_schema" and spec["schema"] is not None:
            try:
                import jsonschema
            except ImportError:                             # without the validator, parsing is the check
                continue
            try:
                jsonschema.validate(value, spec["schema"])
            except jsonschema.ValidationError as exc:
                return f"the answer does not match the schema: {exc.message}"
        elif spec["type"] == "json_object" and not isinstance(value, dict):
            return "the answer is not a JSON object"
    return None


def streamed_answer(path: str, chunks: list[bytes]) -> tuple[dict, str | None]:
    """What a whole (buffered) local stream adds up to, shaped as its unstreamed answer for
    :func:`answer_texts`, and the message of the in-band error it ended with, if any."""
    if path == "/responses":
        final: dict = {}
        for event in openai_bridge.sse_payloads(chunks):
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "error":
                return {}, str(event.get("message") or "the stream failed")
            response = event.get("response") if isinstance(event, dict) else None
            if kind == "response.failed":
                return {}, str(((response or {}).get("error") or {}).get("message") or "the response failed")
            if kind in STREAM_END_TYPES and isinstance(response, dict):
                final = response
        return final, None
    texts: dict[int, list[str]] = {}
    calls: set[int] = set()
    for event in openai_bridge.sse_payloads(chunks):
        if not isinstance(event, dict):
            continue
        if "error" in event:
            error = event["error"]
            return {}, str(error.get("message") if isinstance(error, dict) else error)
        for choice in event.get("choices") or []:
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            texts.setdefault(index, [])
            if delta.get("content"):
                texts[index].append(delta["content"])
            if delta.get("tool_calls"):
                calls.add(index)
    choices = [{"message": {"content": "".join(parts) if parts or index not in calls else None}}
               for index, parts in sorted(texts.items())]
    return {"choices": choices}, None


@dataclass
class _Failure:
    member: str
    message: str
    status: int
    code: str | None
    original: BaseException | None = field(default=None, repr=False)


class Gateway:
    """Routes and upstreams of one config, the response cache and the budgets."""

    def __init__(self, config: GatewayConfig, clock=None):
        self.config = config
        cache = config.cache
        self.cache = ResponseCache(cache.max_bytes, cache.ttl_seconds, **({"clock": clock} if clock else {})) \
            if cache.enabled else None
        self.budgets = Budgets(config.budgets)

    # ---- names -----------------------------------------------------------------------------------------
    def member(self, name: str) -> Member:
        """``name`` as one member: ``<upstream>/<model>`` for a configured upstream, else a local model."""
        prefix, slash, model = name.partition("/")
        upstream = self.config.upstreams.get(prefix) if slash else None
        if upstream is not None and model:
            return Member(name, upstream.upstream_model(model), upstream)
        return Member(name, name)

    def resolve(self, name: str) -> Target:
        route: Route | None = self.config.routes.get(name)
        if route is not None:
            return Target(name, tuple(self.member(m) for m in route.members), route.fallback_on_invalid_json)
        return Target(name, (self.member(name),))

    def handles(self, name) -> bool:
        """Whether ``name`` is a route or ``<upstream>/<model>`` (else a local model the local routes serve)."""
        return isinstance(name, str) and (name in self.config.routes or not self.member(name).is_local)

    def listing(self) -> list[tuple[str, str]]:
        """(name, owner) of every upstream model of the mappings and every route (owner: upstream or "route")."""
        names = [(f"{upstream.name}/{model}", upstream.name)
                 for upstream in self.config.upstreams.values() for model in upstream.models]
        return names + [(route, "route") for route in self.config.routes]

    def scrub(self, text: str) -> str:
        return scrub(text, self.config.secrets())

    def metrics_text(self) -> str:
        """The gateway's own lines for ``/metrics`` (the budgets' spend; empty without budgets)."""
        return self.budgets.metrics_text()

    # ---- answering ---------------------------------------------------------------------------------------
    def run(self, path: str, body: dict, call_local: LocalCall, record: Recorder | None = None,
            native: dict | None = None) -> Answer:
        """Answer ``body`` (an OpenAI request to ``/v1<path>``, path "/chat/completions" ...) through its
        target's members; an APIError when none could (the last member's status, every member's reason).
        ``native``: the /v1/messages body ``body`` was translated from, which an Anthropic-format upstream
        gets as it is (its answer then in Anthropic's shapes: ``Answer.format``)."""
        target = self.resolve(str(body.get("model", "")))
        record = record or (lambda *args: None)
        cacheable = self.cache is not None and is_deterministic(body)
        if cacheable:
            for member in target.members:
                hit = self.cache.get(self._cache_key(path, body, native, member))
                if hit is not None:
                    return Answer(hit.model, body=hit.body, cache="hit", format=hit.format,
                                  stream=iter(hit.events) if hit.events is not None else None,
                                  content_type="application/json" if hit.events is None else "text/event-stream")
        failures: list[_Failure] = []
        for member in target.members:
            store = self._storer(self._cache_key(path, body, native, member)) if cacheable else None
            try:
                answer = self._answer(target, member, path, body, native, call_local, record, store)
            except UpstreamFailure as exc:
                failures.append(_Failure(member.name, exc.message, exc.status, exc.code, exc))
                continue
            except _LocalFailure as exc:
                failures.append(_Failure(member.name, exc.reason, exc.error.status, exc.error.code, exc.original))
                continue
            answer.cache = "miss" if cacheable else None
            return answer
        raise self._all_failed(target, failures)

    @staticmethod
    def _cache_key(path: str, body: dict, native: dict | None, member: Member) -> str:
        """An Anthropic upstream given the /v1/messages body as it is: keyed by that body (its answer is in
        Anthropic's shapes, unlike the same chat request's through /v1/chat/completions)."""
        if native is not None and member.upstream is not None and member.upstream.is_anthropic:
            return request_key(ANTHROPIC_PATH, native, member.name)
        return request_key(path, body, member.name)

    def _storer(self, key: str) -> Callable[[CachedAnswer], bool]:
        return lambda answer: self.cache.put(key, answer)

    def _all_failed(self, target: Target, failures: list[_Failure]) -> BaseException:
        last = failures[-1]
        if len(failures) == 1:
            if last.original is not None and not isinstance(last.original, (UpstreamFailure, _LocalFailure)):
                return last.original                    # one local model: its own error, unchanged
            return APIError(last.status, self.scrub(last.message), code=last.code)
        reasons = "; ".join(f"{f.member}: {f.message}" for f in failures)
        return APIError(last.status, self.scrub(f"every member of route '{target.label}' failed: {reasons}"),
                        code=last.code)

    def _answer(self, target: Target, member: Member, path: str, body: dict, native: dict | None,
                call_local: LocalCall, record: Recorder, store: Callable[[CachedAnswer], bool] | None) -> Answer:
        stream = bool(body.get("stream"))
        sent = dict(body, model=member.model)
        drop_usage_chunk = False
        if stream and path in USAGE_CHUNK_PATHS:                # ask for the usage, to count the tokens
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            drop_usage_chunk = not options.get("include_usage")
            sent["stream_options"] = dict(options, include_usage=True)

        def account(usage: tuple[int, int] | None) -> None:
            prompt, completion = usage or (0, 0)
            record(target.label, member.name, prompt, completion, member.cost(prompt, completion))

        if member.is_local:
            return self._local_answer(target, member, path, body, sent, call_local, account, store,
                                      drop_usage_chunk)
        if member.upstream.is_anthropic:
            return self._anthropic_answer(member, path, sent, native, account, store, drop_usage_chunk)
        try:
            response = upstream_calls.post(member.upstream, path, sent, stream)
        except UpstreamRejected as exc:              # the request itself is wrong: its answer, no fallback
            return Answer(member.name, body=exc.body, status=exc.status,
                          content_type=exc.content_type or "application/json")
        if not stream:
            return self._json_answer(member, response.json(), account, store)
        relay = StreamRelay(member.name, drop_usage_chunk, named_events=path == "/responses")
        return self._upstream_stream(member, relay, response.events(), response, account, store)

    def _local_answer(self, target: Target, member: Member, path: str, body: dict, sent: dict,
                      call_local: LocalCall, account, store, drop_usage_chunk: bool) -> Answer:
        try:
            local = call_local(member.model, sent)
        except Exception as exc:
            reason = local_fallback_reason(exc)
            if reason is None:
                raise
            raise _LocalFailure(reason, to_api_error(exc), exc) from None
        check_json = target.fallback_on_invalid_json and json_format(path, body) is not None
        if local.chunks is None:
            if check_json:
                self._check_json(invalid_json_reason(body, local.body, path))
            return self._json_answer(member, local.body, account, store)
        chunks, close = local.chunks, local.close
        if check_json:                     # the whole stream, checked before its first byte is sent
            chunks, close = self._checked_stream(path, body, local), None
        relay = StreamRelay(member.name, drop_usage_chunk, named_events=path == "/responses")
        events = ([line for line in chunk.split(b"\n") if line] for chunk in chunks)
        return Answer(member.name, stream=self._relay(relay, events, None, account, store), close=close,
                      content_type="text/event-stream")

    def _checked_stream(self, path: str, body: dict, local: LocalAnswer) -> list[bytes]:
        """A local stream read whole (the price of checking it: nothing is sent until it ends), returned when
        its answer satisfies the request's JSON format, else a _LocalFailure that moves the route on."""
        try:
            chunks = list(local.chunks)
        finally:
            if local.close is not None:
                local.close()
        answer, error = streamed_answer(path, chunks)
        self._check_json(f"the local stream failed: {error}" if error is not None
                         else invalid_json_reason(body, answer, path))
        return chunks

    @staticmethod
    def _check_json(reason: str | None) -> None:
        if reason is not None:
            raise _LocalFailure(reason, APIError(502, reason, code="invalid_json_answer"), None)

    def _anthropic_answer(self, member: Member, path: str, sent: dict, native: dict | None, account, store,
                          drop_usage_chunk: bool) -> Answer:
        """An Anthropic-format upstream: ``native`` (a /v1/messages body) as it is, or a chat completion
        translated (``openai_bridge``); anything else it cannot serve (an UpstreamFailure: the route moves on)."""
        upstream = member.upstream
        stream = bool(sent.get("stream"))
        if native is not None:
            request = dict(native, model=member.model)
        elif path == "/chat/completions":
            try:
                request = openai_bridge.messages_request(sent, upstream.default_max_tokens)
            except openai_bridge.Untranslatable as exc:
                raise UpstreamFailure(f"upstream '{upstream.name}' (Anthropic's Messages API) cannot serve this "
                                      f"request: {exc}", status=400, code="unsupported_by_upstream") from None
        else:
            raise UpstreamFailure(f"upstream '{upstream.name}' speaks Anthropic's Messages API: it answers "
                                  f"/v1/chat/completions and /v1/messages, not /v1{path}", status=400,
                                  code="unsupported_by_upstream")
        try:
            response = upstream_calls.post(upstream, ANTHROPIC_PATH, request, stream)
        except UpstreamRejected as exc:              # the request itself is wrong: its answer, no fallback
            if native is not None:
                return Answer(member.name, body=exc.body, status=exc.status, format="anthropic",
                              content_type=exc.content_type or "application/json")
            return Answer(member.name, status=exc.status, body=json.dumps(
                openai_bridge.error_from_anthropic(exc.body), ensure_ascii=False).encode("utf-8"))
        if native is not None:
            if not stream:
                return self._json_answer(member, response.json(), account, store, anthropic=True)
            return self._upstream_stream(member, AnthropicRelay(member.name), response.events(), response,
                                         account, store, format="anthropic")
        if not stream:
            message = response.json()
            completion = openai_bridge.error_from_anthropic(json.dumps(message).encode("utf-8")) \
                if message.get("type") == "error" else openai_bridge.completion_from_message(message, member.name)
            return self._json_answer(member, completion, account, store)
        relay = StreamRelay(member.name, drop_usage_chunk, named_events=False)
        events = chat_events_from_anthropic(response.events(), openai_bridge.ChunkTranslator(member.name))
        return self._upstream_stream(member, relay, events, response, account, store)

    def _upstream_stream(self, member: Member, relay, events: Iterator[list[bytes]], response, account, store,
                         format: str = "openai") -> Answer:
        """An upstream's stream, committed once its first event is framed (a failure before it moves on)."""
        try:
            first = next(e for e in (relay.frame(lines) for lines in events) if e is not None)
        except StopIteration:
            response.close()
            raise UpstreamFailure(f"upstream '{member.upstream.name}' ended the stream before its first event")
        except UpstreamFailure:
            response.close()
            raise
        return Answer(member.name, stream=self._relay(relay, events, first, account, store, format),
                      close=response.close, content_type="text/event-stream", format=format)

    def _json_answer(self, member: Member, payload: dict, account, store, anthropic: bool = False) -> Answer:
        if anthropic:                                  # an Anthropic message, passed through
            payload["model"] = member.name
            account(usage_of({"usage": openai_bridge.chat_usage(payload.get("usage"))}))
            failed = payload.get("type") == "error"
        else:
            rename_model(payload, member.name)
            account(usage_of(payload))
            failed = "error" in payload
        raw = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        format = "anthropic" if anthropic else "openai"
        if store is not None and not failed:
            store(CachedAnswer(member.name, body=raw, format=format))
        return Answer(member.name, body=raw, format=format)

    def _relay(self, relay, events: Iterator[list[bytes]], first: bytes | None, account, store,
               format: str = "openai") -> Iterator[bytes]:
        """The committed stream: ``first`` (already framed), then every event as it arrives; a failure or an
        end before the stream's own end is an error event. Usage is counted and the events cached at the end."""
        sent: list[bytes] = []
        try:
            if first is not None:
                sent.append(first)
                yield first
            try:
                for lines in events:
                    framed = relay.frame(lines)
                    if framed is not None:
                        sent.append(framed)
                        yield framed
                if not relay.finished:
                    raise UpstreamFailure(f"the stream of '{relay.model}' ended before it finished")
            except UpstreamFailure as exc:
                yield relay.error_event(APIError(exc.status, self.scrub(exc.message), code=exc.code))
        finally:
            account(relay.usage)
            if store is not None and relay.finished and not relay.failed:
                store(CachedAnswer(relay.model, events=tuple(sent), format=format))


class _LocalFailure(Exception):
    """A local member's error that moves the route on."""

    def __init__(self, reason: str, error: APIError, original: BaseException | None):
        super().__init__(reason)
        self.reason, self.error, self.original = reason, error, original
