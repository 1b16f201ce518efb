"""Server unit tests without a model: formatting (pure functions), schemas, error mapping, and the app
through falcon.testing with a stand-in engine (mid-stream errors, queue full, cancellation on close)."""
from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from datetime import datetime, timezone
from types import SimpleNamespace

import falcon.testing
import pytest

from localllm.generate import GenerationEvent, TokenLogprob, Usage
from localllm_server import formatting, schemas
from localllm_server.errors import APIError, param_of, to_api_error

HEADER = formatting.ResponseHeader("chatcmpl-test", 1700000000, "m:latest")


def record(text, logprob, top=()):
    return TokenLogprob(0, text, text.encode(), logprob, [TokenLogprob(1, t, t.encode(), lp) for t, lp in top])


# --------------------------------------------------------------------------- formatting

def test_ids_are_unique_and_prefixed():
    ids = {formatting.new_id("chatcmpl") for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("chatcmpl-") for i in ids)


def test_chat_stream_chunk_sequence_for_two_interleaved_choices():
    events = [(0, GenerationEvent(0, "Hel")), (1, GenerationEvent(1, "Yo")), (0, GenerationEvent(0, "lo")),
              (1, GenerationEvent(1, "", finish_reason="stop", usage=Usage(5, 1))),
              (0, GenerationEvent(0, "!", finish_reason="length", usage=Usage(5, 3)))]
    chunks = list(formatting.chat_stream(HEADER, iter(events), 2, 5, include_usage=True))
    deltas = [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
              for c in chunks[:-1]]
    assert deltas == [(0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None),
                      (0, {"content": "Hel"}, None), (1, {"content": "Yo"}, None), (0, {"content": "lo"}, None),
                      (1, {}, "stop"), (0, {"content": "!"}, None), (0, {}, "length")]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4,
                                                                   "total_tokens": 9,
                                                                   "prompt_tokens_details": {"cached_tokens": 0}}
    assert all(c["id"] == "chatcmpl-test" and c["object"] == "chat.completion.chunk" for c in chunks)


def test_chat_stream_without_usage_has_no_usage_field():
    chunks = list(formatting.chat_stream(HEADER, iter([(0, GenerationEvent(0, "a", finish_reason="stop",
                                                                           usage=Usage(1, 1)))]), 1, 1, False))
    assert all("usage" not in c for c in chunks)


def test_chat_completion_object_with_logprobs():
    collector = formatting.Collector(1)
    collector.add(0, GenerationEvent(0, "Hi", [7], [record("Hi", -0.5, [("Hi", -0.5), ("Yo", -1.5)])]))
    collector.add(0, GenerationEvent(0, "", [], None, "stop", Usage(3, 1)))
    body = formatting.chat_completion(HEADER, collector, 3, want_logprobs=True)
    assert body["object"] == "chat.completion" and body["system_fingerprint"] == "fp_localllm"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hi"} and choice["finish_reason"] == "stop"
    assert choice["logprobs"] == {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]}]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_completion_logprobs_legacy_shape():
    records = [record("The", None), record(" sky", -2.0, [(" cat", -1.0)]), record(" is", -0.1, [(" is", -0.1)])]
    logprobs = formatting.completion_logprobs(records)
    assert logprobs == {"tokens": ["The", " sky", " is"], "token_logprobs": [None, -2.0, -0.1],
                        "top_logprobs": [None, {" cat": -1.0, " sky": -2.0}, {" is": -0.1}],
                        "text_offset": [0, 3, 7]}
    assert formatting.completion_logprobs(records[1:], text_offset=10)["text_offset"] == [10, 14]


def test_float32_base64_is_little_endian_float32():
    encoded = formatting.float32_base64([1.0, -2.5, 0.1])
    assert base64.b64decode(encoded) == struct.pack("<3f", 1.0, -2.5, 0.1)


