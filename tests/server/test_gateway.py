"""The gateway over HTTP: a gateway server in front of the local engine, a second real localllm server as the
``real`` upstream, and a fault-injecting upstream (``faulty``) that stalls, answers 429 or 500, returns a body
that is not JSON, or cuts a stream after its first chunk; ``closed`` is a port nobody listens on.

Every fallback trigger moves to the next member; a cut stream ends with an error event; the keys never show in
logs or answers; the real ``openai`` SDK works through routes; cache hits and misses; costs in /metrics; the
models listings.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import SMOLLM2, RawHTTP, RunningServer, free_port

REAL_KEY = "sk-real-upstream-secret-1234"
FAULT_KEY = "sk-faulty-upstream-secret-5678"
READ_TIMEOUT = 0.5
STALL_SECONDS = 2.0
REAL_PRICES = (1000.0, 2000.0)         # per million prompt / completion tokens

OK_ANSWER = "fallback answer"
HELD_RELEASED = threading.Event()
HELD_SECONDS = 10.0


def ok_completion(model: str) -> dict:
    return {"id": "chatcmpl-ok", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": OK_ANSWER},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def chunk(model: str, delta: dict, finish_reason=None) -> bytes:
    payload = {"id": "chatcmpl-ok", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


def anthropic_event(kind: str, **fields) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def ok_message(model: str) -> dict:
    return {"id": "msg_ok", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": OK_ANSWER}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 2}}


class FaultyUpstream(BaseHTTPRequestHandler):
    """Behaves as the request's model says: ``ok``, ``stall``, ``busy`` (429), ``broken`` (500, echoing the
    Authorization header), ``garbage`` (200, not JSON), ``cut`` (a stream cut after its first chunk).
    On /v1/messages it speaks Anthropic's Messages API, with ``overloaded`` (529) besides."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "body": body, "authorization": self.headers.get("Authorization"),
                          "x-api-key": self.headers.get("x-api-key"),
                          "anthropic-version": self.headers.get("anthropic-version")})
        if self.path.startswith("/v1/messages"):
            return self.anthropic(body)
        model = body["model"]
        if model == "stall":
            time.sleep(STALL_SECONDS)
            return self.send(200, b"{}")
        if model == "busy":
            return self.send(429, b'{"error": {"message": "slow down"}}')
        if model == "broken":
            return self.send(500, f"internal failure, your header was {self.headers.get('Authorization')}".encode())
        if model == "garbage":
            return self.send(200, b"<html>not json</html>", "text/html")
        if model == "reject":
            error = {"message": f"bad request for {self.headers.get('Authorization')}", "type": "invalid_request_error"}
            return self.send(400, json.dumps({"error": error}).encode())
        if model == "held":                   # the second chunk waits until the client has the first
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(chunk(model, {"role": "assistant", "content": "first"}))
            self.wfile.flush()
            released = HELD_RELEASED.wait(HELD_SECONDS)
            self.wfile.write(chunk(model, {"content": "released" if released else "held back"}, "stop"))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        if model == "cut":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(chunk(model, {"role": "assistant", "content": "first"}))
            self.wfile.flush()
            self.close_connection = True
            return
        if body.get("stream"):
            events = [chunk(model, {"role": "assistant", "content": OK_ANSWER}), chunk(model, {}, "stop")]
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "chatcmpl-ok", "object": "chat.completion.chunk", "created": 1, "model": model,
                         "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
                events.append(f"data: {json.dumps(usage)}\n\n".encode())
            return self.send(200, b"".join(events) + b"data: [DONE]\n\n", "text/event-stream")
        return self.send(200, json.dumps(ok_completion(model)).encode())

    def anthropic(self, body: dict):
        model = body["model"]
        error = {"busy": (429, "rate_limit_error"), "broken": (500, "api_error"),
                 "overloaded": (529, "overloaded_error"), "reject": (400, "invalid_request_error")}.get(model)
        if error is not None:
            status, kind = error
            message = f"{kind} for {self.headers.get('x-api-key')}"             # echoes the key
            return self.send(status, json.dumps({"type": "error", "error": {"type": kind, "message": message}})
                             .encode())
        if self.path == "/v1/messages/count_tokens":
            return self.send(200, b'{"input_tokens": 3}')
        if not body.get("stream"):
            return self.send(200, json.dumps(ok_message(model)).encode())
        start = anthropic_event("message_start", message=dict(ok_message(model), content=[], stop_reason=None,
                                                              usage={"input_tokens": 3, "output_tokens": 0}))
        events = [start, anthropic_event("ping"),
                  anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
                  anthropic_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "first"})]
        if model == "cut":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"".join(events))
            self.wfile.flush()
            self.close_connection = True
            return
        events += [anthropic_event("content_block_stop", index=0),
                   anthropic_event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                                   usage={"output_tokens": 2}),
                   anthropic_event("message_stop")]
        return self.send(200, b"".join(events), "text/event-stream")

    def send(self, status: int, payload: bytes, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def faulty_port():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FaultyUpstream)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


