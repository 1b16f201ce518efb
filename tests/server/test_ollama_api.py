"""Ollama native API: /api/chat, /api/generate, /api/embed against a real server, with the real `ollama` client
and raw HTTP (NDJSON framing, final-line fields, native error bodies)."""
from __future__ import annotations

import json
import math
import re
import time

import httpx
import ollama
import pytest

SMOL = "smollm2:135m"
GREEDY = {"temperature": 0, "num_predict": 12}
RAW_GREEDY = {"temperature": 0, "num_predict": 4}
# Note on prompts: greedy answers compared between requests use prompts whose top-2 logit margins are wide
# (golden "chat_multiturn", "capital" for 4 tokens): the engine's logits move by up to ~0.9 with how a
# prompt's prefill is split (KV prefix reuse), which flips near-ties.
RFC3339_NANO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
FINAL_FIELDS = {"model", "created_at", "done", "done_reason", "total_duration", "load_duration", "prompt_eval_count",
                "prompt_eval_duration", "eval_count", "eval_duration"}


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server)


def golden_case(golden_smollm2, name):
    return next(case for case in golden_smollm2 if case["name"] == name)


def ndjson(response: httpx.Response) -> list[dict]:
    body = response.text
    assert body.endswith("\n")
    return [json.loads(line) for line in body.splitlines()]


# ---- chat ------------------------------------------------------------------------------------------------

def test_chat_matches_golden_greedy(client, golden_smollm2):
    case = golden_case(golden_smollm2, "chat_multiturn")
    response = client.chat(model=SMOL, messages=case["messages"], options={"temperature": 0, "num_predict": 24})
    assert response.message.role == "assistant"
    assert response.message.content == case["llamacpp"]["greedy_text"]     # "The capital of France is Paris."
    assert response.done and response.done_reason == "stop"
    assert case["llamacpp"]["greedy_tokens"][-1] == 2                        # <|im_end|> ends the answer
    assert response.eval_count == len(case["llamacpp"]["greedy_tokens"]) - 1  # the end token is not counted
    assert response.prompt_eval_count == len(case["prompt_tokens"])
    assert response.total_duration >= response.eval_duration > 0 and response.prompt_eval_duration > 0


def test_streaming_chat_equals_non_streaming(client, golden_smollm2):
    messages = golden_case(golden_smollm2, "chat_multiturn")["messages"]
    whole = client.chat(model=SMOL, messages=messages, options=GREEDY)
    parts = list(client.chat(model=SMOL, messages=messages, options=GREEDY, stream=True))
    assert len(parts) > 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content == "The capital of France is Paris."
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 7


def test_multi_turn_conversation_remembers(client):
    options = {"temperature": 0, "num_predict": 30}
    messages = [{"role": "user", "content": "The secret word is banana."}]
    first = client.chat(model=SMOL, messages=messages, options=options)
    messages += [{"role": "assistant", "content": first.message.content},
                 {"role": "user", "content": "What is the secret word?"}]
    second = client.chat(model=SMOL, messages=messages, options=options)
    assert "banana" in second.message.content.lower()
    # without the first turn the model does not know it
    alone = client.chat(model=SMOL, messages=messages[-1:], options=options)
    assert "banana" not in alone.message.content.lower()


def test_chat_stop_option(client, golden_smollm2):
    messages = golden_case(golden_smollm2, "chat_multiturn")["messages"]
    cut = client.chat(model=SMOL, messages=messages, options={"temperature": 0, "num_predict": 20, "stop": ["Paris"]})
    assert cut.done_reason == "stop" and cut.message.content == "The capital of France is "
    short = client.chat(model=SMOL, messages=messages, options={"temperature": 0, "num_predict": 3})
    assert short.done_reason == "length" and short.eval_count == 3 and short.message.content == "The capital of"


def test_format_json_schema_constrains_the_answer(client):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    question = "Describe a cat as JSON with name and age."
    answer = client.chat(model=SMOL, messages=[{"role": "user", "content": question}], format=schema,
                         options={"temperature": 0, "num_predict": 60})
    assert answer.done_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), schema)
    generated = client.generate(model=SMOL, prompt=question, format="json", options={"temperature": 0, "num_predict": 60})
    assert generated.response.lstrip().startswith("{")


