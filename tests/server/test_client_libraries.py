"""Client libraries against ``localllm serve``: ``langchain-openai`` (``ChatOpenAI(base_url=...)``), ``litellm``
as a client (``litellm.completion(model="openai/<name>", api_base=...)``) and ``langchain-ollama``
(``ChatOllama(base_url=...)``, the native /api routes).

Each answer is checked against the server's own answer to the same greedy request over plain HTTP (text,
finish reason, token counts; tool call names and arguments), directly and through test_gateway's gateway
(``to-real``: a failing upstream, then the real localllm upstream; ``claude/smol``: the keyed localllm server
spoken to as an Anthropic API). Nothing here may reach past 127.0.0.1: every other connection is refused and
fails the module (litellm reads its bundled cost map, LITELLM_LOCAL_MODEL_COST_MAP).
"""
from __future__ import annotations

import json
import socket

import pytest

from .conftest import SMOLLM2
from .test_gateway import faulty_port, gateway  # noqa: F401

# litellm's import makes pydantic warn about its ReadOnly TypedDict items: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning")

langchain_openai = pytest.importorskip("langchain_openai")
langchain_ollama = pytest.importorskip("langchain_ollama")
messages_module = pytest.importorskip("langchain_core.messages")

SYSTEM = "You are brief."
QUESTION = "Name three colours."
MAX_TOKENS = 8
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
WEATHER_QUESTION = "What is the weather in Paris?"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(scope="module", autouse=True)
def no_internet():
    """Refuse every connection that is not to the loopback address; any attempt fails the module."""
    attempts = []
    original = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"the client-library tests must not reach the network (tried {address})")
        return original(sock, address)

    patch = pytest.MonkeyPatch()
    patch.setattr(socket.socket, "connect", connect)
    yield attempts
    patch.undo()
    assert attempts == [], f"a client library tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def litellm():
    patch = pytest.MonkeyPatch()
    patch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")     # never fetch the model cost map
    module = pytest.importorskip("litellm")
    module.telemetry = False
    module.suppress_debug_info = True
    yield module
    patch.undo()