GATEWAY_TOML = """
[upstreams.real]
base_url = "{real}/v1"
api_key_env = "GATEWAY_TEST_REAL_KEY"
input_price_per_million = {price_in}
output_price_per_million = {price_out}
models = {{ "smol" = "{smollm2}" }}

[upstreams.faulty]
base_url = "http://127.0.0.1:{faulty}/v1"
api_key_env = "GATEWAY_TEST_FAULT_KEY"
read_timeout = {read_timeout}
input_price_per_million = 100
output_price_per_million = 500
models = ["ok", "stall", "busy", "broken", "garbage", "cut", "reject", "held"]

[upstreams.closed]
base_url = "http://127.0.0.1:{closed}/v1"
connect_timeout = 1

[upstreams.claude]                     # the keyed localllm server, through its /v1/messages
format = "anthropic"
base_url = "{keyed}"
api_key_env = "GATEWAY_TEST_CLAUDE_KEY"
input_price_per_million = {price_in}
output_price_per_million = {price_out}
models = {{ "smol" = "{smollm2}" }}

[upstreams.faulty-claude]
format = "anthropic"
base_url = "http://127.0.0.1:{faulty}"
api_key_env = "GATEWAY_TEST_FAULT_KEY"
anthropic_version = "2023-06-01"
read_timeout = {read_timeout}
models = ["ok", "busy", "broken", "overloaded", "cut", "reject"]

[routes]
refused = ["closed/any", "real/smol"]
stalls = ["faulty/stall", "faulty/ok"]
busy = ["faulty/busy", "faulty/ok"]
broken = ["faulty/broken", "faulty/ok"]
garbage = ["faulty/garbage", "faulty/ok"]
cut = ["faulty/cut", "faulty/ok"]
local-first = ["{smollm2}", "faulty/ok"]
all-fail = ["faulty/busy", "faulty/broken"]
to-real = ["faulty/broken", "real/smol"]
to-claude = ["faulty-claude/busy", "faulty-claude/overloaded", "claude/smol"]
claude-then-openai = ["faulty-claude/broken", "faulty/ok"]
local-then-claude = ["{smollm2}", "faulty-claude/ok"]
claude-cut = ["faulty-claude/cut", "faulty/ok"]
claude-or-openai = ["faulty-claude/ok", "faulty/ok"]

[routes.strict-json]
members = ["{smollm2}", "faulty/ok"]
fallback_on_invalid_json = true

[routes.strict-json-real]
members = ["{smollm2}", "real/smol"]
fallback_on_invalid_json = true

[cache]
enabled = true
max_bytes = 1000000
ttl_seconds = 600
"""


@pytest.fixture(scope="module")
def gateway(engine, server, keyed_server, faulty_port, tmp_path_factory):
    """A gateway server (its own app on the session engine) and its RawHTTP; the keys in the environment.
    The ``claude`` upstream is the session's keyed server (its key: conftest's API_KEY) as an Anthropic API."""
    from localllm_server.app import Settings, create_app

    from .conftest import API_KEY

    path = tmp_path_factory.mktemp("gateway") / "gateway.toml"
    path.write_text(GATEWAY_TOML.format(real=server, keyed=keyed_server, faulty=faulty_port, closed=free_port(),
                                        smollm2=SMOLLM2, read_timeout=READ_TIMEOUT, price_in=REAL_PRICES[0],
                                        price_out=REAL_PRICES[1]))
    patch = pytest.MonkeyPatch()
    patch.setenv("GATEWAY_TEST_REAL_KEY", REAL_KEY)
    patch.setenv("GATEWAY_TEST_FAULT_KEY", FAULT_KEY)
    patch.setenv("GATEWAY_TEST_CLAUDE_KEY", API_KEY)
    settings = Settings(threads=8)
    settings.gateway = str(path)
    running = RunningServer(create_app(engine, settings), settings)
    yield running.url
    running.close()
    patch.undo()


