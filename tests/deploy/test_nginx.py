"""One replica behind nginx (the shipped deploy/nginx/localllm.conf): ``localllm serve`` and gunicorn.

The real openai and ollama clients talk to nginx: chat, streams (SSE and NDJSON arrive event by event),
embeddings, the /llm/ prefix; a client that goes away mid-stream frees the engine's slot; ``X-Forwarded-*``
count only from the trusted proxy. Waits are bounded; nothing asserts a speed.
"""
from __future__ import annotations

import uuid

import pytest

from .cluster import (MINILM, SMOLLM2, WAIT, Nginx, active_requests, check_shipped_config, http_request, metric,
                       start_gunicorn, start_replica, wait_until)

pytestmark = pytest.mark.real_model

NO_END_OF_TEXT = {"0": -100, "2": -100}     # SmolLM2's end tokens banned: only max_tokens ends a completion
COUNTING = "1, 2, 3, 4, 5,"                  # a raw prompt greedy SmolLM2 continues for long
HELLO = [{"role": "user", "content": "Say hello."}]


def test_the_shipped_files_as_they_are_pass_nginx_t(nginx_path, tmp_path):
    checked = check_shipped_config(nginx_path, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr and "test is successful" in checked.stderr


@pytest.fixture(scope="module")
def waitress_setup(nginx_path, deploy_store, tmp_path_factory):
    """(replica, nginx): ``localllm serve`` behind nginx."""
    folder = tmp_path_factory.mktemp("nginx-one")
    replica = start_replica(deploy_store.root, folder, "solo")
    nginx = None
    try:
        nginx = Nginx(nginx_path, folder / "nginx", [replica.port])
        yield replica, nginx
    finally:
        if nginx is not None:
            nginx.stop()
        replica.stop()


@pytest.fixture(scope="module")
def gunicorn_setup(nginx_path, deploy_store, tmp_path_factory):
    """(gunicorn, nginx): ``gunicorn 'localllm_server.app:get_app()'`` behind nginx."""
    pytest.importorskip("gunicorn")
    folder = tmp_path_factory.mktemp("nginx-gunicorn")
    server = start_gunicorn(deploy_store.root, folder, "gunicorn")
    nginx = None
    try:
        nginx = Nginx(nginx_path, folder / "nginx", [server.port])
        yield server, nginx
    finally:
        if nginx is not None:
            nginx.stop()
        server.stop()


@pytest.fixture(params=["waitress", "gunicorn"])
def setup(request):
    return request.getfixturevalue(f"{request.param}_setup")


def openai_client(base_url: str):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="localllm", max_retries=0, timeout=WAIT)


def test_openai_chat_stream_and_embeddings_through_nginx(setup):
    server, nginx = setup
    client = openai_client(nginx.url + "/v1/")
    direct = openai_client(f"http://127.0.0.1:{server.port}/v1/")

    reply = client.chat.completions.create(model=SMOLLM2, messages=HELLO, max_tokens=12, temperature=0)
    alone = direct.chat.completions.create(model=SMOLLM2, messages=HELLO, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == alone.choices[0].message.content != ""

    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=SMOLLM2, messages=HELLO, max_tokens=12, temperature=0, stream=True) if chunk.choices]
    assert len([p for p in pieces if p]) > 1                  # several events, not one buffered blob
    assert "".join(pieces) == alone.choices[0].message.content

    vectors = client.embeddings.create(model=MINILM, input=["First text", "Second text"])
    expected = direct.embeddings.create(model=MINILM, input=["First text", "Second text"])
    assert [d.embedding for d in vectors.data] == [d.embedding for d in expected.data]
    assert len(vectors.data[0].embedding) == 384


def test_ollama_client_through_nginx(setup):
    import ollama

    server, nginx = setup
    client = ollama.Client(host=nginx.url, timeout=WAIT)
    direct = ollama.Client(host=f"http://127.0.0.1:{server.port}", timeout=WAIT)
    options = {"num_predict": 12, "temperature": 0}

    alone = direct.chat(model=SMOLLM2, messages=HELLO, options=options)["message"]["content"]
    assert client.chat(model=SMOLLM2, messages=HELLO, options=options)["message"]["content"] == alone
    parts = list(client.chat(model=SMOLLM2, messages=HELLO, options=options, stream=True))
    assert parts[-1]["done"] and len(parts) > 2
    assert "".join(part["message"]["content"] for part in parts) == alone
    embedded = client.embed(model=MINILM, input="Why is the sky blue?")["embeddings"]
    assert embedded == direct.embed(model=MINILM, input="Why is the sky blue?")["embeddings"]


def first_line(port: int, path: str, body: dict):
    """Start a stream through ``port``: (its connection, its headers, its first line)."""
    import http.client
    import json

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return connection, {k.lower(): v for k, v in response.getheaders()}, response.readline()


