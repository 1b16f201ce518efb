"""anthropic_api.openai_bridge without HTTP: Anthropic request -> chat-completions body, a chat completion ->
a message, a stream of chat chunks -> Anthropic's events (and a cut or an error -> an ``error`` event)."""
from __future__ import annotations

import json

import pytest

from localllm_server.anthropic_api import openai_bridge
from localllm_server.anthropic_api.request import parse_messages_request
from localllm_server.errors import APIError

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def translated(body: dict) -> dict:
    return openai_bridge.chat_body(body, parse_messages_request(body))


def test_request_system_messages_tools_and_settings():
    body = {"model": "route", "max_tokens": 50, "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 20,
            "metadata": {"user_id": "u-1"}, "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                                  {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                             {"type": "text", "text": "And so?"}]}]}
    out = translated(body)
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And so?"}]
    assert out["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER["input_schema"]}}]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert out["parallel_tool_calls"] is False
    assert (out["model"], out["max_tokens"], out["stop"], out["user"]) == ("route", 50, ["END"], "u-1")
    assert (out["temperature"], out["top_p"], out["top_k"]) == (0.5, 0.9, 20)
    assert "stream" not in out and "reasoning_effort" not in out


@pytest.mark.parametrize("choice, expected", [({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
                                              ({"type": "none"}, "none")])
def test_request_tool_choices(choice, expected):
    body = {"model": "r", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
            "tool_choice": choice}
    assert translated(body)["tool_choice"] == expected


@pytest.mark.parametrize("extra, effort", [
    ({"thinking": {"type": "disabled"}}, "none"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
    ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
    ({"thinking": {"type": "enabled", "budget_tokens": 20000}}, "high"),
    ({"thinking": {"type": "enabled", "budget_tokens": 20000}, "output_config": {"effort": "low"}}, "low"),
    ({"thinking": {"type": "adaptive"}}, None),
    ({"output_config": {"effort": "max"}}, "high"),
])
def test_request_thinking_as_reasoning_effort(extra, effort):
    body = {"model": "r", "max_tokens": 30000, "messages": [{"role": "user", "content": "hi"}], **extra}
    assert translated(body).get("reasoning_effort") == effort


def test_request_stream_asks_for_usage_and_bad_bodies_are_the_local_400():
    body = {"model": "r", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    out = translated(body)
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    with pytest.raises(APIError) as caught:
        translated({"model": "r", "messages": [{"role": "user", "content": "hi"}]})
    assert caught.value.status == 400 and "max_tokens" in caught.value.message


def completion(message: dict, finish_reason: str, **choice) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason,
                         **choice}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                      "prompt_tokens_details": {"cached_tokens": 4}}}


def test_answer_text_thinking_and_usage():
    message = openai_bridge.message_from_completion(
        completion({"content": "Hello.", "reasoning_content": "greet"}, "stop"), "faulty/ok", [], "msg_1")
    assert message == {"id": "msg_1", "type": "message", "role": "assistant", "model": "faulty/ok",
                       "content": [{"type": "thinking", "thinking": "greet", "signature": ""},
                                   {"type": "text", "text": "Hello."}],
                       "stop_reason": "end_turn", "stop_sequence": None,
                       "usage": {"input_tokens": 7, "output_tokens": 7, "cache_creation_input_tokens": 0,
                                 "cache_read_input_tokens": 4}}


def test_answer_tool_calls_and_stop_reasons():
    calls = [{"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]
    message = openai_bridge.message_from_completion(completion({"content": None, "tool_calls": calls},
                                                               "tool_calls"), "m", [])
    assert message["content"] == [{"type": "tool_use", "id": "call_9", "name": "get_weather",
                                   "input": {"city": "Oslo"}}]
    assert message["stop_reason"] == "tool_use"
    cut = openai_bridge.message_from_completion(completion({"content": "abc"}, "length"), "m", [])
    assert (cut["stop_reason"], cut["content"]) == ("max_tokens", [{"type": "text", "text": "abc"}])
    named = openai_bridge.message_from_completion(completion({"content": "a"}, "stop", stop_reason="END"), "m",
                                                  ["END"])
    assert (named["stop_reason"], named["stop_sequence"]) == ("stop_sequence", "END")
    unnamed = openai_bridge.message_from_completion(completion({"content": "a"}, "stop"), "m", ["END"])
    assert (unnamed["stop_reason"], unnamed["stop_sequence"]) == ("end_turn", None)


def test_upstream_error_bodies_take_anthropics_envelope():
    assert openai_bridge.error_from_openai(400, b'{"error": {"message": "bad model"}}') == \
        {"type": "error", "error": {"type": "invalid_request_error", "message": "bad model"}}
    assert openai_bridge.error_from_openai(502, b"<html>") == \
        {"type": "error", "error": {"type": "api_error", "message": "<html>"}}


# ---- streams ------------------------------------------------------------------------------------------

def sse(payload) -> bytes:
    return b"data: " + (payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()) + b"\n\n"


def chunk(delta: dict, finish_reason=None) -> bytes:
    return sse({"object": "chat.completion.chunk", "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})


USAGE = sse({"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})


def events(chunks: list[bytes], stops=()) -> list[dict]:
    return list(openai_bridge.translate_stream(chunks, "route-model", list(stops)))


def rebuild(stream_events: list[dict]) -> dict:
    """A message rebuilt from its events, as an SDK accumulates it."""
    message = None
    for event in stream_events:
        if event["type"] == "message_start":
            message = dict(event["message"], content=[])
        elif event["type"] == "content_block_start":
            assert event["index"] == len(message["content"])
            message["content"].append(dict(event["content_block"], **({"partial": ""}
                                                                       if event["content_block"]["type"] == "tool_use"
                                                                       else {})))
        elif event["type"] == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial"}[delta["type"]]
            block[key] += delta.get("text", delta.get("thinking", delta.get("partial_json")))
        elif event["type"] == "message_delta":
            message.update(event["delta"], usage=event["usage"])
    for block in message["content"]:
        if block["type"] == "tool_use":
            block["input"] = json.loads(block.pop("partial"))
    return message


def test_stream_text_and_thinking_events_in_order():
    out = events([chunk({"role": "assistant", "reasoning_content": "hm"}), chunk({"content": "Hel"}),
                  chunk({"content": "lo"}), chunk({}, "stop"), USAGE, sse("[DONE]")])
    assert [e["type"] for e in out] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    message = rebuild(out)
    assert message["model"] == "route-model"
    assert message["content"] == [{"type": "thinking", "thinking": "hm", "signature": ""},
                                  {"type": "text", "text": "Hello"}]
    assert message["stop_reason"] == "end_turn"
    assert (message["usage"]["input_tokens"], message["usage"]["output_tokens"]) == (5, 3)


def test_stream_tool_call_argument_deltas():
    out = events([chunk({"role": "assistant", "tool_calls": [
                      {"index": 0, "id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": ""}}]}),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
                  chunk({}, "tool_calls"), sse("[DONE]")])
    assert [e["delta"]["type"] for e in out if e["type"] == "content_block_delta"] == ["input_json_delta"] * 2
    message = rebuild(out)
    assert message["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                   "input": {"city": "Oslo"}}]
    assert message["stop_reason"] == "tool_use"


def test_stream_without_text_has_an_empty_text_block_and_length_is_max_tokens():
    message = rebuild(events([chunk({"role": "assistant"}), chunk({}, "length"), sse("[DONE]")]))
    assert message["content"] == [{"type": "text", "text": ""}] and message["stop_reason"] == "max_tokens"


def test_stream_error_event_or_cut_ends_with_an_anthropic_error_event():
    gateway_error = b'data: {"error": {"message": "the stream of \'x\' ended", "code": "upstream_failed"}}\n\n' \
                    b"data: [DONE]\n\n"                     # the gateway's in-band error, one chunk
    out = events([chunk({"role": "assistant", "content": "first"}), gateway_error])
    assert [e["type"] for e in out][-2:] == ["content_block_delta", "error"]
    assert out[-1]["error"]["message"] == "the stream of 'x' ended" and "message_stop" not in [e["type"] for e in out]
    cut = events([chunk({"role": "assistant", "content": "first"})])
    assert cut[-1]["type"] == "error" and "message_stop" not in [e["type"] for e in cut]


def test_stream_is_translated_chunk_by_chunk():
    def chunks():
        yield chunk({"role": "assistant", "content": "a"})
        raise AssertionError("read past the first chunk before its events were taken")
    translated_events = openai_bridge.translate_stream(chunks(), "m", [])
    assert [next(translated_events)["type"] for _ in range(4)] == [
        "message_start", "ping", "content_block_start", "content_block_delta"]
