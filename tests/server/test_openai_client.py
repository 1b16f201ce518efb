"""The real OpenAI Python SDK against a real waitress server (SmolLM2 and all-MiniLM).

Greedy outputs are checked against the golden llama.cpp continuations of the
same prompts (../shared/golden/smollm2_q4_1.json); embeddings against
sentence-transformers' vectors (all_minilm_l6_v2.json).
"""
from __future__ import annotations

import base64
import json
import math
import struct

import openai
import pytest

from .conftest import MINILM, SMOLLM2

N_TOKENS = 8


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=SMOLLM2, messages=messages, **kwargs)


def test_basic_chat_with_system_prompt_is_the_golden_greedy_text(client, golden_case, greedy_text):
    case = golden_case("chat_sky")
    reply = chat(client, case["messages"], temperature=0, max_tokens=N_TOKENS)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-") and reply.model == SMOLLM2
    assert reply.system_fingerprint == "fp_localllm" and reply.created > 0
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_text("chat_sky", N_TOKENS)
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(case["prompt_tokens"])
    assert reply.usage.completion_tokens == N_TOKENS
    assert reply.usage.total_tokens == len(case["prompt_tokens"]) + N_TOKENS


def test_without_system_prompt_the_template_default_is_used(client, golden_case, greedy_text):
    case = golden_case("chat_count")
    assert not any(m["role"] == "system" for m in case["messages"])
    reply = chat(client, case["messages"], temperature=0, max_tokens=4)
    assert reply.usage.prompt_tokens == len(case["prompt_tokens"])
    assert reply.choices[0].message.content == greedy_text("chat_count", 4)


def test_multi_turn_history_ends_with_stop(client, golden_case):
    case = golden_case("chat_multiturn")
    reply = chat(client, case["messages"], temperature=0, max_tokens=16)
    assert reply.usage.prompt_tokens == len(case["prompt_tokens"])
    assert reply.choices[0].message.content == case["llamacpp"]["greedy_text"]
    assert reply.choices[0].finish_reason == "stop"          # the golden continuation ends with EOS


