"""/v1/messages and /v1/messages/count_tokens with the real Anthropic SDK against a real server (SmolLM2).

Oracles: the greedy text equals what /v1/chat/completions gives for the same request (same template,
same sampling), and its token count equals the usage there; the streamed events reassemble into the
non-streamed message; a forced call validates against its input_schema with ``jsonschema``; stop
reasons follow from what ended the output (a stop sequence the free answer contains, max_tokens);
errors carry Anthropic's envelope and status.
"""
from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest

from .conftest import API_KEY, SMOLLM2

WEATHER = {"name": "get_weather", "description": "Get the current weather for a location",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                            "required": ["location"]}}
TIME = {"name": "get_time", "description": "Current time in a time zone",
        "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}
QUESTION = "What is the capital of France?"
SYSTEM = "You are a geography teacher. Answer in one sentence."
MAX_TOKENS = 12
GREEDY = {"extra_body": {"temperature": 0}}      # newer SDKs dropped the sampling arguments; the API keeps them


@pytest.fixture(scope="module")
def claude(server):
    """The Anthropic SDK pointed at the server, as the README shows it."""
    return anthropic.Anthropic(base_url=server, api_key="localllm", max_retries=0, timeout=300)


def create(claude, **kwargs):
    request = {"model": SMOLLM2, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": QUESTION}],
               **GREEDY, **kwargs}
    return claude.messages.create(**request)


def openai_chat(client, messages, **kwargs):
    return client.chat.completions.create(model=SMOLLM2, messages=messages, temperature=0, **kwargs)


@pytest.fixture(scope="module")
def answer(claude):
    return create(claude, system=SYSTEM, max_tokens=40)


@pytest.fixture(scope="module")
def openai_answer(client):
    return openai_chat(client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                       max_tokens=40)


def test_message_has_anthropic_shape(answer):
    assert answer.id.startswith("msg_") and answer.type == "message" and answer.role == "assistant"
    assert answer.model == SMOLLM2
    [block] = answer.content
    assert block.type == "text" and block.text
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.stop_sequence is None
    assert answer.usage.output_tokens > 0


def test_text_and_usage_equal_the_chat_completion(answer, openai_answer):
    """Same template (the system prompt rendered as the chat route renders it), same greedy sampling."""
    choice = openai_answer.choices[0]
    assert answer.content[0].text == choice.message.content
    assert answer.usage.output_tokens == openai_answer.usage.completion_tokens
    assert prompt_tokens(answer.usage) == openai_answer.usage.prompt_tokens
    assert answer.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[choice.finish_reason]


def prompt_tokens(usage) -> int:
    """The whole prompt: Anthropic's usage splits it into prefilled and cache-read tokens."""
    return usage.input_tokens + usage.cache_read_input_tokens


def test_system_prompt_is_the_first_message(claude, answer, smollm2):
    def rendered(messages):
        return len(smollm2.tokenize(smollm2.render_chat(messages, add_generation_prompt=True)))

    user = {"role": "user", "content": QUESTION}
    assert prompt_tokens(answer.usage) == rendered([{"role": "system", "content": SYSTEM}, user])
    blocks = create(claude, max_tokens=1, system=[{"type": "text", "text": SYSTEM}])
    assert prompt_tokens(blocks.usage) == prompt_tokens(answer.usage)
    assert prompt_tokens(create(claude, max_tokens=1).usage) == rendered([user])     # the model's own system


def test_max_tokens_stop(claude, client):
    reply = create(claude, max_tokens=3)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 3
    same = openai_chat(client, [{"role": "user", "content": QUESTION}], max_tokens=3)
    assert reply.content[0].text == same.choices[0].message.content


def test_stop_sequence_ends_the_answer_and_is_named(claude, answer):
    free = answer.content[0].text
    word = free.split()[2]                       # a word the greedy answer writes, not at its start
    reply = create(claude, system=SYSTEM, max_tokens=40, stop_sequences=["zzz-never", word])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == word
    assert reply.content[0].text == free[:free.index(word)]


def test_stream_reassembles_into_the_message(claude, answer):
    with claude.messages.stream(model=SMOLLM2, max_tokens=40, system=SYSTEM, **GREEDY,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == answer.content[0].text and len(pieces) > 1
    assert final.content[0].text == answer.content[0].text
    assert final.stop_reason == answer.stop_reason and final.usage.output_tokens == answer.usage.output_tokens
    assert final.id.startswith("msg_")


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    """``(event name, data)`` of each server-sent event."""
    events = []
    for frame in body.decode().split("\n\n"):
        if frame.strip():
            name, data = frame.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), frame
            events.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return events


def test_stream_events_in_order(http):
    answer = http.post("/v1/messages", {"model": SMOLLM2, "max_tokens": 3, "stream": True, "temperature": 0,
                                        "messages": [{"role": "user", "content": QUESTION}]})
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = sse_events(answer.body)
    assert all(name == data["type"] for name, data in events)
    kinds = [name for name, _ in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    start, delta = events[0][1]["message"], events[-2][1]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 3


FORCED = dict(model=SMOLLM2, max_tokens=60, tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_time"},
              messages=[{"role": "user", "content": "What is the weather in Tokyo?"}], **GREEDY)


@pytest.fixture(scope="module")
def forced(claude):
    return claude.messages.create(**FORCED)


def test_forced_tool_gives_a_tool_use_block_matching_its_schema(forced):
    assert forced.stop_reason == "tool_use"
    [call] = [block for block in forced.content if block.type == "tool_use"]
    assert call.name == "get_time" and call.id
    jsonschema.validate(call.input, TIME["input_schema"])


def test_streamed_tool_use_equals_the_message(claude, forced):
    with claude.messages.stream(**FORCED) as stream:
        kinds = [event.delta.type for event in stream if event.type == "content_block_delta"]
        final = stream.get_final_message()
    [whole_call] = [block for block in forced.content if block.type == "tool_use"]
    [streamed_call] = [block for block in final.content if block.type == "tool_use"]
    assert (streamed_call.name, streamed_call.input) == (whole_call.name, whole_call.input)
    assert final.stop_reason == "tool_use" and "input_json_delta" in kinds


def test_tool_result_round_trip_renders_as_the_chat_route_does(claude, client):
    """The call and its result, sent back the Anthropic way, make the same prompt and answer as the OpenAI way."""
    arguments = {"location": "Tokyo"}
    reply = claude.messages.create(model=SMOLLM2, max_tokens=8, tools=[WEATHER], **GREEDY, messages=[
        {"role": "user", "content": "What is the weather in Tokyo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                           "input": arguments}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny, 25 C"}]}])
    same = openai_chat(client, [
        {"role": "user", "content": "What is the weather in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25 C"}], max_tokens=8,
        tools=[{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                 "parameters": WEATHER["input_schema"]}}])
    assert prompt_tokens(reply.usage) == same.usage.prompt_tokens
    text = "".join(block.text for block in reply.content if block.type == "text")
    assert text == (same.choices[0].message.content or "")


