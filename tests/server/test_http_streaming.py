"""Streaming over raw HTTP: SSE framing byte for byte, concurrent clients, disconnects."""
from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from .conftest import SMOLLM2

SSE_BODY = re.compile(rb"(?:data: \{[^\n]*\}\n\n)+data: \[DONE\]\n\n")


def sse_events(body: bytes) -> list[dict]:
    assert SSE_BODY.fullmatch(body), body[:500]
    return [json.loads(event[len(b"data: "):]) for event in body.split(b"\n\n")[:-2]]


def test_chat_sse_framing_byte_for_byte(http, golden_case, greedy_text):
    response = http.post("/v1/chat/completions", {"model": SMOLLM2, "messages": golden_case("chat_sky")["messages"],
                                                  "temperature": 0, "max_tokens": 3, "stream": True})
    assert response.status == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.body.startswith(b"data: {") and response.body.endswith(b"}\n\ndata: [DONE]\n\n")
    chunks = sse_events(response.body)
    first, *content, final = chunks
    for chunk in chunks:
        assert set(chunk) == {"id", "object", "created", "model", "system_fingerprint", "choices"}
        assert (chunk["id"], chunk["created"]) == (first["id"], first["created"])
        assert (chunk["object"], chunk["model"], chunk["system_fingerprint"]) == \
            ("chat.completion.chunk", SMOLLM2, "fp_localllm")
    assert first["id"].startswith("chatcmpl-")
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
               for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == greedy_text("chat_sky", 3)
    assert final["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]


def test_chat_sse_include_usage(http, golden_case):
    case = golden_case("chat_sky")
    response = http.post("/v1/chat/completions", {"model": SMOLLM2, "messages": case["messages"], "temperature": 0,
                                                  "max_tokens": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    *chunks, last = sse_events(response.body)
    assert all("usage" in c and c["usage"] is None for c in chunks)
    assert last["choices"] == []
    n_prompt = len(case["prompt_tokens"])
    assert last["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 2, "total_tokens": n_prompt + 2,
                             "prompt_tokens_details": {"cached_tokens": last["usage"]["prompt_tokens_details"]["cached_tokens"]}}


def test_completion_sse_framing(http, golden_case, greedy_text):
    response = http.post("/v1/completions", {"model": SMOLLM2, "prompt": golden_case("capital")["prompt"],
                                             "temperature": 0, "max_tokens": 3, "stream": True, "logprobs": 1})
    assert response.headers["content-type"] == "text/event-stream"
    chunks = sse_events(response.body)
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_text("capital", 3)
    tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert "".join(tokens) == greedy_text("capital", 3)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_errors_found_before_streaming_keep_their_status(http):
    response = http.post("/v1/chat/completions", {"model": SMOLLM2, "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 100_000, "stream": True})
    assert response.status == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def stream_text(http, messages) -> str:
    response = http.post("/v1/chat/completions", {"model": SMOLLM2, "messages": messages, "temperature": 0,
                                                  "max_tokens": 8, "stream": True})
    chunks = sse_events(response.body)
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_eight_concurrent_streaming_clients_get_what_they_get_alone(http):
    questions = ["Why is the sky blue?", "Count to 10", "What is the capital of France?", "Say hello.",
                 "Name three fruits.", "What is 2 + 2?", "Write a haiku about rain.", "Who wrote Hamlet?"]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    alone = [stream_text(http, c) for c in conversations]
    with ThreadPoolExecutor(len(conversations)) as pool:
        together = list(pool.map(lambda c: stream_text(http, c), conversations))
    assert together == alone
    assert all(alone)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(http, engine, monkeypatch):
    handles = []
    submit = engine.submit

    def spying_submit(*args, **kwargs):
        handle = submit(*args, **kwargs)
        handles.append(handle)
        return handle
    monkeypatch.setattr(engine, "submit", spying_submit)

    max_tokens = 2000
    body = json.dumps({"model": SMOLLM2, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "stream": True, "temperature": 0, "max_tokens": max_tokens,
                       "logit_bias": {"0": -100, "2": -100}}).encode()     # no end-of-text: only max_tokens ends it
    with socket.create_connection((http.host, http.port), timeout=120) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while received.count(b'"content"') < 4:                 # the role chunk and a few tokens
            data = sock.recv(65536)
            assert data, "server closed the stream early"
            received += data
    [handle] = handles
    worker = engine.workers[SMOLLM2]
    deadline = time.monotonic() + 120                            # a bound only: cancellation takes one step
    while time.monotonic() < deadline and (not handle.cancelled.is_set() or handle in worker.active):
        time.sleep(0.05)
    assert handle.cancelled.is_set()
    assert handle not in worker.active
    [sequence] = handle.sequences
    assert sequence.finish_reason is None                        # stopped by the disconnect, not by max_tokens
    assert len(sequence.generated) < max_tokens
    assert sequence.slot not in [s.slot for h in worker.active for s in h.sequences]
