"""Model.chat with tools on SmolLM2: a forced call parses, and JSON mode closes within its token budget."""
import json

import pytest

import localllm
from localllm import constrain

pytestmark = pytest.mark.real_model

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]


@pytest.fixture(scope="module")
def model(smollm2_gguf_path):
    return localllm.load(smollm2_gguf_path)


def test_required_tool_call_parses(model):
    result = model.chat([{"role": "user", "content": "What is the weather in Tokyo?"}], tools=WEATHER,
                        tool_choice="required", temperature=0, max_tokens=60, details=True)
    (call,) = result.choices[0].tool_calls
    assert call.name == "get_weather" and "location" in json.loads(call.arguments_json)
    assert result.finish_reason == "tool_calls"


def test_json_mode_closes_within_a_tight_budget(model):
    text = model.chat([{"role": "user", "content": "List 3 colors in JSON format"}], temperature=0, max_tokens=20,
                      constraint=constrain.json_object())
    assert isinstance(json.loads(text), dict)
