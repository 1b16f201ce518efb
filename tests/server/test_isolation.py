"""One request never fails another: hostile sampling values beside an innocent greedy stream.

Every sampling parameter the two APIs accept, at its numerical edges, is sent while an innocent
greedy stream is decoding in the same batch. The innocent stream must finish with exactly the text it
gets alone; the hostile request either completes or gets its own clean error, and the server keeps
serving. Before the fix, repeat_penalty 5e-324 made the batched step raise `logits contain NaN or
+inf` and the worker ended every live request with it.
"""
from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import SMOLLM2

PROMPT = "The three primary colors are"
INNOCENT_TOKENS = 40
TINY, HUGE = 5e-324, 1.7976931348623157e308

# (field, value): OpenAI /v1/completions top-level fields, and the same values as /api/generate options.
OPENAI_EDGES = [("repeat_penalty", TINY), ("repeat_penalty", 1e-300), ("repeat_penalty", HUGE),
                ("temperature", TINY), ("temperature", 2.0), ("top_p", TINY), ("top_p", 0.0), ("min_p", 1.0),
                ("min_p", TINY), ("top_k", 2**63 - 1), ("frequency_penalty", -2.0), ("presence_penalty", 2.0),
                ("seed", 2**63 - 1)]
OLLAMA_EDGES = OPENAI_EDGES + [("temperature", HUGE), ("repeat_last_n", -1), ("repeat_last_n", 2**31),
                               ("num_predict", -1)]


def _stream(port: int, path: str, body: dict, started: threading.Event | None = None) -> tuple[int, list[dict]]:
    """POST a streaming request; (status, decoded events). ``started`` is set after the first event."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        events = []
        for raw in response:
            line = raw.strip()
            if line.startswith(b"data: "):
                line = line[6:]
            if not line or line == b"[DONE]":
                continue
            events.append(json.loads(line))
            if started is not None:
                started.set()
        return response.status, events
    finally:
        connection.close()


def _openai_text(events: list[dict]) -> str:
    assert not any("error" in e for e in events), events
    assert events[-1]["choices"][0]["finish_reason"] == "length" or any(
        e["choices"] and e["choices"][0].get("finish_reason") for e in events)
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


def _ollama_text(events: list[dict]) -> str:
    assert not any("error" in e for e in events), events
    assert events[-1]["done"] is True
    return "".join(e["response"] for e in events)


ROUTES = {
    "openai": ("/v1/completions", lambda extra: {"model": SMOLLM2, "prompt": PROMPT, "stream": True, **extra},
               lambda: {"temperature": 0, "max_tokens": INNOCENT_TOKENS}, _openai_text),
    "ollama": ("/api/generate", lambda extra: {"model": SMOLLM2, "prompt": PROMPT, "raw": True, "stream": True,
                                                "options": extra},
               lambda: {"temperature": 0, "num_predict": INNOCENT_TOKENS}, _ollama_text),
}


def _hostile_body(api: str, field: str, value) -> dict:
    path, body, _, _ = ROUTES[api]
    extra = {field: value}
    if field != "num_predict":
        extra["max_tokens" if api == "openai" else "num_predict"] = 12
    else:   # unlimited: bounded by ten context windows (context shift); a small window and a fixed seed keep that
        extra.update(num_ctx=256, seed=1)   # short and the same every run (sampled at random, it once ran minutes)
    return body(extra)


@pytest.fixture(scope="module")
def port(server) -> int:
    return int(server.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def alone(port) -> dict[str, str]:
    """The innocent stream's text with nothing beside it, per API."""
    texts = {}
    for api, (path, body, innocent, text_of) in ROUTES.items():
        status, events = _stream(port, path, body(innocent()))
        assert status == 200
        texts[api] = text_of(events)
    assert texts["openai"] == texts["ollama"] and len(texts["openai"]) > 20
    return texts


def _beside_innocent(port: int, api: str, hostile: list[dict]) -> tuple[str, list[tuple[int, list[dict]]]]:
    """Run the hostile bodies while the innocent stream decodes; (innocent text, hostile results)."""
    path, body, innocent, text_of = ROUTES[api]
    started = threading.Event()
    with ThreadPoolExecutor(len(hostile) + 1) as pool:
        innocent_run = pool.submit(_stream, port, path, body(innocent()), started)
        assert started.wait(120), "the innocent stream produced nothing"
        hostile_runs = [pool.submit(_stream, port, path, b) for b in hostile]
        status, events = innocent_run.result(timeout=300)
        results = [run.result(timeout=300) for run in hostile_runs]
    assert status == 200
    return text_of(events), results


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_extreme_sampling_values_never_touch_the_stream_beside_them(api, port, alone):
    edges = OPENAI_EDGES if api == "openai" else OLLAMA_EDGES
    for start in range(0, len(edges), 6):                   # six hostile requests at a time beside the innocent one
        batch = edges[start:start + 6]
        text, results = _beside_innocent(port, api, [_hostile_body(api, f, v) for f, v in batch])
        assert text == alone[api], f"innocent stream changed beside {batch}"
        for (field, value), (status, events) in zip(batch, results):
            assert status == 200, (field, value, status)
            assert events and not any("error" in e for e in events), (field, value, events[-1:])


def test_a_request_that_bans_every_token_fails_alone(port, smollm2, alone):
    """logit_bias -100 on the whole vocabulary: that request gets its error, the innocent stream its text."""
    ban_all = {str(token): -100 for token in range(smollm2.tokenizer.vocab_size)}
    hostile = {"model": SMOLLM2, "prompt": PROMPT, "stream": True, "max_tokens": 8, "logit_bias": ban_all}
    text, [(status, events)] = _beside_innocent(port, "openai", [hostile])
    assert text == alone["openai"]
    if status == 200:                                       # the stream had begun: its own error event
        assert "error" in events[-1] and "every token is banned" in events[-1]["error"]["message"]
    else:
        assert status == 400
    # and the server still serves
    status, events = _stream(port, *[ROUTES["openai"][0], ROUTES["openai"][1](ROUTES["openai"][2]())])
    assert status == 200 and _openai_text(events) == alone["openai"]
