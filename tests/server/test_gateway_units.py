"""The gateway package without HTTP: config checks, the cache, the stream relays, route resolution, the
fallback decisions for local members (fake local resource) and the JSON checks of their streams, budgets, and
the chat <-> Anthropic Messages translation for Anthropic-format upstreams (``anthropic_api.openai_bridge``)."""
from __future__ import annotations

import hashlib
import json

import pytest

from localllm_server.errors import APIError
from localllm_server.gateway import config as gateway_config
from localllm_server.gateway.cache import CachedAnswer, ResponseCache, is_deterministic, request_key
from localllm_server.gateway.routing import Gateway, LocalAnswer, StreamRelay, invalid_json_reason, usage_of

ENV = {"KEY_A": "sk-a-secret"}
KEY_A_SHA256 = hashlib.sha256(ENV["KEY_A"].encode()).hexdigest()


def parse(document: dict):
    return gateway_config.parse(document, "gw.toml", ENV)


def upstream(**extra) -> dict:
    return {"base_url": "http://127.0.0.1:9/v1", **extra}


# ---- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("document, key, problem", [
    ({"upstream": {}}, "upstream", "unknown key"),
    ({"upstreams": {"a": upstream(base_url="ftp://x")}}, "upstreams.a.base_url", "http:// or https://"),
    ({"upstreams": {"a": upstream(api_key_env="MISSING_VAR")}}, "upstreams.a.api_key_env",
     "MISSING_VAR is not set"),
    ({"upstreams": {"a": upstream(read_timeout=0)}}, "upstreams.a.read_timeout", "more than 0"),
    ({"upstreams": {"a": upstream(input_price_per_million="1")}}, "upstreams.a.input_price_per_million",
     "must be a number"),
    ({"upstreams": {"a": upstream(models={"x": 3})}}, "upstreams.a.models", "must map model names"),
    ({"upstreams": {"a/b": upstream()}}, "upstreams.a/b", "without '/'"),
    ({"upstreams": {"a": upstream(api_key="sk")}}, "upstreams.a.api_key", "unknown key"),
    ({"routes": {"r": []}}, "routes.r", "non-empty list"),
    ({"routes": {"r": {"members": ["m"], "fallback_on_invalid_json": "yes"}}}, "routes.r.fallback_on_invalid_json",
     "true or false"),
    ({"routes": {"r": ["s"], "s": ["m"]}}, "routes.r", "routes do not nest"),
    ({"upstreams": {"a": upstream()}, "routes": {"a": ["m"]}}, "routes.a", "also an upstream"),
    ({"cache": {"max_bytes": 0}}, "cache.max_bytes", "at least 1"),
    ({"cache": {"enabled": 1}}, "cache.enabled", "true or false"),
    ({"upstreams": {"a": upstream(format="gemini")}}, "upstreams.a.format", "'openai', 'anthropic'"),
    ({"upstreams": {"a": upstream(format="anthropic")}}, "upstreams.a.base_url", "without /v1"),
    ({"upstreams": {"a": upstream(default_max_tokens=10)}}, "upstreams.a.default_max_tokens",
     'only for an upstream with format = "anthropic"'),
    ({"upstreams": {"a": upstream(format="anthropic", base_url="http://h", default_max_tokens=0)}},
     "upstreams.a.default_max_tokens", "at least 1"),
    ({"budgets": {"b": {"max_cost": 1}}}, "budgets.b", "exactly one of key_env"),
    ({"budgets": {"b": {"key_env": "KEY_A", "other_keys": True, "max_cost": 1}}}, "budgets.b", "exactly one"),
    ({"budgets": {"b": {"key_env": "UNSET_VAR", "max_cost": 1}}}, "budgets.b.key_env", "UNSET_VAR is not set"),
    ({"budgets": {"b": {"key_sha256": "abc", "max_cost": 1}}}, "budgets.b.key_sha256", "64 hexadecimal"),
    ({"budgets": {"b": {"key_env": "KEY_A"}}}, "budgets.b", "needs max_cost or max_tokens"),
    ({"budgets": {"b": {"key_env": "KEY_A", "max_tokens": -1}}}, "budgets.b.max_tokens", "at least 0"),
    ({"budgets": {"b": {"key_env": "KEY_A", "max_cost": 1, "period": "week"}}}, "budgets.b.period",
     "'hour', 'day', 'month'"),
    ({"budgets": {"b": {"other_keys": True, "max_cost": 1}, "c": {"other_keys": True, "max_cost": 1}}},
     "budgets.c.other_keys", "only one budget"),
    ({"budgets": {"b": {"key_env": "KEY_A", "max_cost": 1},
                  "c": {"key_sha256": KEY_A_SHA256, "max_cost": 1}}},
     "budgets.c", "the same key as budget 'b'"),
])
def test_config_mistakes_name_the_file_and_key(document, key, problem):
    with pytest.raises(gateway_config.GatewayConfigError) as caught:
        parse(document)
    assert caught.value.key == key and problem in str(caught.value)
    assert str(caught.value).startswith(f"gw.toml: {key}: ")


