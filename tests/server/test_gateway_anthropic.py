"""Anthropic-format upstreams (``format = "anthropic"``) through the gateway, over HTTP.

test_gateway's fixtures: ``claude`` is the session's keyed localllm server spoken to as an Anthropic API (its
/v1/messages; the key goes as ``x-api-key``, which it checks), ``faulty-claude`` the fault-injecting upstream's
Anthropic side (429, 500, 529, a stream cut after its first text, a 400 echoing the key). Routes:
``to-claude`` = [faulty-claude/busy, faulty-claude/overloaded, claude/smol], ``claude-then-openai`` =
[faulty-claude/broken, faulty/ok], ``claude-cut`` = [faulty-claude/cut, faulty/ok], ``claude-or-openai`` =
[faulty-claude/ok, faulty/ok], ``local-then-claude`` = [smollm2, faulty-claude/ok].

From /v1/chat/completions the request is translated (a greedy answer equals the local chat's own, streamed or
not; forced tools come back as tool_calls); from /v1/messages it is passed through as sent.
"""
from __future__ import annotations

import json
import logging

import pytest

from .conftest import API_KEY, SMOLLM2
from .test_gateway import (FAULT_KEY, OK_ANSWER, REAL_PRICES, FaultyUpstream,  # noqa: F401
                           faulty_port, gateway, gw, metric, no_secret, sse_payloads)

anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")

SYSTEM = {"role": "system", "content": "You are brief."}
PROMPT = [SYSTEM, {"role": "user", "content": "Name three colours."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}


def greedy(model: str, **extra) -> dict:
    return {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0, **extra}


def streamed_text(payloads: list) -> str:
    return "".join(choice["delta"].get("content") or "" for p in payloads if isinstance(p, dict)
                   for choice in p.get("choices", []))


def no_key(text: str) -> None:
    no_secret(text)
    assert API_KEY not in text


# ---- /v1/chat/completions, translated ----------------------------------------------------------------

def test_a_chat_through_an_anthropic_upstream_is_the_local_chat_answer(gw, http):
    response = gw.post("/v1/chat/completions", greedy("claude/smol"))
    assert response.status == 200, response.body
    assert response.headers["x-localllm-model"] == "claude/smol"
    answer = response.json()
    direct = http.post("/v1/chat/completions", greedy(SMOLLM2)).json()
    assert answer["model"] == "claude/smol" and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 8
    assert answer["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]      # the same prompt


def test_a_streamed_chat_through_an_anthropic_upstream_is_translated_chunk_by_chunk(gw, http):
    direct = http.post("/v1/chat/completions", greedy(SMOLLM2)).json()
    response = gw.post("/v1/chat/completions", greedy("claude/smol", stream=True))
    assert response.status == 200 and response.headers["x-localllm-model"] == "claude/smol"
    payloads = sse_payloads(response.body)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["model"] for c in chunks} == {"claude/smol"} and {c["object"] for c in chunks} == {
        "chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(chunks) == direct["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert all("usage" not in c for c in chunks)                  # not asked for: dropped
    with_usage = sse_payloads(gw.post("/v1/chat/completions", greedy(
        "claude/smol", stream=True, stream_options={"include_usage": True})).body)
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_through_an_anthropic_upstream(gw, http, stream):
    body = {"model": "claude/smol", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER_TOOL], "tool_choice": "required", "max_tokens": 40, "temperature": 0}
    direct = http.post("/v1/chat/completions", dict(body, model=SMOLLM2)).json()["choices"][0]
    response = gw.post("/v1/chat/completions", dict(body, stream=stream))
    assert response.status == 200, response.body
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for payload in sse_payloads(response.body)[:-1]:
            for choice in payload["choices"]:
                finish = choice["finish_reason"] or finish
                for call in choice["delta"].get("tool_calls") or []:
                    entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                    entry["name"] += call.get("function", {}).get("name") or ""
                    entry["arguments"] += call.get("function", {}).get("arguments") or ""
        [call] = calls.values()
    else:
        choice = response.json()["choices"][0]
        finish = choice["finish_reason"]
        [tool_call] = choice["message"]["tool_calls"]
        call = tool_call["function"]
        assert tool_call["type"] == "function" and tool_call["id"]
    assert finish == direct["finish_reason"] == "tool_calls"
    [direct_call] = direct["message"]["tool_calls"]
    assert call["name"] == direct_call["function"]["name"] == "get_weather"
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
    assert arguments == json.loads(direct_call["function"]["arguments"])


def test_a_json_schema_answer_through_an_anthropic_upstream(gw):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 10}},
              "required": ["colour"], "additionalProperties": False}
    response = gw.post("/v1/chat/completions", greedy("claude/smol", max_tokens=30, response_format={
        "type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}))
    assert response.status == 200, response.body
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), schema)


def test_the_translated_request_the_anthropic_upstream_gets(gw):
    FaultyUpstream.seen.clear()
    response = gw.post("/v1/chat/completions", {
        "model": "faulty-claude/ok", "max_tokens": 5, "temperature": 0.5, "stop": "END", "user": "u-7",
        "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "seed": 3, "reasoning_effort": "none",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"},
                                                  {"type": "image_url",
                                                   "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                     {"role": "assistant", "content": None, "tool_calls": [{
                         "id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                     {"role": "user", "content": "And tomorrow?"}]})
    assert response.status == 200, response.body
    answer = response.json()
    assert answer["model"] == "faulty-claude/ok" and answer["choices"][0]["message"]["content"] == OK_ANSWER
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["prompt_tokens"] == 3
    [seen] = FaultyUpstream.seen
    assert seen["path"] == "/v1/messages" and seen["authorization"] is None
    assert seen["x-api-key"] == FAULT_KEY and seen["anthropic-version"] == "2023-06-01"
    assert seen["body"] == {
        "model": "ok", "max_tokens": 5, "system": "Be brief.", "temperature": 0.5, "stop_sequences": ["END"],
        "metadata": {"user_id": "u-7"}, "thinking": {"type": "disabled"},
        "tools": [{"name": "get_weather", "description": "Get the weather of a city",
                   "input_schema": WEATHER_TOOL["function"]["parameters"]}],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}, {
                "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                               "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "rain"},
                                         {"type": "text", "text": "And tomorrow?"}]}]}


