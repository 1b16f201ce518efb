"""A conversation longer than the context window keeps going on the native routes (issue 19).

The `ollama` client loops a chat with SmolLM2 at num_ctx 128 whose answers run past the end of
the window (the context shifts, as in Ollama); /api/chat then leaves out the oldest messages and
/api/generate cuts a long context, as Ollama does. ``shift: false`` keeps every answer inside the
window. The prompt each request ran is checked token for token against the messages this
file expects kept, rendered here through the model's own template. The OpenAI routes keep their
400 ``context_length_exceeded``.
"""
from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.server.conftest import SMOLLM2

NUM_CTX = 128
HALF = NUM_CTX - NUM_CTX // 2                      # what a cut leaves the prompt when num_predict is unset
SYSTEM = {"role": "system", "content": "You are Countbot. You count."}
COUNT = "Write the numbers from 1 to 300, separated by commas."


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, timeout=300)


def chat_ids(model, messages: list[dict]) -> list[int]:
    return model.tokenize(model.render_chat(messages, add_generation_prompt=True))


def expected_kept(model, messages: list[dict], num_predict: int | None = None, shift: bool = False) -> list[dict]:
    """Ollama's walk from the oldest message (from user turns): the system prompt plus the newest messages that
    leave the answer its room (num_predict, or half the window; with a shift, the smaller of the two); the whole
    conversation when it fits (with a shift, only the prompt must fit)."""
    limit = NUM_CTX - num_predict if num_predict is not None and not shift else NUM_CTX - 1
    room = NUM_CTX // 2 if num_predict is None else (min(num_predict, NUM_CTX // 2) if shift else num_predict)
    budget = min(NUM_CTX - room, limit)
    if len(chat_ids(model, messages)) <= limit:
        return messages
    for start in range(3, len(messages), 2):                    # SYSTEM, then user/assistant pairs
        assert messages[start]["role"] == "user"
        kept = messages[:1] + messages[start:]
        if len(chat_ids(model, kept)) <= budget or start == len(messages) - 1:
            return kept
    raise AssertionError("unreachable: the newest message is always kept")


