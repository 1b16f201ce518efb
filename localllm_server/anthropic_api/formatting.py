"""Engine events -> Anthropic Messages API objects and stream events (pure functions, no I/O).

A message is ``{"id": "msg_...", "type": "message", "role": "assistant", "model", "content",
"stop_reason", "stop_sequence", "usage"}``; its ``content`` blocks are, in order, the thought
(``thinking``, for reasoning models), the answer (``text``; present unless there are only calls)
and the calls (``tool_use``, ``input`` the arguments object). ``stop_reason``:

* ``max_tokens``: cut by ``max_tokens``;
* ``tool_use``: the answer ended after calls;
* ``stop_sequence``: one of the request's ``stop_sequences`` ended it (named in ``stop_sequence``);
* ``end_turn``: the model ended its turn (or one of its own stop strings did).

Usage follows Anthropic's split: ``input_tokens`` are the prompt tokens prefilled for this
request, ``cache_read_input_tokens`` those taken from the KV cache (their sum is the prompt),
``cache_creation_input_tokens`` is always 0.

Streamed (:class:`MessageStream`): ``message_start`` (the message with empty content), ``ping``,
per block ``content_block_start``, ``content_block_delta`` ... (``thinking_delta``,
``text_delta``, ``input_json_delta``), ``content_block_stop``, then ``message_delta`` (stop reason,
usage) and ``message_stop``. Every event is a dict whose ``type`` is its SSE event name.
"""
from __future__ import annotations

import json
import uuid
from typing import Callable, Iterable, Iterator

from .. import formatting


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict:
    return {"input_tokens": prompt_tokens - cached_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached_tokens}


def matched_stop_sequence(generated_text: str, stop_sequences: list[str]) -> str | None:
    """The stop sequence that ended ``generated_text`` (everything the model wrote, stop string included), or None.

    The engine stops at the first character that completes a stop string, the earliest-starting one on a tie
    (``localllm.stopping``); so the first of ``stop_sequences`` to complete in the text is the one that stopped it.
    """
    best = None                                  # (end, start, stop)
    for stop in stop_sequences:
        start = generated_text.find(stop)
        if start != -1 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    return best[2] if best is not None else None


def stop_reason(finish_reason: str | None, has_calls: bool, stop_sequence: str | None) -> str:
    """Anthropic's ``stop_reason`` for an engine ``finish_reason`` ("stop" | "length")."""
    if finish_reason == "length":
        return "max_tokens"
    if has_calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def tool_input(arguments_json: str) -> dict:
    """A call's arguments as the ``input`` object ({} when the model's text is not a JSON object, as Ollama does)."""
    try:
        value = json.loads(arguments_json or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def thinking_block(thinking: str) -> dict:
    return {"type": "thinking", "thinking": thinking, "signature": ""}


def text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def tool_use_block(call_id: str, name: str, arguments: dict) -> dict:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def message_object(message_id: str, model: str, content: list[dict], reason: str | None, stop_sequence: str | None,
                   usage_value: dict) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": stop_sequence, "usage": usage_value}


def content_blocks(text: str, thinking: str, make_parser=None) -> tuple[list[dict], bool]:
    """(the ``content`` blocks of a whole output, whether it made calls)."""
    answer, calls = formatting.parse_calls(text, make_parser)
    blocks = [thinking_block(thinking)] if thinking else []
    blocks += [text_block(answer)] if answer or not calls else []
    blocks += [tool_use_block(call.id, call.name, tool_input(call.arguments_json)) for call in calls]
    return blocks, bool(calls)


class MessageStream:
    """The events of one streamed message (one choice).

    ``detokenize``: token ids -> text (the model's), to find which stop sequence ended the output.
    """

    def __init__(self, message_id: str, model: str, stop_sequences: list[str], detokenize: Callable,
                 make_parser=None):
        self.message_id, self.model = message_id, model
        self.stop_sequences = stop_sequences
        self.detokenize = detokenize
        self.parser = make_parser() if make_parser is not None else None
        self.index = -1                       # index of the last block started
        self.open_kind: str | None = None     # "thinking" | "text" | "tool_use" while a block is open
        self.calls = 0                        # tool_use blocks started
        self.texts = 0                        # text blocks started

    def events(self, events: Iterable, prompt_tokens: int) -> Iterator[dict]:
        """Event dicts for ``(index, GenerationEvent)`` pairs."""
        yield {"type": "message_start",
               "message": message_object(self.message_id, self.model, [], None, None, usage(prompt_tokens, 0))}
        yield {"type": "ping"}
        token_ids: list[int] = []
        for _, event in events:
            token_ids += event.token_ids
            if event.thinking:
                yield from self._delta("thinking", thinking_block(""), {"type": "thinking_delta",
                                                                        "thinking": event.thinking})
            pieces = self.parser.push(event.text) if self.parser is not None and event.text else \
                ([event.text] if event.text else [])
            if event.finish_reason and self.parser is not None:
                pieces += self.parser.finish()
            for piece in pieces:
                yield from self._piece(piece)
            if event.finish_reason:
                if not self.texts and not self.calls:        # no answer: an empty text block, as unstreamed
                    yield from self._start("text", text_block(""))
                yield from self._stop()
                stop = matched_stop_sequence(self.detokenize(token_ids), self.stop_sequences) \
                    if event.finish_reason == "stop" and self.stop_sequences else None
                completion = formatting.final_completion_tokens(event)
                cached = formatting.final_cached_tokens(event)
                yield {"type": "message_delta",
                       "delta": {"stop_reason": stop_reason(event.finish_reason, self.calls > 0, stop),
                                 "stop_sequence": stop},
                       "usage": usage(prompt_tokens, completion, cached)}
                yield {"type": "message_stop"}

    def _piece(self, piece) -> Iterator[dict]:
        if isinstance(piece, str):
            yield from self._delta("text", text_block(""), {"type": "text_delta", "text": piece})
            return
        if piece.id is not None:                 # a new call: its own block
            self.calls += 1
            yield from self._start("tool_use", tool_use_block(piece.id, piece.name, {}))
        if piece.arguments_fragment:
            yield {"type": "content_block_delta", "index": self.index,
                   "delta": {"type": "input_json_delta", "partial_json": piece.arguments_fragment}}

    def _delta(self, kind: str, empty_block: dict, delta: dict) -> Iterator[dict]:
        if self.open_kind != kind:
            yield from self._start(kind, empty_block)
        yield {"type": "content_block_delta", "index": self.index, "delta": delta}

    def _start(self, kind: str, block: dict) -> Iterator[dict]:
        yield from self._stop()
        self.texts += kind == "text"
        self.index += 1
        self.open_kind = kind
        yield {"type": "content_block_start", "index": self.index, "content_block": block}

    def _stop(self) -> Iterator[dict]:
        if self.open_kind is not None:
            yield {"type": "content_block_stop", "index": self.index}
            self.open_kind = None
