"""Tools: parsing the common call formats, streaming deltas, rendering, tool_choice grammars, SmolLM2 calls."""
from __future__ import annotations

import json
import random

import pytest

from localllm import constrain, tools
from localllm.chat_template import ChatTemplate
from localllm.tools import ToolCallDelta, ToolCallStreamParser, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["location"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
NAMES = ["get_weather", "get_time"]

HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo", "unit": "celsius"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}}\n</tool_call>')
LLAMA = '{"name": "get_weather", "parameters": {"location": "Paris"}}'
LLAMA_TAG = '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris"}}; {"name": "get_time", ' \
            '"parameters": {"timezone": "CET"}}'
MISTRAL = 'Sure [TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Rome"}}, ' \
          '{"name": "get_time", "arguments": {"timezone": "UTC"}}]'
MISTRAL_V11 = '[TOOL_CALLS]get_weather[ARGS]{"location": "Oslo"}'

# (text, expected content, expected [(name, arguments_json)]) -- written by hand
CASES = [
    (HERMES, "Let me check.", [("get_weather", '{"location": "Tokyo", "unit": "celsius"}'),
                               ("get_time", '{"timezone": "Asia/Tokyo"}')]),
    (LLAMA, "", [("get_weather", '{"location": "Paris"}')]),
    (LLAMA_TAG, "", [("get_weather", '{"location": "Paris"}'), ("get_time", '{"timezone": "CET"}')]),
    (MISTRAL, "Sure", [("get_weather", '{"location": "Rome"}'), ("get_time", '{"timezone": "UTC"}')]),
    (MISTRAL_V11, "", [("get_weather", '{"location": "Oslo"}')]),
    ('<tool_call>{"arguments": "{\\"location\\": \\"Lima\\"}", "name": "get_weather"}</tool_call> done', "done",
     [("get_weather", '{"location": "Lima"}')]),
    ('<tool_call>\n{"name": "get_time"}\n</tool_call>', "", [("get_time", "{}")]),
    ('{"colors": ["red", "green", "blue"]}', '{"colors": ["red", "green", "blue"]}', []),
    ('{"name": "not_a_tool", "parameters": {}}', '{"name": "not_a_tool", "parameters": {}}', []),
    ("<tool_call>not json</tool_call> plain", "<tool_call>not json</tool_call> plain", []),
    ("Just text, a <b>tag</b> and [brackets].", "Just text, a <b>tag</b> and [brackets].", []),
]


def _summary(calls):
    return [(call.name, call.arguments_json) for call in calls]


@pytest.mark.parametrize("text,content,expected", CASES)
def test_parse_tool_calls(text, content, expected):
    got_content, calls = parse_tool_calls(text, TOOLS)
    assert got_content == content
    assert _summary(calls) == expected
    for call in calls:
        assert call.id.startswith("call_") and len(call.id) > 10
        json.loads(call.arguments_json)
    assert len({call.id for call in calls}) == len(calls)


def test_bare_json_without_known_tools_accepts_any_name():
    _, calls = parse_tool_calls('{"name": "anything", "parameters": {"x": 1}}')
    assert _summary(calls) == [("anything", '{"x": 1}')]


def _stream(text, pieces_at, tool_list=TOOLS):
    parser = ToolCallStreamParser(tool_list)
    deltas = []
    cuts = [0] + sorted(pieces_at) + [len(text)]
    for start, end in zip(cuts, cuts[1:]):
        deltas += parser.push(text[start:end])
    deltas += parser.finish()
    return deltas


def _reassemble(deltas):
    content = "".join(d for d in deltas if isinstance(d, str))
    calls: dict[int, list] = {}
    for delta in deltas:
        if isinstance(delta, ToolCallDelta):
            if delta.id is not None:
                assert delta.index not in calls, "a call's id and name come once, in its first delta"
                calls[delta.index] = [delta.name, ""]
            calls[delta.index][1] += delta.arguments_fragment
    assert sorted(calls) == list(range(len(calls))), "indexes are 0, 1, 2, ... in order"
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("text", [case[0] for case in CASES])
def test_stream_parser_reassembles_for_any_chunking(text):
    content, calls = parse_tool_calls(text, TOOLS)
    rng = random.Random(text)
    for _ in range(60):
        cuts = rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 15)))
        assert _reassemble(_stream(text, cuts)) == (content, _summary(calls))
    assert _reassemble(_stream(text, range(1, len(text)))) == (content, _summary(calls))   # one character at a time