def test_config_file_reads_keys_from_the_environment_only(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[upstreams.a]\nbase_url = "https://api.example.com/v1/"\napi_key_env = "KEY_A"\n'
                    'models = ["m1"]\n[routes]\nr = ["local:1", "a/m1"]\n[cache]\nenabled = true\n')
    loaded = gateway_config.load(path, ENV)
    upstream_a = loaded.upstreams["a"]
    assert upstream_a.api_key == "sk-a-secret" and upstream_a.base_url == "https://api.example.com/v1"
    assert "sk-a-secret" not in repr(loaded)
    assert loaded.routes["r"].members == ("local:1", "a/m1") and loaded.cache.enabled
    (tmp_path / "bad.toml").write_text("[upstreams\n")
    with pytest.raises(gateway_config.GatewayConfigError, match="bad.toml: not valid TOML"):
        gateway_config.load(tmp_path / "bad.toml", ENV)
    with pytest.raises(gateway_config.GatewayConfigError, match="no such file"):
        gateway_config.load(tmp_path / "none.toml", ENV)


def test_resolution_of_routes_upstream_models_and_local_names():
    gateway = Gateway(parse({"upstreams": {"a": upstream(models={"fast": "fast-2025", "slow": "slow"})},
                             "routes": {"r": ["smollm2:135m", "a/fast"]}}))
    route = gateway.resolve("r")
    assert [(m.name, m.model, m.is_local) for m in route.members] == [("smollm2:135m", "smollm2:135m", True),
                                                                      ("a/fast", "fast-2025", False)]
    assert gateway.resolve("a/other").members[0].model == "other"        # not in the mapping: sent as named
    assert gateway.resolve("user/model:tag").members[0].is_local         # "user" is no upstream: a store name
    assert gateway.listing() == [("a/fast", "a"), ("a/slow", "a"), ("r", "route")]


# ---- cache ------------------------------------------------------------------------------------------

def test_cache_keys_budget_and_ttl():
    now = [0.0]
    cache = ResponseCache(max_bytes=30, ttl_seconds=10, clock=lambda: now[0])
    assert request_key("/chat/completions", {"a": 1, "b": 2}, "m") == request_key("/chat/completions",
                                                                                  {"b": 2, "a": 1}, "m")
    assert request_key("/chat/completions", {"a": 1}, "m") != request_key("/chat/completions", {"a": 1}, "n")
    assert is_deterministic({"temperature": 0}) and is_deterministic({"seed": 3, "temperature": 1})
    assert not is_deterministic({}) and not is_deterministic({"temperature": 0.2})
    cache.put("k1", CachedAnswer("m", body=b"x" * 10))
    cache.put("k2", CachedAnswer("m", events=(b"y" * 10,)))
    assert cache.get("k1") is not None                     # k1 is now the most recently used
    cache.put("k3", CachedAnswer("m", body=b"z" * 10))     # over 30 bytes: the least recently used (k2) goes
    assert cache.get("k2") is None and cache.get("k1") is not None and cache.bytes <= 30
    assert not cache.put("huge", CachedAnswer("m", body=b"h" * 31))
    now[0] = 11
    assert cache.get("k1") is None and cache.get("k3") is None