def test_logprobs(client, golden_smollm2):
    messages = golden_case(golden_smollm2, "chat_multiturn")["messages"]
    answer = client.chat(model=SMOL, messages=messages, options=RAW_GREEDY, logprobs=True, top_logprobs=3)
    assert len(answer.logprobs) == answer.eval_count == 4
    for record in answer.logprobs:
        assert record.logprob <= 0 and len(record.top_logprobs) == 3
        assert record.logprob == max(t.logprob for t in record.top_logprobs)      # greedy takes the best
    assert "".join(r.token for r in answer.logprobs) == answer.message.content
    parts = list(client.generate(model=SMOL, prompt="The capital of France is", raw=True, options=RAW_GREEDY,
                                 logprobs=True, stream=True))
    streamed = [r for p in parts for r in (p.logprobs or [])]
    assert [r.token for r in streamed] == [" Paris", ".", "\n", "\n"] and not streamed[0].top_logprobs


def test_tools_are_rendered_into_the_prompt(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = client.chat(model=SMOL, messages=messages, options={"num_predict": 1})
    with_tools = client.chat(model=SMOL, messages=messages, tools=tools, options={"num_predict": 1})
    assert with_tools.prompt_eval_count > plain.prompt_eval_count + 40
    # an earlier call and its result (Ollama's message shapes) render too
    history = messages + [{"role": "assistant", "content": "",
                           "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                          {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    followed = client.chat(model=SMOL, messages=history, tools=tools, options={"num_predict": 1})
    assert followed.prompt_eval_count > with_tools.prompt_eval_count


def test_chat_with_no_messages_loads_the_model(server):
    response = httpx.post(f"{server}/api/chat", json={"model": SMOL}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert body["done"] is True and body["done_reason"] == "load" and body["model"] == SMOL


def test_keep_alive_zero_unloads_after_the_request(client, server):
    client.chat(model=SMOL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}, keep_alive=0)
    deadline = time.time() + 30
    while any(m.model == SMOL for m in client.ps().models) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(m.model == SMOL for m in client.ps().models)
    client.generate(model=SMOL, prompt="", keep_alive=-1)                      # load, keep forever
    loaded = next(m for m in client.ps().models if m.model == SMOL)
    assert loaded.expires_at.year > 2200
    response = httpx.post(f"{server}/api/generate", json={"model": SMOL, "keep_alive": "5m"}, timeout=60).json()
    assert response["done_reason"] == "load"
    loaded = next(m for m in client.ps().models if m.model == SMOL)
    assert 200 < loaded.expires_at.timestamp() - time.time() <= 301


def test_concurrent_requests_are_all_answered(server, golden_smollm2):
    from concurrent.futures import ThreadPoolExecutor

    messages = golden_case(golden_smollm2, "chat_multiturn")["messages"]

    def ask(route):
        body = {"model": SMOL, "stream": route == "generate", "options": RAW_GREEDY}
        body.update({"messages": messages} if route == "chat" else {"prompt": "The capital of France is", "raw": True})
        return httpx.post(f"{server}/api/{route}", json=body, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(ask, ["chat", "generate", "chat", "generate"]))
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["message"]["content"] for r in responses[::2]] == ["The capital of France"] * 2
    assert ["".join(line["response"] for line in ndjson(r)) for r in responses[1::2]] == [" Paris.\n\n"] * 2


def test_client_going_away_cancels_generation(server, engine):
    body = {"model": SMOL, "messages": [{"role": "user", "content": "Write a very long story."}],
            "options": {"num_predict": -1, "temperature": 1.0, "stop": []}}
    with httpx.stream("POST", f"{server}/api/chat", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["done"] is False
    worker = engine.workers["smollm2:135m"]
    deadline = time.time() + 30                # without cancellation it would run to the 4096-token context
    while worker.busy() and time.time() < deadline:
        time.sleep(0.1)
    assert not worker.busy()


# ---- generate --------------------------------------------------------------------------------------------

def test_generate_raw_matches_golden_and_returns_context(client, golden_smollm2):
    case = golden_case(golden_smollm2, "capital")
    response = client.generate(model=SMOL, prompt=case["prompt"], raw=True, options=RAW_GREEDY)
    assert response.context == case["prompt_tokens"] + case["llamacpp"]["greedy_tokens"][:4]
    assert response.response == " Paris.\n\n"
    assert response.prompt_eval_count == len(case["prompt_tokens"]) and response.eval_count == 4


def test_generate_context_continues(client):
    first = client.generate(model=SMOL, prompt="Tell me about Paris.", options=GREEDY)
    assert len(first.context) == first.prompt_eval_count + first.eval_count
    second = client.generate(model=SMOL, prompt="And London?", context=first.context, options=GREEDY)
    assert second.context[:len(first.context)] == list(first.context)
    assert second.prompt_eval_count > len(first.context)
    assert len(second.context) == second.prompt_eval_count + second.eval_count


def test_generate_template_system_and_streaming(client):
    prompt = "The capital of France is"
    raw = client.generate(model=SMOL, prompt=prompt, raw=True, options=RAW_GREEDY)
    templated = client.generate(model=SMOL, prompt=prompt, template="{{ prompt }}", options=RAW_GREEDY)
    assert templated.response == raw.response == " Paris.\n\n" and templated.context == raw.context
    chat_style = client.generate(model=SMOL, prompt=prompt, options=RAW_GREEDY)
    with_system = client.generate(model=SMOL, prompt=prompt, system="You are a poet.", options=RAW_GREEDY)
    assert raw.prompt_eval_count < chat_style.prompt_eval_count
    assert with_system.context[:chat_style.prompt_eval_count] != chat_style.context[:chat_style.prompt_eval_count]
    parts = list(client.generate(model=SMOL, prompt=prompt, raw=True, options=RAW_GREEDY, stream=True))
    assert "".join(p.response for p in parts) == raw.response
    assert parts[-1].context == raw.context and not any(p.context for p in parts[:-1])


def test_generate_empty_prompt_loads(client):
    response = client.generate(model=SMOL, prompt="")
    assert response.done and response.done_reason == "load" and response.response == ""


# ---- raw HTTP: framing, final line, errors ---------------------------------------------------------------

def prompt_tokens_metric(server, api: str) -> int:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(f'localllm_prompt_tokens_total{{api="{api}"}}'):
            return int(line.split()[-1])
    return 0


def test_ndjson_framing_and_final_line(server, golden_smollm2):
    counted = prompt_tokens_metric(server, "api_chat")
    messages = golden_case(golden_smollm2, "chat_multiturn")["messages"]       # a 7-token answer: 4 are cut
    response = httpx.post(f"{server}/api/chat", timeout=60, json={"model": SMOL, "messages": messages,
                                                                  "options": RAW_GREEDY})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(response)
    for line in lines[:-1]:
        assert set(line) == {"model", "created_at", "message", "done"} and line["done"] is False
        assert line["message"]["role"] == "assistant" and line["message"]["content"]
        assert RFC3339_NANO_UTC.match(line["created_at"])
    final = lines[-1]
    assert FINAL_FIELDS <= set(final) and final["done"] is True and final["done_reason"] == "length"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert all(isinstance(final[k], int) for k in FINAL_FIELDS if k.endswith(("duration", "count")))
    assert final["eval_count"] == 4 and final["model"] == SMOL
    assert "".join(line["message"]["content"] for line in lines) == "The capital of France"
    assert prompt_tokens_metric(server, "api_chat") == counted + final["prompt_eval_count"]

    capital = {"model": SMOL, "prompt": "The capital of France is", "raw": True, "options": RAW_GREEDY}
    lines = ndjson(httpx.post(f"{server}/api/generate", timeout=60, json=capital))
    assert all(set(line) == {"model", "created_at", "response", "done"} for line in lines[:-1])
    assert FINAL_FIELDS | {"context", "response"} <= set(lines[-1])

    single = httpx.post(f"{server}/api/generate", timeout=60, json={**capital, "stream": False})
    assert single.headers["content-type"].startswith("application/json")
    assert single.json()["response"] == "".join(line["response"] for line in lines) == " Paris.\n\n"


@pytest.mark.parametrize("route, body, status, message", [
    ("chat", {"model": "missing-model", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model 'missing-model' not found, try pulling it first"),
    ("generate", {"model": "missing-model", "prompt": "hi"}, 404, "model 'missing-model' not found, try pulling it first"),
    ("chat", {"messages": []}, 400, "model is required"),
    ("chat", {"model": SMOL, "messages": "hi"}, 400, "messages must be a list"),
    ("chat", {"model": SMOL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content must be a string"),
    ("chat", {"model": SMOL, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400,
     "model 'smollm2:135m' has no vision: it cannot read images"),
    ("chat", {"model": SMOL, "format": "xml", "messages": [{"role": "user", "content": "hi"}]}, 400,
     "format: format must be \"json\" or a JSON schema object"),
    ("generate", {"model": SMOL, "prompt": "x", "format": {"type": "object", "not": {"type": "null"}}}, 400,
     "format: "),
    ("chat", {"model": SMOL, "tools": [{"function": {}}], "messages": [{"role": "user", "content": "hi"}]}, 400,
     "tools[0].function.name must be a non-empty string"),
    ("chat", {"model": SMOL, "top_logprobs": 50, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "top_logprobs must be an integer between 0 and 20"),
    ("chat", {"model": SMOL, "stream": "yes", "messages": []}, 400, "stream must be true or false"),
    ("chat", {"model": SMOL, "keep_alive": "soon", "messages": []}, 400, "keep_alive: invalid duration"),
    ("chat", {"model": SMOL, "options": {"temperature": "hot"}, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "invalid options: parameter temperature must be a number"),
    ("chat", {"model": SMOL, "options": {"tempreature": 1}, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "unknown option 'tempreature'"),
    ("chat", {"model": SMOL, "options": {"mirostat": 2}, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "options.mirostat is not supported"),
    ("chat", {"model": SMOL, "shift": False, "options": {"num_ctx": 32, "num_predict": 100},
              "messages": [{"role": "user", "content": "hi"}]}, 400, "the context window is 32 tokens"),
    ("chat", {"model": "all-minilm", "messages": [{"role": "user", "content": "hi"}]}, 400,
     "model 'all-minilm' does not support chat"),
    ("generate", {"model": SMOL, "prompt": "def f(", "suffix": "return 1"}, 400, "does not support insert"),
    ("generate", {"model": SMOL, "prompt": "x", "context": [1, "a"]}, 400, "context must be a list of token ids"),
    ("generate", {"model": SMOL, "prompt": "x", "context": [10 ** 9]}, 400, "context token ids must be in"),
    ("generate", {"model": SMOL, "prompt": "x", "template": "{% if %}"}, 400, "chat template syntax error"),
    ("embed", {"model": SMOL, "input": "hi"}, 400, "does not support embeddings"),
    ("embed", {"model": "all-minilm", "input": [1, 2]}, 400, "input must be a string or a list of strings"),
    ("embed", {"model": "all-minilm", "input": "x " * 400, "truncate": False}, 400, "more than the model's max_seq_length"),
])
def test_native_error_bodies(server, route, body, status, message):
    response = httpx.post(f"{server}/api/{route}", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]


@pytest.mark.parametrize("payload, message", [(b"", "missing request body"), (b"{not json", "invalid JSON"),
                                              (b"[1, 2]", "must be a JSON object")])
def test_bad_bodies(server, payload, message):
    response = httpx.post(f"{server}/api/chat", content=payload, timeout=30)
    assert response.status_code == 400 and message in response.json()["error"]


def test_not_found_through_the_client(client):
    for call in (lambda: client.chat(model="nothing-here", messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.generate(model="nothing-here", prompt="hi"),
                 lambda: client.show("nothing-here"), lambda: client.embed(model="nothing-here", input="x")):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 404
        assert info.value.error == "model 'nothing-here' not found, try pulling it first"


# ---- embeddings ------------------------------------------------------------------------------------------

def test_embed_matches_sentence_transformers(client, golden_minilm):
    response = client.embed(model="all-minilm", input=golden_minilm["inputs"])
    assert response.model == "all-minilm" and len(response.embeddings) == len(golden_minilm["inputs"])
    for got, expected in zip(response.embeddings, golden_minilm["embeddings"]):
        assert max(abs(a - b) for a, b in zip(got, expected)) < 2e-4
    assert response.prompt_eval_count > 256 and response.load_duration >= 0 and response.total_duration > 0
    single = client.embed(model="all-minilm", input=golden_minilm["inputs"][0])
    assert single.embeddings == [response.embeddings[0]]
    short = client.embed(model="all-minilm", input="hello world", dimensions=8).embeddings[0]
    assert len(short) == 8 and math.isclose(sum(v * v for v in short), 1.0, rel_tol=1e-5)
    assert client.embed(model="all-minilm", input="").embeddings == []


def test_legacy_embeddings_route(client):
    legacy = client.embeddings(model="all-minilm", prompt="hello world").embedding
    normalized = client.embed(model="all-minilm", input="hello world").embeddings[0]
    norm = math.sqrt(sum(v * v for v in legacy))
    assert len(legacy) == 384 and not math.isclose(norm, 1.0, rel_tol=1e-3)      # Ollama: not normalized
    assert max(abs(a / norm - b) for a, b in zip(legacy, normalized)) < 1e-5
    assert client.embeddings(model="all-minilm", prompt="").embedding == []
