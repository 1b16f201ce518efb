"""/v1/messages (Anthropic) through the gateway's routes and upstreams, with the real ``anthropic`` SDK.

The gateway server, its fault-injecting upstream and the session localllm server as the ``real`` upstream are
test_gateway's fixtures (its config's routes: ``to-real`` = [faulty/broken, real/smol], ``busy`` = [faulty/busy,
faulty/ok], ``local-first`` = [smollm2, faulty/ok], ``cut``, ``all-fail``). A message through a route equals
what the answering member gives through /v1/chat/completions (greedy); its stream rebuilds the same message; a
forced tool through an upstream is a tool_use block whose input validates; a cut stream ends with an ``error``
event; the keys show nowhere.
"""
from __future__ import annotations

import json
import logging

import pytest

from .conftest import SMOLLM2, RawHTTP
from .test_gateway import (FAULT_KEY, HELD_RELEASED, OK_ANSWER, REAL_KEY, FaultyUpstream,  # noqa: F401
                           faulty_port, gateway, gw, metric, no_secret)

anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")

GREEDY = {"extra_body": {"temperature": 0}}      # newer SDKs dropped the sampling arguments
PROMPT = [{"role": "user", "content": "Name three colours."}]
WEATHER = {"name": "get_weather", "description": "Get the weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                            "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def claude(gateway):
    return anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0, timeout=120)


def chat_text(gw: RawHTTP, model: str, max_tokens: int) -> tuple[str, str, dict]:
    """(answer text, answering model, usage) of the greedy chat completion of PROMPT via ``model``."""
    response = gw.post("/v1/chat/completions", {"model": model, "messages": PROMPT, "max_tokens": max_tokens,
                                                "temperature": 0, "user": "chat-side"})   # not the messages' key
    assert response.status == 200, response.body
    answer = response.json()
    return answer["choices"][0]["message"]["content"], answer["model"], answer["usage"]


@pytest.mark.parametrize("route, member", [("to-real", "real/smol"), ("local-first", SMOLLM2), ("busy", "faulty/ok")])
def test_a_message_through_a_route_is_the_members_chat_answer(claude, gw, route, member):
    raw = claude.messages.with_raw_response.create(model=route, max_tokens=8, **GREEDY, messages=PROMPT)
    assert raw.headers["x-localllm-model"] == member
    message = raw.parse()
    text, model, usage = chat_text(gw, route, 8)
    assert model == member and message.model == member
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == text
    if member == "faulty/ok":
        assert text == OK_ANSWER and message.stop_reason == "end_turn"
    else:
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 8
    assert message.usage.output_tokens == usage["completion_tokens"]


@pytest.mark.parametrize("route", ["to-real", "local-first"])
def test_a_streamed_message_rebuilds_the_same_message(claude, route):
    whole = claude.messages.create(model=route, max_tokens=6, **GREEDY, messages=PROMPT)
    with claude.messages.stream(model=route, max_tokens=6, **GREEDY, messages=PROMPT) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert streamed.model == whole.model
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_through_an_upstream_is_a_valid_tool_use(claude, stream):
    request = dict(model="to-real", max_tokens=40, **GREEDY, tools=[WEATHER],
                   tool_choice={"type": "tool", "name": "get_weather"},
                   messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    if stream:
        with claude.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = claude.messages.create(**request)
    assert message.model == "real/smol" and message.stop_reason == "tool_use"
    [call] = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])


