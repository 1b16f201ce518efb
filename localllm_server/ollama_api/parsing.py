"""Ollama request bodies -> checked Python values, or a 400 naming the bad field.

Ollama's conventions: ``stream`` defaults to true; ``keep_alive`` is a number of
seconds or a Go duration string (``"5m"``, ``"1h30m"``, ``"0"``), negative meaning
"keep loaded forever"; ``options`` holds the sampling settings under Ollama's names.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..errors import APIError
from ..schemas import as_integer

# Options we apply (Ollama names; ``num_predict`` is max_tokens)
GENERATION_OPTIONS = ("num_ctx", "num_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                      "repeat_last_n", "seed", "stop", "frequency_penalty", "presence_penalty")
# Ollama runtime options with no meaning here (threads, GPU layers, memory mapping...): accepted and ignored
IGNORED_OPTIONS = frozenset({"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                             "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
                             "penalize_newline"})
# Ollama samplers localllm does not have: accepted only at the value that switches them off
NEUTRAL_OPTIONS = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}
MIROSTAT_TUNING = frozenset({"mirostat_tau", "mirostat_eta"})

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# What parse_duration takes (the OpenAPI document's pattern): a number of seconds, or a Go duration
DURATION_PATTERN = rf"^[+-]?(?:{_NUMBER}(?:[eE][+-]?\d+)?|(?:{_NUMBER}(?:ns|us|µs|μs|ms|s|m|h))+)$"
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FOREVER = math.inf


def model_name(body: dict, field: str = "model") -> str:
    """The model name of a request (``name`` is accepted for older clients); not yet validated."""
    name = body.get(field)
    if name is None and field == "model":
        name = body.get("name")
    if name is None or name == "":
        raise APIError(400, f"{field} is required", param=field)
    if not isinstance(name, str):
        raise APIError(400, f"{field} must be a string", param=field)
    return name


def flag(body: dict, field: str, default: bool) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{field} must be true or false", param=field)
    return value


def optional_string(body: dict, field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{field} must be a string", param=field)
    return value


def keep_alive(body: dict) -> float | None:
    """Seconds to keep the model loaded after this request: None (server default), 0, a number, or inf."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, bool):
        raise APIError(400, "keep_alive must be a duration such as \"5m\" or a number of seconds", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value)
    else:
        raise APIError(400, "keep_alive must be a duration such as \"5m\" or a number of seconds", param="keep_alive")
    return FOREVER if seconds < 0 else seconds


def parse_duration(text: str) -> float:
    """A Go duration (``"1h30m"``, ``"300ms"``, ``"-1m"``) or a plain number of seconds (``"10"``), in seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isnan(seconds):
            raise APIError(400, f"keep_alive: invalid duration {text!r}", param="keep_alive")
        return seconds
    sign = -1.0 if value.startswith("-") else 1.0
    rest = value.lstrip("+-")
    total, pos = 0.0, 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        if not match:
            raise APIError(400, f"keep_alive: invalid duration {text!r} (examples: \"5m\", \"1h30m\", \"0\", \"-1\")",
                           param="keep_alive")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not rest:
        raise APIError(400, f"keep_alive: invalid duration {text!r}", param="keep_alive")
    return sign * total


def options(body: dict) -> dict[str, Any]:
    """The generation settings in ``options`` as keyword arguments for ``Model.make_params``."""
    from localllm.modelfile import ModelfileError, normalize_parameters

    raw = body.get("options")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise APIError(400, "options must be an object", param="options")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None or key in IGNORED_OPTIONS or key in MIROSTAT_TUNING:
            continue
        if key in NEUTRAL_OPTIONS:
            if value != NEUTRAL_OPTIONS[key]:
                raise APIError(400, f"options.{key} is not supported (only {NEUTRAL_OPTIONS[key]}, which turns it off)",
                               param=f"options.{key}")
            continue
        if key not in GENERATION_OPTIONS:
            raise APIError(400, f"unknown option {key!r} (supported: {', '.join(GENERATION_OPTIONS)})",
                           param=f"options.{key}")
        settings[key] = value
    try:
        return normalize_parameters(settings)
    except ModelfileError as exc:
        raise APIError(400, f"invalid options: {exc}", param="options") from None


def images(value, where: str) -> list[str]:
    """``images``: a list of base64-encoded images (decoded, and refused by models without vision, later)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(image, str) for image in value):
        raise APIError(400, f"{where} must be a list of base64-encoded images", param=where)
    return value


def constraint(body: dict):
    """The grammar for ``format``: "json" (any JSON object) or a JSON schema; None when absent."""
    from localllm import constrain

    try:
        return constrain.from_ollama_format(body.get("format"))
    except ValueError as exc:                   # a bad shape, or a schema the grammar cannot enforce
        raise APIError(400, f"format: {exc}", param="format") from None


def messages(body: dict, model: str) -> list[dict]:
    """Chat messages, checked: role, content (string), images (base64 strings), tool_calls, tool_name, thinking."""
    raw = body.get("messages")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise APIError(400, "messages must be a list", param="messages")
    checked = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise APIError(400, f"{where}.role must be a non-empty string", param=f"{where}.role")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", param=f"{where}.content")
        item = {"role": role, "content": content}
        listed = images(message.get("images"), f"{where}.images")
        if listed:
            item["images"] = listed
        if message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise APIError(400, f"{where}.tool_calls must be a list of objects", param=f"{where}.tool_calls")
            item["tool_calls"] = calls
        if message.get("tool_name") is not None:
            item["tool_name"] = message["tool_name"]
            item.setdefault("name", message["tool_name"])
        if message.get("thinking"):
            item["thinking"] = message["thinking"]
        checked.append(item)
    return checked


def think(body: dict) -> bool | str | None:
    """``think``: true, false, "low", "medium", "high" (also "none", "minimal"); None when absent (the model's default)."""
    from localllm.reasoning import normalize_think

    try:
        return normalize_think(body.get("think"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="think") from None


def thinking(model, think_value, name: str):
    """The request's ``localllm.reasoning.ThinkingRequest`` on ``model``; 400 when a model that does not
    think is asked to (as Ollama answers)."""
    from localllm import reasoning

    try:
        return reasoning.thinking_request(model.template, think_value)
    except reasoning.ThinkingNotSupported:
        raise APIError(400, f'"{name}" does not support thinking', param="think") from None


def tools(body: dict) -> list[dict] | None:
    value = body.get("tools")
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise APIError(400, "tools must be a list of objects", param="tools")
    return value


def token_ids(body: dict, field: str) -> list[int] | None:
    value = body.get(field)
    if value is None:
        return None
    ids = [as_integer(t) for t in value] if isinstance(value, list) else None
    if ids is None or any(t is None for t in ids):
        raise APIError(400, f"{field} must be a list of token ids (integers)", param=field)
    return ids


def logprob_settings(body: dict) -> dict[str, Any]:
    """``logprobs`` (bool) and ``top_logprobs`` (0..20) as ``make_params`` settings; top_logprobs implies logprobs."""
    want = flag(body, "logprobs", False)
    top = body.get("top_logprobs")
    top = 0 if top is None else as_integer(top)
    if top is None or not 0 <= top <= 20:
        raise APIError(400, "top_logprobs must be an integer between 0 and 20", param="top_logprobs")
    if not (want or top):
        return {}
    return {"logprobs": True, "top_logprobs": top}
