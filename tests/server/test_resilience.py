"""Hard to break under load: a disconnect storm, the bounded queue, request timeouts, slow clients, graceful shutdown.

Raw sockets on 127.0.0.1 against real waitress servers (and real ``localllm serve`` processes for the
shutdown), with the real SmolLM2 and greedy decoding, so every text that completes can be compared with
the same request's text from a quiet server. Waits are bounded; nothing asserts a speed.
"""
from __future__ import annotations

import gc
import http.client
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import pytest

from .conftest import SMOLLM2, free_port, run_app

pytestmark = pytest.mark.real_model

NO_END_OF_TEXT = {"0": -100, "2": -100}     # SmolLM2's end tokens banned: only max_tokens ends a completion
COUNTING = "1, 2, 3, 4, 5,"                  # a raw prompt greedy SmolLM2 continues past 600 tokens (checked)
WAIT = 300                                   # generous bound on any wait for the server (2 cores, shared)
NUM_CTX = 1024                               # the context of this module's engines
ENDLESS = 1000                               # max_tokens of a generation no test waits for


# ---- raw HTTP over sockets -------------------------------------------------------------------------------

def send(port: int, method: str, path: str, body: dict | None = None, headers: dict | None = None,
         rcvbuf: int | None = None) -> socket.socket:
    """A socket on which one request was sent (``Connection: close``: the server closes it after the answer)."""
    data = b"" if body is None else json.dumps(body).encode()
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)    # before connect: the window stays small
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             "Content-Type: application/json", f"Content-Length: {len(data)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    return sock


def start_stream(port: int, path: str, body: dict, **kwargs) -> tuple[socket.socket, bytes]:
    """Send a streaming request and read its status line and headers (sent with the first event): a 200."""
    sock = send(port, "POST", path, body, **kwargs)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, head
        head += byte
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock, head


def read_to_end(sock: socket.socket) -> bytes:
    received = []
    with sock:
        while data := sock.recv(65536):
            received.append(data)
    return b"".join(received)


class Response:
    def __init__(self, raw: bytes):
        class Wire:
            def makefile(self, mode):
                return io.BytesIO(raw)
        response = http.client.HTTPResponse(Wire())
        response.begin()
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.body = response.read()

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: dict | None = None, **kwargs) -> Response:
    return Response(read_to_end(send(port, method, path, body, **kwargs)))


def sse_payloads(body: bytes) -> list:
    """The events of an SSE body that ends with ``data: [DONE]`` (every event a ``data:`` line)."""
    events = body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""], body[-300:]
    assert all(e.startswith(b"data: {") for e in events[:-2]), body[:300]
    return [json.loads(e[len(b"data: "):]) for e in events[:-2]]


def ndjson_lines(body: bytes) -> list[dict]:
    assert body.endswith(b"\n"), body[-300:]
    return [json.loads(line) for line in body.splitlines()]


def completion_body(prompt: str, max_tokens: int, stream: bool = True, **extra) -> dict:
    return {"model": SMOLLM2, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            **extra}


def generate_body(prompt: str, num_predict: int, stream: bool = True) -> dict:
    return {"model": SMOLLM2, "prompt": prompt, "raw": True, "stream": stream,
            "options": {"num_predict": num_predict, "temperature": 0}}


def sse_text(response: Response) -> tuple[str, str | None]:
    """(text, finish_reason) of a streamed completion that ended normally."""
    assert response.status == 200 and response.headers["content-type"] == "text/event-stream"
    chunks = sse_payloads(response.body)
    assert all("error" not in chunk for chunk in chunks), chunks[-1]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def ndjson_text(response: Response) -> tuple[str, str | None]:
    """(response text, done_reason) of a streamed /api/generate that ended normally."""
    assert response.status == 200 and response.headers["content-type"] == "application/x-ndjson"
    lines = ndjson_lines(response.body)
    assert all("error" not in line for line in lines), lines[-1]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    return "".join(line["response"] for line in lines), lines[-1]["done_reason"]


