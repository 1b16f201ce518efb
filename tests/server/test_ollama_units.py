"""Pure pieces of the Ollama API: request parsing, timestamps, /api/show text, tool-call lines, FIM tokens."""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from localllm_server.errors import APIError
from localllm_server.ollama_api import parsing, responses
from localllm_server.ollama_api.chat import ChatOutput
from localllm_server.ollama_api.generate import fill_in_the_middle


@pytest.mark.parametrize("text, seconds", [("5m", 300), ("1h30m", 5400), ("300ms", 0.3), ("1.5s", 1.5), ("0", 0),
                                           ("10", 10), ("-1", -1), ("-1m", -60), ("2h0m0s", 7200), ("90us", 90e-6)])
def test_parse_duration(text, seconds):
    assert math.isclose(parsing.parse_duration(text), seconds)


@pytest.mark.parametrize("value, seconds", [(None, None), (0, 0.0), (30, 30.0), (2.5, 2.5), ("5m", 300.0),
                                            ("0s", 0.0), (-1, math.inf), ("-5m", math.inf)])
def test_keep_alive(value, seconds):
    assert parsing.keep_alive({"keep_alive": value}) == seconds


@pytest.mark.parametrize("value", ["5x", "m", "", "1h-3m", True, [1], {"a": 1}])
def test_keep_alive_refuses(value):
    with pytest.raises(APIError) as info:
        parsing.keep_alive({"keep_alive": value})
    assert info.value.status == 400 and "keep_alive" in info.value.message


def test_options():
    assert parsing.options({}) == {}
    settings = parsing.options({"options": {"temperature": 0, "num_ctx": 2048.0, "stop": "x", "seed": -1,
                                            "num_thread": 8, "num_gpu": 99, "use_mmap": True, "mirostat": 0,
                                            "typical_p": 1.0, "mirostat_tau": 5.0, "num_predict": None}})
    assert settings == {"temperature": 0.0, "num_ctx": 2048, "stop": ["x"], "seed": -1}
    for options, words in [({"mirostat": 2}, "options.mirostat is not supported"), ({"typical_p": 0.5}, "typical_p"),
                           ({"bogus": 1}, "unknown option 'bogus'"), ({"top_k": 1.5}, "top_k must be an integer"),
                           ({"top_p": 7}, "top_p must be between 0 and 1")]:
        with pytest.raises(APIError, match=words):
            parsing.options({"options": options})
    with pytest.raises(APIError, match="options must be an object"):
        parsing.options({"options": [1]})


def test_logprob_settings():
    assert parsing.logprob_settings({}) == {}
    assert parsing.logprob_settings({"logprobs": True}) == {"logprobs": True, "top_logprobs": 0}
    assert parsing.logprob_settings({"top_logprobs": 3}) == {"logprobs": True, "top_logprobs": 3}
    with pytest.raises(APIError, match="top_logprobs"):
        parsing.logprob_settings({"logprobs": True, "top_logprobs": 21})


def test_rfc3339_like_go():
    utc = datetime(2024, 6, 4, 14, 38, 31, 837530, tzinfo=timezone.utc)
    assert responses.rfc3339(utc) == "2024-06-04T14:38:31.83753Z"
    assert responses.rfc3339(utc, nanoseconds=123456789) == "2024-06-04T14:38:31.123456789Z"
    assert responses.rfc3339(utc.replace(microsecond=0)) == "2024-06-04T14:38:31Z"
    west = utc.astimezone(timezone(timedelta(hours=-7)))
    assert responses.rfc3339(west) == "2024-06-04T07:38:31.83753-07:00"
    east = utc.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert responses.rfc3339(east).endswith("+05:30")
    assert responses.created_at().endswith("Z")
    assert responses.local_time(math.inf)[:4] > "2300"
    assert responses.ns(1.5) == 1_500_000_000 and responses.ns(None) == 0


