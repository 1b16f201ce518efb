"""Reasoning models over HTTP, through the real ``openai`` and ``ollama`` clients.

The tiny Qwen 3 and R1-distill models of ``tests/test_reasoning.py`` write a known script
(``<think>`` THOUGHT ``</think>`` ANSWER), and the tiny gpt-oss of ``tests/test_reasoning_harmony.py``
the same thought and answer in Harmony channels (``<|channel|>analysis<|message|>`` THOUGHT ``<|end|>``
``<|start|>assistant<|channel|>final<|message|>`` ANSWER), so every API must give the thought and the
answer apart, streamed or not: OpenAI ``reasoning_content`` / ``reasoning`` and ``reasoning_tokens``,
the Responses API's ``reasoning`` items, Ollama's ``thinking``.
"""
from __future__ import annotations

import json

import jsonschema
import pytest

from tests.server.conftest import RawHTTP, run_app
from tests.test_reasoning import ANSWER, ANSWER_SCHEMA, THOUGHT, THOUGHT_1, write_thinking_model
from tests.test_reasoning_harmony import SCRIPT, write_harmony_model

QWEN3, R1, PLAIN = "tiny-qwen3-thinking:latest", "tiny-r1-distill:latest", "tiny-plain:latest"
GPT_OSS = "tiny-gpt-oss:latest"
USER = [{"role": "user", "content": "What is 2+2?"}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
               "required": ["city", "n"], "additionalProperties": False}
REASONING_TOKENS = {QWEN3: 4, R1: 3,            # <think> (Qwen 3 writes it), the two thought tokens, </think>
                    GPT_OSS: 4}                 # <|message|> (the header's end), the two thought tokens, <|end|>


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory):
    from localllm.engine import Engine, EngineSettings
    from localllm.store import ModelStore
    from tests.tiny_models import write_tiny_llama

    folder = tmp_path_factory.mktemp("reasoning-server")
    store = ModelStore(folder / "store")
    store.add_local(QWEN3, write_thinking_model(folder / "qwen3.gguf", "qwen3"))
    store.add_local(R1, write_thinking_model(folder / "r1.gguf", "r1"))
    store.add_local(GPT_OSS, write_harmony_model(folder / "gpt-oss.gguf"))
    store.add_local(PLAIN, write_tiny_llama(folder / "plain.gguf"))
    engine = Engine(EngineSettings(n_slots=2, max_queue=16, keep_alive=600), store=store)
    running = run_app(engine, threads=4)
    yield running.url
    running.close()
    engine.close()