def test_models_list_is_an_empty_list_not_null():
    assert formatting.models_list([]) == {"object": "list", "data": []}
    entry = SimpleNamespace(name="hf.co/user/repo:q4", modified_at=datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert formatting.model_object(entry) == {"id": "hf.co/user/repo:q4", "object": "model", "created": 1704067200,
                                              "owned_by": "hf.co"}


# --------------------------------------------------------------------------- schemas and errors

def test_omitted_sampling_parameters_stay_unset():
    request = schemas.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert {k: v for k, v in request.settings.items() if v is not None} == {"logprobs": False}
    assert request.stream is False and request.include_usage is False


def test_settings_precedence_and_conversions():
    request = schemas.parse_chat({
        "model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                                   {"role": "user", "content": "hi"}],
        "max_tokens": 5, "max_completion_tokens": 7, "stop": "END", "logit_bias": {"42": -100, "7": 2.5},
        "temperature": 0.2, "options": {"temperature": 0.9, "top_k": 3, "num_ctx": 512, "num_predict": 9,
                                        "seed": -1, "num_gpu": 1}})
    settings = request.settings
    assert settings["max_tokens"] == 7 and settings["temperature"] == 0.2
    assert settings["top_k"] == 3 and settings["num_ctx"] == 512 and settings["seed"] is None
    assert settings["stop"] == ["END"] and settings["logit_bias"] == {42: -100.0, 7: 2.5}
    assert request.messages[0] == {"role": "system", "content": [{"type": "text", "text": "be brief"}]}


def test_completion_prompt_forms():
    def prompts(value):
        return schemas.parse_completion({"model": "m", "prompt": value}).prompts
    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    request = schemas.parse_completion({"model": "m", "prompt": "x", "logprobs": 0})
    assert request.settings["logprobs"] is True and request.settings["top_logprobs"] == 0


@pytest.mark.parametrize("body, param, message", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs", "top_logprobs must be between 0 and 20"),
    ({"model": "m", "messages": []}, "messages", "`messages` must not be empty"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature", None),
])
def test_schema_errors_name_the_parameter(body, param, message):
    with pytest.raises(APIError) as info:
        schemas.parse_chat(body)
    assert info.value.status == 400 and info.value.param == param
    if message:
        assert info.value.message == message


def test_library_exceptions_map_to_statuses():
    from localllm.engine import ServerBusy
    from localllm.kv_cache import ContextLengthExceeded
    from localllm.store import ModelNotFound

    error = to_api_error(ModelNotFound("x"))
    assert (error.status, error.message, error.error_type) == (404, "model 'x' not found, try pulling it first",
                                                               "not_found_error")
    error = to_api_error(ContextLengthExceeded(5000, 4096), prompt_param="prompt")
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "prompt")
    assert to_api_error(ServerBusy("busy")).status == 503
    assert to_api_error(ValueError("n must be at most 4 (slots)")).param == "n"
    assert to_api_error(RuntimeError("boom")).status == 500
    assert param_of("logit_bias token id 9 is out of range") == "logit_bias"
    assert param_of("something else went wrong") is None


# --------------------------------------------------------------------------- the app with a stand-in engine

class FakeHandle:
    def __init__(self, events, error=None):
        self._events, self._error, self.cancelled = events, error, False

    def __iter__(self):
        yield from self._events
        if self._error is not None:
            raise self._error

    def cancel(self):
        self.cancelled = True


class FakeModel:
    capabilities = ("completion",)
    n_ctx = 64
    config = SimpleNamespace(vocab_size=100)
    tokenizer = SimpleNamespace(vocab_size=100, bos_id=None, add_bos=False)
    metadata: dict = {}
    name = "fake:latest"

    def make_params(self, **settings):
        return SimpleNamespace(n=settings.get("n") or 1, logprobs=bool(settings.get("logprobs")),
                               sampling=SimpleNamespace(temperature=0.8, top_p=0.9)), 64

    def render_chat(self, messages, add_generation_prompt=True, tools=None):
        return " ".join(m["content"] for m in messages)

    def tokenize(self, text, add_bos=None):
        return [1] * len(text.split())


class FakeEngine:
    def __init__(self, handle=None, submit_error=None):
        self.handle, self.submit_error = handle, submit_error
        self.store = SimpleNamespace(get=lambda name: SimpleNamespace(name=name), list=lambda: [])

    def load(self, entry, keep_alive=None):
        return FakeModel()

    def submit(self, entry, ids, params, num_ctx=None, keep_alive=None, timeout=None):
        if self.submit_error:
            raise self.submit_error
        return self.handle

    def loaded(self):
        return []


def fake_client(engine):
    from localllm_server.app import Settings, create_app
    return falcon.testing.TestClient(create_app(engine, Settings()))


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi there"}], "stream": True}


def test_an_error_after_streaming_began_is_sent_in_band_then_done():
    handle = FakeHandle([GenerationEvent(0, "Hel")], error=RuntimeError("the worker died"))
    result = fake_client(FakeEngine(handle)).simulate_post("/v1/chat/completions", json=CHAT)
    assert result.status_code == 200
    events = result.content.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    error = json.loads(events[-3][len(b"data: "):])
    assert error["error"]["type"] == "api_error" and "the worker died" in error["error"]["message"]
    assert json.loads(events[1][len(b"data: "):])["choices"][0]["delta"] == {"content": "Hel"}
    assert handle.cancelled                                     # the engine request is let go


def test_an_error_before_the_first_event_keeps_its_status():
    from localllm.kv_cache import ContextLengthExceeded
    handle = FakeHandle([], error=ContextLengthExceeded(100, 64))
    result = fake_client(FakeEngine(handle)).simulate_post("/v1/chat/completions", json=CHAT)
    assert result.status_code == 400 and result.json["error"]["code"] == "context_length_exceeded"