def fake_entry(**fields):
    base = dict(name="m:latest", path="/blobs/sha256-ab", format="gguf", digest="sha256:ab", size=10,
                modified_at=datetime(2024, 1, 2, tzinfo=timezone.utc), parameters={}, template=None, system=None,
                messages=[], license=None, chat_template="{{ messages }}",
                details={"format": "gguf", "family": "llama", "families": ["llama"], "parameter_size": "1M",
                         "quantization_level": "Q8_0"},
                model_info={"general.architecture": "llama", "llama.context_length": 64, "tokenizer.ggml.model": "gpt2",
                            "tokenizer.chat_template": "x", "other.key": 1})
    base.update(fields)
    return SimpleNamespace(**base)


def test_show_object():
    shown = responses.show(fake_entry(parameters={"stop": ["a", "b"], "top_k": 5}, system="be nice"))
    assert shown["parameters"] == 'stop' + " " * 26 + ' "a"\nstop' + " " * 26 + ' "b"\ntop_k' + " " * 25 + " 5"
    assert shown["system"] == "be nice" and "license" not in shown and "messages" not in shown
    assert shown["model_info"] == {"general.architecture": "llama", "llama.context_length": 64,
                                   "tokenizer.ggml.model": "gpt2"}
    assert shown["capabilities"] == ["completion"] and shown["template"] == "{{ messages }}"
    assert shown["details"]["parent_model"] == "" and shown["modified_at"] == "2024-01-02T00:00:00Z"
    assert responses.capabilities(fake_entry(model_info={"general.architecture": "bert"})) == ["embedding"]
    assert responses.capabilities(fake_entry(chat_template="{% if tools %}{% endif %}")) == ["completion", "tools"]
    assert responses.tag(fake_entry())["digest"] == "ab"


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def events_of(texts):
    out = [SimpleNamespace(text=t, logprobs=None, finish_reason=None, token_ids=[1]) for t in texts]
    out[-1].finish_reason = "stop"
    return out


class FakeRun:
    def metrics(self, event):
        return {"eval_count": 3}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_tool_calls_not_streamed():
    output = ChatOutput(FakeRun(), TOOLS, stream=False)
    final = output.end("Let me check. " + CALL, events_of(["x"])[-1], [1, 2], [])
    assert len(final) == 1
    assert final[0]["message"] == {"role": "assistant", "content": "Let me check.",
                                   "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert final[0]["done_reason"] == "stop" and final[0]["eval_count"] == 3


def test_tool_calls_streamed_whole_after_the_text():
    output = ChatOutput(FakeRun(), TOOLS, stream=True)
    text = "Sure. " + CALL
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    events = events_of(pieces)
    lines = [fields for event in events for fields in output.piece(event)]
    lines += output.end("", events[-1], [], [])
    contents = "".join(line["message"]["content"] for line in lines)
    assert contents.strip() == "Sure."
    calls = [line["message"]["tool_calls"] for line in lines if "tool_calls" in line["message"]]
    assert calls == [[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]]
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["message"]["content"] == ""
    assert "<tool_call>" not in contents


def test_plain_chat_output():
    output = ChatOutput(FakeRun(), [], stream=True)
    event = SimpleNamespace(text="hi", logprobs=None, finish_reason=None, token_ids=[1])
    assert output.piece(event) == [{"message": {"role": "assistant", "content": "hi"}}]
    assert output.piece(SimpleNamespace(text="", logprobs=None, finish_reason=None, token_ids=[])) == []


class FakeTokenizer:
    bos_id, add_bos = 0, True

    def encode(self, text):
        return [ord(c) for c in text]


class FakeModel:
    def __init__(self, fim_ids):
        self.tokenizer = FakeTokenizer()
        self.tokenizer.fim_ids = fim_ids

    def tokenize(self, text, add_bos=None):
        return self.tokenizer.encode(text)


def test_fill_in_the_middle_layout():
    model = FakeModel({"fim_pre": 1, "fim_mid": 3, "fim_suf": 4})
    assert fill_in_the_middle(model, "m", "ab", "c", add_bos=True) == [0, 1, 97, 98, 4, 99, 3]
    assert fill_in_the_middle(model, "m", "ab", "c", add_bos=False) == [1, 97, 98, 4, 99, 3]
    with pytest.raises(APIError, match="does not support insert"):
        fill_in_the_middle(FakeModel(None), "m", "x", "y", add_bos=True)