@pytest.fixture(scope="module")
def gw(gateway) -> RawHTTP:
    return RawHTTP(gateway)


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **extra}


def no_secret(text: str) -> None:
    assert REAL_KEY not in text and FAULT_KEY not in text


def sse_payloads(body: bytes) -> list:
    """The data of every SSE event ("[DONE]" as a string)."""
    payloads = []
    for event in body.decode().split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


# ---- fallback triggers --------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["stalls", "busy", "broken", "garbage"])
def test_each_upstream_failure_moves_to_the_next_member(gw, route, caplog):
    caplog.set_level(logging.DEBUG)
    response = gw.post("/v1/chat/completions", chat_body(route))
    assert response.status == 200, response.body
    assert response.headers["x-localllm-model"] == "faulty/ok"
    answer = response.json()
    assert answer["model"] == "faulty/ok"
    assert answer["choices"][0]["message"]["content"] == OK_ANSWER
    no_secret(caplog.text)


def test_a_refused_connection_moves_to_the_real_localllm_upstream(gw):
    response = gw.post("/v1/chat/completions", chat_body("refused", max_tokens=3))
    assert response.status == 200, response.body
    assert response.headers["x-localllm-model"] == "real/smol"
    answer = response.json()
    assert answer["model"] == "real/smol"
    assert answer["usage"]["completion_tokens"] == 3


def test_the_upstream_gets_its_own_model_name_and_its_key(gw):
    FaultyUpstream.seen.clear()
    gw.post("/v1/chat/completions", chat_body("faulty/ok", temperature=0.7, logprobs=True,
                                                tools=[{"type": "function", "function": {"name": "f"}}]))
    [seen] = FaultyUpstream.seen
    assert seen["path"] == "/v1/chat/completions"
    assert seen["authorization"] == f"Bearer {FAULT_KEY}"
    assert seen["body"]["model"] == "ok"
    assert seen["body"]["logprobs"] is True and seen["body"]["tools"][0]["function"]["name"] == "f"


def test_a_prompt_too_long_for_the_local_model_moves_on(gw):
    long_prompt = "word " * 9000                      # past SmolLM2's 8192-token context
    response = gw.post("/v1/chat/completions",
                       {"model": "local-first", "messages": [{"role": "user", "content": long_prompt}]})
    assert response.status == 200, response.body
    assert response.json()["model"] == "faulty/ok"


def test_the_local_model_answers_first_when_it_can(gw):
    response = gw.post("/v1/chat/completions", chat_body("local-first", max_tokens=2))
    assert response.status == 200
    assert response.headers["x-localllm-model"] == SMOLLM2
    assert response.json()["model"] == SMOLLM2


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "point", "schema": {
    "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
    "required": ["x", "y"]}}}


def test_an_invalid_local_json_answer_moves_on_only_where_the_route_opts_in(gw):
    cut_short = chat_body("strict-json", max_tokens=3, response_format=SCHEMA_FORMAT)   # 3 tokens: no whole object
    assert gw.post("/v1/chat/completions", cut_short).json()["model"] == "faulty/ok"
    kept = gw.post("/v1/chat/completions", dict(cut_short, model="local-first")).json()
    assert kept["model"] == SMOLLM2                    # local-first does not check the answer
    with pytest.raises(ValueError):
        json.loads(kept["choices"][0]["message"]["content"])


def test_a_local_stream_is_checked_whole_before_it_is_sent_where_the_route_opts_in(gw):
    cut_short = chat_body("strict-json", max_tokens=3, response_format=SCHEMA_FORMAT, stream=True)
    moved = gw.post("/v1/chat/completions", cut_short)
    assert moved.status == 200 and moved.headers["x-localllm-model"] == "faulty/ok"
    assert {p["model"] for p in sse_payloads(moved.body)[:-1]} == {"faulty/ok"}    # no local byte was sent
    whole = dict(cut_short, max_tokens=40, temperature=0)
    checked = gw.post("/v1/chat/completions", whole)
    unchecked = gw.post("/v1/chat/completions", dict(whole, model="local-first"))
    assert checked.headers["x-localllm-model"] == unchecked.headers["x-localllm-model"] == SMOLLM2
    checked_events, unchecked_events = sse_payloads(checked.body), sse_payloads(unchecked.body)
    assert len(checked_events) == len(unchecked_events) > 3                 # replayed event by event

    def text(events):
        return "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"])
    assert text(checked_events) == text(unchecked_events)
    point = json.loads(text(checked_events))
    assert set(point) == {"x", "y"}