# ---- stream relay -----------------------------------------------------------------------------------

def test_relay_renames_the_model_reads_usage_and_drops_the_usage_chunk_not_asked_for():
    relay = StreamRelay("up/fast", drop_usage_chunk=True, named_events=False)
    first = relay.frame([b'data: {"model": "fast-2025", "usage": null, "choices": [{"delta": {}}]}'])
    assert json.loads(first[6:]) == {"model": "up/fast", "choices": [{"delta": {}}]}
    assert relay.frame([b'data: {"model": "fast-2025", "choices": [], "usage": {"prompt_tokens": 4, '
                        b'"completion_tokens": 6}}']) is None
    assert relay.usage == (4, 6) and not relay.finished
    assert relay.frame([b"data: [DONE]"]) == b"data: [DONE]\n\n" and relay.finished
    unchanged = b'data: {"model": "up/fast", "choices": []}'
    assert StreamRelay("up/fast", False, False).frame([unchanged]) == unchanged + b"\n\n"


def test_relay_responses_events_and_error_event():
    relay = StreamRelay("up/fast", drop_usage_chunk=False, named_events=True)
    framed = relay.frame([b"event: response.completed", b'data: {"type": "response.completed", '
                          b'"sequence_number": 7, "response": {"model": "x", "usage": {"input_tokens": 2, '
                          b'"output_tokens": 5}}}'])
    assert framed.startswith(b"event: response.completed\ndata: ") and b'"model": "up/fast"' in framed
    assert relay.finished and relay.usage == (2, 5)
    error = relay.error_event(APIError(502, "cut", code="upstream_failed"))
    assert error.startswith(b"event: error\n") and json.loads(error.split(b"data: ")[1])["sequence_number"] == 8


def test_usage_and_invalid_json_checks():
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 1}}) == (3, 1)
    assert usage_of({"usage": {"prompt_tokens": 3}}) == (3, 0)               # embeddings
    assert usage_of({"choices": []}) is None
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}

    def answer(content):
        return {"choices": [{"message": {"content": content}}]}

    assert invalid_json_reason({"response_format": schema}, answer('{"x": 1}')) is None
    assert "not valid JSON" in invalid_json_reason({"response_format": schema}, answer('{"x": '))
    assert "does not match the schema" in invalid_json_reason({"response_format": schema}, answer('{"y": 1}'))
    assert "not a JSON object" in invalid_json_reason({"response_format": {"type": "json_object"}}, answer("[1]"))
    assert invalid_json_reason({}, answer("plain text")) is None


# ---- fallback decisions for local members --------------------------------------------------------------

def two_locals(**route) -> Gateway:
    return Gateway(parse({"routes": {"r": {"members": ["first:1", "second:1"], **route}},
                          "cache": {"enabled": True}}))


def local_calls(behaviour: dict):
    """A fake local resource: ``behaviour[model]`` is an exception to raise or the answer's content."""
    calls = []

    def call(model: str, body: dict) -> LocalAnswer:
        calls.append(model)
        outcome = behaviour[model]
        if isinstance(outcome, BaseException):
            raise outcome
        return LocalAnswer(body={"model": model, "choices": [{"message": {"content": outcome}}],
                                 "usage": {"prompt_tokens": 2, "completion_tokens": 3}})
    return call, calls


def test_local_context_overflow_moves_on_and_bad_parameters_do_not():
    from localllm.kv_cache import ContextLengthExceeded

    recorded = []
    call, calls = local_calls({"first:1": ContextLengthExceeded(9000, 8192),
                               "second:1": "ok"})
    answer = two_locals().run("/chat/completions", {"model": "r"}, call, lambda *row: recorded.append(row))
    assert calls == ["first:1", "second:1"] and answer.model == "second:1" and answer.cache is None
    assert json.loads(answer.body)["model"] == "second:1"
    assert recorded == [("r", "second:1", 2, 3, 0.0)]
    call, calls = local_calls({"first:1": ValueError("temperature must be at least 0"), "second:1": "ok"})
    with pytest.raises(ValueError, match="temperature"):
        two_locals().run("/chat/completions", {"model": "r"}, call)
    assert calls == ["first:1"]
    call, calls = local_calls({"first:1": RuntimeError("a bug"), "second:1": "ok"})
    with pytest.raises(RuntimeError):                      # a bug is not a reason to ask another model
        two_locals().run("/chat/completions", {"model": "r"}, call)