@pytest.fixture(scope="module")
def openai_client(reasoning_server):
    from openai import OpenAI

    return OpenAI(base_url=reasoning_server + "/v1/", api_key="localllm", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def ollama_client(reasoning_server):
    import ollama

    return ollama.Client(host=reasoning_server, timeout=300)


def extra(obj, name: str):
    """A field the OpenAI SDK does not declare (``reasoning_content``, ``reasoning``)."""
    return (obj.model_extra or {}).get(name)


# ----------------------------------------------------------------------------- /v1/chat/completions


@pytest.mark.parametrize("model", [QWEN3, R1, GPT_OSS])
def test_openai_chat_thought_apart(openai_client, model):
    completion = openai_client.chat.completions.create(model=model, messages=USER, max_tokens=20)
    [choice] = completion.choices
    assert choice.message.content == ANSWER and choice.finish_reason == "stop"
    assert extra(choice.message, "reasoning_content") == THOUGHT == extra(choice.message, "reasoning")
    assert completion.usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS[model]


@pytest.mark.parametrize("model", [QWEN3, R1, GPT_OSS])
def test_openai_chat_stream_thought_in_its_own_delta(openai_client, model):
    stream = openai_client.chat.completions.create(model=model, messages=USER, max_tokens=20, stream=True,
                                                   stream_options={"include_usage": True})
    thought, thought_alias, content, finish, usage = [], [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            thought.append(extra(choice.delta, "reasoning_content") or "")
            thought_alias.append(extra(choice.delta, "reasoning") or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert ("".join(thought), "".join(thought_alias), "".join(content)) == (THOUGHT, THOUGHT, ANSWER)
    assert finish == "stop" and usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS[model]


@pytest.mark.parametrize("model", [QWEN3, R1])
def test_openai_reasoning_effort_none_answers_at_once(openai_client, model):
    completion = openai_client.chat.completions.create(model=model, messages=USER, max_tokens=20,
                                                       reasoning_effort="none")
    message = completion.choices[0].message
    assert message.content == ANSWER and extra(message, "reasoning_content") is None
    assert completion.usage.completion_tokens == 1


def test_openai_thought_cut_by_max_tokens(openai_client):
    completion = openai_client.chat.completions.create(model=QWEN3, messages=USER, max_tokens=2,
                                                       reasoning_effort="high")
    [choice] = completion.choices
    assert choice.finish_reason == "length" and not choice.message.content
    assert extra(choice.message, "reasoning_content") == THOUGHT_1


@pytest.mark.parametrize("model", [QWEN3, R1, GPT_OSS])
@pytest.mark.parametrize("schema", [ANSWER_SCHEMA, CITY_SCHEMA])
@pytest.mark.parametrize("stream", [False, True])
def test_openai_json_schema_after_the_thought(openai_client, model, schema, stream):
    response_format = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    kwargs = dict(model=model, messages=USER, max_tokens=60, response_format=response_format)
    if stream:
        thought, content = [], []
        for chunk in openai_client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                thought.append(extra(choice.delta, "reasoning_content") or "")
                content.append(choice.delta.content or "")
        thought, content = "".join(thought), "".join(content)
    else:
        message = openai_client.chat.completions.create(**kwargs).choices[0].message
        thought, content = extra(message, "reasoning_content"), message.content
    assert thought == THOUGHT
    jsonschema.validate(json.loads(content), schema)


def test_openai_json_object_and_forced_tool_call_after_the_thought(openai_client):
    message = openai_client.chat.completions.create(model=R1, messages=USER, max_tokens=40,
                                                    response_format={"type": "json_object"}).choices[0].message
    assert (extra(message, "reasoning_content"), json.loads(message.content)) == (THOUGHT, {"answer": 4})
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}]
    choice = openai_client.chat.completions.create(model=QWEN3, messages=USER, max_tokens=120, tools=tools,
                                                   tool_choice="required", temperature=0).choices[0]
    assert extra(choice.message, "reasoning_content") == THOUGHT and choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}


def test_openai_earlier_thoughts_accepted(openai_client, reasoning_server):
    for key in ("reasoning_content", "reasoning"):
        messages = USER + [{"role": "assistant", "content": ANSWER, key: THOUGHT}, {"role": "user", "content": "Again?"}]
        completion = openai_client.chat.completions.create(model=QWEN3, messages=messages, max_tokens=20)
        assert completion.choices[0].message.content == ANSWER
    bad = RawHTTP(reasoning_server).post("/v1/chat/completions", {"model": QWEN3, "messages": USER,
                                                                  "reasoning_effort": "extreme"})
    assert bad.status == 400 and bad.json()["error"]["param"] == "reasoning_effort"
    bad = RawHTTP(reasoning_server).post("/v1/chat/completions", {
        "model": QWEN3, "messages": [{"role": "assistant", "content": "x", "reasoning_content": 3}]})
    assert bad.status == 400 and bad.json()["error"]["param"] == "messages[0].reasoning_content"


def test_openai_effort_on_a_model_that_does_not_think(openai_client):
    completion = openai_client.chat.completions.create(model=PLAIN, messages=USER, max_tokens=3,
                                                       reasoning_effort="high")
    assert extra(completion.choices[0].message, "reasoning_content") is None
    assert completion.usage.completion_tokens_details is None


# ----------------------------------------------------------------------------- /v1/responses


@pytest.mark.parametrize("model", [QWEN3, R1])
def test_responses_reasoning_item(openai_client, model):
    response = openai_client.responses.create(model=model, input="What is 2+2?", max_output_tokens=20)
    reasoning_item, message = response.output
    assert reasoning_item.type == "reasoning" and reasoning_item.content[0].text == THOUGHT
    assert message.type == "message" and response.output_text == ANSWER
    assert response.usage.output_tokens_details.reasoning_tokens == REASONING_TOKENS[model]
    off = openai_client.responses.create(model=model, input="What is 2+2?", max_output_tokens=20,
                                         reasoning={"effort": "none"})
    assert [item.type for item in off.output] == ["message"] and off.output_text == ANSWER
    assert off.reasoning.effort == "none"


