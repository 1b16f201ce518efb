"""Tool calling and structured output on /v1/chat/completions, with the real OpenAI SDK and SmolLM2.

Oracles: the call must parse and name the forced function; streamed deltas must reassemble
into the non-streamed call; prompts with tools, calls and results must tokenize exactly
like the Hermes-format prompt written out here by hand; JSON must parse and validate with
``jsonschema``.
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from .conftest import SMOLLM2
from .test_http_errors import CHAT, assert_envelope, with_

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City name"}},
                   "required": ["location"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
TOKYO = [{"role": "user", "content": "What is the weather in Tokyo?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}

# The prompt SmolLM2 (whose template has no `tools`) must get: the default Hermes tools block as the
# system message, calls as <tool_call> blocks, results as <tool_response> user messages.
HERMES_SYSTEM = """<|im_start|>system
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a location", \
"parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City name"}}, \
"required": ["location"]}}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
"""


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=SMOLLM2, messages=messages, **kwargs)


def weather_call(client, **kwargs):
    return chat(client, TOKYO, tools=[WEATHER], tool_choice="required", temperature=0, **kwargs)


def test_required_tool_choice_gives_a_get_weather_call(client):
    reply = weather_call(client)
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > len("call_")
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["location"], str)


def test_tools_are_rendered_into_the_prompt(client, smollm2):
    reply = weather_call(client)
    expected = HERMES_SYSTEM + "<|im_start|>user\nWhat is the weather in Tokyo?<|im_end|>\n<|im_start|>assistant\n"
    assert reply.usage.prompt_tokens == len(smollm2.tokenize(expected))


def test_named_tool_choice_forces_that_function(client):
    for seed in (1, 2):
        reply = chat(client, TOKYO, tools=[WEATHER, TIME], temperature=1, seed=seed,
                     tool_choice={"type": "function", "function": {"name": "get_time"}})
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "get_time"
        assert isinstance(json.loads(call.function.arguments)["timezone"], str)
        assert reply.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_gives_text_and_renders_no_tools(client):
    plain = chat(client, TOKYO, temperature=0, max_tokens=12)
    reply = chat(client, TOKYO, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == plain.choices[0].message.content
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens
    assert reply.choices[0].finish_reason == "length"


def test_auto_tool_choice_answers_in_text_when_the_model_writes_no_call(client):
    reply = chat(client, TOKYO, tools=[WEATHER], temperature=0, max_tokens=12)
    message = reply.choices[0].message
    assert message.content and "<tool_call>" not in message.content and message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_reassembles_into_the_non_streamed_call(client):
    whole = weather_call(client).choices[0].message.tool_calls[0]
    chunks = list(weather_call(client, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    fragments = [tc for d in deltas for tc in (d.tool_calls or [])]
    first, *rest = fragments
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                       "get_weather", "")
    assert first.id.startswith("call_")
    assert len(rest) > 1                                       # the arguments come in several fragments
    assert all(f.index == 0 and f.id is None and f.function.name is None for f in rest)
    assert "".join(f.function.arguments for f in rest) == whole.function.arguments
    assert not any(d.content for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_full_tool_round_trip(client, smollm2):
    first = weather_call(client).choices[0].message
    call = first.tool_calls[0]
    result = json.dumps({"temperature": 22, "condition": "sunny"})
    messages = TOKYO + [first.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": result}]
    reply = chat(client, messages, tools=[WEATHER], temperature=0, max_tokens=40)
    answer = reply.choices[0].message
    assert answer.tool_calls is None and isinstance(answer.content, str) and answer.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    expected = (HERMES_SYSTEM + "<|im_start|>user\nWhat is the weather in Tokyo?<|im_end|>\n"
                "<|im_start|>assistant\n<tool_call>\n"
                '{"name": "get_weather", "arguments": ' + arguments + "}\n</tool_call><|im_end|>\n"
                "<|im_start|>user\n<tool_response>\n" + result + "\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n")
    assert reply.usage.prompt_tokens == len(smollm2.tokenize(expected))


def test_json_mode_lists_colors(client):
    reply = chat(client, [{"role": "user", "content": "List 3 colors in JSON format"}], temperature=0,
                 max_tokens=60, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_person_schema_validates_for_20_seeds(client):
    format_ = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    contents = []
    for seed in range(0, 20, 4):                               # n=4: choice i samples with seed + i
        reply = chat(client, [{"role": "user", "content": "Extract person info: John Doe is 30 years old"}],
                     temperature=1, seed=seed, n=4, max_tokens=60, response_format=format_)
        contents += [choice.message.content for choice in reply.choices]
    assert len(contents) == 20
    for content in contents:
        jsonschema.validate(json.loads(content), PERSON)


BAD_TOOL_REQUESTS = [
    (with_(CHAT, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}),
     "tool_choice", "tool_choice names function 'get_time', which is not in tools"),
    (with_(CHAT, tool_choice="required"), "tool_choice", None),
    (with_(CHAT, tool_choice="sometimes", tools=[WEATHER]), "tool_choice", None),
    (with_(CHAT, tools=WEATHER), "tools", None),
    (with_(CHAT, tools=[{"type": "retrieval"}]), "tools", "tools[0].type must be 'function'"),
    (with_(CHAT, tools=[{"type": "function", "function": {"description": "no name"}}]), "tools", None),
    (with_(CHAT, tools=[{"type": "function", "function": {"name": "has space"}}]), "tools", None),
    (with_(CHAT, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools", 'tools[0].function.parameters must be a JSON schema with "type": "object"'),
    (with_(CHAT, tools=[WEATHER, WEATHER]), "tools", None),
    (with_(CHAT, tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}], tool_choice="required"),
     "tools", None),                                           # a schema llguidance cannot enforce
    (with_(CHAT, tools=[WEATHER], response_format={"type": "json_object"}), "response_format", None),
    (with_(CHAT, messages=TOKYO + [{"role": "tool", "content": "22 C"}]), "messages[1].tool_call_id", None),
    (with_(CHAT, messages=TOKYO + [{"role": "assistant", "tool_calls": [{"type": "function"}]}]),
     "messages[1].tool_calls[0]", None),
]


@pytest.mark.parametrize("body, param, message", BAD_TOOL_REQUESTS)
def test_bad_tool_requests(http, body, param, message):
    assert_envelope(http.post("/v1/chat/completions", body), 400, param, message)


def test_json_mode_with_tool_choice_none_is_allowed(client):
    reply = chat(client, [{"role": "user", "content": "List 3 colors in JSON format"}], tools=[WEATHER],
                 tool_choice="none", temperature=0, max_tokens=60, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_the_sdk_raises_bad_request_for_an_unknown_named_tool(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, TOKYO, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"
