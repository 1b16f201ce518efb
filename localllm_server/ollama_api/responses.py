"""Ollama response objects (pure functions): timestamps, durations, model listings, /api/show.

Timestamps are RFC 3339 with nanoseconds as Go writes them (``time.RFC3339Nano``:
trailing zeros of the fraction dropped): ``created_at`` in UTC (``...Z``), model times
(``modified_at``, ``expires_at``) in local time with the offset. Durations are integer
nanoseconds.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

TRUNCATED_HEADER = "X-Localllm-Prompt-Truncated"   # prompt tokens left out to fit the context window
FOREVER_SECONDS = 292 * 365.25 * 86400        # Go's longest duration, what Ollama shows for keep_alive < 0
EMBEDDING_FAMILIES = ("bert", "nomic-bert", "jina-bert-v2", "xlm-roberta", "roberta", "distilbert", "mpnet",
                      "new", "gte")


def rfc3339(moment: datetime, nanoseconds: int | None = None) -> str:
    """``2024-06-04T14:38:31.83753-07:00`` (``Z`` for UTC); ``nanoseconds`` replaces the microseconds."""
    fraction = nanoseconds if nanoseconds is not None else moment.microsecond * 1000
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    offset = moment.utcoffset()
    if offset is None or offset.total_seconds() == 0:
        return text + "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def created_at() -> str:
    """Now, in UTC, with nanoseconds (the ``created_at`` of every response line)."""
    now_ns = time.time_ns()
    moment = datetime.fromtimestamp(now_ns // 1_000_000_000, tz=timezone.utc)
    return rfc3339(moment, now_ns % 1_000_000_000)


def local_time(unix_seconds: float) -> str:
    """A unix time as local RFC 3339 (``expires_at``); infinity -> Go's farthest future, as Ollama shows it."""
    if unix_seconds == float("inf"):
        unix_seconds = time.time() + FOREVER_SECONDS
    return rfc3339(datetime.fromtimestamp(unix_seconds).astimezone())


def ns(seconds: float | None) -> int:
    return int(round((seconds or 0.0) * 1e9))


def metrics(total_seconds: float, load_seconds: float, usage, timings: dict | None) -> dict:
    """The duration and count fields of a final line (``usage`` and ``timings`` from the final engine event)."""
    timings = timings or {}
    return {"total_duration": ns(total_seconds), "load_duration": ns(load_seconds),
            "prompt_eval_count": usage.prompt_tokens if usage else 0,
            "prompt_eval_duration": ns(timings.get("prompt_seconds")),
            "eval_count": usage.completion_tokens if usage else 0,
            "eval_duration": ns(timings.get("decode_seconds"))}


def truncation(tokens: int, messages: int | None = None) -> dict:
    """The final line's fields for a prompt cut to fit the context window (none when nothing was cut).

    ``truncated_prompt_tokens``: prompt tokens left out (the whole request's prompt minus the one run);
    ``truncated_messages`` (/api/chat): how many of the oldest non-system messages were left out.
    """
    if not tokens and not messages:
        return {}
    fields = {"truncated_prompt_tokens": int(tokens)}
    if messages is not None:
        fields["truncated_messages"] = int(messages)
    return fields


def logprobs(records) -> list[dict]:
    """Token logprobs as Ollama writes them: ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``."""
    return [{"token": r.text, "logprob": r.logprob, "bytes": list(r.bytes),
             "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes)} for t in r.top]}
            for r in records]


# ---- models --------------------------------------------------------------------------------------------

def digest_hex(entry) -> str:
    return entry.digest.split(":", 1)[-1]


def details(entry) -> dict:
    """Ollama's ``details``; ``families`` ends with ``"clip"`` for a model with a vision projector, as Ollama's do."""
    info = entry.details or {}
    families = list(info.get("families") or [])
    if getattr(entry, "projector", None) is not None and "clip" not in families:
        families.append("clip")
    return {"parent_model": "", "format": info.get("format", entry.format), "family": info.get("family", ""),
            "families": families, "parameter_size": info.get("parameter_size", ""),
            "quantization_level": info.get("quantization_level", "")}


def architecture(entry) -> str:
    return str((entry.model_info or {}).get("general.architecture") or (entry.details or {}).get("family") or "")


def capabilities(entry) -> list[str]:
    """``["embedding"]`` for encoders, else ``["completion"]`` plus ``"tools"`` when the template uses tools,
    ``"insert"`` when the vocabulary has fill-in-the-middle tokens (``suffix``), ``"vision"`` when the model has
    a vision projector (images in chats) and ``"thinking"`` when the template has a thought block
    (``localllm.reasoning.thinking_support``), in Ollama's order."""
    from localllm.model_info import supports_insert
    from localllm.reasoning import thinking_support

    if architecture(entry) in EMBEDDING_FAMILIES:
        return ["embedding"]
    found = ["completion"]
    if "tools" in (entry.chat_template or ""):
        found.append("tools")
    if supports_insert(entry.path, entry.format):
        found.append("insert")
    if getattr(entry, "projector", None) is not None:
        found.append("vision")
    if thinking_support(entry.chat_template) is not None:
        found.append("thinking")
    return found


def tag(entry) -> dict:
    """One model of ``/api/tags``."""
    return {"name": entry.name, "model": entry.name, "modified_at": rfc3339(entry.modified_at),
            "size": entry.size, "digest": digest_hex(entry), "details": details(entry)}


def process(entry, row: dict, context_length: int | None) -> dict:
    """One loaded model of ``/api/ps`` (``row`` from ``Engine.loaded()``)."""
    return {"name": entry.name, "model": entry.name, "size": entry.size, "digest": digest_hex(entry),
            "details": details(entry), "expires_at": local_time(row["expires_at"]), "size_vram": 0,
            "context_length": context_length}


def model_info(entry) -> dict:
    """``general.*``, architecture keys and scalar tokenizer keys (long arrays and the template left out)."""
    arch = architecture(entry)
    info = {}
    for key, value in (entry.model_info or {}).items():
        if key == "tokenizer.chat_template":
            continue
        if key.startswith("general.") or (arch and key.startswith(arch + ".")) or key.startswith("tokenizer."):
            info[key] = value
    return info


def projector_info(entry) -> dict:
    """Ollama's ``projector_info``: the vision projector's metadata (``general.architecture`` ``clip``,
    ``clip.projector_type``, ``clip.vision.*``, its parameter count); empty for a model without one."""
    if getattr(entry, "projector", None) is None:
        return {}
    return dict(getattr(entry, "projector_info", None) or {})


def show(entry) -> dict:
    """The ``/api/show`` object; empty text fields are left out, as Ollama does (``projector_info`` too)."""
    from localllm.modelfile import format_parameters, render_modelfile

    body = {"modelfile": render_modelfile(entry), "parameters": format_parameters(entry.parameters or {}),
            "license": entry.license or "", "system": entry.system or "", "template": entry.chat_template or "",
            "details": details(entry), "model_info": model_info(entry), "capabilities": capabilities(entry),
            "modified_at": rfc3339(entry.modified_at)}
    if entry.messages:
        body["messages"] = [dict(m) for m in entry.messages]
    if projector_info(entry):
        body["projector_info"] = projector_info(entry)
    return {key: value for key, value in body.items() if value != ""}