# ---- fallback ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_429_and_529_from_anthropic_upstreams_move_on(gw, stream):
    FaultyUpstream.seen.clear()
    response = gw.post("/v1/chat/completions", greedy("to-claude", stream=stream))
    assert response.status == 200, response.body
    assert response.headers["x-localllm-model"] == "claude/smol"
    assert [seen["body"]["model"] for seen in FaultyUpstream.seen] == ["busy", "overloaded"]
    if stream:
        assert {p["model"] for p in sse_payloads(response.body)[:-1]} == {"claude/smol"}
    else:
        assert response.json()["model"] == "claude/smol"


def test_a_failing_anthropic_upstream_falls_back_to_an_openai_one_without_showing_keys(gw, caplog):
    caplog.set_level(logging.DEBUG)
    response = gw.post("/v1/chat/completions", greedy("claude-then-openai"))
    assert response.status == 200 and response.json()["model"] == "faulty/ok"
    rejected = gw.post("/v1/chat/completions", greedy("faulty-claude/reject"))
    assert rejected.status == 400 and rejected.headers["x-localllm-model"] == "faulty-claude/reject"
    error = rejected.json()["error"]                           # Anthropic's error in OpenAI's envelope
    assert error["type"] == "invalid_request_error" and error["message"].startswith("invalid_request_error for ")
    assert "***" in error["message"]
    for text in (response.body.decode(), rejected.body.decode(), caplog.text):
        no_key(text)


def test_what_an_anthropic_upstream_cannot_do_moves_on_or_is_a_400(gw):
    routed = gw.post("/v1/chat/completions", greedy("claude-or-openai", logprobs=True))
    assert routed.status == 200 and routed.json()["model"] == "faulty/ok"
    alone = gw.post("/v1/chat/completions", greedy("faulty-claude/ok", n=2))
    assert alone.status == 400 and alone.json()["error"]["code"] == "unsupported_by_upstream"
    assert "n > 1" in alone.json()["error"]["message"]
    embedded = gw.post("/v1/embeddings", {"model": "faulty-claude/ok", "input": "hi"})
    assert embedded.status == 400 and "not /v1/embeddings" in embedded.json()["error"]["message"]
    json_mode = gw.post("/v1/chat/completions", greedy("faulty-claude/ok", response_format={"type": "json_object"}))
    assert json_mode.status == 400 and "no JSON mode" in json_mode.json()["error"]["message"]


def test_a_cut_anthropic_stream_ends_with_an_error_event_never_restarted(gw):
    FaultyUpstream.seen.clear()
    response = gw.post("/v1/chat/completions", greedy("claude-cut", stream=True))
    assert response.status == 200 and response.headers["x-localllm-model"] == "faulty-claude/cut"
    *chunks, error, done = sse_payloads(response.body)
    assert streamed_text(chunks) == "first" and done == "[DONE]"
    assert error["error"]["code"] == "upstream_failed" and "ended before it finished" in error["error"]["message"]
    assert [seen["body"]["model"] for seen in FaultyUpstream.seen] == ["cut"]       # never sent to faulty/ok


# ---- /v1/messages, passed through ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def claude_sdk(gateway):
    return anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_message_through_an_anthropic_upstream_is_passed_through(claude_sdk, keyed_server, stream):
    request = dict(model="to-claude", max_tokens=8, system=[{"type": "text", "text": "You are brief."}],
                   messages=MESSAGES, extra_body={"temperature": 0})
    FaultyUpstream.seen.clear()
    if stream:
        with claude_sdk.messages.stream(**request) as events:
            kinds = [event.type for event in events]
            message = events.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    else:
        message = claude_sdk.messages.create(**request)
    assert [seen["body"]["system"] for seen in FaultyUpstream.seen] == [request["system"]] * 2   # as sent
    direct = anthropic.Anthropic(base_url=keyed_server, api_key=API_KEY, max_retries=0).messages.create(
        **dict(request, model=SMOLLM2))
    assert message.model == "claude/smol"
    assert [b.model_dump() for b in message.content] == [b.model_dump() for b in direct.content]
    assert (message.stop_reason, message.usage.output_tokens) == (direct.stop_reason, direct.usage.output_tokens)


