"""Constrained decoding: masks against llguidance itself, schema validation (jsonschema), SmolLM2 outputs."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

import localllm
from localllm import constrain
from localllm.constrain import UnsupportedSchema

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return localllm.load(smollm2_gguf_path)


class _Budget:
    """Hands the token budget to the processor (generate.make_sequences may not pass it yet)."""

    def __init__(self, constraint, max_tokens):
        self.constraint, self.max_tokens = constraint, max_tokens

    def make_processor(self, tokenizer, max_new_tokens=None):
        return self.constraint.make_processor(tokenizer, max_new_tokens=max_new_tokens or self.max_tokens)


def _chat(model, content, constraint, max_tokens=60, **settings):
    return model.chat([{"role": "user", "content": content}], constraint=_Budget(constraint, max_tokens),
                      max_tokens=max_tokens, details=True, **settings)


# ----------------------------------------------------------------------------- validation up front


@pytest.mark.parametrize("schema,fragment", [
    ({"type": "object", "if": {"type": "object"}, "then": {}}, "if"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "string", "format": "credit-card"}, "format"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"type": "objct"}, "objct"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"$ref": "https://example.com/schema.json"}, "example.com"),
    ([{"type": "string"}], "must be a JSON object"),
])
def test_unsupported_schema_raises(schema, fragment):
    with pytest.raises(UnsupportedSchema, match=re.escape(fragment)):
        constrain.json_schema(schema, name="bad")


def test_request_field_mapping():
    assert constrain.from_response_format(None) is None
    assert constrain.from_response_format({"type": "text"}) is None
    assert constrain.from_response_format({"type": "json_object"}).kind == "json_object"
    c = constrain.from_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                               "strict": True}})
    assert c.kind == "json_schema"
    with pytest.raises(UnsupportedSchema, match="json_schema 'p'"):
        constrain.from_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": {"not": {}}}})
    with pytest.raises(ValueError, match="response_format.type"):
        constrain.from_response_format({"type": "xml"})
    with pytest.raises(ValueError, match="response_format.json_schema"):
        constrain.from_response_format({"type": "json_schema"})
    assert constrain.from_ollama_format("") is None and constrain.from_ollama_format(None) is None
    assert constrain.from_ollama_format("json").kind == "json_object"
    assert constrain.from_ollama_format(PERSON).kind == "json_schema"
    with pytest.raises(ValueError, match="format must be"):
        constrain.from_ollama_format("yaml")
    with pytest.raises(UnsupportedSchema):
        constrain.regex("(?<=a)b")
    with pytest.raises(UnsupportedSchema):
        constrain.lark("start: undefined_rule")


# ----------------------------------------------------------------------------- the processor


def test_mask_agrees_with_the_matcher_token_by_token(smollm2):
    """The unpacked bitmask says exactly what llguidance's own consume check says, for sampled tokens."""
    tokenizer = smollm2.tokenizer
    processor = constrain.json_schema(PERSON).make_processor(tokenizer)
    prefix = tokenizer.encode('{"name": "Jo', add_bos=False)
    processor.advance(prefix)
    allowed = processor.allowed()
    rng = np.random.default_rng(0)
    probe = np.concatenate([rng.choice(tokenizer.vocab_size, 300, replace=False),
                            rng.choice(np.flatnonzero(allowed), 100, replace=False)])
    for token in probe:
        copy = processor.matcher.deep_copy()
        assert bool(allowed[token]) == (copy.try_consume_tokens([int(token)]) == 1), tokenizer.token_text(int(token))


def test_processor_masks_logits_and_ends_with_eog(smollm2):
    tokenizer = smollm2.tokenizer
    processor = constrain.json_schema(PERSON).make_processor(tokenizer)
    prompt = [1, 2, 3]
    logits = np.linspace(-1, 1, tokenizer.vocab_size, dtype=np.float32)
    out = processor(logits, prompt, len(prompt))
    allowed = np.isfinite(out)
    assert allowed.any() and all(tokenizer.token_bytes(int(i)).startswith(b"{") for i in np.flatnonzero(allowed))
    assert np.array_equal(out[allowed], logits[allowed]) and logits.dtype == out.dtype
    history = prompt + tokenizer.encode('{"name": "Ann", "age": 7}', add_bos=False)
    out = processor(logits, history, len(prompt))
    assert set(np.flatnonzero(np.isfinite(out))) == set(tokenizer.eog_ids)
    with pytest.raises(constrain.ConstraintViolation):
        processor(logits, history + tokenizer.encode("x", add_bos=False), len(prompt))


# ----------------------------------------------------------------------------- SmolLM2 outputs


def test_json_mode_colors(smollm2):
    result = _chat(smollm2, "List 3 colors in JSON format", constrain.json_object(), temperature=0)
    assert isinstance(json.loads(result.text), dict), result.text


def test_person_schema_20_seeds_at_temperature_1(smollm2):
    result = _chat(smollm2, "Extract person info: John Doe is 30 years old", constrain.json_schema(PERSON),
                   temperature=1, seed=0, n=20)       # choices get seeds 0..19
    assert len(result.choices) == 20
    for choice in result.choices:
        jsonschema.validate(json.loads(choice.text), PERSON)


SMALL_SCHEMAS = [
    ("What is the capital of France? Answer in JSON.",
     {"type": "object", "properties": {"city": {"type": "string", "minLength": 2, "maxLength": 12},
                                       "continent": {"enum": ["Europe", "Asia", "Africa"]}},
      "required": ["city", "continent"], "additionalProperties": False}),
    ("List three fruits in JSON.",
     {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                  "minItems": 2, "maxItems": 3}},
      "required": ["fruits"], "additionalProperties": False}),
    ("Describe a book with its author as JSON.",
     {"type": "object", "properties": {
         "title": {"type": "string", "maxLength": 30},
         "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                     "born": {"type": "integer", "minimum": 1000, "maximum": 2024}},
                    "required": ["name", "born"], "additionalProperties": False},
         "available": {"type": "boolean"}},
      "required": ["title", "author", "available"], "additionalProperties": False}),
    ("Give a US phone number and a rating from 1 to 5 in JSON.",
     {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{3}-[0-9]{4}$"},
                                       "rating": {"type": "number", "minimum": 1, "maximum": 5}},
      "required": ["phone", "rating"], "additionalProperties": False}),
]


@pytest.mark.parametrize("prompt,schema", SMALL_SCHEMAS)
def test_small_schemas_validate(smollm2, prompt, schema):
    result = _chat(smollm2, prompt, constrain.json_schema(schema), temperature=0)
    jsonschema.validate(json.loads(result.text), schema)


def test_tight_budget_still_parses(smollm2):
    """The closer spends the end of a small budget closing the JSON."""
    for max_tokens in (12, 20):
        result = _chat(smollm2, "List 3 colors in JSON format", constrain.json_object(), max_tokens=max_tokens,
                       temperature=1, seed=3)
        assert result.usage.completion_tokens <= max_tokens
        assert isinstance(json.loads(result.text), dict), result.text
    result = _chat(smollm2, "Extract person info: John Doe is 30 years old", constrain.json_schema(PERSON),
                   max_tokens=16, temperature=1, seed=1)
    jsonschema.validate(json.loads(result.text), PERSON)


def test_regex_constraint(smollm2):
    result = smollm2.generate("The year the Berlin wall fell:", constraint=constrain.regex(r" ?[0-9]{4}"),
                              max_tokens=8, temperature=0, details=True)
    assert re.fullmatch(r" ?[0-9]{4}", result.text) and result.finish_reason == "stop"
