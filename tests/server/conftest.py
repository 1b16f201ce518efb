"""Real waitress servers on 127.0.0.1 serving a temporary store with the real models registered."""
from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

SMOLLM2 = "smollm2:135m"
MINILM = "all-minilm"
API_KEY = "test-secret-key"
SMALL_BODY_LIMIT = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """``app`` on waitress at 127.0.0.1 (a free port), configured as ``localllm serve`` configures it."""

    def __init__(self, app, settings):
        from localllm_server.server import waitress_server

        settings.host, settings.port = "127.0.0.1", 0
        self.server = waitress_server(app, settings)
        self.port = self.server.effective_port
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def close(self):
        from localllm_server.server import stop

        stop(self.server, self.thread)


def run_app(engine, **settings) -> RunningServer:
    from localllm_server.app import Settings, create_app

    settings = Settings(**settings)
    return RunningServer(create_app(engine, settings), settings)


@pytest.fixture(scope="session")
def server_store(tmp_path_factory, smollm2_gguf_path, minilm_dir):
    """A temporary model store holding smollm2:135m and all-minilm (registered from the real files)."""
    from localllm.store import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("server-store"))
    store.add_local(SMOLLM2, smollm2_gguf_path)
    store.add_local("all-minilm:latest", minilm_dir)
    return store


@pytest.fixture(scope="session")
def engine(server_store):
    from localllm.engine import Engine, EngineSettings

    engine = Engine(EngineSettings(n_slots=8, max_queue=64, keep_alive=600), store=server_store)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def server(engine):
    """Base URL of a running server (no API key)."""
    running = run_app(engine, threads=16)
    yield running.url
    running.close()


@pytest.fixture(scope="session")
def keyed_server(engine):
    """Base URL of a server sharing ``engine`` with an API key and a small body limit."""
    running = run_app(engine, threads=4, api_key=API_KEY, max_body_bytes=SMALL_BODY_LIMIT)
    yield running.url
    running.close()


@pytest.fixture(scope="session")
def client(server):
    """The real OpenAI SDK pointed at the server, as the README shows it."""
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1/", api_key="localllm", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def smollm2(engine):
    """The loaded SmolLM2 model behind the server (for its tokenizer)."""
    return engine.load(SMOLLM2)


@pytest.fixture(scope="session")
def golden_case(golden_smollm2):
    cases = {case["name"]: case for case in golden_smollm2}
    return cases.__getitem__


@pytest.fixture(scope="session")
def greedy_text(smollm2, golden_case):
    """``greedy_text(case, n)``: text of the first ``n`` golden greedy tokens of a SmolLM2 case."""
    def text(case_name: str, n_tokens: int) -> str:
        return smollm2.detokenize(golden_case(case_name)["llamacpp"]["greedy_tokens"][:n_tokens])
    return text


class HTTPResponse:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        import json
        return json.loads(self.body)


class RawHTTP:
    """Plain http.client requests (no SDK): exact status, headers and body bytes."""

    def __init__(self, url: str):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 300,
                chunked: bool = False) -> HTTPResponse:
        import http.client
        import json

        headers = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            if chunked:
                connection.request(method, path, body=iter([body]), headers=headers, encode_chunked=True)
            else:
                connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return HTTPResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def post(self, path: str, body=None, **kwargs) -> HTTPResponse:
        return self.request("POST", path, body, **kwargs)

    def get(self, path: str, **kwargs) -> HTTPResponse:
        return self.request("GET", path, **kwargs)


@pytest.fixture(scope="session")
def http(server) -> RawHTTP:
    return RawHTTP(server)


@pytest.fixture(scope="session")
def keyed_http(keyed_server) -> RawHTTP:
    return RawHTTP(keyed_server)
