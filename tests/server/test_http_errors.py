"""Every error case over raw HTTP: a 4xx/5xx with the OpenAI envelope naming the parameter."""
from __future__ import annotations

import pytest

from .conftest import API_KEY, MINILM, SMALL_BODY_LIMIT, SMOLLM2, RawHTTP, run_app

CHAT = {"model": SMOLLM2, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
COMPLETION = {"model": SMOLLM2, "prompt": "Hello", "max_tokens": 1}
EMBEDDING = {"model": MINILM, "input": "Hello"}


def assert_envelope(response, status: int, param=None, message=None, code=None, contains=None):
    assert response.status == status, response.body
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param, error
    if message is not None:
        assert error["message"] == message
    if contains is not None:
        assert contains in error["message"]
    if code is not None:
        assert error["code"] == code
    expected_type = {404: "not_found_error", 503: "api_error"}.get(status, "invalid_request_error")
    assert error["type"] == expected_type
    return error


def with_(base: dict, **changes) -> dict:
    body = {**base, **changes}
    return {k: v for k, v in body.items() if v is not ...}


CHAT_CASES = [
    (with_(CHAT, model=...), "model", None),
    (with_(CHAT, model=""), "model", None),
    (with_(CHAT, messages=...), "messages", None),
    (with_(CHAT, messages=[]), "messages", "`messages` must not be empty"),
    (with_(CHAT, messages="Hi"), "messages", None),
    (with_(CHAT, messages=[{"role": "robot", "content": "Hi"}]), "messages[0].role", None),
    (with_(CHAT, messages=[{"role": "user", "content": 5}]), "messages[0].content", None),
    (with_(CHAT, messages=[{"role": "user", "content": [{"type": "audio"}]}]), "messages[0].content[0]", None),
    (with_(CHAT, temperature="hot"), "temperature", "temperature must be a number"),
    (with_(CHAT, temperature=2.5), "temperature", "temperature must be between 0 and 2"),
    (with_(CHAT, top_p=1.5), "top_p", "top_p must be between 0 and 1"),
    (with_(CHAT, max_tokens=0), "max_tokens", None),
    (with_(CHAT, max_tokens="many"), "max_tokens", None),
    (with_(CHAT, max_completion_tokens=-1), "max_completion_tokens", None),
    (with_(CHAT, logprobs=True, top_logprobs=21), "top_logprobs", "top_logprobs must be between 0 and 20"),
    (with_(CHAT, logprobs=True, top_logprobs=-1), "top_logprobs", "top_logprobs must be between 0 and 20"),
    (with_(CHAT, top_logprobs=2), "top_logprobs", None),
    (with_(CHAT, logprobs="yes"), "logprobs", None),
    (with_(CHAT, n=0), "n", None),
    (with_(CHAT, n=64), "n", None),                                   # more than the engine's parallel slots
    (with_(CHAT, stop=5), "stop", None),
    (with_(CHAT, stop=["x"] * 17), "stop", None),
    (with_(CHAT, stop=[""]), "stop", None),
    (with_(CHAT, seed="x"), "seed", None),
    (with_(CHAT, seed=1.5), "seed", None),
    (with_(CHAT, frequency_penalty=3), "frequency_penalty", None),
    (with_(CHAT, presence_penalty=-3), "presence_penalty", None),
    (with_(CHAT, logit_bias=[1]), "logit_bias", None),
    (with_(CHAT, logit_bias={"abc": 1}), "logit_bias", None),
    (with_(CHAT, logit_bias={"5": 150}), "logit_bias", None),
    (with_(CHAT, logit_bias={"5": "x"}), "logit_bias", None),
    (with_(CHAT, logit_bias={"999999": 1}), "logit_bias", None),         # beyond the vocabulary
    (with_(CHAT, stream="yes"), "stream", None),
    (with_(CHAT, stream_options={"include_usage": "x"}), "stream_options.include_usage", None),
    (with_(CHAT, user=5), "user", None),
    (with_(CHAT, response_format={"type": "xml"}), "response_format", None),
    (with_(CHAT, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools", None),
    (with_(CHAT, tool_choice="required"), "tool_choice", None),
    (with_(CHAT, options="x"), "options", None),
    (with_(CHAT, options={"top_k": -1}), "options.top_k", None),
    (with_(CHAT, options={"num_ctx": "big"}), "options.num_ctx", None),
    (with_(CHAT, top_k=-2), "top_k", None),
    (with_(CHAT, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]),
     "messages", "model 'smollm2:135m' has no vision: it cannot read images"),
    (with_(CHAT, model=MINILM), "model", None),
]


@pytest.mark.parametrize("body, param, message", CHAT_CASES)
def test_chat_bad_requests(http, body, param, message):
    assert_envelope(http.post("/v1/chat/completions", body), 400, param, message)


COMPLETION_CASES = [
    (with_(COMPLETION, prompt=...), "prompt", None),
    (with_(COMPLETION, prompt=[]), "prompt", None),
    (with_(COMPLETION, prompt=5), "prompt", None),
    (with_(COMPLETION, prompt=["a", [1, 2]]), "prompt", None),
    (with_(COMPLETION, prompt=[[1, -1]]), "prompt[0]", None),
    (with_(COMPLETION, prompt=[1, 2, 10 ** 6]), "prompt", None),          # beyond the vocabulary
    (with_(COMPLETION, prompt=""), "prompt", None),
    (with_(COMPLETION, suffix="return x"), "suffix", None),               # SmolLM2 has no FIM tokens
    (with_(COMPLETION, logprobs=21), "logprobs", "logprobs must be between 0 and 20"),
    (with_(COMPLETION, logprobs=True), "logprobs", None),
    (with_(COMPLETION, echo="x"), "echo", None),
    (with_(COMPLETION, max_tokens=-1), "max_tokens", None),
    (with_(COMPLETION, best_of=3), "best_of", None),
    (with_(COMPLETION, model=MINILM), "model", None),
]


@pytest.mark.parametrize("body, param, message", COMPLETION_CASES)
def test_completion_bad_requests(http, body, param, message):
    assert_envelope(http.post("/v1/completions", body), 400, param, message)


EMBEDDING_CASES = [
    (with_(EMBEDDING, input=...), "input", None),
    (with_(EMBEDDING, input=[]), "input", None),
    (with_(EMBEDDING, input=[1, "a"]), "input", None),
    (with_(EMBEDDING, encoding_format="hex"), "encoding_format", None),
    (with_(EMBEDDING, dimensions=0), "dimensions", None),
    (with_(EMBEDDING, dimensions=100000), "dimensions", None),           # more than the model has
    (with_(EMBEDDING, model=SMOLLM2), "model", None),                     # a text model cannot embed
]


@pytest.mark.parametrize("body, param, message", EMBEDDING_CASES)
def test_embedding_bad_requests(http, body, param, message):
    assert_envelope(http.post("/v1/embeddings", body), 400, param, message)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_invalid_json_bodies(http, path, raw):
    assert_envelope(http.post(path, raw, headers={"Content-Type": "application/json"}), 400)


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION),
                                        ("/v1/embeddings", EMBEDDING)])