@pytest.mark.parametrize("stream", [False, True])
def test_an_invalid_local_responses_answer_moves_on_where_the_route_opts_in(gw, stream):
    text_format = {"format": {"type": "json_schema", "name": "point", "schema": SCHEMA_FORMAT["json_schema"]["schema"]}}
    body = {"model": "strict-json-real", "input": "A point?", "max_output_tokens": 3, "text": text_format,
            "stream": stream}
    response = gw.post("/v1/responses", body)
    assert response.status == 200, response.body
    assert response.headers["x-localllm-model"] == "real/smol"        # the local answer was cut: not JSON
    final = sse_payloads(response.body)[-1]["response"] if stream else response.json()
    assert final["model"] == "real/smol"
    whole = gw.post("/v1/responses", dict(body, max_output_tokens=40, temperature=0))
    assert whole.headers["x-localllm-model"] == SMOLLM2
    final = sse_payloads(whole.body)[-1]["response"] if stream else whole.json()
    [message] = [item for item in final["output"] if item["type"] == "message"]
    assert set(json.loads(message["content"][0]["text"])) == {"x", "y"}


def test_when_every_member_fails_the_error_names_each_and_no_key(gw, caplog):
    caplog.set_level(logging.DEBUG)
    response = gw.post("/v1/chat/completions", chat_body("all-fail"))
    assert response.status == 502
    message = response.json()["error"]["message"]
    assert "faulty/busy" in message and "faulty/broken" in message and "HTTP 429" in message
    assert "***" in message                           # the echoed key, scrubbed
    no_secret(response.body.decode())
    no_secret(caplog.text)


def test_an_upstream_rejection_is_passed_back_without_fallback_or_key(gw):
    response = gw.post("/v1/chat/completions", chat_body("faulty/reject"))
    assert response.status == 400
    assert response.headers["x-localllm-model"] == "faulty/reject"
    assert response.json()["error"]["type"] == "invalid_request_error"
    no_secret(response.body.decode())


def test_a_direct_upstream_timeout_is_a_504(gw):
    response = gw.post("/v1/chat/completions", chat_body("faulty/stall"))
    assert response.status == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


# ---- streams ----------------------------------------------------------------------------------------

def test_a_stream_failing_before_its_first_event_moves_on(gw):
    response = gw.post("/v1/chat/completions", chat_body("stalls", stream=True))
    assert response.status == 200
    assert response.headers["x-localllm-model"] == "faulty/ok"
    payloads = sse_payloads(response.body)
    assert payloads[-1] == "[DONE]"
    assert [p["model"] for p in payloads[:-1]] == ["faulty/ok"] * 2
    assert all("usage" not in p for p in payloads[:-1])      # asked upstream for the usage, not shown


def test_a_stream_cut_after_its_first_chunk_ends_with_an_error_event_never_restarted(gw):
    FaultyUpstream.seen.clear()
    response = gw.post("/v1/chat/completions", chat_body("cut", stream=True))
    assert response.status == 200
    assert response.headers["x-localllm-model"] == "faulty/cut"
    first, error, done = sse_payloads(response.body)
    assert first["model"] == "faulty/cut" and first["choices"][0]["delta"]["content"] == "first"
    assert error["error"]["code"] == "upstream_failed" and "ended before it finished" in error["error"]["message"]
    assert done == "[DONE]"
    assert [seen["body"]["model"] for seen in FaultyUpstream.seen] == ["cut"]       # never sent to faulty/ok