def test_stream_parser_sends_name_first_then_argument_fragments():
    cuts = list(range(1, len(HERMES)))
    deltas = [d for d in _stream(HERMES, cuts) if isinstance(d, ToolCallDelta)]
    first = [d for d in deltas if d.index == 0]
    assert first[0].id and first[0].name == "get_weather"
    assert all(d.id is None and d.name is None for d in first[1:]) and len(first) > 3
    assert deltas[-1].index == 1
    chunk = first[0].to_openai()
    assert chunk["type"] == "function" and chunk["function"]["name"] == "get_weather"
    assert first[1].to_openai() == {"index": 0, "function": {"arguments": first[1].arguments_fragment}}


def test_stream_parser_holds_back_possible_markers():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.push("Hello <tool") == ["Hello"]
    assert parser.push("box> ok") == [" <toolbox> ok"]
    assert parser.finish() == []


# ----------------------------------------------------------------------------- rendering


def test_render_round_trip_for_templates_without_tools():
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "Tokyo"}'}}
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
                {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]
    prepared = tools.apply_tools(messages, [WEATHER], template_supports_tools=False, system="Be brief.")
    assert [m["role"] for m in prepared] == ["system", "user", "assistant", "user"]
    assert prepared[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in prepared[0]["content"]
    assert prepared[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>'
    assert prepared[3]["content"] == ('<tool_response>\n{"temperature": 21}\n</tool_response>\n'
                                      "<tool_response>\nsunny\n</tool_response>")
    content, calls = parse_tool_calls(prepared[2]["content"], [WEATHER])   # what we render is what we parse
    assert content == "" and _summary(calls) == [("get_weather", '{"location": "Tokyo"}')]
    assert messages[1]["content"] is None and "tool_calls" in messages[1]       # the caller's objects are untouched
    prompt = ChatTemplate(None).render(prepared)
    assert "<tool_call>" in prompt and "<tool_response>" in prompt


def test_render_ollama_messages():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"location": "Tokyo"}}}]},
                {"role": "tool", "tool_name": "get_weather", "content": "21 degrees"}]
    prepared = tools.apply_tools(messages, None, template_supports_tools=False)
    assert prepared[0]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>'
    assert prepared[1] == {"role": "user", "content": "<tool_response>\n21 degrees\n</tool_response>"}


def test_template_with_tools_renders_them_itself():
    source = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
              "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    template = ChatTemplate(source)
    assert tools.template_supports_tools(template)
    assert not tools.template_supports_tools(ChatTemplate(None))
    messages = [{"role": "user", "content": "hi"}]
    assert tools.apply_tools(messages, [WEATHER], template_supports_tools=True) == messages
    assert tools.tool_call_style(ChatTemplate(source + "{# <tool_call> #}")) == "hermes"
    assert tools.tool_call_style(ChatTemplate(source + "{# [TOOL_CALLS] #}")) == "mistral"
    assert tools.tool_call_style(ChatTemplate(source + "{# <|python_tag|> #}")) == "llama"


# ----------------------------------------------------------------------------- request fields


def test_validate_tools_and_tool_choice():
    assert tools.validate_tools(None) == []
    assert [t["function"]["name"] for t in tools.validate_tools(TOOLS)] == NAMES
    with pytest.raises(ValueError, match=r"tools\[0\].function.name"):
        tools.validate_tools([{"type": "function", "function": {"description": "no name"}}])
    with pytest.raises(ValueError, match="defined twice"):
        tools.validate_tools([WEATHER, WEATHER])
    with pytest.raises(ValueError, match=r"tools\[0\].type"):
        tools.validate_tools([{"type": "retrieval"}])
    assert tools.normalize_tool_choice(None, TOOLS) == "auto"
    assert tools.normalize_tool_choice(None, []) == "none"
    assert tools.normalize_tool_choice("required", TOOLS) == "required"
    assert tools.normalize_tool_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS) == "get_time"
    with pytest.raises(ValueError, match="not in tools"):
        tools.normalize_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(ValueError, match="needs at least one tool"):
        tools.normalize_tool_choice("required", [])
    with pytest.raises(ValueError, match="tool_choice must be"):
        tools.normalize_tool_choice("always", TOOLS)