def history(turns: int, words: int) -> list[dict]:
    """A made-up conversation: SYSTEM, then ``turns`` user/assistant pairs of about ``words`` tokens each."""
    messages = [SYSTEM]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"Question {turn}: " + "tell me more " * (words // 3)},
                     {"role": "assistant", "content": f"Answer {turn}: " + "and then some " * (words // 3)}]
    return messages


def ndjson(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines()]


def test_the_ollama_client_keeps_a_long_chat_going(client, smollm2):
    messages = [SYSTEM]
    for turn in range(3):
        messages.append({"role": "user", "content": COUNT if turn == 0 else "Go on counting."})
        kept = expected_kept(smollm2, messages, num_predict=160, shift=True)
        response = client.chat(model=SMOLLM2, messages=messages,
                               options={"num_ctx": NUM_CTX, "num_predict": 160, "temperature": 0})
        assert response.done and response.message.content
        assert response.prompt_eval_count == len(chat_ids(smollm2, kept))       # the prompt the model saw
        assert kept[0] == SYSTEM and kept[-1] == messages[-1]
        if turn == 0:                                      # the first answer: longer than the window
            assert kept == messages and response.done_reason == "length" and response.eval_count == 160
            assert response.prompt_eval_count + response.eval_count > NUM_CTX      # the context shifted
        else:                                              # then earlier turns go, leaving half the window
            assert len(kept) < len(messages) and response.prompt_eval_count <= HALF
        messages.append({"role": "assistant", "content": response.message.content})


def test_without_shift_the_answer_stops_at_the_window(server, smollm2):
    messages = [SYSTEM, {"role": "user", "content": COUNT}]
    final = httpx.post(f"{server}/api/chat", timeout=300, json={
        "model": SMOLLM2, "messages": messages, "stream": False, "shift": False,
        "options": {"num_ctx": NUM_CTX, "temperature": 0}}).json()
    assert final["done_reason"] == "length" and final["prompt_eval_count"] + final["eval_count"] == NUM_CTX


@pytest.mark.parametrize("stream", [False, True])
def test_the_final_line_and_a_header_count_the_dropped_tokens(server, smollm2, stream):
    messages = history(turns=6, words=15) + [{"role": "user", "content": "Now say hi."}]
    kept = expected_kept(smollm2, messages, num_predict=4)
    full, sent = len(chat_ids(smollm2, messages)), len(chat_ids(smollm2, kept))
    assert full > NUM_CTX - 4 and 2 < len(kept) < len(messages)          # the case cuts, and keeps some history
    response = httpx.post(f"{server}/api/chat", timeout=300, json={
        "model": SMOLLM2, "messages": messages, "stream": stream, "shift": False,
        "options": {"num_ctx": NUM_CTX, "num_predict": 4, "temperature": 0}})
    assert response.status_code == 200, response.text
    final = ndjson(response)[-1] if stream else response.json()
    assert final["done"] and final["prompt_eval_count"] == sent
    assert final["truncated_prompt_tokens"] == full - sent
    assert final["truncated_messages"] == len(messages) - len(kept)
    assert response.headers["x-localllm-prompt-truncated"] == str(full - sent)


def test_a_conversation_that_fits_is_not_cut_and_says_nothing(server, smollm2):
    messages = history(turns=1, words=6) + [{"role": "user", "content": "Now say hi."}]
    response = httpx.post(f"{server}/api/chat", timeout=300, json={
        "model": SMOLLM2, "messages": messages, "stream": False,
        "options": {"num_ctx": NUM_CTX, "num_predict": 2, "temperature": 0}})
    body = response.json()
    assert body["prompt_eval_count"] == len(chat_ids(smollm2, messages))
    assert "truncated_prompt_tokens" not in body and "x-localllm-prompt-truncated" not in response.headers


def test_truncate_false_keeps_the_400(server):
    messages = history(turns=6, words=15) + [{"role": "user", "content": "Now say hi."}]
    response = httpx.post(f"{server}/api/chat", timeout=300, json={
        "model": SMOLLM2, "messages": messages, "truncate": False, "shift": False,
        "options": {"num_ctx": NUM_CTX, "num_predict": 4}})
    assert response.status_code == 400
    assert "the context window is 128 tokens" in response.json()["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_newest_message_too_long_alone_is_a_400(server, smollm2, stream):
    messages = history(turns=2, words=15) + [{"role": "user", "content": "count " * 150}]
    newest = len(chat_ids(smollm2, [SYSTEM, messages[-1]]))
    response = httpx.post(f"{server}/api/chat", timeout=300, json={
        "model": SMOLLM2, "messages": messages, "stream": stream, "options": {"num_ctx": NUM_CTX}})
    assert response.status_code == 400
    assert response.json() == {"error": f"the newest message, with the system prompt and tools, needs {newest} "
                                        f"tokens + at least 1 to answer but the context window is 128 tokens: "
                                        f"shorten the message or raise num_ctx"}


def test_the_openai_route_keeps_its_context_length_exceeded(server):
    messages = history(turns=6, words=15) + [{"role": "user", "content": "Now say hi."}]
    response = httpx.post(f"{server}/v1/chat/completions", timeout=300, json={
        "model": SMOLLM2, "messages": messages, "max_tokens": 4, "options": {"num_ctx": NUM_CTX}})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_generate_with_a_long_context_keeps_bos_num_keep_and_the_end(server, smollm2):
    earlier = history(turns=3, words=15)[1:]                     # an earlier exchange, as its context ids
    context = chat_ids(smollm2, earlier) + smollm2.tokenize("Answer 3: and so on", add_bos=False)
    follow_up = "Go on counting."
    whole = context + smollm2.tokenize(
        smollm2.render_chat([{"role": "user", "content": follow_up}], add_generation_prompt=True), add_bos=False)
    assert whole[0] == smollm2.tokenizer.bos_id and len(whole) > NUM_CTX
    budget = NUM_CTX - 4
    kept = whole[:1 + 4] + whole[len(whole) - (budget - 5):]            # BOS + num_keep 4, then the newest
    response = httpx.post(f"{server}/api/generate", timeout=300, json={
        "model": SMOLLM2, "prompt": follow_up, "context": context, "stream": True,
        "options": {"num_ctx": NUM_CTX, "num_predict": 4, "temperature": 0}})
    assert response.status_code == 200, response.text
    final = ndjson(response)[-1]
    assert final["prompt_eval_count"] == budget and final["context"][:budget] == kept
    assert final["truncated_prompt_tokens"] == len(whole) - budget
    assert response.headers["x-localllm-prompt-truncated"] == str(len(whole) - budget)


def test_generate_num_keep_and_truncate_false(server, smollm2):
    prompt = " ".join(str(n) for n in range(200))
    ids = smollm2.tokenize(prompt)
    assert len(ids) > NUM_CTX
    body = {"model": SMOLLM2, "prompt": prompt, "raw": True, "stream": False,
            "options": {"num_ctx": NUM_CTX, "num_predict": 2, "temperature": 0, "num_keep": 10}}
    final = httpx.post(f"{server}/api/generate", timeout=300, json=body).json()
    budget = NUM_CTX - 2
    bos = 1 if ids[0] == smollm2.tokenizer.bos_id else 0
    assert final["context"][:budget] == ids[:bos + 10] + ids[len(ids) - (budget - bos - 10):]
    assert final["truncated_prompt_tokens"] == len(ids) - budget
    refused = httpx.post(f"{server}/api/generate", timeout=300, json={**body, "truncate": False})
    assert refused.status_code == 400 and "the context window is 128 tokens" in refused.json()["error"]
    bad = httpx.post(f"{server}/api/generate", timeout=300,
                     json={**body, "options": {**body["options"], "num_keep": -2}})
    assert bad.status_code == 400 and bad.json() == {
        "error": "options.num_keep must be an integer >= -1 (-1 keeps the start of the prompt)"}


def test_shift_lets_the_answer_go_past_the_window(server, smollm2):
    messages = [SYSTEM, {"role": "user", "content": COUNT}]
    n_prompt = len(chat_ids(smollm2, messages))
    body = {"model": SMOLLM2, "messages": messages, "stream": False,
            "options": {"num_ctx": 64, "num_predict": 40, "temperature": 0}}
    refused = httpx.post(f"{server}/api/chat", timeout=300, json={**body, "shift": False})   # the answer must fit
    assert refused.status_code == 400 and "+ num_predict 40 but the context window is 64" in refused.json()["error"]
    final = httpx.post(f"{server}/api/chat", timeout=300, json=body).json()                 # shift: Ollama's default
    assert n_prompt + 40 > 64 and final["prompt_eval_count"] == n_prompt
    assert final["eval_count"] == 40 and final["done_reason"] == "length" and "truncated_prompt_tokens" not in final


def test_shift_on_generate_sends_a_prompt_that_fits_whole(server, smollm2):
    prompt = " ".join(str(n) for n in range(24))
    ids = smollm2.tokenize(prompt)
    body = {"model": SMOLLM2, "prompt": prompt, "raw": True, "stream": False,
            "options": {"num_ctx": len(ids) + 8, "num_predict": 12, "temperature": 0}}
    cut = httpx.post(f"{server}/api/generate", timeout=300, json={**body, "shift": False}).json()  # leave 12
    assert cut["prompt_eval_count"] == len(ids) - 4 and cut["truncated_prompt_tokens"] == 4
    whole = httpx.post(f"{server}/api/generate", timeout=300, json={**body, "shift": True}).json()
    assert whole["prompt_eval_count"] == len(ids) and whole["eval_count"] == 12
    assert "truncated_prompt_tokens" not in whole