def chat_request(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def tool_request(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": WEATHER_QUESTION}], "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 40,
            "temperature": 0}


@pytest.fixture(scope="module")
def reference(http) -> dict:
    """The server's own greedy answer over plain HTTP: the text and usage, and the forced call's arguments."""
    answer = http.post("/v1/chat/completions", chat_request(SMOLLM2)).json()
    called = http.post("/v1/chat/completions", tool_request(SMOLLM2)).json()
    [call] = called["choices"][0]["message"]["tool_calls"]
    assert answer["choices"][0]["finish_reason"] == "length" and call["function"]["name"] == "get_weather"
    return {"text": answer["choices"][0]["message"]["content"], "usage": answer["usage"],
            "arguments": json.loads(call["function"]["arguments"])}


def lc_messages():
    return [messages_module.SystemMessage(SYSTEM), messages_module.HumanMessage(QUESTION)]


# ---- langchain-openai --------------------------------------------------------------------------------

def chat_openai(base_url: str, model: str, **extra):
    return langchain_openai.ChatOpenAI(base_url=base_url + "/v1", api_key="unused", model=model, temperature=0,
                                       max_tokens=MAX_TOKENS, max_retries=0, timeout=120, **extra)


def test_langchain_openai_invoke(server, reference):
    message = chat_openai(server, SMOLLM2).invoke(lc_messages())
    assert message.content == reference["text"]
    assert message.response_metadata["finish_reason"] == "length"
    assert message.response_metadata["model_name"] == SMOLLM2
    assert message.usage_metadata["input_tokens"] == reference["usage"]["prompt_tokens"]
    assert message.usage_metadata["output_tokens"] == MAX_TOKENS


def test_langchain_openai_stream(server, reference):
    chunks = list(chat_openai(server, SMOLLM2, stream_usage=True).stream(lc_messages()))
    assert len([c for c in chunks if c.content]) > 1                    # chunk by chunk
    assert "".join(chunk.content for chunk in chunks) == reference["text"]
    whole = sum(chunks[1:], chunks[0])
    assert whole.usage_metadata["output_tokens"] == MAX_TOKENS
    assert whole.response_metadata["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_langchain_openai_bind_tools(server, reference, stream):
    llm = chat_openai(server, SMOLLM2, max_completion_tokens=40)
    bound = llm.bind_tools([WEATHER], tool_choice="get_weather")
    if stream:
        chunks = list(bound.stream(WEATHER_QUESTION))
        message = sum(chunks[1:], chunks[0])
    else:
        message = bound.invoke(WEATHER_QUESTION)
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["args"] == reference["arguments"]


@pytest.mark.parametrize("model, answered_by", [("to-real", "real/smol"), ("claude/smol", "claude/smol")])
def test_langchain_openai_through_the_gateway(gateway, reference, model, answered_by):
    message = chat_openai(gateway, model).invoke(lc_messages())
    assert message.content == reference["text"] and message.response_metadata["model_name"] == answered_by
    chunks = list(chat_openai(gateway, model, stream_usage=True).stream(lc_messages()))
    assert "".join(chunk.content for chunk in chunks) == reference["text"]
    assert sum(chunks[1:], chunks[0]).usage_metadata["output_tokens"] == MAX_TOKENS
    [call] = chat_openai(gateway, model, max_completion_tokens=40).bind_tools(
        [WEATHER], tool_choice="get_weather").invoke(WEATHER_QUESTION).tool_calls
    assert call["name"] == "get_weather" and call["args"] == reference["arguments"]


# ---- litellm as a client --------------------------------------------------------------------------------

def litellm_call(litellm, base_url: str, request: dict, **extra):
    return litellm.completion(**dict(request, model=f"openai/{request['model']}", **extra),
                              api_base=base_url + "/v1", api_key="unused", num_retries=0, timeout=120)


@pytest.mark.parametrize("base, model", [("server", SMOLLM2), ("gateway", "to-real"), ("gateway", "claude/smol")])
def test_litellm_completion_stream_and_tools(litellm, request, reference, base, model):
    base_url = request.getfixturevalue(base)
    response = litellm_call(litellm, base_url, chat_request(model))
    assert response.choices[0].message.content == reference["text"]
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == MAX_TOKENS
    assert response.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    chunks = list(litellm_call(litellm, base_url, chat_request(model), stream=True))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference["text"]
    called = litellm_call(litellm, base_url, tool_request(model))
    [call] = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == reference["arguments"]
    assert called.choices[0].finish_reason == "tool_calls"


def test_litellm_streamed_tool_call(litellm, server, reference):
    chunks = list(litellm_call(litellm, server, tool_request(SMOLLM2), stream=True))
    name, arguments = "", ""
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += call.function.name or ""
            arguments += call.function.arguments or ""
    assert name == "get_weather" and json.loads(arguments) == reference["arguments"]


# ---- langchain-ollama against the native API -------------------------------------------------------------

def chat_ollama(server: str, num_predict: int = MAX_TOKENS):
    return langchain_ollama.ChatOllama(base_url=server, model=SMOLLM2, temperature=0, num_predict=num_predict)


def test_langchain_ollama_invoke_and_stream(server, reference):
    message = chat_ollama(server).invoke(lc_messages())
    assert message.content == reference["text"]
    assert message.response_metadata["done_reason"] == "length"
    assert message.usage_metadata["input_tokens"] == reference["usage"]["prompt_tokens"]
    assert message.usage_metadata["output_tokens"] == MAX_TOKENS
    chunks = list(chat_ollama(server).stream(lc_messages()))
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(chunk.content for chunk in chunks) == reference["text"]


# as langchain-ollama sends a tool (it keeps type, required and the properties' types, in this order)
OLLAMA_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}


def test_langchain_ollama_tools_and_tool_results_reach_the_prompt(server, http):
    """Ollama's API has no tool_choice and the 135M model does not call tools by itself, so what this checks is
    the way there: bound tools, an earlier call and its result are in the prompt exactly as the same
    conversation sent over plain HTTP puts them (same prompt length, same greedy answer)."""
    history = [messages_module.HumanMessage("What is the weather in Oslo?"),
               messages_module.AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"},
                                                          "id": "call_1"}]),
               messages_module.ToolMessage("rain", tool_call_id="call_1"),
               messages_module.HumanMessage(WEATHER_QUESTION)]
    message = chat_ollama(server, num_predict=12).bind_tools([OLLAMA_WEATHER]).invoke(history)
    raw = http.post("/api/chat", {
        "model": SMOLLM2, "stream": False, "options": {"temperature": 0, "num_predict": 12}, "tools": [OLLAMA_WEATHER],
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"},
                     {"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                     {"role": "tool", "content": "rain"},
                     {"role": "user", "content": WEATHER_QUESTION}]}).json()
    alone = http.post("/api/chat", {"model": SMOLLM2, "stream": False, "options": {"num_predict": 1},
                                    "messages": [{"role": "user", "content": WEATHER_QUESTION}]}).json()
    assert message.content == raw["message"]["content"] and message.tool_calls == []
    assert message.usage_metadata["input_tokens"] == raw["prompt_eval_count"]
    assert raw["prompt_eval_count"] > alone["prompt_eval_count"] + 40          # the tools and the earlier turns