def test_tool_call_constraint_kinds():
    assert tools.tool_call_constraint(TOOLS, "auto") is None
    assert tools.tool_call_constraint(TOOLS, "none") is None
    assert tools.tool_call_constraint(TOOLS, "required").kind == "tool_call"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    with pytest.raises(constrain.UnsupportedSchema, match="tool 'f' parameters"):
        tools.tool_call_constraint([bad], "required")


def _accepts(constraint, tokenizer, text):
    matcher = constraint.matcher(tokenizer)
    return matcher.consume_tokens(tokenizer.encode(text, add_bos=False, parse_special=False)) and \
        matcher.is_accepting()


def test_forced_call_grammars(smollm2_tokenizer):
    required = tools.tool_call_constraint(TOOLS, "required")
    named = tools.tool_call_constraint(TOOLS, "get_time")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>'
    assert _accepts(required, smollm2_tokenizer, call)
    assert not _accepts(named, smollm2_tokenizer, call)
    assert _accepts(named, smollm2_tokenizer, '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}'
                                              '\n</tool_call>')
    assert not _accepts(required, smollm2_tokenizer, call.replace('"location"', '"city"'))   # required argument
    assert not _accepts(required, smollm2_tokenizer, call + "\n" + call)                       # one call by default
    parallel = tools.tool_call_constraint(TOOLS, "required", parallel_tool_calls=True)
    assert _accepts(parallel, smollm2_tokenizer, call + "\n" + call)
    llama = tools.tool_call_constraint(TOOLS, "get_weather", style="llama")
    assert _accepts(llama, smollm2_tokenizer, '{"name": "get_weather", "parameters": {"location": "Oslo"}}')
    mistral = tools.tool_call_constraint(TOOLS, "get_weather", style="mistral")
    assert _accepts(mistral, smollm2_tokenizer,
                    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Oslo"}}]')


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    import localllm

    return localllm.load(smollm2_gguf_path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    return smollm2.tokenizer


class _Budget:
    """Hands the token budget to the processor (generate.make_sequences may not pass it yet)."""

    def __init__(self, constraint, max_tokens):
        self.constraint, self.max_tokens = constraint, max_tokens

    def make_processor(self, tokenizer, max_new_tokens=None):
        return self.constraint.make_processor(tokenizer, max_new_tokens=max_new_tokens or self.max_tokens)


def _forced_call(model, tool_list, choice, max_tokens=60, **settings):
    choice = tools.normalize_tool_choice(choice, tool_list)
    prompt = tools.render_tools_prompt(model, [{"role": "user", "content": "What is the weather in Tokyo?"}],
                                       tool_list, choice)
    constraint = tools.tool_call_constraint(tool_list, choice, style=tools.tool_call_style(model.template))
    return prompt, _Budget(constraint, max_tokens), model.generate(prompt, constraint=_Budget(constraint, max_tokens),
                                                                    max_tokens=max_tokens, details=True, **settings)


def test_smollm2_required_tool_call(smollm2):
    assert not tools.template_supports_tools(smollm2.template)
    _, _, result = _forced_call(smollm2, [WEATHER], "required", temperature=0)
    content, calls = parse_tool_calls(result.text, [WEATHER])
    assert result.finish_reason == "stop", result.text
    assert content == "" and len(calls) == 1
    assert calls[0].name == "get_weather"
    assert "location" in json.loads(calls[0].arguments_json)


def test_smollm2_named_tool_choice(smollm2):
    for seed in (1, 2):
        _, _, result = _forced_call(smollm2, TOOLS, {"type": "function", "function": {"name": "get_time"}},
                                    temperature=1, seed=seed)
        _, calls = parse_tool_calls(result.text, TOOLS)
        assert [call.name for call in calls] == ["get_time"], result.text
        assert isinstance(json.loads(calls[0].arguments_json)["timezone"], str)


def test_smollm2_streamed_call_matches_whole_text(smollm2):
    prompt, constraint, result = _forced_call(smollm2, [WEATHER], "required", temperature=0)
    parser = ToolCallStreamParser([WEATHER])
    deltas = []
    for piece in smollm2.stream(prompt, constraint=constraint, max_tokens=60, temperature=0):
        deltas += parser.push(piece)
    deltas += parser.finish()
    content, calls = parse_tool_calls(result.text, [WEATHER])
    assert _reassemble(deltas) == (content, _summary(calls))
    assert len([d for d in deltas if isinstance(d, ToolCallDelta)]) > 1     # name first, then arguments


def test_prepare_chat_plans(smollm2):
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    plan = tools.prepare_chat(smollm2, messages, tools=TOOLS, tool_choice="required")
    assert plan.constraint.kind == "tool_call" and plan.tool_choice == "required" and plan.parses_tool_calls
    assert "<tools>" in plan.prompt and plan.prompt.endswith("<|im_start|>assistant\n")
    json_mode = constrain.json_object()
    plan = tools.prepare_chat(smollm2, messages, tools=TOOLS, constraint=json_mode)       # auto: the format applies
    assert plan.constraint is json_mode and plan.tool_choice == "auto"
    plan = tools.prepare_chat(smollm2, messages, tools=TOOLS, tool_choice="none")
    assert "<tools>" not in plan.prompt and plan.constraint is None and plan.stream_parser() is None
    assert plan.parse('<tool_call>{"name": "get_time"}</tool_call>') == ('<tool_call>{"name": "get_time"}</tool_call>', [])
    plan = tools.prepare_chat(smollm2, messages)
    assert plan.prompt == smollm2.render_chat(messages) and not plan.parses_tool_calls
    with pytest.raises(ValueError, match="tool_choice"):
        tools.prepare_chat(smollm2, messages, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    assert tools.ChatPlan.finish_reason("stop", [object()]) == "tool_calls"
    assert tools.ChatPlan.finish_reason("length", []) == "length"


def test_call_wire_shapes():
    call = tools.ToolCall("call_abc", "get_weather", '{"location": "Tokyo"}')
    assert call.to_openai() == {"id": "call_abc", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"location": "Tokyo"}'}}
    assert call.to_openai(index=1)["index"] == 1
    assert call.to_ollama() == {"function": {"name": "get_weather", "arguments": {"location": "Tokyo"}}}
    assert tools.ToolCall("c", "f", '{"cut": "sho').to_ollama() == {"function": {"name": "f", "arguments": {}}}


def test_smollm2_tool_round_trip(smollm2):
    """Call, tool result, final answer: the second turn sees the call and the result and answers in text."""
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    plan = tools.prepare_chat(smollm2, messages, tools=[WEATHER], tool_choice="required")
    first = smollm2.generate(plan.prompt, constraint=_Budget(plan.constraint, 60), max_tokens=60, temperature=0,
                             details=True)
    content, calls = plan.parse(first.text)
    assert [call.name for call in calls] == ["get_weather"]
    messages += [{"role": "assistant", "content": content or None, "tool_calls": [c.to_openai() for c in calls]},
                 {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature_c": 18, "sky": "rain"}'}]
    plan = tools.prepare_chat(smollm2, messages, tools=[WEATHER])
    assert tools.tool_call_text("get_weather", calls[0].arguments_json) in plan.prompt
    assert '<tool_response>\n{"temperature_c": 18, "sky": "rain"}\n</tool_response>' in plan.prompt
    second = smollm2.generate(plan.prompt, constraint=plan.constraint, max_tokens=40, temperature=0, details=True)
    answer, more_calls = plan.parse(second.text)
    assert answer or more_calls, second.text
