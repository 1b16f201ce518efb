"""The gateway package without HTTP: config checks, the cache, the stream relay, route resolution and the
fallback decisions for local members (fake local resource)."""
from __future__ import annotations

import json

import pytest

from localllm_server.errors import APIError
from localllm_server.gateway import config as gateway_config
from localllm_server.gateway.cache import CachedAnswer, ResponseCache, is_deterministic, request_key
from localllm_server.gateway.routing import Gateway, LocalAnswer, StreamRelay, invalid_json_reason, usage_of

ENV = {"KEY_A": "sk-a-secret"}


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
