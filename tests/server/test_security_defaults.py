"""Security defaults, checked through real servers: loopback bind, the API key (every malformed or wrong
Authorization refused with the 401 envelope; compared as equal-length digests), CORS with real preflight
requests (Ollama's default origins, LOCALLLM_ORIGINS, 403 for other origins, no key needed for a
preflight), and hostile chat templates (from the model file or the request) answered 400 while the
server keeps serving."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.server.conftest import API_KEY, SMOLLM2, RawHTTP, run_app

pytestmark = pytest.mark.real_model

ALLOWED = "https://app.example.com"
NON_ASCII_KEY = "clé-🔑-secret"
HOSTILE_TEMPLATE = "{{ 'x' * 10**9 }}"


# ---------------------------------------------------------------- bind address
def test_default_settings_bind_loopback(monkeypatch):
    from localllm_server.app import Settings, parse_host

    monkeypatch.delenv("LOCALLLM_HOST", raising=False)
    assert (Settings().host, Settings().port) == ("127.0.0.1", 11434)
    settings = Settings.from_env()
    assert (settings.host, settings.port) == ("127.0.0.1", 11434)
    assert parse_host(":8080") == ("127.0.0.1", 8080)     # a port alone keeps the loopback host


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_localllm_serve_listens_on_loopback_only(tmp_path):
    import psutil

    env = dict(os.environ, LOCALLLM_MODELS=str(tmp_path / "store"))
    env.pop("LOCALLLM_HOST", None)
    if not _port_is_free(11434):          # someone's server has the default port: keep the default host
        env["LOCALLLM_HOST"] = ":0"
    process = subprocess.Popen([sys.executable, "-m", "localllm.cli", "serve"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("localllm listening on http://127.0.0.1:"), (line, process.stderr.read()
                                                                            if process.poll() is not None else "")
        port = int(line.strip().rsplit(":", 1)[1])
        deadline = time.time() + 30
        listening = []
        while not listening and time.time() < deadline:
            listening = [c.laddr for c in psutil.Process(process.pid).net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN]
            time.sleep(0.1)
        assert listening and all(address.ip == "127.0.0.1" and address.port == port for address in listening)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


# ---------------------------------------------------------------- API key
@pytest.mark.parametrize("authorization", [
    None,                                        # no header
    "",                                          # empty header
    "Bearer",                                    # scheme without a key
    "Bearer ",                                   # empty bearer
    "Bearer " + "x" * len(API_KEY),              # wrong key of the same length
    "Bearer " + API_KEY[:-1],                    # a prefix of the key
    "Bearer " + API_KEY + "x",                   # the key with more after it
    "Bearer " + API_KEY.upper(),                 # case matters
    "Bearer " + API_KEY[:-1] + "é",              # non-ASCII in place of the last character
    "Basic " + API_KEY,                          # another scheme
    "Basic dGVzdDp0ZXN0",
    API_KEY,                                     # the key without a scheme
    "Token " + API_KEY,
])
def test_wrong_or_malformed_keys_get_the_401_envelope(keyed_http, authorization):
    headers = {} if authorization is None else {"Authorization": authorization.encode("utf-8")}
    openai = keyed_http.get("/v1/models", headers=headers)
    assert openai.status == 401
    assert openai.json() == {"error": {"message": "Invalid API key", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_api_key"}}
    assert openai.headers["www-authenticate"] == "Bearer"
    ollama = keyed_http.get("/api/tags", headers=headers)
    assert ollama.status == 401 and ollama.json() == {"error": "Invalid API key"}


@pytest.mark.parametrize("authorization", ["Bearer " + API_KEY, "bearer " + API_KEY, "BEARER  " + API_KEY + " "])
def test_the_right_key_passes(keyed_http, authorization):
    assert keyed_http.get("/v1/models", headers={"Authorization": authorization}).status == 200
    assert keyed_http.get("/api/tags", headers={"Authorization": authorization}).status == 200


def test_public_paths_need_no_key(keyed_http):
    assert keyed_http.get("/").status == 200
    assert keyed_http.get("/health").status == 200


@pytest.fixture(scope="module")
def non_ascii_keyed_http(engine):
    running = run_app(engine, threads=2, api_key=NON_ASCII_KEY)
    yield RawHTTP(running.url)
    running.close()


def test_a_non_ascii_key_matches_its_utf8_bytes_only(non_ascii_keyed_http):
    http = non_ascii_keyed_http
    assert http.get("/v1/models", headers={"Authorization": b"Bearer " + NON_ASCII_KEY.encode()}).status == 200
    for wrong in (NON_ASCII_KEY.encode()[:-1], "clé".encode("latin-1"), NON_ASCII_KEY.encode("latin-1", "replace"),
                  NON_ASCII_KEY.encode("utf-8", "replace").replace("é".encode(), b"e")):
        assert http.get("/v1/models", headers={"Authorization": b"Bearer " + wrong}).status == 401


def test_the_key_is_compared_as_equal_length_digests(monkeypatch):
    """Whatever the length of the key sent, the comparison sees two 32-byte digests (no early exit on a
    length mismatch or a differing first byte)."""
    import falcon.testing

    from localllm_server import middleware
    from localllm_server.app import Settings

    compared = []
    real = middleware.hmac.compare_digest
    monkeypatch.setattr(middleware.hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b))
    app = falcon.App(middleware=middleware.middleware_for(Settings(api_key=API_KEY)))
    app.add_route("/v1/models", type("Models", (), {"on_get": lambda self, req, resp: None})())
    client = falcon.testing.TestClient(app)
    for sent in ("", "k", API_KEY[:3], API_KEY, API_KEY * 40):
        client.simulate_get("/v1/models", headers={"Authorization": f"Bearer {sent}"})
    assert compared == [(32, 32)] * 5


# ---------------------------------------------------------------- CORS
@pytest.fixture(scope="module")
def cors_http(engine):
    """A server with LOCALLLM_ORIGINS (an exact origin and a wildcard) and an API key."""
    running = run_app(engine, threads=2, api_key=API_KEY, cors_origins=[ALLOWED, "https://*.trusted.dev"])
    yield RawHTTP(running.url)
    running.close()


def preflight(http: RawHTTP, origin: str, path: str = "/v1/chat/completions"):
    return http.request("OPTIONS", path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "authorization, content-type"})


def _vary(response) -> set[str]:
    return {part.strip().lower() for part in response.headers.get("vary", "").split(",")}


@pytest.mark.parametrize("origin", [ALLOWED, "https://chat.trusted.dev", "http://localhost:5173", "http://127.0.0.1",
                                    "https://localhost", "http://0.0.0.0:8080", "app://desktop", "tauri://localhost"])
def test_preflight_from_an_allowed_origin(cors_http, origin):
    response = preflight(cors_http, origin)
    assert response.status == 204                           # no API key needed for the preflight
    assert response.headers["access-control-allow-origin"] == origin
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed_headers = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-request-timeout", "x-session-id", "x-api-key",
            "anthropic-version"} <= allowed_headers              # the headers our own clients and routes read
    assert "origin" in _vary(response)
    assert int(response.headers["access-control-max-age"]) > 0
    for path in ("/api/chat", "/v1/embeddings", "/no/such/route"):
        assert preflight(cors_http, origin, path).status == 204


@pytest.mark.parametrize("origin", ["https://evil.example", "http://app.example.com", "https://app.example.com.evil",
                                    "https://trusted.dev.evil.example", "null", "http://localhost.evil.example"])
def test_preflight_from_another_origin_gets_no_cors_headers(cors_http, origin):
    response = preflight(cors_http, origin)
    assert response.status == 403
    assert not any(name.startswith("access-control-") for name in response.headers)
    assert response.json()["error"]["code"] == "origin_not_allowed"


def test_requests_from_an_allowed_origin_carry_cors_headers(cors_http):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    response = cors_http.get("/v1/models", headers={"Origin": ALLOWED, **auth})
    assert response.status == 200 and response.headers["access-control-allow-origin"] == ALLOWED
    assert "origin" in _vary(response)
    unauthorized = cors_http.get("/v1/models", headers={"Origin": ALLOWED})   # the browser app may read its 401
    assert unauthorized.status == 401 and unauthorized.headers["access-control-allow-origin"] == ALLOWED
    plain = cors_http.get("/v1/models", headers=auth)                          # no Origin: not a CORS request
    assert plain.status == 200 and "access-control-allow-origin" not in plain.headers


def test_requests_from_another_origin_are_refused_before_they_run(cors_http):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    # a "simple" cross-site POST (text/plain, no preflight) must not make the server act
    response = cors_http.post("/api/copy", '{"source": "smollm2:135m", "destination": "csrf-copy"}',
                              headers={"Origin": "https://evil.example", "Content-Type": "text/plain", **auth})
    assert response.status == 403 and response.json() == {
        "error": "origin 'https://evil.example' is not allowed to call this server (add it to LOCALLLM_ORIGINS)"}
    assert "access-control-allow-origin" not in response.headers
    tags = cors_http.get("/api/tags", headers=auth).json()
    assert "csrf-copy:latest" not in {model["name"] for model in tags["models"]}


def test_default_origins_without_localllm_origins(http):
    assert preflight(http, "http://localhost:3000").headers["access-control-allow-origin"] == "http://localhost:3000"
    assert http.get("/api/tags", headers={"Origin": "https://127.0.0.1:8443"}).status == 200
    assert preflight(http, ALLOWED).status == 403
    assert http.get("/api/tags", headers={"Origin": ALLOWED}).status == 403


def test_any_origin_with_a_star(engine):
    running = run_app(engine, threads=2, cors_origins=["*"])
    try:
        http = RawHTTP(running.url)
        response = preflight(http, "https://anyone.example")
        assert response.status == 204 and response.headers["access-control-allow-origin"] == "*"
        assert http.get("/api/tags", headers={"Origin": "https://anyone.example"}).status == 200
    finally:
        running.close()


def test_origins_from_the_environment(monkeypatch):
    from localllm_server.app import Settings
    from localllm_server.middleware import OriginPolicy

    monkeypatch.setenv("LOCALLLM_ORIGINS", f" {ALLOWED} , https://*.trusted.dev,")
    policy = OriginPolicy(Settings.from_env().cors_origins)
    assert policy.allows(ALLOWED) and policy.allows("https://a.trusted.dev") and policy.allows("http://localhost")
    assert not policy.allows("https://evil.example") and not policy.allows("https://trusted.dev")


# ---------------------------------------------------------------- hostile chat templates over HTTP
@pytest.fixture(scope="module")
def hostile_model_http(tmp_path_factory):
    """A server whose one model (a tiny llama) carries a template that asks for a 1 GB string."""
    from localllm.engine import Engine, EngineSettings
    from localllm.store import ModelStore
    from tests.tiny_models import write_tiny_llama

    folder = tmp_path_factory.mktemp("hostile-template")
    store = ModelStore(folder / "store")
    store.add_local("hostile-template:latest", write_tiny_llama(folder / "hostile.gguf", chat_template=HOSTILE_TEMPLATE))
    engine = Engine(EngineSettings(n_slots=2, max_queue=8, keep_alive=600), store=store)
    running = run_app(engine, threads=4)
    yield RawHTTP(running.url)
    running.close()
    engine.close()


def test_a_hostile_template_in_the_model_file_gets_400_and_the_server_keeps_serving(hostile_model_http):
    chat = {"model": "hostile-template", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for attempt in range(2):
        response = hostile_model_http.post("/v1/chat/completions", chat)
        assert response.status == 400, response.body
        error = response.json()["error"]
        assert error["param"] == "messages" and "characters" in error["message"]
        ollama = hostile_model_http.post("/api/chat", {**chat, "stream": False})
        assert ollama.status == 400 and "characters" in ollama.json()["error"]
    raw = hostile_model_http.post("/v1/completions", {"model": "hostile-template", "prompt": "ab", "max_tokens": 2,
                                                      "temperature": 0})
    assert raw.status == 200 and raw.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("template, reason", [
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "deep"),
    ("{{ ''.__class__.__mro__ }}", "sandbox"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps|ran for"),
    ("{{ lipsum(10**6) }}", "lipsum"),
])
def test_a_hostile_template_in_the_request_gets_400(http, template, reason):
    import re

    response = http.post("/api/generate", {"model": SMOLLM2, "prompt": "hi", "template": template, "stream": False,
                                           "options": {"num_predict": 1}})
    assert response.status == 400 and re.search(reason, response.json()["error"]), response.body
    fine = http.post("/api/generate", {"model": SMOLLM2, "prompt": "hi", "stream": False,
                                       "options": {"num_predict": 1, "temperature": 0}})
    assert fine.status == 200 and fine.json()["done"] is True