def test_unknown_model_is_404(http, path, body):
    response = http.post(path, {**body, "model": "no-such-model"})
    assert_envelope(response, 404, "model", "model 'no-such-model' not found, try pulling it first")


def test_invalid_model_name_is_400(http):
    assert_envelope(http.post("/v1/chat/completions", {**CHAT, "model": "../../etc/passwd"}), 400, "model")


def test_prompt_plus_max_tokens_over_the_context(http):
    response = http.post("/v1/chat/completions", {**CHAT, "max_tokens": 100_000})
    assert_envelope(response, 400, "messages", code="context_length_exceeded")
    response = http.post("/v1/completions", {**COMPLETION, "max_tokens": 100_000})
    assert_envelope(response, 400, "prompt", code="context_length_exceeded")


def test_prompt_longer_than_a_requested_context(http):
    body = {**CHAT, "max_tokens": None, "options": {"num_ctx": 8}}
    assert_envelope(http.post("/v1/chat/completions", body), 400, "messages", code="context_length_exceeded")


def test_tokenize_and_detokenize_bad_requests(http):
    assert_envelope(http.post("/tokenize", {"model": SMOLLM2}), 400, "prompt")
    assert_envelope(http.post("/tokenize", {"model": SMOLLM2, "prompt": 5}), 400, "prompt")
    assert_envelope(http.post("/detokenize", {"model": SMOLLM2, "tokens": ["a"]}), 400, "tokens")
    assert_envelope(http.post("/detokenize", {"model": SMOLLM2, "tokens": [10 ** 6]}), 400, "tokens")
    assert_envelope(http.post("/tokenize", {"model": "no-such-model", "prompt": "x"}), 404, "model")


def test_unknown_route_and_wrong_method(http):
    assert_envelope(http.get("/v1/nothing-here"), 404)
    assert_envelope(http.get("/v1/chat/completions"), 405)


def test_body_over_the_limit_is_413(keyed_http):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 * SMALL_BODY_LIMIT)}]}
    assert_envelope(keyed_http.post("/v1/chat/completions", big, headers=auth), 413)
    # without a Content-Length (chunked upload) the limit holds while reading
    assert_envelope(keyed_http.post("/v1/chat/completions", big, headers=auth, chunked=True), 413)


def test_api_key(keyed_http, keyed_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        assert_envelope(keyed_http.get("/v1/models", headers=headers), 401, None, "Invalid API key")
        assert_envelope(keyed_http.post("/v1/chat/completions", CHAT, headers=headers), 401, None, "Invalid API key")
    assert keyed_http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status == 200
    assert keyed_http.get("/").status == 200 and keyed_http.get("/health").status == 200

    from openai import AuthenticationError, OpenAI
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=keyed_server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert OpenAI(base_url=keyed_server + "/v1", api_key=API_KEY, max_retries=0).models.list().data


def test_queue_full_is_503(server_store):
    from localllm.engine import Engine, EngineSettings

    busy_engine = Engine(EngineSettings(n_slots=1, max_queue=0, keep_alive=60), store=server_store)
    running = run_app(busy_engine, threads=2)
    try:
        response = RawHTTP(running.url).post("/v1/chat/completions", CHAT)
        assert_envelope(response, 503, None, "server busy, please try again.  maximum pending requests exceeded")
    finally:
        running.close()
        busy_engine.close()


def test_library_errors_map_to_their_documented_status():
    from localllm.engine import RequestTimeout, ServerShuttingDown
    from localllm.formats.errors import ModelFormatError
    from localllm.store import DiskFull, DownloadFailed
    from localllm_server.errors import to_api_error
    from localllm_server.openapi import ERROR_REASONS

    cases = [(DiskFull("pulling x: no space left on the device", errno=28), 507, "insufficient_storage"),
             (DownloadFailed("pip download failed"), 502, "download_failed"),
             (RequestTimeout("ran past its timeout"), 504, "request_timeout"),
             (ServerShuttingDown("the server is shutting down"), 503, "server_shutting_down"),
             (ModelFormatError("tensor data past the end", "/m.gguf"), 400, "invalid_model_file")]
    for exc, status, code in cases:
        error = to_api_error(exc)
        assert (error.status, error.code) == (status, code), exc
        assert error.status in ERROR_REASONS