def test_a_tool_result_conversation_reaches_the_upstream_as_chat_messages(claude):
    FaultyUpstream.seen.clear()
    claude.messages.create(model="faulty/ok", max_tokens=5, tools=[WEATHER], system="Be brief.",
                           stop_sequences=["END"], metadata={"user_id": "u-7"},
                           messages=[{"role": "user", "content": "Weather in Oslo?"},
                                     {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                                                        "name": "get_weather",
                                                                        "input": {"city": "Oslo"}}]},
                                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                                   "content": "rain"}]}])
    [seen] = FaultyUpstream.seen
    assert seen["path"] == "/v1/chat/completions" and seen["authorization"] == f"Bearer {FAULT_KEY}"
    sent = seen["body"]
    assert sent["model"] == "ok" and sent["stop"] == ["END"] and sent["user"] == "u-7"
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    assert sent["messages"][2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"}
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    events = []
    for chunk in body.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_a_cut_upstream_stream_is_an_error_event_never_restarted(gw):
    FaultyUpstream.seen.clear()
    response = gw.post("/v1/messages", {"model": "cut", "max_tokens": 5, "stream": True, "messages": PROMPT})
    assert response.status == 200 and response.headers["x-localllm-model"] == "faulty/cut"
    events = sse_events(response.body)
    kinds = [kind for kind, _ in events]
    assert kinds[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert events[3][1]["delta"]["text"] == "first"
    assert kinds[-1] == "error" and "message_stop" not in kinds
    assert events[-1][1]["error"]["type"] == "api_error" and "ended before it finished" in \
        events[-1][1]["error"]["message"]
    assert [seen["body"]["model"] for seen in FaultyUpstream.seen] == ["cut"]


def test_a_stream_is_translated_event_by_event_not_buffered(gateway):
    import http.client
    from urllib.parse import urlsplit

    HELD_RELEASED.clear()
    url = urlsplit(gateway)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("POST", "/v1/messages", json.dumps({"model": "faulty/held", "max_tokens": 5, "stream": True,
                                                           "messages": PROMPT}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.getheader("X-Localllm-Model") == "faulty/held"
    line = ""
    while '"text_delta"' not in line:                  # arrives while the upstream still holds the rest
        line = response.readline().decode()
        assert line, "the stream ended before its first text"
    assert json.loads(line[5:])["delta"]["text"] == "first"
    HELD_RELEASED.set()
    rest = sse_events(response.read())
    connection.close()
    texts = [data["delta"]["text"] for kind, data in rest if kind == "content_block_delta"]
    assert texts == ["released"] and rest[-1][0] == "message_stop"


def test_the_sdk_raises_on_a_cut_stream(claude):
    with pytest.raises(anthropic.APIStatusError):
        with claude.messages.stream(model="cut", max_tokens=5, messages=PROMPT) as stream:
            for _ in stream:
                pass


def test_failures_are_anthropic_errors_without_keys(gw, caplog):
    caplog.set_level(logging.DEBUG)
    response = gw.post("/v1/messages", {"model": "all-fail", "max_tokens": 5, "messages": PROMPT})
    assert response.status == 502
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "faulty/busy" in error["error"]["message"] and "faulty/broken" in error["error"]["message"]
    rejected = gw.post("/v1/messages", {"model": "faulty/reject", "max_tokens": 5, "messages": PROMPT})
    assert rejected.status == 400 and rejected.json()["error"]["type"] == "invalid_request_error"
    for text in (response.body.decode(), rejected.body.decode(), caplog.text):
        no_secret(text)
        assert REAL_KEY not in text


def test_messages_are_cached_and_costed_per_route(gw):
    body = {"model": "to-real", "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": "Cache this message."}]}
    tokens_before = metric(gw, "localllm_gateway_completion_tokens_total", "to-real", "real/smol")
    first, second = gw.post("/v1/messages", body), gw.post("/v1/messages", body)
    assert (first.headers["x-localllm-cache"], second.headers["x-localllm-cache"]) == ("miss", "hit")
    assert second.json()["content"] == first.json()["content"] and second.json()["model"] == "real/smol"
    assert metric(gw, "localllm_gateway_completion_tokens_total", "to-real", "real/smol") == tokens_before + 3


def test_a_large_max_tokens_is_fitted_to_a_local_members_window_not_a_fallback(gw):
    body = {"model": "local-first", "max_tokens": 32000, "temperature": 0,      # Claude Code's max_tokens
            "messages": [{"role": "user", "content": "Hi"}]}                    # a short answer (end_turn)
    routed = gw.post("/v1/messages", body)
    assert routed.status == 200 and routed.headers["x-localllm-model"] == SMOLLM2
    local = gw.post("/v1/messages", dict(body, model=SMOLLM2)).json()
    assert routed.json()["content"] == local["content"] and routed.json()["stop_reason"] == local["stop_reason"]


def test_local_models_keep_the_local_path(gw):
    response = gw.post("/v1/messages", {"model": SMOLLM2, "max_tokens": 3, "messages": PROMPT})
    assert response.status == 200 and "x-localllm-model" not in response.headers
    assert response.json()["id"].startswith("msg_") and response.json()["model"] == SMOLLM2


def test_count_tokens_only_for_local_members(gw):
    body = {"messages": PROMPT}
    local = gw.post("/v1/messages/count_tokens", dict(body, model=SMOLLM2))
    routed = gw.post("/v1/messages/count_tokens", dict(body, model="local-first"))
    assert local.status == routed.status == 200 and routed.json() == local.json()
    for model in ("faulty/ok", "to-real"):
        refused = gw.post("/v1/messages/count_tokens", dict(body, model=model))
        assert refused.status == 400, refused.body
        assert "cannot count" in refused.json()["error"]["message"] and "upstream" in refused.json()["error"]["message"]