def wait_until(condition, what: str, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def engine_idle(engine) -> bool:
    return all(s["active"] == s["pending"] == s["sequences"] == 0 for s in engine.stats().values())


# ---- the engines and servers of this module ----------------------------------------------------------------

def make_engine(server_store, **settings):
    from localllm.engine import Engine, EngineSettings

    return Engine(EngineSettings(keep_alive=600, num_ctx=NUM_CTX, **settings), store=server_store)


@pytest.fixture(scope="module")
def storm_engine(server_store):
    engine = make_engine(server_store, n_slots=8, max_queue=64)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def storm_port(storm_engine):
    """A server with as many threads as ``localllm serve`` gives this engine (every queued request has one)."""
    from localllm_server.server import threads_for

    running = run_app(storm_engine, threads=threads_for(storm_engine.settings))
    yield int(running.port)
    running.close()


# ---- disconnect storm ------------------------------------------------------------------------------------

STORM_CLIENTS = 64
STORM_TOKENS = 4


def storm_request(i: int) -> tuple[str, dict]:
    """Client ``i``'s request: even ones stream SSE completions, odd ones NDJSON /api/generate."""
    prompt = f"{i} times {i + 1} is"
    if i % 2 == 0:
        return "/v1/completions", completion_body(prompt, STORM_TOKENS, logit_bias=NO_END_OF_TEXT)
    return "/api/generate", generate_body(prompt, STORM_TOKENS)


def storm_client(port: int, i: int, leave_after: int | None) -> tuple[str, str | None] | None:
    """Run client ``i``: read its whole stream (its text, finish reason), or close the connection after
    ``leave_after`` bytes of the answer (0: right after sending the request) and return None."""
    path, body = storm_request(i)
    sock = send(port, "POST", path, body)
    if leave_after is None:
        response = Response(read_to_end(sock))
        return sse_text(response) if path == "/v1/completions" else ndjson_text(response)
    with sock:
        received = 0
        while received < leave_after and (data := sock.recv(min(4096, leave_after - received))):
            received += len(data)
    return None


def run_storm(port: int, leave_after: dict[int, int]) -> list:
    with ThreadPoolExecutor(STORM_CLIENTS) as pool:        # the pool's threads are joined on leaving
        return list(pool.map(lambda i: storm_client(port, i, leave_after.get(i)), range(STORM_CLIENTS)))


def test_disconnect_storm_leaves_nothing_behind(storm_engine, storm_port):
    import psutil

    quiet = run_storm(storm_port, {})                    # warm-up: every stream completes; the reference texts
    assert all(text and reason in ("length", "stop") for text, reason in quiet)
    wait_until(lambda: engine_idle(storm_engine), "the engine is idle after the warm-up")
    gc.collect()
    process = psutil.Process()
    rss_before, threads_before = process.memory_info().rss, process.num_threads()     # OS threads, numba's too

    rng = random.Random(19)
    leaving = rng.sample(range(STORM_CLIENTS), STORM_CLIENTS // 2)
    # Close right after sending, after the status line, or at any byte of the stream up to its usual length.
    leave_after = {i: rng.choice([0, 1, rng.randrange(1, 200 * STORM_TOKENS)]) for i in leaving}
    stormy = run_storm(storm_port, leave_after)

    for i, result in enumerate(stormy):
        if i in leave_after:
            assert result is None
        else:
            assert result == quiet[i], f"client {i} got a different stream in the storm"
    wait_until(lambda: engine_idle(storm_engine), "every request of the storm has left the engine")
    [stats] = storm_engine.stats().values()
    assert stats == {"active": 0, "pending": 0, "sequences": 0, "free_slots": storm_engine.settings.n_slots}
    wait_until(lambda: process.num_threads() == threads_before, "the thread count is back")
    gc.collect()
    rss_after = process.memory_info().rss
    assert abs(rss_after - rss_before) <= 0.10 * rss_before, (rss_before, rss_after)
    assert storm_client(storm_port, leaving[0], None) == quiet[leaving[0]]     # and it still answers the same


# ---- bounded queue under a burst ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_queue(server_store):
    """An engine with one slot and two places in its queue, served with the threads serve() would give it."""
    from localllm_server.server import threads_for

    engine = make_engine(server_store, n_slots=1, max_queue=2)
    running = run_app(engine, threads=threads_for(engine.settings))
    yield engine, int(running.port)
    running.close()
    engine.close()


def burst_request(i: int) -> tuple[str, dict]:
    prompt = f"The {i}th word is"
    if i % 2 == 0:
        return "/v1/completions", completion_body(prompt, 4, stream=False)
    return "/api/generate", generate_body(prompt, 4, stream=False)


def test_a_burst_past_the_queue_gets_503_at_once_and_the_admitted_complete(small_queue):
    engine, port = small_queue
    blocker, _ = start_stream(port, "/v1/completions", completion_body(COUNTING, ENDLESS, logit_bias=NO_END_OF_TEXT))
    wait_until(lambda: engine.stats()[SMOLLM2]["active"] == 1, "the blocker is decoding")

    bound = engine.settings.max_queue
    n_burst = 10 * bound
    with ThreadPoolExecutor(n_burst) as pool:
        futures = [pool.submit(request, port, "POST", *burst_request(i)) for i in range(n_burst)]
        # Nothing leaves the queue while the blocker holds the slot: exactly the excess is answered now.
        deadline = time.monotonic() + WAIT
        while sum(f.done() for f in futures) < n_burst - bound and time.monotonic() < deadline:
            wait(futures, timeout=0.1, return_when=FIRST_COMPLETED)
        answered = [i for i, f in enumerate(futures) if f.done()]
        assert len(answered) == n_burst - bound
        assert engine.stats()[SMOLLM2]["pending"] == bound
        for i in answered:
            response = futures[i].result()
            assert response.status == 503
            assert response.headers["retry-after"] == "1"
            assert response.headers["content-type"].startswith("application/json")
            message = "server busy, please try again.  maximum pending requests exceeded"
            if burst_request(i)[0] == "/v1/completions":
                assert response.json() == {"error": {"message": message, "type": "api_error", "param": None,
                                                     "code": "server_busy"}}
            else:
                assert response.json() == {"error": message}
        blocker.close()                                      # the slot frees: the queued ones run
        admitted = {i: futures[i].result(timeout=WAIT) for i in range(n_burst) if i not in answered}
    for i, response in admitted.items():
        assert response.status == 200
        alone = request(port, "POST", *burst_request(i))     # the same request on a quiet server
        assert alone.status == 200
        assert response.json()["choices" if i % 2 == 0 else "response"] == \
            alone.json()["choices" if i % 2 == 0 else "response"]
    wait_until(lambda: engine_idle(engine), "the engine is idle")


# ---- per-request timeout -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timeout_server(server_store):
    """A server whose engine stops every request after 1 s (LOCALLLM_REQUEST_TIMEOUT=1)."""
    engine = make_engine(server_store, n_slots=2, max_queue=4, request_timeout=1.0)
    running = run_app(engine, threads=8)
    yield engine, int(running.port)
    running.close()
    engine.close()


def test_request_timeout_ends_streams_with_an_error_event_and_frees_the_slot(timeout_server):
    engine, port = timeout_server
    sse, sse_head = start_stream(port, "/v1/completions", completion_body(COUNTING, ENDLESS,
                                                                          logit_bias=NO_END_OF_TEXT))
    ndjson, ndjson_head = start_stream(port, "/api/generate", generate_body(COUNTING, ENDLESS))
    sse_response = Response(sse_head + read_to_end(sse))
    ndjson_response = Response(ndjson_head + read_to_end(ndjson))

    *chunks, error = sse_payloads(sse_response.body)
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert "ran past its timeout of 1 seconds" in error["error"]["message"]
    *lines, last = ndjson_lines(ndjson_response.body)
    assert lines and not any(line["done"] for line in lines)
    assert "ran past its timeout of 1 seconds" in last["error"]
    wait_until(lambda: engine_idle(engine), "the timed-out requests left the engine")
    assert engine.stats()[SMOLLM2]["free_slots"] == 2

    answer = request(port, "POST", "/v1/completions", completion_body(COUNTING, ENDLESS, stream=False,
                                                                      logit_bias=NO_END_OF_TEXT))
    assert answer.status == 504 and "ran past its timeout of 1 seconds" in answer.json()["error"]["message"]


def test_a_waiting_request_times_out_too(server_store):
    from localllm.engine import RequestTimeout

    engine = make_engine(server_store, n_slots=2, max_queue=4)         # no server-wide limit: only the request's
    model = engine.load(SMOLLM2)
    params, num_ctx = model.make_params(temperature=0, max_tokens=ENDLESS)
    ids = model.tokenize(COUNTING)
    running = [engine.submit(SMOLLM2, ids, params, num_ctx, timeout=60) for _ in range(2)]    # both slots
    for handle in running:
        next(iter(handle))
    waiting = engine.submit(SMOLLM2, ids, params, num_ctx, timeout=0.3)
    with pytest.raises(RequestTimeout, match="ran past its timeout of 0.3 seconds"):
        next(iter(waiting))
    assert engine.stats()[SMOLLM2]["active"] == 2
    for handle in running:
        handle.cancel()
    wait_until(lambda: engine_idle(engine), "the cancelled requests left the engine")
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        engine.submit(SMOLLM2, ids, params, num_ctx, timeout=-1)
    engine.close()


def test_the_x_request_timeout_header_sets_a_request_s_own_limit(server, timeout_server):
    """A request may ask for less time than the server allows (X-Request-Timeout), never for more."""
    port = int(server.rsplit(":", 1)[1])                                 # a server without a limit of its own
    slow = completion_body(COUNTING, ENDLESS, stream=False, logit_bias=NO_END_OF_TEXT)
    answer = request(port, "POST", "/v1/completions", slow, headers={"X-Request-Timeout": "0.5"})
    assert answer.status == 504 and answer.json()["error"]["code"] == "request_timeout"
    assert "ran past its timeout of 0.5 seconds" in answer.json()["error"]["message"]
    stream = request(port, "POST", "/api/generate", generate_body(COUNTING, ENDLESS),
                     headers={"X-Request-Timeout": "0.5"})
    assert stream.status == 200 and "ran past its timeout of 0.5 seconds" in stream.body.decode().splitlines()[-1]
    for bad in ("soon", "0", "-1", "nan", "inf"):
        refused = request(port, "POST", "/v1/completions", slow, headers={"X-Request-Timeout": bad})
        assert refused.status == 400 and "X-Request-Timeout must be a positive number" in \
            refused.json()["error"]["message"]
    _, limited_port = timeout_server                                    # the server's 1 s still holds
    longer = request(limited_port, "POST", "/v1/completions", slow, headers={"X-Request-Timeout": "600"})
    assert longer.status == 504 and "ran past its timeout of 1 seconds" in longer.json()["error"]["message"]


# ---- slow clients ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread_port(storm_engine):
    """A server with a single worker thread: any client that held it would stall every other."""
    running = run_app(storm_engine, threads=1)
    yield int(running.port)
    running.close()


def test_a_trickling_client_holds_no_thread(one_thread_port):
    path, body = "/v1/completions", completion_body("The sky is", 6, stream=False)
    data = json.dumps(body).encode()
    trickler = socket.create_connection(("127.0.0.1", one_thread_port), timeout=WAIT)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    for byte in range(len(head) + len(data) // 2):           # half the request, a byte at a time
        trickler.sendall((head + data)[byte:byte + 1])
    other = request(one_thread_port, "POST", path, body)       # served by the only thread meanwhile
    assert other.status == 200
    trickler.sendall((head + data)[len(head) + len(data) // 2:])
    trickled = Response(read_to_end(trickler))
    assert trickled.status == 200 and trickled.json()["choices"] == other.json()["choices"]


def test_a_slow_reader_stalls_neither_the_engine_nor_other_clients(storm_engine, one_thread_port):
    body = completion_body(COUNTING, 64, logit_bias=NO_END_OF_TEXT)
    slow = send(one_thread_port, "POST", "/v1/completions", body, rcvbuf=4096)   # it reads nothing for now
    wait_until(lambda: engine_idle(storm_engine) and storm_engine.stats()[SMOLLM2]["free_slots"] == 8,
               "the slow reader's generation is done though it read nothing")
    other = request(one_thread_port, "POST", "/v1/completions", completion_body("The sky is", 6, stream=False))
    assert other.status == 200                                 # the only thread is free again
    text, reason = sse_text(Response(read_to_end(slow)))
    alone = request(one_thread_port, "POST", "/v1/completions", {**body, "stream": False})
    assert (text, reason) == (alone.json()["choices"][0]["text"], "length")


def test_an_abandoned_half_request_is_closed_after_the_channel_timeout(storm_engine):
    running = run_app(storm_engine, threads=1, channel_timeout=1)
    try:
        with socket.create_connection(("127.0.0.1", int(running.port)), timeout=WAIT) as idle:
            idle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
            try:
                assert idle.recv(1024) == b""                  # closed by the server, nothing answered
            except ConnectionResetError:
                pass
    finally:
        running.close()


def test_a_huge_declared_body_is_refused_before_it_is_sent(storm_engine):
    running = run_app(storm_engine, threads=1, max_body_bytes=4096)
    try:
        with socket.create_connection(("127.0.0.1", int(running.port)), timeout=30) as sock:
            # 100 MB announced (below waitress's own default limit of 1 GB), not one byte sent: answered at once
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000000\r\n\r\n")
            answer = Response(read_to_end(sock))
        assert answer.status == 413
    finally:
        running.close()


def test_uploads_have_their_own_body_limit(storm_engine):
    """/api/blobs takes model-sized bodies (max_upload_bytes) while every other route keeps max_body_bytes."""
    import hashlib
    running = run_app(storm_engine, threads=2, max_body_bytes=4096, max_upload_bytes=8_000_000)
    digest = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    try:
        with socket.create_connection(("127.0.0.1", int(running.port)), timeout=30) as sock:
            sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         "Content-Length: 100000000\r\n\r\n".encode())   # past the upload limit: at once
            assert Response(read_to_end(sock)).status == 413
        body = bytes(3_000_000)                                       # past the JSON limit, within the upload one
        with socket.create_connection(("127.0.0.1", int(running.port)), timeout=30) as sock:
            sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            answer = Response(read_to_end(sock))
        assert answer.status == 400 and "sha256" in answer.json()["error"]          # read whole, then checked
    finally:
        running.close()


# ---- graceful shutdown of `localllm serve` ------------------------------------------------------------------

class ServeProcess:
    """``python -m localllm.cli serve`` on a free port, serving the test store."""

    def __init__(self, store_root, grace: float):
        self.port = free_port()
        env = dict(os.environ, LOCALLLM_MODELS=str(store_root), LOCALLLM_HOST=f"127.0.0.1:{self.port}",
                   LOCALLLM_SHUTDOWN_GRACE=str(grace), LOCALLLM_NUM_PARALLEL="2", LOCALLLM_MAX_QUEUE="4")
        self.process = subprocess.Popen([sys.executable, "-m", "localllm.cli", "serve"], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "listening on" in self.process.stdout.readline()
        self.request(SMOLLM2)                                   # loaded (and its kernels read) before the test

    def request(self, model: str) -> Response:
        return request(self.port, "POST", "/api/generate", {"model": model})

    def refuses_connections(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
            return False
        except ConnectionRefusedError:
            return True

    def exit_code(self) -> int:
        try:
            return self.process.wait(WAIT)
        finally:
            self.process.stdout.close()
            self.process.stderr.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.exit_code()


@pytest.fixture()
def serve_process(server_store):
    started = []

    def start(grace: float) -> ServeProcess:
        started.append(ServeProcess(server_store.root, grace))
        return started[-1]
    yield start
    for process in started:
        process.kill()


def test_sigterm_stops_listening_and_lets_streams_finish(serve_process):
    server = serve_process(grace=WAIT)
    keep_alive = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)   # opened before SIGTERM
    sse, sse_head = start_stream(server.port, "/v1/completions",
                                 completion_body(COUNTING, 64, logit_bias=NO_END_OF_TEXT))
    ndjson, ndjson_head = start_stream(server.port, "/api/generate", generate_body(COUNTING, 64))
    server.process.send_signal(signal.SIGTERM)

    wait_until(server.refuses_connections, "the server stops listening")
    assert server.process.poll() is None                        # still finishing the streams (64 tokens each)
    late = json.dumps(generate_body("Hi", 2, stream=False)).encode()
    keep_alive.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(late) + late)
    refused = Response(read_to_end(keep_alive))                 # a new request on an old connection: 503
    assert (refused.status, refused.headers["retry-after"]) == (503, "1")
    assert "shutting down" in refused.json()["error"]

    text, reason = sse_text(Response(sse_head + read_to_end(sse)))
    assert reason == "length" and text
    *lines, last = ndjson_lines(Response(ndjson_head + read_to_end(ndjson)).body)
    assert last["done"] and last["done_reason"] == "length" and last["eval_count"] == 64
    assert server.exit_code() == 0


def test_sigterm_ends_streams_past_the_grace_with_an_error_event_and_exits_0(serve_process):
    server = serve_process(grace=1)
    sse, sse_head = start_stream(server.port, "/v1/completions",
                                 completion_body(COUNTING, 3000, logit_bias=NO_END_OF_TEXT))
    ndjson, ndjson_head = start_stream(server.port, "/api/generate", generate_body(COUNTING, 3000))
    server.process.send_signal(signal.SIGTERM)

    *chunks, error = sse_payloads(Response(sse_head + read_to_end(sse)).body)
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert error["error"]["message"] == \
        "the server is shutting down: the request was stopped after the 1 s grace period"
    *lines, last = ndjson_lines(Response(ndjson_head + read_to_end(ndjson)).body)
    assert lines and not any(line["done"] for line in lines)
    assert last == {"error": "the server is shutting down: the request was stopped after the 1 s grace period"}
    assert server.exit_code() == 0