def test_one_local_model_keeps_its_own_error():
    from localllm.kv_cache import ContextLengthExceeded

    overflow = ContextLengthExceeded(9000, 8192)
    call, _ = local_calls({"solo:1": overflow})
    with pytest.raises(ContextLengthExceeded):
        two_locals().run("/chat/completions", {"model": "solo:1"}, call)


def test_invalid_json_fallback_is_opt_in_and_all_failures_are_listed():
    body = {"model": "r", "response_format": {"type": "json_object"}}
    call, calls = local_calls({"first:1": "{broken", "second:1": '{"ok": true}'})
    assert two_locals(fallback_on_invalid_json=True).run("/chat/completions", body, call).model == "second:1"
    call, calls = local_calls({"first:1": "{broken", "second:1": '{"ok": true}'})
    assert two_locals().run("/chat/completions", body, call).model == "first:1"
    call, calls = local_calls({"first:1": "{broken", "second:1": "{also broken"})
    with pytest.raises(APIError) as caught:
        two_locals(fallback_on_invalid_json=True).run("/chat/completions", body, call)
    assert caught.value.status == 502 and "first:1: the answer is not valid JSON" in caught.value.message
    assert "second:1: the answer is not valid JSON" in caught.value.message


def test_deterministic_answers_are_replayed_from_the_cache():
    gateway = two_locals()
    call, calls = local_calls({"first:1": "cached text", "second:1": "other"})
    body = {"model": "r", "temperature": 0}
    first = gateway.run("/chat/completions", body, call)
    second = gateway.run("/chat/completions", dict(body), call)
    assert (first.cache, second.cache) == ("miss", "hit") and second.body == first.body
    assert calls == ["first:1"]
    gateway.run("/completions", body, call)                 # another route path: another key
    assert calls == ["first:1", "first:1"]


def test_settings_from_env_name_the_gateway_file(monkeypatch, tmp_path):
    """LOCALLLM_GATEWAY reaches Settings (serve reads it there), unset means no gateway."""
    from localllm_server.app import Settings

    monkeypatch.setenv("LOCALLLM_GATEWAY", str(tmp_path / "gateway.toml"))
    assert Settings.from_env().gateway == str(tmp_path / "gateway.toml")
    monkeypatch.delenv("LOCALLLM_GATEWAY")
    assert Settings.from_env().gateway is None


# ---- budgets ----------------------------------------------------------------------------------------

def test_budget_periods_are_utc_calendar_hours_days_and_months():
    from datetime import datetime, timezone

    from localllm_server.gateway.budgets import period_bounds

    def at(*parts) -> float:
        return datetime(*parts, tzinfo=timezone.utc).timestamp()

    assert period_bounds("hour", at(2026, 3, 1, 10, 59, 59)) == (at(2026, 3, 1, 10), at(2026, 3, 1, 11))
    assert period_bounds("day", at(2026, 2, 28, 23, 0)) == (at(2026, 2, 28), at(2026, 3, 1))
    assert period_bounds("month", at(2026, 12, 31, 23)) == (at(2026, 12, 1), at(2027, 1, 1))
    assert period_bounds("month", at(2028, 2, 29)) == (at(2028, 2, 1), at(2028, 3, 1))