def test_responses_stream_reasoning_then_schema_answer(openai_client):
    events = list(openai_client.responses.create(
        model=QWEN3, input="What is 2+2?", max_output_tokens=60, stream=True,
        text={"format": {"type": "json_schema", "name": "reply", "schema": CITY_SCHEMA, "strict": True}}))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert thought == THOUGHT
    jsonschema.validate(json.loads(answer), CITY_SCHEMA)
    [done] = [e for e in events if e.type == "response.reasoning_text.done"]
    assert done.text == THOUGHT
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.usage.output_tokens_details.reasoning_tokens == 4


def test_responses_reasoning_items_sent_back(openai_client):
    first = openai_client.responses.create(model=QWEN3, input="What is 2+2?", max_output_tokens=20)
    again = [{"role": "user", "content": "What is 2+2?"}] + [item.model_dump(exclude_none=True)
                                                             for item in first.output]
    again.append({"role": "user", "content": "And again?"})
    assert openai_client.responses.create(model=QWEN3, input=again, max_output_tokens=20).output_text == ANSWER


# ----------------------------------------------------------------------------- Ollama


@pytest.mark.parametrize("model", [QWEN3, R1, GPT_OSS])
def test_ollama_show_lists_thinking(ollama_client, model):
    assert "thinking" in ollama_client.show(model).capabilities
    assert "thinking" not in ollama_client.show(PLAIN).capabilities


@pytest.mark.parametrize("model", [QWEN3, R1, GPT_OSS])
@pytest.mark.parametrize("think", [None, True, "high"])
def test_ollama_chat_thinking(ollama_client, model, think):
    response = ollama_client.chat(model=model, messages=USER, think=think, options={"num_predict": 20})
    assert (response.message.thinking, response.message.content) == (THOUGHT, ANSWER)
    assert response.done_reason == "stop"


@pytest.mark.parametrize("model", [QWEN3, R1, GPT_OSS])
def test_ollama_chat_stream_thinking_in_its_own_field(ollama_client, model):
    thought, content = [], []
    for part in ollama_client.chat(model=model, messages=USER, think=True, stream=True, options={"num_predict": 20}):
        assert not (part.message.thinking and part.message.content)
        thought.append(part.message.thinking or "")
        content.append(part.message.content or "")
    assert ("".join(thought), "".join(content)) == (THOUGHT, ANSWER)


@pytest.mark.parametrize("model", [QWEN3, R1])
def test_ollama_think_false(ollama_client, model):
    response = ollama_client.chat(model=model, messages=USER, think=False, options={"num_predict": 20})
    assert (response.message.thinking, response.message.content, response.eval_count) == (None, ANSWER, 1)


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_format_schema_after_the_thought(ollama_client, stream):
    parts = ollama_client.chat(model=R1, messages=USER, think=True, format=CITY_SCHEMA, stream=stream,
                               options={"num_predict": 60})
    parts = list(parts) if stream else [parts]
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    jsonschema.validate(json.loads("".join(p.message.content for p in parts)), CITY_SCHEMA)


def test_ollama_generate_thinking_and_history(ollama_client):
    response = ollama_client.generate(model=QWEN3, prompt="What is 2+2?", options={"num_predict": 20})
    assert (response.thinking, response.response) == (THOUGHT, ANSWER)
    streamed = list(ollama_client.generate(model=R1, prompt="What is 2+2?", stream=True, think=True,
                                           options={"num_predict": 20}))
    assert "".join(p.thinking or "" for p in streamed) == THOUGHT
    assert "".join(p.response for p in streamed) == ANSWER
    off = ollama_client.generate(model=R1, prompt="What is 2+2?", think=False, options={"num_predict": 20})
    assert (off.thinking, off.response) == (None, ANSWER)
    history = USER + [{"role": "assistant", "content": ANSWER, "thinking": THOUGHT},
                      {"role": "user", "content": "Again?"}]
    assert ollama_client.chat(model=QWEN3, messages=history, options={"num_predict": 20}).message.content == ANSWER


def test_ollama_think_errors(ollama_client, reasoning_server):
    import ollama

    with pytest.raises(ollama.ResponseError, match="does not support thinking") as error:
        ollama_client.chat(model=PLAIN, messages=USER, think=True)
    assert error.value.status_code == 400
    assert ollama_client.chat(model=PLAIN, messages=USER, think=False, options={"num_predict": 2}).message.thinking \
        is None
    bad = RawHTTP(reasoning_server).post("/api/chat", {"model": QWEN3, "messages": USER, "think": "max"})
    assert bad.status == 400 and "think must be true, false or one of" in bad.json()["error"]