def test_streaming_deltas_join_to_the_greedy_text(client, golden_case, greedy_text):
    chunks = list(chat(client, golden_case("chat_sky")["messages"], temperature=0, max_tokens=N_TOKENS,
                       stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == greedy_text("chat_sky", N_TOKENS)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage_sends_a_last_usage_chunk(client, golden_case):
    case = golden_case("chat_sky")
    chunks = list(chat(client, case["messages"], temperature=0, max_tokens=4, stream=True,
                       stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(case["prompt_tokens"]), 4)
    assert last.usage.total_tokens == len(case["prompt_tokens"]) + 4
    assert all(c.usage is None for c in body)


def test_text_completion_is_the_golden_greedy_text(client, golden_case, greedy_text):
    case = golden_case("capital")
    reply = client.completions.create(model=SMOLLM2, prompt=case["prompt"], temperature=0, max_tokens=4)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == greedy_text("capital", 4)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(case["prompt_tokens"])


def test_completion_token_array_prompts_and_prompt_lists(client, golden_case, greedy_text):
    capital, story = golden_case("capital"), golden_case("story")
    reply = client.completions.create(model=SMOLLM2, prompt=[capital["prompt_tokens"], story["prompt_tokens"]],
                                      temperature=0, max_tokens=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [greedy_text("capital", 3), greedy_text("story", 3)]
    assert reply.usage.prompt_tokens == len(capital["prompt_tokens"]) + len(story["prompt_tokens"])
    assert reply.usage.completion_tokens == 6
    listed = client.completions.create(model=SMOLLM2, prompt=[capital["prompt"], story["prompt"]],
                                       temperature=0, max_tokens=3)
    assert [c.text for c in listed.choices] == [c.text for c in reply.choices]


def test_completion_echo_and_integer_logprobs(client, golden_case, greedy_text):
    case = golden_case("capital")
    reply = client.completions.create(model=SMOLLM2, prompt=case["prompt"], temperature=0, max_tokens=2,
                                      echo=True, logprobs=3)
    choice = reply.choices[0]
    assert choice.text == case["prompt"] + greedy_text("capital", 2)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(case["prompt_tokens"]) + 2
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    for token, logprob, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert logprob <= 0 and top[token] == logprob
        assert 3 <= len(top) <= 4                          # the 3 best, plus the token itself if not among them
    for logprob, top in zip(logprobs.token_logprobs[-2:], logprobs.top_logprobs[-2:]):
        assert logprob == max(top.values())               # greedy: the generated token is the best one


def test_completion_streaming(client, golden_case, greedy_text):
    chunks = list(client.completions.create(model=SMOLLM2, prompt=golden_case("capital")["prompt"], temperature=0,
                                            max_tokens=4, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == greedy_text("capital", 4)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_list_and_retrieve(client):
    ids = {m.id for m in client.models.list()}
    assert {SMOLLM2, "all-minilm:latest"} <= ids
    model = client.models.retrieve(SMOLLM2)
    assert (model.id, model.object, model.owned_by) == (SMOLLM2, "model", "library")
    assert model.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model:7b")


def test_seed_makes_sampling_reproducible(client):
    messages = [{"role": "user", "content": "Tell me a short story about a cat."}]
    first, second = (chat(client, messages, temperature=1.0, seed=1234, max_tokens=N_TOKENS) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.content


def test_logprobs_with_top_logprobs(client, golden_case, greedy_text):
    reply = chat(client, golden_case("chat_sky")["messages"], temperature=0, max_tokens=4, logprobs=True,
                 top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content == greedy_text("chat_sky", 4)
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)
        assert entry.token == entry.top_logprobs[0].token
        assert bytes(entry.bytes).decode() == entry.token
        assert all(t.logprob <= 0 for t in entry.top_logprobs)
    no_logprobs = chat(client, golden_case("chat_sky")["messages"], temperature=0, max_tokens=1)
    assert no_logprobs.choices[0].logprobs is None


def test_n_2_gives_two_choices(client, golden_case, greedy_text):
    reply = chat(client, golden_case("chat_sky")["messages"], temperature=0, max_tokens=4, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [greedy_text("chat_sky", 4)] * 2
    assert reply.usage.completion_tokens == 8
    sampled = chat(client, [{"role": "user", "content": "Name a color."}], temperature=1.0, seed=7, max_tokens=4,
                   n=2)
    assert [c.index for c in sampled.choices] == [0, 1]


def test_n_2_streams_both_indexes(client, golden_case, greedy_text):
    chunks = list(chat(client, golden_case("chat_sky")["messages"], temperature=0, max_tokens=3, n=2,
                       stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == greedy_text("chat_sky", 3)
        assert mine[-1].finish_reason == "length"


def test_stop_sequences(client, golden_case, greedy_text):
    full = greedy_text("chat_sky", N_TOKENS)                 # "The sky appears blue because ..."
    assert " blue" in full
    for stop in (" blue", [" blue", "never-there"]):
        reply = chat(client, golden_case("chat_sky")["messages"], temperature=0, max_tokens=N_TOKENS, stop=stop)
        assert reply.choices[0].message.content == full[:full.index(" blue")]
        assert reply.choices[0].finish_reason == "stop"


def test_max_completion_tokens_limits_like_max_tokens(client, golden_case, greedy_text):
    reply = chat(client, golden_case("chat_sky")["messages"], temperature=0, max_completion_tokens=2)
    assert reply.choices[0].message.content == greedy_text("chat_sky", 2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_ollama_style_options_extension(client, golden_case):
    reply = chat(client, golden_case("chat_sky")["messages"], max_tokens=3,
                 extra_body={"options": {"temperature": 0, "top_k": 1, "repeat_penalty": 1.0, "num_ctx": 2048}})
    greedy = chat(client, golden_case("chat_sky")["messages"], temperature=0, max_tokens=3)
    assert reply.choices[0].message.content == greedy.choices[0].message.content


def test_logit_bias_bans_the_greedy_token(client, golden_case, smollm2):
    messages = golden_case("chat_sky")["messages"]
    first_token = golden_case("chat_sky")["llamacpp"]["greedy_tokens"][0]
    reply = chat(client, messages, temperature=0, max_tokens=1, logit_bias={str(first_token): -100})
    assert reply.choices[0].message.content != smollm2.detokenize([first_token])


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    reply = chat(client, [{"role": "user", "content": "Is the sky blue? Answer in JSON."}], temperature=0,
                 max_tokens=24, response_format={"type": "json_schema",
                                                 "json_schema": {"name": "answer", "schema": schema}})
    assert json.loads(reply.choices[0].message.content)["answer"] in ("yes", "no")


def _norm(vector):
    return math.sqrt(sum(x * x for x in vector))


def test_embeddings_one_string_matches_sentence_transformers(client, golden_minilm):
    text = next(t for t in golden_minilm["inputs"] if t)
    expected = golden_minilm["embeddings"][golden_minilm["inputs"].index(text)]
    reply = client.embeddings.create(model=MINILM, input=text)
    [item] = reply.data
    assert item.index == 0 and item.object == "embedding" and reply.model == MINILM
    assert len(item.embedding) == len(expected) == 384
    assert max(abs(a - b) for a, b in zip(item.embedding, expected)) < 1e-4
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens


def test_embeddings_batch_keeps_the_order(client, golden_minilm):
    texts = [t for t in golden_minilm["inputs"] if t][:3]
    reply = client.embeddings.create(model=MINILM, input=texts)
    assert [d.index for d in reply.data] == [0, 1, 2]
    for text, item in zip(texts, reply.data):
        expected = golden_minilm["embeddings"][golden_minilm["inputs"].index(text)]
        assert max(abs(a - b) for a, b in zip(item.embedding, expected)) < 1e-4


def test_embeddings_base64_decodes_to_the_float_list(client, http):
    body = {"model": MINILM, "input": "hello world"}
    floats = http.post("/v1/embeddings", {**body, "encoding_format": "float"}).json()["data"][0]["embedding"]
    encoded = http.post("/v1/embeddings", {**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = struct.unpack(f"<{len(floats)}f", base64.b64decode(encoded))
    assert list(decoded) == [struct.unpack("<f", struct.pack("<f", x))[0] for x in floats]
    # the SDK asks for base64 by default and decodes it itself
    assert client.embeddings.create(**body).data[0].embedding == pytest.approx(floats, abs=1e-7)


def test_embeddings_dimensions_truncate_then_renormalize(client):
    full = client.embeddings.create(model=MINILM, input="hello world").data[0].embedding
    short = client.embeddings.create(model=MINILM, input="hello world", dimensions=64).data[0].embedding
    assert len(short) == 64 and _norm(short) == pytest.approx(1.0, abs=1e-5)
    scale = _norm(full[:64])
    assert short == pytest.approx([x / scale for x in full[:64]], abs=1e-5)