def test_budgets_match_keys_refuse_when_spent_and_start_again_each_period():
    from datetime import datetime, timezone

    from localllm_server.gateway.budgets import Budgets, BudgetSpent

    config = parse({"budgets": {"a": {"key_env": "KEY_A", "max_cost": 1.0, "max_tokens": 100, "period": "hour"},
                                "hashed": {"key_sha256": hashlib.sha256(b"sk-b").hexdigest(), "max_tokens": 5}}})
    now = [datetime(2026, 5, 1, 9, 30, tzinfo=timezone.utc).timestamp()]
    budgets = Budgets(config.budgets, clock=lambda: now[0])
    a, hashed = config.budgets["a"], config.budgets["hashed"]
    assert budgets.match("sk-a-secret") is a and budgets.match("sk-b") is hashed
    assert budgets.match("sk-other") is None and budgets.match(None) is None      # no other_keys budget
    assert "sk-a-secret" not in repr(config)
    budgets.check(a)
    budgets.charge(a, 40, 0.6)
    budgets.check(a)                                   # 0.6 of 1.0: still open
    budgets.charge(a, 70, 0.6)                         # the request that crosses both limits was answered
    with pytest.raises(BudgetSpent) as caught:
        budgets.check(a)
    assert caught.value.status == 429 and caught.value.code == caught.value.error_type == "insufficient_quota"
    assert caught.value.message == ("budget 'a' is spent for this hour: 1.200000 of 1 in cost and 110 of 100 "
                                    "tokens (it starts again at 2026-05-01T10:00:00Z)")
    assert caught.value.retry_after == 30 * 60
    now[0] += 30 * 60                                  # the next hour: spent from 0 again
    budgets.check(a)
    assert [(r["budget"], r["tokens"], r["cost"], r["refused"]) for r in budgets.snapshot()] == \
        [("a", 0, 0.0, 1), ("hashed", 0, 0.0, 0)]


def test_other_keys_budget_and_metrics_text():
    from localllm_server.gateway.budgets import Budgets

    config = parse({"budgets": {'quote"d': {"key_env": "KEY_A", "max_tokens": 10},
                                "rest": {"other_keys": True, "max_cost": 0}}})
    budgets = Budgets(config.budgets)
    assert budgets.match("anything") is config.budgets["rest"] and budgets.match(None) is config.budgets["rest"]
    budgets.charge(config.budgets['quote"d'], 7, 0.0)
    lines = budgets.metrics_text().splitlines()
    assert 'localllm_gateway_budget_spent_tokens{budget="quote\\"d",period="day"} 7' in lines
    assert 'localllm_gateway_budget_max_cost{budget="rest",period="day"} 0.000000' in lines
    assert not any(line.startswith('localllm_gateway_budget_max_cost{budget="quote') for line in lines)
    assert Budgets({}).metrics_text() == "" and not Budgets({})


# ---- chat <-> Anthropic Messages, for Anthropic-format upstreams ----------------------------------------