def test_count_tokens_is_the_prompt(claude, answer):
    counted = claude.messages.count_tokens(model=SMOLLM2, system=SYSTEM,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert counted.input_tokens == prompt_tokens(answer.usage)


def test_unknown_model_is_not_found_error(claude):
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 404
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("body, fragment", [
    ({"model": SMOLLM2, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens is required"),
    ({"model": SMOLLM2, "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]},
     "messages[0].role must be 'user' or 'assistant'"),
    ({"model": SMOLLM2, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
     "has no vision"),
    ({"model": SMOLLM2, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
      "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_time"}}, "get_time"),
])
def test_bad_requests_are_invalid_request_errors(http, body, fragment):
    answer = http.post("/v1/messages", body)
    assert answer.status == 400, answer.body
    error = answer.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]


def test_sdk_raises_bad_request_for_a_bad_role(claude):
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude.messages.create(model=SMOLLM2, max_tokens=5, messages=[{"role": "tool", "content": "hi"}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"


def test_unknown_route_under_messages_has_the_anthropic_envelope(http):
    answer = http.post("/v1/messages/batches", {})
    assert answer.status == 404
    assert answer.json()["error"]["type"] == "not_found_error"


def test_x_api_key_authenticates(keyed_server):
    keyed = anthropic.Anthropic(base_url=keyed_server, api_key=API_KEY, max_retries=0, timeout=300)
    counted = keyed.messages.count_tokens(model=SMOLLM2, messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens > 0
    wrong = anthropic.Anthropic(base_url=keyed_server, api_key=API_KEY + "x", max_retries=0, timeout=300)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        wrong.messages.count_tokens(model=SMOLLM2, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["error"]["type"] == "authentication_error"


def test_bearer_still_authenticates_and_is_compared_first(keyed_http):
    body = {"model": SMOLLM2, "messages": [{"role": "user", "content": "hi"}]}
    path = "/v1/messages/count_tokens"
    assert keyed_http.post(path, body, headers={"Authorization": f"Bearer {API_KEY}"}).status == 200
    assert keyed_http.post(path, body, headers={"Authorization": f"Bearer {API_KEY}", "x-api-key": "wrong"}).status \
        == 200
    assert keyed_http.post(path, body, headers={"Authorization": "Bearer wrong", "x-api-key": API_KEY}).status \
        == 401                                                     # a Bearer token, when sent, is the one compared
    assert keyed_http.post(path, body, headers={"x-api-key": ""}).status == 401
    assert keyed_http.post(path, body, headers={"Authorization": f"Basic {API_KEY}"}).status == 401


def test_an_error_after_the_stream_began_is_an_error_event(http):
    """A request past its own time limit: a 504 before the first token, else an in-band ``error`` event; both in
    Anthropic's envelope as timeout_error."""
    answer = http.post("/v1/messages", {"model": SMOLLM2, "max_tokens": 4000, "stream": True, "temperature": 0,
                                        "messages": [{"role": "user", "content": "Write a very long story."}]},
                       headers={"X-Request-Timeout": "1"})
    if answer.status == 504:
        error = answer.json()
    else:
        assert answer.status == 200
        events = sse_events(answer.body)
        assert events[0][0] == "message_start" and "message_stop" not in [name for name, _ in events]
        name, error = events[-1]
        assert name == "error"
    assert error["type"] == "error" and error["error"]["type"] == "timeout_error"


# --------------------------------------------------------------------------- units: parsing and shaping

def event(text="", thinking="", finish=None, token_ids=(), completion=0, cached=0):
    from localllm.generate import GenerationEvent, Usage

    usage = Usage(10, completion, cached) if finish else None
    return 0, GenerationEvent(0, text, list(token_ids), None, finish, usage, thinking=thinking)


def test_request_becomes_the_chat_request_it_means():
    from localllm_server.anthropic_api.request import parse_messages_request

    request = parse_messages_request({
        "model": "m", "max_tokens": 2048, "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        "stop_sequences": ["END"], "top_k": 3, "tools": [WEATHER, TIME], "tool_choice": {"type": "any"},
        "thinking": {"type": "enabled", "budget_tokens": 1024}, "metadata": {"user_id": "u"},
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                              {"type": "text", "text": "Let me look."},
                                              {"type": "tool_use", "id": "t1", "name": "get_weather",
                                               "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": "sunny"}]},
                                         {"type": "text", "text": "and tomorrow?"}]}]})
    chat = request.chat
    assert chat.messages == [
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}], "reasoning_content": "hmm",
         "tool_calls": [{"id": "t1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "user", "content": [{"type": "text", "text": "and tomorrow?"}]}]
    assert chat.settings["max_tokens"] == 2048 and chat.settings["stop"] == ["END"] and chat.settings["top_k"] == 3
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is True
    assert [tool["function"]["parameters"] for tool in chat.tools] == [WEATHER["input_schema"], TIME["input_schema"]]
    assert chat.reasoning_effort is True and request.stop_sequences == ["END"]
    named = parse_messages_request({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                                    "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"},
                                    "thinking": {"type": "disabled"},
                                    "output_config": {"effort": "max"}}).chat
    assert named.tool_choice == "get_weather" and named.parallel_tool_calls is False
    assert named.reasoning_effort == "none"
    effort = parse_messages_request({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                                     "output_config": {"effort": "xhigh", "format": {
                                         "type": "json_schema", "schema": {"type": "object"}}}}).chat
    assert effort.reasoning_effort == "high"
    assert effort.response_format["json_schema"]["schema"] == {"type": "object"}


@pytest.mark.parametrize("change, message", [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking.budget_tokens must be an integer >= 1024"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 2000},
     "thinking.budget_tokens must be below max_tokens"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]},
     "messages[0].content[0].type must be one of 'text', 'tool_use', 'thinking', 'redacted_thinking' in assistant "
     "messages, got 'tool_result'"),
    ({"tools": [WEATHER, dict(TIME, name="get_weather")]}, "tools[1].name 'get_weather' is defined twice"),
    ({"tools": [dict(WEATHER, input_schema={"type": "string"})]}, "tools[0].input_schema must be a JSON schema"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": "{}"}]}]},
     "messages[0].content[0].input must be an object"),
    ({"messages": []}, "`messages` must not be empty"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "'web_search_20250305' is not supported"),
    ({"tool_choice": {"type": "any"}}, "tool_choice 'any' needs at least one tool"),
    ({"tools": [WEATHER], "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
     "output_config.format json_schema cannot be combined with tools"),
    ({"stop_sequences": "END"}, "stop_sequences must be a list of strings"),
    ({"temperature": 1.5}, "temperature must be between 0 and 1"),
    ({"tool_choice": {"type": {"a": 1}}}, "tool_choice must be"),
    ({"output_config": {"effort": ["high"]}}, "output_config.effort must be one of"),
])
def test_bad_bodies_name_the_field(change, message):
    from localllm_server.anthropic_api.request import parse_messages_request
    from localllm_server.errors import APIError

    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], **change}
    with pytest.raises(APIError) as raised:
        parse_messages_request(body)
    assert raised.value.status == 400 and message in raised.value.message