def test_queue_full_is_503_with_the_exact_message():
    from localllm.engine import ServerBusy
    busy = ServerBusy("server busy, please try again.  maximum pending requests exceeded")
    result = fake_client(FakeEngine(submit_error=busy)).simulate_post("/v1/chat/completions", json=CHAT)
    assert result.status_code == 503
    assert result.json["error"]["message"] == "server busy, please try again.  maximum pending requests exceeded"


def test_closing_the_stream_cancels_the_request():
    from localllm_server.streaming import ClosingStream
    handle = FakeHandle([GenerationEvent(0, "a"), GenerationEvent(0, "b")])
    app = fake_client(FakeEngine(handle)).app
    environ = falcon.testing.create_environ(method="POST", path="/v1/chat/completions", body=json.dumps(CHAT),
                                            headers={"Content-Type": "application/json"})
    body = app(environ, lambda status, headers: None)
    assert isinstance(body, ClosingStream)
    next(iter(body))                                            # the client read one event, then went away
    body.close()
    assert handle.cancelled


def test_the_server_package_imports_neither_numpy_nor_numba():
    code = ("import sys, localllm_server.app, localllm_server.routes, localllm_server.openai_api, "
            "localllm_server.misc, localllm_server.server, localllm_server.formatting, localllm_server.schemas, "
            "localllm_server.schemas_responses, localllm_server.openai_api.responses; "
            "print(sorted(m for m in ('numpy', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fill_in_the_middle_prompt_layout():
    from localllm_server.openai_api.completions import fim_token_ids, prompt_ids

    model = FakeModel()
    model.tokenizer = SimpleNamespace(vocab_size=100, bos_id=0, add_bos=False,
                                      fim_ids={"fim_pre": 2, "fim_suf": 3, "fim_mid": 4})
    assert fim_token_ids(model) == {"fim_pre": 2, "fim_suf": 3, "fim_mid": 4}
    assert prompt_ids(model, "x y", "z") == [2, 1, 1, 3, 1, 4]
    model.tokenizer.add_bos = True
    assert prompt_ids(model, [5, 5], "z") == [0, 2, 5, 5, 3, 1, 4]
    with pytest.raises(APIError) as info:
        prompt_ids(FakeModel(), "x", "z")
    assert info.value.param == "suffix"


@pytest.mark.parametrize("value, expected", [
    ("", ("127.0.0.1", 11434)), ("0.0.0.0", ("0.0.0.0", 11434)), ("0.0.0.0:8080", ("0.0.0.0", 8080)),
    (":9000", ("127.0.0.1", 9000)), ("http://localhost:1234/", ("localhost", 1234)), ("[::1]:5000", ("::1", 5000)),
])
def test_localllm_host_parsing(value, expected):
    from localllm_server.app import parse_host
    assert parse_host(value) == expected


# --------------------------------------------------------------------------- tool calls and /v1/responses

TWO_CALLS = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Oslo"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "CET"}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


def call_parser():
    from localllm.tool_parser import ToolCallStreamParser
    return ToolCallStreamParser(TOOLS)


def pieces(text, size, finish_reason="stop"):
    """``text`` as (0, event) pairs of ``size`` characters, the last one finishing."""
    cuts = [text[i:i + size] for i in range(0, len(text), size)]
    return [(0, GenerationEvent(0, cut, finish_reason=finish_reason if i == len(cuts) - 1 else None,
                                usage=Usage(5, len(cuts)) if i == len(cuts) - 1 else None))
            for i, cut in enumerate(cuts)]


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_chat_stream_tool_call_deltas(size):
    chunks = list(formatting.chat_stream(HEADER, iter(pieces(TWO_CALLS, size)), 1, 5, False, call_parser))
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    fragments = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    heads = [f for f in fragments if "id" in f]
    assert [(f["index"], f["type"], f["function"]) for f in heads] == [
        (0, "function", {"name": "get_weather", "arguments": ""}),
        (1, "function", {"name": "get_time", "arguments": ""})]
    assert heads[0]["id"] != heads[1]["id"] and all(f["id"].startswith("call_") for f in heads)
    for index, arguments in ((0, '{"location": "Oslo"}'), (1, '{"timezone": "CET"}')):
        rest = [f for f in fragments if f["index"] == index and "id" not in f]
        assert all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for f in rest)
        assert "".join(f["function"]["arguments"] for f in rest) == arguments
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}