def test_a_stream_is_passed_on_event_by_event_not_buffered(gateway):
    import http.client
    from urllib.parse import urlsplit

    HELD_RELEASED.clear()
    url = urlsplit(gateway)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(chat_body("faulty/held", stream=True)),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.getheader("X-Localllm-Model") == "faulty/held"
    first = response.readline()                        # arrives while the upstream still holds the rest
    assert json.loads(first[5:])["choices"][0]["delta"]["content"] == "first"
    HELD_RELEASED.set()
    rest = sse_payloads(response.read())
    connection.close()
    assert rest[0]["choices"][0]["delta"]["content"] == "released" and rest[-1] == "[DONE]"


def test_a_stream_from_the_real_upstream_is_passed_through_with_its_model_renamed(gw):
    body = chat_body("to-real", stream=True, max_tokens=4, temperature=0,
                     messages=[{"role": "user", "content": "Count from one."}], stream_options={"include_usage": True})
    response = gw.post("/v1/chat/completions", body)
    assert response.headers["x-localllm-model"] == "real/smol"
    payloads = sse_payloads(response.body)
    assert payloads[-1] == "[DONE]"
    assert {p["model"] for p in payloads[:-1]} == {"real/smol"}
    assert payloads[-2]["usage"]["completion_tokens"] == 4


# ---- the openai SDK ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdk(gateway):
    from openai import OpenAI

    return OpenAI(base_url=gateway + "/v1/", api_key="unused", max_retries=0, timeout=120)


def test_openai_sdk_chat_through_a_route(sdk, server):
    from openai import OpenAI

    raw = sdk.chat.completions.with_raw_response.create(
        model="to-real", messages=[{"role": "user", "content": "Name a color."}], max_tokens=5, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-localllm-model"] == "real/smol"
    assert completion.model == "real/smol"
    direct = OpenAI(base_url=server + "/v1/", api_key="x", max_retries=0).chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "Name a color."}], max_tokens=5, temperature=0)
    assert completion.choices[0].message.content == direct.choices[0].message.content


def test_openai_sdk_streaming_through_a_route(sdk):
    stream = sdk.chat.completions.create(model="to-real", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=3, stream=True)
    chunks = list(stream)
    assert {c.model for c in chunks} == {"real/smol"}
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1


def test_openai_sdk_tools_through_a_route(sdk):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    completion = sdk.chat.completions.create(
        model="to-real", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        tool_choice="required", max_tokens=30)
    assert completion.model == "real/smol"
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)


# ---- cache and costs ----------------------------------------------------------------------------------

def metric(gw, name: str, route: str, model: str) -> float:
    prefix = f'{name}{{route="{route}",model="{model}"}} '
    for line in gw.get("/metrics").body.decode().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def test_deterministic_requests_are_cached_and_costed(gw):
    body = chat_body("real/smol", max_tokens=3, temperature=0, messages=[{"role": "user", "content": "Cache me"}])
    cost_before = metric(gw, "localllm_gateway_cost_total", "real/smol", "real/smol")
    hits_before = metric(gw, "localllm_gateway_cache_hits_total", "real/smol", "real/smol")
    first = gw.post("/v1/chat/completions", body)
    second = gw.post("/v1/chat/completions", body)
    assert first.headers["x-localllm-cache"] == "miss" and second.headers["x-localllm-cache"] == "hit"
    assert second.body == first.body
    usage = first.json()["usage"]
    expected = (usage["prompt_tokens"] * REAL_PRICES[0] + usage["completion_tokens"] * REAL_PRICES[1]) / 1e6
    cost = metric(gw, "localllm_gateway_cost_total", "real/smol", "real/smol") - cost_before
    assert cost == pytest.approx(expected, abs=1e-5)          # the hit cost nothing
    assert metric(gw, "localllm_gateway_cache_hits_total", "real/smol", "real/smol") == hits_before + 1
    other = gw.post("/v1/chat/completions", dict(body, max_tokens=2))
    assert other.headers["x-localllm-cache"] == "miss"
    sampled = gw.post("/v1/chat/completions", dict(body, temperature=0.8))
    assert "x-localllm-cache" not in sampled.headers


def test_streams_are_cached_as_their_events(gw):
    body = chat_body("local-first", max_tokens=3, seed=7, stream=True)
    first = gw.post("/v1/chat/completions", body)
    second = gw.post("/v1/chat/completions", body)
    assert (first.headers["x-localllm-cache"], second.headers["x-localllm-cache"]) == ("miss", "hit")
    assert second.headers["x-localllm-model"] == SMOLLM2
    assert second.body == first.body and sse_payloads(first.body)[-1] == "[DONE]"