def test_matched_stop_sequence_is_the_first_to_complete():
    from localllm_server.anthropic_api.formatting import matched_stop_sequence

    assert matched_stop_sequence("one two three", ["three", "two"]) == "two"
    assert matched_stop_sequence("abcd", ["bcd", "abcd"]) == "abcd"          # same end: the earliest start
    assert matched_stop_sequence("abc", ["x"]) is None


def test_stream_of_a_thought_then_text():
    from localllm_server.anthropic_api.formatting import MessageStream

    stream = MessageStream("msg_1", "m", ["!"], lambda ids: "Hi there!", None)
    events = list(stream.events([event(thinking="Let me "), event(thinking="think."), event(text="Hi "),
                                 event(text="there", finish="stop", token_ids=[1, 2, 3], completion=7, cached=4)],
                                prompt_tokens=10))
    kinds = [(e["type"], e.get("index"), (e.get("delta") or e.get("content_block") or {}).get("type"))
             for e in events]
    assert kinds == [("message_start", None, None), ("ping", None, None),
                     ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
                     ("content_block_delta", 0, "thinking_delta"), ("content_block_stop", 0, None),
                     ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"),
                     ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
                     ("message_delta", None, None), ("message_stop", None, None)]
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "!"}
    assert events[-2]["usage"] == {"input_tokens": 6, "output_tokens": 7, "cache_creation_input_tokens": 0,
                                   "cache_read_input_tokens": 4}


