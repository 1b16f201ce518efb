"""POST /v1/responses with the real OpenAI SDK (``client.responses.create``) and SmolLM2.

Oracles: greedy text equals the golden llama.cpp continuation of the same conversation
(instructions = its system message); streamed deltas join to the final text; a Responses
conversation with function_call / function_call_output items gets exactly the prompt of
the equivalent chat completion; JSON validates with ``jsonschema``.
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from .conftest import SMOLLM2
from .test_http_errors import assert_envelope
from .test_openai_tools import PERSON, TOKYO, WEATHER

WEATHER_FLAT = {"type": "function", **WEATHER["function"]}
N_TOKENS = 8


def create(client, **kwargs):
    return client.responses.create(model=SMOLLM2, **kwargs)


def test_plain_text_with_instructions_is_the_golden_greedy_text(client, golden_case, greedy_text):
    case = golden_case("chat_sky")
    system, user = case["messages"]
    reply = create(client, instructions=system["content"], input=user["content"], temperature=0,
                   max_output_tokens=N_TOKENS)
    assert reply.object == "response" and reply.id.startswith("resp_") and reply.model == SMOLLM2
    assert reply.created_at > 0 and reply.instructions == system["content"]
    assert reply.output_text == greedy_text("chat_sky", N_TOKENS)
    [item] = reply.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.input_tokens == len(case["prompt_tokens"])
    assert reply.usage.output_tokens == N_TOKENS
    assert reply.usage.total_tokens == len(case["prompt_tokens"]) + N_TOKENS


def test_message_items_with_history_complete(client, golden_case):
    case = golden_case("chat_multiturn")
    system, *turns = case["messages"]
    items = [{"role": m["role"], "content": [{"type": "output_text" if m["role"] == "assistant" else "input_text",
                                              "text": m["content"]}]} for m in turns]
    reply = create(client, instructions=system["content"], input=items, temperature=0, max_output_tokens=16)
    assert reply.usage.input_tokens == len(case["prompt_tokens"])
    assert reply.output_text == case["llamacpp"]["greedy_text"]
    assert reply.status == "completed" and reply.incomplete_details is None


def test_streaming_deltas_join_to_the_final_text(client, golden_case, greedy_text):
    system, user = golden_case("chat_sky")["messages"]
    events = list(create(client, instructions=system["content"], input=user["content"], temperature=0,
                         max_output_tokens=N_TOKENS, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == greedy_text("chat_sky", N_TOKENS)
    assert events[-4].text == deltas
    assert events[0].response.status == "in_progress" and final.status == "incomplete"
    assert final.usage.output_tokens == N_TOKENS
    assert len({e.item_id for e in events if hasattr(e, "item_id")}) == 1


def test_function_call_with_tool_choice_required(client):
    reply = create(client, input=TOKYO[0]["content"], tools=[WEATHER_FLAT], tool_choice="required", temperature=0)
    [item] = reply.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert item.call_id.startswith("call_") and item.id.startswith("fc_")
    assert isinstance(json.loads(item.arguments)["location"], str)
    assert reply.status == "completed" and reply.output_text == ""
    assert reply.tools[0].name == "get_weather" and reply.tool_choice == "required"


def test_streamed_function_call_matches_the_non_streamed_one(client):
    kwargs = dict(input=TOKYO[0]["content"], tools=[WEATHER_FLAT], tool_choice="required", temperature=0)
    [whole] = create(client, **kwargs).output
    events = list(create(client, stream=True, **kwargs))
    types = [e.type for e in events]
    assert "response.output_text.delta" not in types and types[-1] == "response.completed"
    added = next(e for e in events if e.type == "response.output_item.added")
    assert (added.item.type, added.item.name, added.item.arguments) == ("function_call", "get_weather", "")
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert arguments == done.arguments == whole.arguments
    [item] = events[-1].response.output
    assert (item.name, item.arguments, item.call_id) == ("get_weather", whole.arguments, added.item.call_id)


def test_named_tool_choice(client):
    reply = create(client, input=TOKYO[0]["content"], tools=[WEATHER_FLAT], temperature=0,
                   tool_choice={"type": "function", "name": "get_weather"})
    assert [item.name for item in reply.output] == ["get_weather"]


def test_function_call_output_round_trip_matches_the_chat_prompt(client):
    call = create(client, input=TOKYO, tools=[WEATHER_FLAT], tool_choice="required", temperature=0).output[0]
    result = json.dumps({"temperature": 22, "condition": "sunny"})
    items = TOKYO + [{"type": "function_call", "call_id": call.call_id, "name": call.name,
                      "arguments": call.arguments},
                     {"type": "function_call_output", "call_id": call.call_id, "output": result}]
    reply = create(client, input=items, tools=[WEATHER_FLAT], temperature=0, max_output_tokens=24)
    assert reply.output_text and reply.output[0].type == "message"
    chat_reply = client.chat.completions.create(
        model=SMOLLM2, tools=[WEATHER], temperature=0, max_tokens=24, messages=TOKYO + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                "name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": result}])
    assert reply.usage.input_tokens == chat_reply.usage.prompt_tokens
    assert reply.output_text == chat_reply.choices[0].message.content


def test_json_schema_text_format(client):
    format_ = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    reply = create(client, input="Extract person info: John Doe is 30 years old", temperature=0,
                   max_output_tokens=60, text={"format": format_})
    jsonschema.validate(json.loads(reply.output_text), PERSON)
    assert reply.text.format.type == "json_schema" and reply.text.format.name == "person"


def test_json_object_text_format(client):
    reply = create(client, input="List 3 colors in JSON format", temperature=0, max_output_tokens=60,
                   text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(reply.output_text), dict)


def test_previous_response_id_is_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input="Hi", previous_response_id="resp_123")
    assert info.value.status_code == 400 and info.value.body["param"] == "previous_response_id"


BASE = {"model": SMOLLM2, "input": "Hi", "max_output_tokens": 1}
IMAGE = {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}
BAD_REQUESTS = [
    ({"input": "Hi"}, "model", None),
    ({"model": SMOLLM2}, "input", None),
    ({**BASE, "input": 5}, "input", None),
    ({**BASE, "input": []}, "input", None),
    ({**BASE, "input": [{"role": "robot", "content": "Hi"}]}, "input", None),
    ({**BASE, "input": [{"type": "item_reference", "id": "msg_1"}]}, "input", None),
    ({**BASE, "input": [{"type": "function_call", "name": "f"}]}, "input", "input[0].call_id must be a string"),
    ({**BASE, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input", None),
    ({**BASE, "input": [IMAGE]}, "input", "model 'smollm2:135m' has no vision: it cannot read images"),
    ({**BASE, "max_output_tokens": 0}, "max_output_tokens", None),
    ({**BASE, "temperature": 3}, "temperature", None),
    ({**BASE, "tools": [{"type": "web_search"}]}, "tools", None),
    ({**BASE, "tools": [WEATHER_FLAT], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", None),
    ({**BASE, "tool_choice": "required"}, "tool_choice", None),
    ({**BASE, "text": {"format": {"type": "xml"}}}, "text", None),
    ({**BASE, "text": {"format": {"type": "json_schema", "name": "x"}}}, "text", None),
    ({**BASE, "tools": [WEATHER_FLAT], "text": {"format": {"type": "json_object"}}}, "text", None),
    ({**BASE, "previous_response_id": "resp_1"}, "previous_response_id", None),
    ({**BASE, "conversation": "conv_1"}, "conversation", None),
    ({**BASE, "metadata": {"a": 1}}, "metadata", None),
]


@pytest.mark.parametrize("body, param, message", BAD_REQUESTS)
def test_bad_requests_get_the_error_envelope(http, body, param, message):
    assert_envelope(http.post("/v1/responses", body), 400, param, message)


def test_unknown_model_is_404(http):
    assert_envelope(http.post("/v1/responses", {**BASE, "model": "nope:1b"}), 404, "model")


def test_the_sdk_stream_helper_accumulates_text_and_calls(client, golden_case):
    case = golden_case("chat_multiturn")                  # ends with a stop: response.completed (the helper needs it)
    system, *turns = case["messages"]
    with client.responses.stream(model=SMOLLM2, instructions=system["content"], input=turns, temperature=0,
                                 max_output_tokens=16) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == case["llamacpp"]["greedy_text"]
    with client.responses.stream(model=SMOLLM2, input=TOKYO[0]["content"], tools=[WEATHER_FLAT],
                                 tool_choice="required", temperature=0) as stream:
        final = stream.get_final_response()
    [item] = final.output
    assert item.type == "function_call" and "location" in json.loads(item.arguments)
