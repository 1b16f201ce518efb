"""Routes outside /v1 over raw HTTP: /, /health, /tokenize, /detokenize, /openapi.json, /metrics; X-Request-Id."""
from __future__ import annotations

from .conftest import MINILM, SMOLLM2


def test_root_and_head(http):
    response = http.get("/")
    assert response.status == 200 and response.body == b"localllm is running"
    assert response.headers["content-type"].startswith("text/plain")
    head = http.request("HEAD", "/")
    assert head.status == 200 and head.body == b""


def test_health(http):
    response = http.get("/health")
    assert response.status == 200 and response.json() == {"status": "ok"}


def test_health_says_when_kernels_are_being_prepared(http):
    import threading

    from localllm.progress import slow_step
    inside, leave = threading.Event(), threading.Event()

    def first_use():
        with slow_step("preparing the decode step kernels for Q4_1 weights", after=60):
            inside.set()
            leave.wait(30)

    worker = threading.Thread(target=first_use)
    worker.start()
    try:
        inside.wait(30)
        response = http.get("/health")
        assert response.status == 200
        assert response.json() == {"status": "warming up",
                                   "steps": ["preparing the decode step kernels for Q4_1 weights"]}
    finally:
        leave.set()
        worker.join()
    assert http.get("/health").json() == {"status": "ok"}


def test_tokenize_a_conversation_gives_the_golden_prompt_tokens(http, golden_case):
    case = golden_case("chat_sky")
    response = http.post("/tokenize", {"model": SMOLLM2, "messages": case["messages"]})
    assert response.status == 200
    body = response.json()
    assert body["tokens"] == case["prompt_tokens"]
    assert body["count"] == len(case["prompt_tokens"]) and body["max_model_len"] > 0


def test_tokenize_text_and_detokenize_round_trip(http, golden_case):
    case = golden_case("unicode")
    tokens = http.post("/tokenize", {"model": SMOLLM2, "prompt": case["prompt"]}).json()["tokens"]
    assert tokens == case["prompt_tokens"]
    text = http.post("/detokenize", {"model": SMOLLM2, "tokens": tokens}).json()["prompt"]
    assert text == case["prompt"]


def test_tokenize_with_an_embedding_model_adds_its_special_tokens(http):
    with_specials = http.post("/tokenize", {"model": MINILM, "prompt": "hello world"}).json()["tokens"]
    plain = http.post("/tokenize", {"model": MINILM, "prompt": "hello world",
                                    "add_special_tokens": False}).json()["tokens"]
    assert len(with_specials) == len(plain) + 2 and with_specials[1:-1] == plain
    assert http.post("/detokenize", {"model": MINILM, "tokens": plain}).json()["prompt"] == "hello world"


def test_openapi_lists_every_route_with_its_parameters(http, server):
    import falcon.inspect

    document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, methods in {"/v1/chat/completions": ["post"], "/v1/completions": ["post"],
                          "/v1/embeddings": ["post"], "/v1/models": ["get"], "/v1/models/{model}": ["get"],
                          "/": ["get", "head"], "/health": ["get"], "/tokenize": ["post"], "/detokenize": ["post"],
                          "/openapi.json": ["get"], "/metrics": ["get"], "/api/chat": ["post"],
                          "/api/generate": ["post"], "/api/tags": ["get"]}.items():
        assert set(methods) <= set(paths[path]), path
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for name in ("model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stream",
                 "stream_options", "stop", "seed", "frequency_penalty", "presence_penalty", "logprobs",
                 "top_logprobs", "n", "logit_bias", "user", "response_format", "tools", "tool_choice", "options"):
        assert name in chat["properties"], name
    assert chat["properties"]["top_logprobs"]["maximum"] == 20
    assert set(chat["required"]) == {"model", "messages"}
    completion = paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "suffix", "echo", "logprobs"} <= set(completion["properties"])
    embeddings = paths["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"input", "encoding_format", "dimensions"} <= set(embeddings["properties"])
    assert paths["/v1/models/{model}"]["get"]["parameters"][0]["name"] == "model"


def test_metrics_in_prometheus_text(http):
    http.post("/v1/completions", {"model": SMOLLM2, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    response = http.get("/metrics")
    assert response.status == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.body.decode()
    assert '# TYPE localllm_http_requests_total counter' in text
    assert 'localllm_http_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    completion_tokens = [line for line in text.splitlines()
                         if line.startswith('localllm_completion_tokens_total{api="completions"}')]
    assert completion_tokens and int(completion_tokens[0].split()[-1]) >= 1
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


def test_request_id_is_echoed_or_made(http):
    echoed = http.get("/health", headers={"X-Request-Id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    made = http.get("/health").headers["x-request-id"]
    other = http.get("/health").headers["x-request-id"]
    assert made and other and made != other
    error = http.post("/v1/chat/completions", {"model": SMOLLM2, "messages": []},
                      headers={"X-Request-Id": "failing-1"})
    assert error.status == 400 and error.headers["x-request-id"] == "failing-1"