def test_stream_of_calls_matches_the_whole_message():
    from localllm.tool_parser import ToolCallStreamParser
    from localllm_server.anthropic_api.formatting import MessageStream, content_blocks

    text = 'Sure.<tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>' \
           '<tool_call>{"name": "get_time", "arguments": {"timezone": "CET"}}</tool_call>'
    make_parser = lambda: ToolCallStreamParser(["get_weather", "get_time"])          # noqa: E731
    stream = MessageStream("msg_1", "m", [], lambda ids: text, make_parser)
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    events = list(stream.events([event(text=p, finish="stop" if i == len(pieces) - 1 else None, completion=30)
                                 for i, p in enumerate(pieces)], prompt_tokens=10))
    blocks = {}
    for e in events:
        if e["type"] == "content_block_start":
            blocks[e["index"]] = dict(e["content_block"], partial="")
        elif e["type"] == "content_block_delta":
            block, delta = blocks[e["index"]], e["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                block["partial"] += delta["partial_json"]
    streamed = [{k: v for k, v in b.items() if k != "partial"} | ({"input": json.loads(b["partial"])}
                                                                   if b["type"] == "tool_use" else {})
                for _, b in sorted(blocks.items())]
    whole, has_calls = content_blocks(text, "", make_parser)
    assert has_calls and [b["type"] for b in whole] == ["text", "tool_use", "tool_use"]
    assert [{k: v for k, v in b.items() if k != "id"} for b in streamed] == \
        [{k: v for k, v in b.items() if k != "id"} for b in whole]
    assert whole[1]["input"] == {"location": "Paris"} and whole[2]["name"] == "get_time"
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_empty_answer_is_one_empty_text_block_streamed_or_not():
    from localllm_server.anthropic_api.formatting import MessageStream, content_blocks

    events = list(MessageStream("msg_1", "m", [], lambda ids: "", None).events(
        [event(finish="stop")], prompt_tokens=3))
    assert [e["type"] for e in events][2:5] == ["content_block_start", "content_block_stop", "message_delta"]
    assert events[2]["content_block"] == {"type": "text", "text": ""}
    assert content_blocks("", "", None) == ([{"type": "text", "text": ""}], False)
    assert events[-2]["delta"]["stop_reason"] == "end_turn"


# --------------------------------------------------------------------------- a reasoning model (tiny Qwen 3)

@pytest.fixture(scope="module")
def thinking_claude(tmp_path_factory):
    """The Anthropic SDK on a server of the tiny Qwen 3 that writes ``<think>`` THOUGHT ``</think>`` ANSWER."""
    from localllm.engine import Engine, EngineSettings
    from localllm.store import ModelStore
    from tests.server.conftest import run_app
    from tests.test_reasoning import write_thinking_model

    folder = tmp_path_factory.mktemp("anthropic-thinking")
    store = ModelStore(folder / "store")
    store.add_local("tiny-qwen3:latest", write_thinking_model(folder / "qwen3.gguf", "qwen3"))
    engine = Engine(EngineSettings(n_slots=2, max_queue=8, keep_alive=600), store=store)
    running = run_app(engine, threads=4)
    yield anthropic.Anthropic(base_url=running.url, api_key="localllm", max_retries=0, timeout=300)
    running.close()
    engine.close()


def test_thinking_is_a_thinking_block_streamed_or_not(thinking_claude):
    from tests.test_reasoning import ANSWER, THOUGHT

    request = dict(model="tiny-qwen3:latest", max_tokens=2000, messages=[{"role": "user", "content": "2+2?"}],
                   thinking={"type": "enabled", "budget_tokens": 1024})     # past the 1024-token window: capped
    whole = thinking_claude.messages.create(**request)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in whole.content] == \
        [("thinking", THOUGHT), ("text", ANSWER)]
    assert whole.stop_reason == "end_turn"
    with thinking_claude.messages.stream(**request) as stream:
        kinds = [event.delta.type for event in stream if event.type == "content_block_delta"]
        final = stream.get_final_message()
    assert final.content[0].thinking == THOUGHT and final.content[1].text == ANSWER
    assert kinds[0] == "thinking_delta" and kinds[-1] == "text_delta"
    off = thinking_claude.messages.create(**dict(request, thinking={"type": "disabled"}))
    assert [(b.type, b.text) for b in off.content] == [("text", ANSWER)] and off.usage.output_tokens == 1


def test_max_tokens_past_the_window_is_capped_but_a_prompt_past_it_is_refused(thinking_claude):
    capped = thinking_claude.messages.create(model="tiny-qwen3:latest", max_tokens=100_000,
                                             messages=[{"role": "user", "content": "2+2?"}])
    assert capped.stop_reason == "end_turn"
    with pytest.raises(anthropic.BadRequestError) as raised:
        thinking_claude.messages.create(model="tiny-qwen3:latest", max_tokens=10,
                                        messages=[{"role": "user", "content": "two " * 2000}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert raised.value.body["error"]["message"].startswith("prompt needs")      # the prompt alone is too long