def test_a_message_moves_from_a_local_member_to_an_anthropic_upstream(gw):
    FaultyUpstream.seen.clear()
    long_prompt = "word " * 9000                         # past SmolLM2's 8192-token context
    response = gw.post("/v1/messages", {"model": "local-then-claude", "max_tokens": 5, "stop_sequences": ["END"],
                                        "messages": [{"role": "user", "content": long_prompt}]})
    assert response.status == 200, response.body
    message = response.json()
    assert message["model"] == "faulty-claude/ok" and message["content"] == [{"type": "text", "text": OK_ANSWER}]
    [seen] = FaultyUpstream.seen
    assert seen["body"]["stop_sequences"] == ["END"] and seen["body"]["max_tokens"] == 5      # the body as sent


def test_a_cut_anthropic_stream_on_messages_ends_with_an_error_event(gw):
    response = gw.post("/v1/messages", {"model": "claude-cut", "max_tokens": 5, "stream": True, "messages": MESSAGES})
    assert response.status == 200 and response.headers["x-localllm-model"] == "faulty-claude/cut"
    events = [(chunk.split("\n")[0].removeprefix("event: "), json.loads(chunk.split("data: ", 1)[1]))
              for chunk in response.body.decode().split("\n\n") if chunk]
    kinds = [kind for kind, _ in events]
    assert kinds == ["message_start", "ping", "content_block_start", "content_block_delta", "error"]
    assert events[0][1]["message"]["model"] == "faulty-claude/cut"
    assert events[-1][1]["error"]["type"] == "api_error" and "ended before it finished" in \
        events[-1][1]["error"]["message"]


def test_an_anthropic_rejection_on_messages_keeps_its_envelope_without_the_key(gw):
    response = gw.post("/v1/messages", {"model": "faulty-claude/reject", "max_tokens": 5, "messages": MESSAGES})
    assert response.status == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "***" in error["error"]["message"]
    no_key(response.body.decode())


# ---- cache and cost -------------------------------------------------------------------------------------

def test_anthropic_answers_are_costed_and_cached_per_api(gw):
    body = greedy("claude/smol", max_tokens=3, messages=[{"role": "user", "content": "Cache via Anthropic"}])
    cost_before = metric(gw, "localllm_gateway_cost_total", "claude/smol", "claude/smol")
    first, second = gw.post("/v1/chat/completions", body), gw.post("/v1/chat/completions", body)
    assert (first.headers["x-localllm-cache"], second.headers["x-localllm-cache"]) == ("miss", "hit")
    assert second.body == first.body
    usage = first.json()["usage"]
    expected = (usage["prompt_tokens"] * REAL_PRICES[0] + usage["completion_tokens"] * REAL_PRICES[1]) / 1e6
    cost = metric(gw, "localllm_gateway_cost_total", "claude/smol", "claude/smol") - cost_before
    assert cost == pytest.approx(expected, abs=1e-5)
    message = {"model": "claude/smol", "max_tokens": 3, "temperature": 0,
               "messages": [{"role": "user", "content": "Cache via Anthropic"}]}
    as_message = gw.post("/v1/messages", message)                  # the same request on the other API: its own
    assert as_message.headers["x-localllm-cache"] == "miss" and as_message.json()["type"] == "message"
    again = gw.post("/v1/messages", message)
    assert again.headers["x-localllm-cache"] == "hit" and again.json()["content"] == as_message.json()["content"]


def test_count_tokens_asks_an_anthropic_upstream(gw):
    body = {"messages": MESSAGES, "system": "You are brief."}
    local = gw.post("/v1/messages/count_tokens", dict(body, model=SMOLLM2))
    upstream = gw.post("/v1/messages/count_tokens", dict(body, model="claude/smol"))     # the keyed server's count
    assert local.status == upstream.status == 200 and upstream.json() == local.json()
    FaultyUpstream.seen.clear()
    assert gw.post("/v1/messages/count_tokens", dict(body, model="faulty-claude/ok")).json() == {"input_tokens": 3}
    [seen] = FaultyUpstream.seen
    assert seen["path"] == "/v1/messages/count_tokens" and seen["body"] == dict(body, model="ok")
    rejected = gw.post("/v1/messages/count_tokens", dict(body, model="faulty-claude/reject"))
    assert rejected.status == 400 and rejected.json()["error"]["type"] == "invalid_request_error"
    busy = gw.post("/v1/messages/count_tokens", dict(body, model="to-claude"))        # its first member: no fallback
    assert busy.status == 429 and busy.json()["error"]["type"] == "rate_limit_error"
    for response in (rejected, busy):
        no_key(response.body.decode())
