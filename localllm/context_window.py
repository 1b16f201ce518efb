"""Fitting a long conversation, or a long prompt, into the context window (pure logic, no model).

Ollama keeps a chat going past its window: ``/api/chat`` drops the oldest messages that do not
fit ``num_ctx`` (keeping the system messages and the newest message, and never leaving a tool
result without the assistant turn that called the tool; localllm also starts the kept messages at a
user turn, as strict templates require), and when generation reaches the end of
the window its runner shifts the context, freeing half of it. A ``/api/generate`` prompt that does
not fit is cut in the middle: its first ``num_keep`` tokens (after BOS) and its end are kept.

Without a context shift (``GenerationParams.context_shift`` off) the answer must fit beside the
prompt, so its room is set aside when the prompt is cut:

- ``prompt_limit(n_ctx, max_tokens)``: the most prompt tokens a request can run with
  (``n_ctx - max_tokens``; without ``max_tokens``, ``n_ctx - 1``, room for one token). A prompt
  within it is sent whole, as before: nothing is dropped from a request that fits.
- ``prompt_budget(n_ctx, max_tokens)``: what a prompt over the limit is cut down to:
  ``n_ctx - max_tokens`` when the request sets ``max_tokens`` (``num_predict``), else half the
  window (``n_ctx - n_ctx // 2``), the room Ollama's first context shift would free for the answer.

With ``context_shift=True`` the answer goes past the window by shifting it, so only the prompt must
fit (limit ``n_ctx - 1``, as Ollama's runner), and a cut prompt leaves ``max_tokens`` or half the
window, whichever is less, before the first shift.

A prompt whose parts that are never dropped (system messages, tools, the newest message) exceed
the limit raises :class:`ConversationTooLong`, a ``ContextLengthExceeded``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .kv_cache import ContextLengthExceeded

# Ollama's default ``num_keep``: prompt tokens after BOS that a cut never removes
DEFAULT_NUM_KEEP = 4

RenderFunction = Callable[[list[dict], Sequence[dict] | None], list[int]]


class ConversationTooLong(ContextLengthExceeded):
    """The messages that are never dropped (system, tools, the newest message) do not fit the window alone."""

    def __init__(self, n_prompt: int, n_ctx: int, max_tokens: int | None):
        answer = f"num_predict {max_tokens}" if max_tokens is not None else "at least 1 to answer"
        ValueError.__init__(self, f"the newest message, with the system prompt and tools, needs {n_prompt} tokens "
                                  f"+ {answer} but the context window is {n_ctx} tokens: shorten the message "
                                  f"or raise num_ctx")
        self.needed = n_prompt + (max_tokens if max_tokens is not None else 1)
        self.n_ctx = n_ctx


def prompt_limit(n_ctx: int, max_tokens: int | None, context_shift: bool = False) -> int:
    """The most prompt tokens a request can run with: room for ``max_tokens``, or for one token without it
    or with a context shift (the answer then goes past the window)."""
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive integer, got {n_ctx}")
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be None or >= 0, got {max_tokens}")
    return n_ctx - max_tokens if max_tokens is not None and not context_shift else n_ctx - 1


def prompt_budget(n_ctx: int, max_tokens: int | None, context_shift: bool = False) -> int:
    """The size a prompt over :func:`prompt_limit` is cut down to: ``max_tokens`` or half the window left for
    the answer (with a context shift, the smaller of the two)."""
    half = n_ctx // 2
    if context_shift:
        room = half if max_tokens is None else min(max_tokens, half)
    else:
        room = half if max_tokens is None else max_tokens
    return min(n_ctx - room, prompt_limit(n_ctx, max_tokens, context_shift))


@dataclass
class FittedConversation:
    """The messages to render, their prompt token ids, and what was left out to get there.

    ``dropped_tokens`` is ``len(render(all messages)) - len(prompt_ids)``: how many prompt
    tokens the conversation lost (0 when it was sent whole).
    """

    messages: list[dict]
    prompt_ids: list[int]
    dropped_tokens: int = 0
    dropped_messages: int = 0


def fit_conversation(messages: list[dict], tools: Sequence[dict] | None, render: RenderFunction,
                     n_ctx: int, max_tokens: int | None = None, context_shift: bool = False) -> FittedConversation:
    """Drop the oldest non-system messages of a conversation that does not fit the window.

    ``render(messages, tools) -> token ids`` is the whole prompt the model would see (chat
    template, generation prompt, thinking switch); tools are always rendered. A conversation
    within :func:`prompt_limit` comes back whole. Otherwise the kept messages are every system
    message (in place, at the front) and the newest messages from the first start that brings
    the prompt within :func:`prompt_budget`. A start is a user message (:func:`kept_starts`: a tool
    call and its results, a question and its answer go together), and the newest message (with its
    tool-call turn, if it is a tool result) is always kept. If even those kept parts alone exceed
    the limit: :class:`ConversationTooLong`. Renders O(log n) times for n messages. ``context_shift``:
    the request's answer may shift the window (see the module's notes on the limit and budget).
    """
    if not messages:
        raise ValueError("messages is empty: nothing to fit")
    limit, budget = prompt_limit(n_ctx, max_tokens, context_shift), prompt_budget(n_ctx, max_tokens, context_shift)
    full_ids = _as_list(render(list(messages), tools))
    if len(full_ids) <= limit:
        return FittedConversation(list(messages), full_ids)

    starts = kept_starts(messages)                        # candidates after 0 (0 = nothing dropped)
    rendered: dict[int, list[int]] = {}

    def ids_from(start: int) -> list[int]:
        if start not in rendered:
            rendered[start] = _as_list(render(kept_from(messages, start), tools))
        return rendered[start]

    # smallest start whose prompt is within the budget (prompt sizes shrink as starts grow)
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(ids_from(starts[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    start = starts[lo]
    ids = ids_from(start)
    if len(ids) > limit:                                  # only the never-dropped parts are left, and too long
        raise ConversationTooLong(len(ids), n_ctx, None if context_shift else max_tokens)
    kept = kept_from(messages, start)
    return FittedConversation(kept, ids, len(full_ids) - len(ids), len(messages) - len(kept))


def kept_from(messages: Sequence[dict], start: int) -> list[dict]:
    """The system messages before ``start``, then every message from ``start`` on."""
    return [m for m in messages[:start] if m.get("role") == "system"] + list(messages[start:])


def kept_starts(messages: Sequence[dict]) -> list[int]:
    """The indices (> 0) the kept messages may start at, ascending, the last one keeping only the newest message.

    Every start but the last is a user message: a question goes with its answer and a tool call with its
    results, and the kept conversation opens with a user turn as templates expect (Gemma's and Mistral's
    refuse one that opens with the assistant). The last start is the newest message, or for a tool result
    the assistant turn whose ``tool_calls`` it answers. [0] when that is the first message.
    """
    newest = tool_block_start(messages, len(messages) - 1)
    if newest == 0:
        return [0]
    return [i for i in range(1, newest) if messages[i].get("role") == "user"] + [newest]


def tool_block_start(messages: Sequence[dict], index: int) -> int:
    """``index``, or for a tool result the assistant turn whose ``tool_calls`` it answers (if it directly precedes
    the run of tool results ``index`` belongs to)."""
    if messages[index].get("role") != "tool":
        return index
    first = index
    while first > 0 and messages[first - 1].get("role") == "tool":
        first -= 1
    caller = first - 1
    if caller >= 0 and messages[caller].get("role") == "assistant" and messages[caller].get("tool_calls"):
        return caller
    return index


def _as_list(ids) -> list[int]:
    """``ids`` as a list, kept as it is when it is one (a vision prompt's PromptTokens carries its images)."""
    return ids if isinstance(ids, list) else list(ids)


def fit_prompt_ids(ids: Sequence[int], n_ctx: int, max_tokens: int | None, num_keep: int = DEFAULT_NUM_KEEP,
                   bos_id: int | None = None, context_shift: bool = False) -> tuple[list[int], int]:
    """(the prompt ids to run, how many were dropped): a prompt over :func:`prompt_limit` loses tokens from its
    middle, as Ollama's runner truncates a prompt: the first ``num_keep`` tokens (plus a leading ``bos_id``;
    -1 keeps as many as fit) and the newest tokens up to :func:`prompt_budget` are kept.
    """
    if num_keep < -1:
        raise ValueError(f"num_keep must be -1 (keep all) or >= 0, got {num_keep}")
    ids = list(ids)
    limit, budget = prompt_limit(n_ctx, max_tokens, context_shift), prompt_budget(n_ctx, max_tokens, context_shift)
    if len(ids) <= limit or budget < 1:                   # fits; or no room at all (refused where submitted)
        return ids, 0
    n_keep = len(ids) if num_keep == -1 else num_keep + (1 if bos_id is not None and ids[0] == bos_id else 0)
    n_keep = min(n_keep, budget)
    kept = ids[:n_keep] + ids[len(ids) - (budget - n_keep):]      # (budget == n_keep: ids[len:] is empty)
    return kept, len(ids) - len(kept)