def test_cli_run_against_the_server_prints_the_thought(reasoning_server, monkeypatch):
    import io

    from localllm import cli

    monkeypatch.setenv("LOCALLLM_HOST", reasoning_server.removeprefix("http://"))
    out = io.StringIO()
    assert cli.stream_reply(cli.RemoteModel(R1), USER, {"num_predict": 20}, out) == ANSWER
    assert out.getvalue() == f"Thinking...\n{THOUGHT}\n...done thinking.\n\n{ANSWER}\n"
    hidden = io.StringIO()
    cli.stream_reply(cli.RemoteModel(QWEN3), USER, {"num_predict": 20}, hidden, think=False)
    assert hidden.getvalue() == ANSWER + "\n"
    with pytest.raises(cli.CLIError, match="does not support thinking"):
        cli.stream_reply(cli.RemoteModel(PLAIN), USER, {"num_predict": 2}, io.StringIO(), think=True)


# ----------------------------------------------------------------------------- gpt-oss (Harmony channels)


@pytest.mark.parametrize("effort", ["none", "low", "high"])
def test_gpt_oss_always_thinks_and_the_effort_reaches_its_prompt(openai_client, effort):
    completion = openai_client.chat.completions.create(model=GPT_OSS, messages=USER, max_tokens=30,
                                                       reasoning_effort=effort)
    message = completion.choices[0].message
    assert (extra(message, "reasoning_content"), message.content) == (THOUGHT, ANSWER)    # "none" cannot turn it off
    assert completion.usage.completion_tokens == len(SCRIPT)
    low = openai_client.chat.completions.create(model=GPT_OSS, messages=USER, max_tokens=1, reasoning_effort="low")
    # "Reasoning: low|medium|high" in the system message, a token a character in the tiny vocabulary
    extra_tokens = {"none": 3, "low": 0, "high": 1}[effort]             # "none": the template's default, medium
    assert completion.usage.prompt_tokens - low.usage.prompt_tokens == extra_tokens


def test_gpt_oss_thought_cut_by_max_tokens(openai_client):
    [choice] = openai_client.chat.completions.create(model=GPT_OSS, messages=USER, max_tokens=4).choices
    assert choice.finish_reason == "length" and not choice.message.content
    assert extra(choice.message, "reasoning_content") == THOUGHT_1


@pytest.mark.parametrize("stream", [False, True])
def test_gpt_oss_responses_reasoning_item(openai_client, stream):
    kwargs = dict(model=GPT_OSS, input="What is 2+2?", max_output_tokens=30, reasoning={"effort": "high"})
    if stream:
        events = list(openai_client.responses.create(stream=True, **kwargs))
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THOUGHT
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
        response = events[-1].response
    else:
        response = openai_client.responses.create(**kwargs)
    reasoning_item, message = response.output
    assert reasoning_item.type == "reasoning" and reasoning_item.content[0].text == THOUGHT
    assert message.type == "message" and response.output_text == ANSWER
    assert response.usage.output_tokens_details.reasoning_tokens == 4


@pytest.mark.parametrize("think", [False, True, "low", "high"])
def test_gpt_oss_ollama_think_levels(ollama_client, think):
    response = ollama_client.chat(model=GPT_OSS, messages=USER, think=think, options={"num_predict": 30})
    assert (response.message.thinking, response.message.content) == (THOUGHT, ANSWER)   # false is ignored, as Ollama
    assert response.done_reason == "stop" and response.eval_count == len(SCRIPT)
    medium = ollama_client.chat(model=GPT_OSS, messages=USER, options={"num_predict": 1})
    level = think if isinstance(think, str) else "medium"
    assert response.prompt_eval_count - medium.prompt_eval_count == len(level) - len("medium")


@pytest.mark.parametrize("stream", [False, True])
def test_gpt_oss_ollama_format_schema_and_generate(ollama_client, stream):
    parts = ollama_client.chat(model=GPT_OSS, messages=USER, think="low", format=CITY_SCHEMA, stream=stream,
                               options={"num_predict": 60})
    parts = list(parts) if stream else [parts]
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    jsonschema.validate(json.loads("".join(p.message.content for p in parts)), CITY_SCHEMA)
    generated = ollama_client.generate(model=GPT_OSS, prompt="What is 2+2?", stream=stream, think="high",
                                       options={"num_predict": 30})
    generated = list(generated) if stream else [generated]
    assert "".join(p.thinking or "" for p in generated) == THOUGHT
    assert "".join(p.response for p in generated) == ANSWER