STREAMS = [
    ("/v1/completions", {"model": SMOLLM2, "prompt": COUNTING, "max_tokens": 200, "stream": True,
                         "logit_bias": NO_END_OF_TEXT}),
    ("/api/generate", {"model": SMOLLM2, "prompt": COUNTING, "raw": True,
                       "options": {"num_predict": 200, "temperature": 0}}),
]


@pytest.mark.parametrize("path, body", STREAMS, ids=["sse", "ndjson"])
def test_streams_are_not_buffered(waitress_setup, path, body):
    """The first event of a 200-token stream comes out of nginx while the replica is still generating (a
    buffering proxy would hold it until its buffers fill or the stream ends); the app marks the stream
    ``X-Accel-Buffering: no`` (nginx reads that header and does not pass it on)."""
    replica, nginx = waitress_setup
    connection, headers, first = first_line(nginx.port, path, body)
    try:
        assert first.strip() and first.strip() != b"data: [DONE]"
        assert active_requests(replica.port) == 1
    finally:
        connection.close()
    wait_until(lambda: active_requests(replica.port) == 0, "the closed stream's request ends")

    connection, headers, _ = first_line(replica.port, path, body)
    connection.close()
    assert headers["x-accel-buffering"] == "no"
    wait_until(lambda: active_requests(replica.port) == 0, "the closed stream's request ends")


def test_disconnect_mid_stream_frees_the_slot(setup):
    """The openai client closes a stream that would run 2000 tokens: nginx closes its connection to the server,
    which stops the generation: no active request left, and no completed one (a request that ran to its end
    would add its 2000 tokens to the completion counter; a cancelled one adds none)."""
    server, nginx = setup
    client = openai_client(nginx.url + "/v1/")
    completed_before = metric(server.port, "localllm_completion_tokens_total")
    stream = client.completions.create(model=SMOLLM2, prompt=COUNTING, max_tokens=2000, stream=True,
                                       logit_bias=NO_END_OF_TEXT, temperature=0)
    received = []
    for chunk in stream:
        received.append(chunk.choices[0].text)
        if len(received) == 5:
            break
    assert active_requests(server.port) == 1                # still generating
    stream.close()
    wait_until(lambda: active_requests(server.port) == 0, "the engine frees the slot")
    assert metric(server.port, "localllm_completion_tokens_total") == completed_before
    reply = client.completions.create(model=SMOLLM2, prompt=COUNTING, max_tokens=5, temperature=0,
                                      logit_bias=NO_END_OF_TEXT)
    assert reply.choices[0].text == "".join(received)        # greedy: the same first tokens; the server serves on


def test_path_prefix(waitress_setup):
    import ollama

    replica, nginx = waitress_setup
    client = openai_client(nginx.url + "/llm/v1/")
    assert SMOLLM2 in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(model=SMOLLM2, messages=HELLO, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content
    prefixed = ollama.Client(host=nginx.url + "/llm", timeout=WAIT)
    assert prefixed.generate(model=SMOLLM2, prompt="Hi", options={"num_predict": 3})["done"]
    status, _, _ = http_request(nginx.port, "GET", "/llm/api/tags")
    assert status == 200
    status, _, _ = http_request(nginx.port, "GET", "/llmapi/tags")     # not the prefix: the app's 404
    assert status == 404


def access_line(replica, request_id: str) -> str:
    return wait_until(lambda: next((line for line in replica.log().splitlines() if line.endswith(request_id)),
                                   None), f"the access log has {request_id}", seconds=10)


def test_forwarded_headers_only_from_the_trusted_proxy(waitress_setup):
    """The replica trusts 127.0.0.1 (nginx): through nginx it logs the client's own address (127.0.0.5) and the
    host it asked for; a client reaching the replica directly (from 127.0.0.3) cannot claim another address,
    host or scheme with the same headers."""
    replica, nginx = waitress_setup
    forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}

    through = f"req-{uuid.uuid4().hex}"
    status, _, _ = http_request(nginx.port, "GET", "/v1/models", source="127.0.0.5",
                                headers={"Host": "llm.example.test", "X-Request-Id": through, **forged})
    assert status == 200
    assert access_line(replica, through) == \
        f'127.0.0.5 "GET http://llm.example.test:{nginx.port}/v1/models" 200 {through}'

    direct = f"req-{uuid.uuid4().hex}"
    status, _, _ = http_request(replica.port, "GET", "/v1/models", source="127.0.0.3",
                                headers={"X-Request-Id": direct, **forged})
    assert status == 200
    assert access_line(replica, direct) == \
        f'127.0.0.3 "GET http://127.0.0.1:{replica.port}/v1/models" 200 {direct}'