def test_chat_stream_cut_call_keeps_length():
    chunks = list(formatting.chat_stream(HEADER, iter(pieces(TWO_CALLS[:60], 10, "length")), 1, 5, False,
                                         call_parser))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completion_with_only_calls_has_null_content():
    collector = formatting.Collector(1)
    for index, event in pieces(TWO_CALLS.split("\n", 1)[1], 1000):
        collector.add(index, event)
    [choice] = formatting.chat_completion(HEADER, collector, 5, False, call_parser)["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("function", "get_weather", '{"location": "Oslo"}'), ("function", "get_time", '{"timezone": "CET"}')]
    assert calls[0]["id"] != calls[1]["id"]


RESPONSE_FIELDS = {"instructions": None, "tools": [], "tool_choice": "auto"}
RESPONSE_HEADER = formatting.ResponseHeader("resp_test", 1700000000, "m:latest")


def test_response_stream_events_for_text_then_calls():
    stream = formatting.ResponseStream(RESPONSE_HEADER, RESPONSE_FIELDS, call_parser)
    generated = pieces(TWO_CALLS, 5)
    events = list(stream.events(iter(generated), 5))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events if not e["type"].endswith(".delta")]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.done", "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    message, weather, time_ = final["output"]
    assert message["content"][0]["text"] == "Checking." and message["status"] == "completed"
    assert (weather["name"], weather["arguments"], time_["name"]) == ("get_weather", '{"location": "Oslo"}',
                                                                      "get_time")
    assert weather["call_id"].startswith("call_") and weather["id"].startswith("fc_")
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert added[1]["item"]["arguments"] == "" and added[1]["output_index"] == 1
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
              and e["item_id"] == weather["id"]]
    assert "".join(deltas) == weather["arguments"]
    n_generated = len(generated)
    assert final["usage"] == {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": n_generated, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 5 + n_generated}


def test_response_output_and_status():
    items = formatting.response_output(TWO_CALLS, "stop", call_parser)
    assert [item["type"] for item in items] == ["message", "function_call", "function_call"]
    [item] = formatting.response_output("Hello", "length")
    assert item["content"] == [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]
    assert item["status"] == "incomplete" and formatting.item_status("length") == "incomplete"
    body = formatting.response_object(RESPONSE_HEADER, RESPONSE_FIELDS, "incomplete", [item], None)
    assert body["incomplete_details"] == {"reason": "max_output_tokens"} and body["object"] == "response"


def test_chat_tools_are_normalized_and_tool_choice_resolved():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "description": "d"}}]}
    request = schemas.parse_chat(body)
    assert request.tools == [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {}}}}]
    assert request.tool_choice == "auto" and request.parallel_tool_calls is False
    assert schemas.parse_chat({**body, "tool_choice": {"type": "function", "function": {"name": "f"}}}).tool_choice \
        == "f"
    assert schemas.parse_chat({**body, "tools": None, "tool_choice": "auto"}).tool_choice == "none"


def test_responses_input_items_become_chat_messages():
    from localllm_server.schemas_responses import parse_responses

    request = parse_responses({"model": "m", "instructions": "Be brief.", "max_output_tokens": 9, "input": [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"a\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]}],
        "tools": [{"type": "function", "name": "f", "strict": True}], "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "text"}}})
    assert request.chat.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"}]
    assert request.chat.tool_choice == "f" and request.chat.settings["max_tokens"] == 9
    assert request.tool_choice == {"type": "function", "name": "f"}
    assert request.tools == [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}},
                              "strict": True}]
    schema = {"type": "object"}
    request = parse_responses({"model": "m", "input": "hi", "text": {"format": {
        "type": "json_schema", "name": "s", "schema": schema}}})
    assert request.chat.response_format == {"type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                                                   "strict": False}}
    assert request.chat.messages == [{"role": "user", "content": "hi"}]


def test_responses_route_with_a_stand_in_engine():
    events = [GenerationEvent(0, "Hel"), GenerationEvent(0, "lo", finish_reason="stop", usage=Usage(2, 2))]
    body = {"model": "fake", "input": "hi there"}
    result = fake_client(FakeEngine(FakeHandle(events))).simulate_post("/v1/responses", json=body)
    assert result.status_code == 200 and result.json["status"] == "completed"
    assert result.json["output"][0]["content"][0]["text"] == "Hello" and result.json["id"].startswith("resp_")
    assert result.json["usage"]["input_tokens"] == 2 and result.json["usage"]["output_tokens"] == 2

    handle = FakeHandle([GenerationEvent(0, "Hel")], error=RuntimeError("the worker died"))
    result = fake_client(FakeEngine(handle)).simulate_post("/v1/responses", json={**body, "stream": True})
    assert result.status_code == 200 and result.headers["content-type"] == "text/event-stream"
    frames = [frame.split("\n") for frame in result.text.strip().split("\n\n")]
    names = [frame[0][len("event: "):] for frame in frames]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "error"
    assert all(json.loads(frame[1][len("data: "):])["type"] == name for frame, name in zip(frames, names))
    error = json.loads(frames[-1][1][len("data: "):])
    assert "the worker died" in error["message"] and error["sequence_number"] == len(frames) - 1
    assert "[DONE]" not in result.text and handle.cancelled