def test_route_tokens_in_metrics(gw):
    before = metric(gw, "localllm_gateway_completion_tokens_total", "busy", "faulty/ok")
    gw.post("/v1/chat/completions", chat_body("busy"))
    assert metric(gw, "localllm_gateway_completion_tokens_total", "busy", "faulty/ok") == before + 2
    assert metric(gw, "localllm_gateway_requests_total", "busy", "faulty/ok") >= 1


# ---- listings and the local path ----------------------------------------------------------------------

def test_models_listings_show_local_upstream_models_and_routes(gw):
    ids = {m["id"]: m["owned_by"] for m in gw.get("/v1/models").json()["data"]}
    assert ids[SMOLLM2] == "library" and ids["real/smol"] == "real" and ids["faulty/cut"] == "faulty"
    assert ids["strict-json"] == "route" and ids["local-first"] == "route"
    assert gw.get("/v1/models/real/smol").json() == {"id": "real/smol", "object": "model", "created": 0,
                                                      "owned_by": "real"}
    assert gw.get("/v1/models/cut").json()["owned_by"] == "route"
    assert gw.get(f"/v1/models/{SMOLLM2}").json()["owned_by"] == "library"
    names = {m["name"] for m in gw.get("/api/tags").json()["models"]}
    assert {SMOLLM2, "real/smol", "faulty/ok", "strict-json"} <= names


def test_local_errors_are_unchanged_through_the_gateway(gw):
    missing = gw.post("/v1/chat/completions", chat_body("no-such-model:1b"))
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"
    no_model = gw.post("/v1/chat/completions", {"messages": []})
    assert no_model.status == 400 and no_model.json()["error"]["param"] == "model"


def test_embeddings_and_responses_through_the_gateway(gw):
    embedded = gw.post("/v1/embeddings", {"model": "all-minilm", "input": "hello"})
    assert embedded.status == 200 and embedded.headers["x-localllm-model"] == "all-minilm"
    assert len(embedded.json()["data"][0]["embedding"]) == 384
    response = gw.post("/v1/responses", {"model": "to-real", "input": "Hi", "max_output_tokens": 3, "stream": True})
    assert response.headers["x-localllm-model"] == "real/smol"
    events = sse_payloads(response.body)
    assert events[0]["response"]["model"] == "real/smol"
    assert events[-1]["type"] == "response.incomplete"           # max_output_tokens reached
    assert events[-1]["response"]["model"] == "real/smol" and events[-1]["response"]["usage"]["output_tokens"] == 3


# ---- the CLI ----------------------------------------------------------------------------------------

def test_usage_command_prints_the_gateways_accounting(gateway, gw, monkeypatch, capsys):
    from localllm import cli

    gw.post("/v1/chat/completions", chat_body("garbage"))
    monkeypatch.setenv("LOCALLLM_HOST", gateway)
    assert cli.main(["usage", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["budgets"] == []                                   # this gateway has none
    rows = {(row["route"], row["model"]): row for row in printed["routes"]}
    row = rows[("garbage", "faulty/ok")]
    assert row["requests"] >= 1 and row["completion"] == 2 * row["requests"] and row["prompt"] == 3 * row["requests"]
    assert row["cost"] == pytest.approx(row["requests"] * (3 * 100 + 2 * 500) / 1e6)
    assert cli.main(["usage"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ROUTE", "MODEL", "REQUESTS", "PROMPT", "TOKENS", "COMPLETION", "TOKENS", "COST"]
    assert any(line.split()[:2] == ["garbage", "faulty/ok"] for line in table)
    assert table[-1].startswith("TOTAL")


def test_serve_refuses_a_bad_gateway_file_before_binding(tmp_path, monkeypatch, capsys):
    from localllm import cli

    monkeypatch.setenv("LOCALLLM_GATEWAY", "")
    path = tmp_path / "gateway.toml"
    path.write_text('[upstreams.hosted]\nbase_url = "https://api.example.com/v1"\napi_key_env = "UNSET_GW_KEY"\n')
    monkeypatch.delenv("UNSET_GW_KEY", raising=False)
    assert cli.main(["serve", "--gateway", str(path)]) == 1
    assert f"{path}: upstreams.hosted.api_key_env: the environment variable UNSET_GW_KEY is not set" in \
        capsys.readouterr().err
