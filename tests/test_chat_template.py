"""Chat templates: SmolLM2's own template against the golden renders, HF semantics of the
environment (trim/lstrip blocks, tojson, raise_exception, strftime_now, sandbox) and the
adaptations of OpenAI-style messages (content parts, None content, tool-call arguments)."""
from __future__ import annotations

import json
from datetime import datetime

import pytest

from localllm.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError

QWEN_STYLE_TOOL_CALLS = (
    "{% for message in messages %}{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}</tool_call>'
    "{% endfor %}{% else %}[{{ message.role }}:{{ message.content }}]{% endif %}{% endfor %}"
)


def test_golden_renders_with_the_gguf_template(smollm2_gguf, golden_smollm2):
    metadata = smollm2_gguf.metadata
    template = ChatTemplate(metadata["tokenizer.chat_template"], bos_token="<|im_start|>", eos_token="<|im_end|>")
    cases = [case for case in golden_smollm2 if "messages" in case]
    assert len(cases) >= 3
    for case in cases:
        assert template.render(case["messages"]) == case["rendered_prompt"], case["name"]


def test_golden_prompt_tokens_through_template_and_tokenizer(smollm2_gguf, golden_smollm2):
    from localllm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(smollm2_gguf.metadata)
    template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    for case in (case for case in golden_smollm2 if "messages" in case):
        assert tokenizer.encode(template.render(case["messages"])) == case["prompt_tokens"], case["name"]


def test_default_template_is_chatml():
    template = ChatTemplate(None)
    assert template.source == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert template.render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert template.render(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def test_trim_and_lstrip_blocks():
    template = ChatTemplate("{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n"
                            "    {% endif %}\n{% endfor %}")
    assert template.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]) == "U:a\n"


def test_variables_and_helpers():
    template = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ strftime_now('%Y') }}"
                            "|{{ tools | tojson }}|{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=True) }}|{{ custom }}",
                            bos_token="<s>", eos_token="</s>")
    tools = [{"type": "function", "function": {"name": "météo"}}]
    year = str(datetime.now().year)
    assert template.render([], tools=tools, custom=7) == (
        f'<s>|</s>|True|{year}|{json.dumps(tools, ensure_ascii=False)}|{{"a": "é", "b": 1}}|7')
    assert ChatTemplate("{{ x | tojson(indent=2) }}").render([], x={"k": [1]}) == '{\n  "k": [\n    1\n  ]\n}'
    assert ChatTemplate("{{ tools }}").render([]) == "None"


def test_raise_exception_and_errors_become_chat_template_errors():
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start "
                            "with a user message') }}{% endif %}ok")
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="^Conversation must start with a user message$"):
        template.render([{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ChatTemplate("{{ 1 + messages[0].content }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # the sandbox is immutable
        ChatTemplate("{{ messages.append(1) }}").render([])
    with pytest.raises(ValueError):  # ChatTemplateError is a ValueError
        ChatTemplate(None).render("not a list")


def test_content_parts_are_joined_for_string_templates():
    template = ChatTemplate(None)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    assert template.render(messages, add_generation_prompt=False) == "<|im_start|>user\nHi\nthere<|im_end|>\n"
    assert isinstance(messages[0]["content"], list)  # the caller's message is untouched
    printing = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")  # would print the list's repr
    assert printing.render(messages) == "Hi\nthere"


def test_content_parts_are_kept_for_typed_templates():
    template = ChatTemplate("{% for m in messages %}{% for part in m.content %}<{{ part.type }}:{{ part.text }}>"
                            "{% endfor %}{% endfor %}")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert template.render(messages) == "<text:a><text:b>"


def test_non_text_parts_are_rejected():
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(ChatTemplateError, match=r"messages\[0\].content.*image_url"):
        ChatTemplate(None).render(messages)


def test_none_content_becomes_empty_string():
    messages = [{"role": "assistant", "content": None}]
    assert ChatTemplate(None).render(messages, add_generation_prompt=False) == "<|im_start|>assistant\n<|im_end|>\n"


def test_tool_call_arguments_become_objects_when_the_template_encodes_them():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": "é"}'}}
    messages = [{"role": "user", "content": "sum"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    rendered = ChatTemplate(QWEN_STYLE_TOOL_CALLS).render(messages)
    assert rendered == ('[user:sum]<tool_call>{"name": "add", "arguments": {"a": 1, "b": "é"}}</tool_call>'
                        "[tool:3]")
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1, "b": "é"}'


def test_tool_call_arguments_stay_strings_for_templates_that_print_them():
    template = ChatTemplate("{% for m in messages %}{% for c in m.tool_calls or [] %}"
                            "{{ c.function.name }}({{ c.function.arguments }}){% endfor %}{% endfor %}")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}
    assert template.render([{"role": "assistant", "content": "", "tool_calls": [call]}]) == 'f({"x": 2})'


def test_generation_block_and_loop_controls():
    template = ChatTemplate("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                            "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    assert template.render([{"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}]) == "A"