def test_chat_requests_become_messages_requests():
    from localllm_server.anthropic_api.openai_bridge import messages_request

    chat = {"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Rule one."}]},
        {"role": "system", "content": "Rule two."},
        {"role": "user", "content": "Two cities?"},
        {"role": "assistant", "content": "", "reasoning_content": "thought",
         "tool_calls": [{"id": "c1", "function": {"name": "w", "arguments": '{"city": "A"}'}},
                        {"id": "c2", "function": {"name": "w", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sun"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        "stop": ["a", "b"], "top_k": 3, "tool_choice": "required", "max_completion_tokens": 5000,
        "max_tokens": 9, "reasoning_effort": "medium", "stream": True, "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "w"}}], "frequency_penalty": 1, "logit_bias": {}}
    out = messages_request(chat, default_max_tokens=100)
    assert out == {
        "model": "m", "max_tokens": 5000, "system": "Rule one.\nRule two.", "top_k": 3, "stop_sequences": ["a", "b"],
        "tools": [{"name": "w", "input_schema": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "any"}, "thinking": {"type": "enabled", "budget_tokens": 4096}, "stream": True,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Two cities?"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "w", "input": {"city": "A"}},
                                              {"type": "tool_use", "id": "c2", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "sun"},
                                         {"type": "tool_result", "tool_use_id": "c2", "content": "rain"},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}
    plain = messages_request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "reasoning_effort": "high", "parallel_tool_calls": False}, default_max_tokens=1500)
    assert plain["max_tokens"] == 1500 and plain["thinking"] == {"type": "enabled", "budget_tokens": 1499}
    assert "tool_choice" not in plain                  # no tools: nothing to choose
    short = messages_request({"model": "m", "messages": [], "max_tokens": 500, "reasoning_effort": "low"}, 100)
    assert "thinking" not in short                     # no room for Anthropic's least budget (1024)


@pytest.mark.parametrize("extra, problem", [
    ({"n": 3}, "n > 1"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "no JSON mode"),
    ({"tools": [{"type": "web_search"}]}, "only function tools"),
    ({"messages": [{"role": "function", "content": "x"}]}, "'function' message"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "'input_audio' part"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
     "data: URL"),
])
def test_what_the_messages_api_cannot_take_is_untranslatable(extra, problem):
    from localllm_server.anthropic_api.openai_bridge import Untranslatable, messages_request

    with pytest.raises(Untranslatable, match=problem):
        messages_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}, 10)


def test_messages_become_chat_completions():
    from localllm_server.anthropic_api.openai_bridge import completion_from_message, error_from_anthropic

    message = {"id": "msg_1", "type": "message", "model": "claude-x", "stop_reason": "tool_use", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Ö"}}],
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 2,
                  "output_tokens": 7}}
    completion = completion_from_message(message, "up/claude")
    assert completion["id"] == "chatcmpl-msg_1" and completion["model"] == "up/claude"
    assert completion["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me check.", "reasoning_content": "hmm", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Ö"}'}}]}}
    assert completion["usage"] == {"prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24,
                                   "prompt_tokens_details": {"cached_tokens": 10}}
    for reason, finish in (("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
                           ("refusal", "content_filter")):
        answer = completion_from_message({"content": [{"type": "text", "text": "x"}], "stop_reason": reason}, "m")
        assert answer["choices"][0]["finish_reason"] == finish
    only_calls = completion_from_message({"content": [{"type": "tool_use", "id": "t", "name": "w", "input": {}}],
                                          "stop_reason": "tool_use"}, "m")
    assert only_calls["choices"][0]["message"]["content"] is None
    assert error_from_anthropic(b'{"type": "error", "error": {"type": "permission_error", "message": "no"}}') == \
        {"error": {"message": "no", "type": "permission_error", "param": None, "code": None}}
    assert error_from_anthropic(b"<html>")["error"]["message"] == "<html>"


def test_anthropic_stream_events_become_chat_chunks():
    from localllm_server.anthropic_api.openai_bridge import ChunkTranslator

    translator = ChunkTranslator("up/claude")
    events = [
        {"type": "message_start", "message": {"id": "msg_9", "usage": {"input_tokens": 4, "output_tokens": 1}}},
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "t1", "name": "w",
                                                                      "input": {}}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"a"'}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ": 1}"}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"}]
    out = [payload for event in events for payload in translator.feed(event)]
    assert out[-1] == "[DONE]"
    chunks = out[:-1]
    assert {c["id"] for c in chunks} == {"chatcmpl-msg_9"} and {c["model"] for c in chunks} == {"up/claude"}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [{"role": "assistant", "content": ""}, {"reasoning_content": "hm"}, {"content": "Hi"},
                      {"tool_calls": [{"index": 0, "id": "t1", "type": "function",
                                       "function": {"name": "w", "arguments": ""}}]},
                      {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
                      {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 4 \
        and chunks[-1]["usage"]["completion_tokens"] == 9
    failed = ChunkTranslator("m").feed({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert failed == [{"error": {"message": "busy", "type": "overloaded_error", "param": None, "code": None}},
                      "[DONE]"]


def test_anthropic_relay_renames_reads_usage_and_notices_the_end():
    from localllm_server.gateway.routing import AnthropicRelay

    relay = AnthropicRelay("up/claude")
    start = relay.frame([b"event: message_start", b'data: {"type": "message_start", "message": {"model": "c-9", '
                                                   b'"usage": {"input_tokens": 4, "cache_read_input_tokens": 6}}}'])
    assert start.startswith(b"event: message_start\ndata: ") and start.endswith(b"\n\n")
    assert json.loads(start.split(b"data: ")[1])["message"]["model"] == "up/claude"
    relay.frame([b"event: message_delta", b'data: {"type": "message_delta", "usage": {"output_tokens": 3}}'])
    assert relay.usage == (10, 3) and not relay.finished
    relay.frame([b"event: message_stop", b'data: {"type": "message_stop"}'])
    assert relay.finished and not relay.failed
    error = relay.error_event(APIError(504, "late"))
    assert error.startswith(b"event: error\n") and relay.failed
    assert json.loads(error.split(b"data: ")[1]) == {"type": "error", "error": {"type": "timeout_error",
                                                                                "message": "late"}}


# ---- JSON checks of streams and Responses answers -------------------------------------------------------

def test_json_format_and_streamed_answers():
    from localllm_server.gateway.routing import json_format, streamed_answer

    schema = {"type": "object"}
    assert json_format("/responses", {"text": {"format": {"type": "json_schema", "schema": schema}}}) == \
        {"type": "json_schema", "schema": schema}
    assert json_format("/responses", {"text": {"format": {"type": "text"}}}) is None
    assert json_format("/chat/completions", {"response_format": {"type": "json_object"}}) == \
        {"type": "json_object", "schema": None}
    chunks = [b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n',
              b'data: {"choices": [{"index": 0, "delta": {"content": "{\\"x\\""}}, '
              b'{"index": 1, "delta": {"tool_calls": [{"index": 0}]}}]}\n\n',
              b'data: {"choices": [{"index": 0, "delta": {"content": ": 1}"}}]}\n\ndata: [DONE]\n\n']
    assert streamed_answer("/chat/completions", chunks) == ({"choices": [
        {"message": {"content": '{"x": 1}'}}, {"message": {"content": None}}]}, None)
    broken = chunks[:1] + [b'data: {"error": {"message": "engine stopped"}}\n\ndata: [DONE]\n\n']
    assert streamed_answer("/chat/completions", broken) == ({}, "engine stopped")
    final = {"output": [{"type": "message", "content": [{"type": "output_text", "text": "{}"}]}]}
    events = [b"event: response.created\ndata: {\"type\": \"response.created\", \"response\": {}}\n\n",
              b"event: response.completed\ndata: " + json.dumps({"type": "response.completed",
                                                                "response": final}).encode() + b"\n\n"]
    assert streamed_answer("/responses", events) == (final, None)
    failed = b'event: response.failed\ndata: {"type": "response.failed", "response": {"error": {"message": "x"}}}\n\n'
    assert streamed_answer("/responses", [failed]) == ({}, "x")


def test_a_local_stream_is_checked_whole_only_where_the_route_opts_in():
    body = {"model": "r", "stream": True, "response_format": {"type": "json_object"}}
    pulled = []

    def stream(text: str):
        for piece in (text[:3], text[3:]):
            pulled.append(piece)
            yield f'data: {{"choices": [{{"index": 0, "delta": {{"content": {json.dumps(piece)}}}}}]}}\n\n'.encode()
        yield b"data: [DONE]\n\n"

    def call(model: str, sent: dict) -> LocalAnswer:
        return LocalAnswer(chunks=stream('{"ok": 1}' if model == "second:1" else "not json"))

    answer = two_locals(fallback_on_invalid_json=True).run("/chat/completions", body, call)
    assert answer.model == "second:1" and pulled == ["not", " json", '{"o', 'k": 1}']   # the first read whole
    replayed = [json.loads(line[5:]) for line in b"".join(answer.stream).splitlines() if line.startswith(b"data: {")]
    assert "".join(event["choices"][0]["delta"]["content"] for event in replayed) == '{"ok": 1}'
    pulled.clear()
    unchecked = two_locals().run("/chat/completions", body, call)
    assert unchecked.model == "first:1" and pulled == []                   # passed on as it comes: not read yet
