"""localllm.context_window: which messages a long conversation keeps, and how a long prompt is cut.

A fake renderer stands in for the chat template: every message costs its words plus two
tokens (role, end of turn), each tool five, the prompt starts with BOS and ends with a two-token
generation prompt. The message choice is checked against a linear scan written out here (the
way Ollama's chatPrompt walks the conversation, from user turns only), on hand-made and generated
conversations.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from localllm.context_window import (ConversationTooLong, fit_conversation, fit_prompt_ids, prompt_budget,
                                     prompt_limit)
from localllm.kv_cache import ContextLengthExceeded

BOS, END, GENERATION_PROMPT = 1, 2, [3, 4]
ROLE_IDS = {"system": 10, "user": 11, "assistant": 12, "tool": 13}


class FakeTemplate:
    """messages -> token ids, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, messages, tools):
        self.calls += 1
        ids = [BOS] + [20] * 5 * len(tools or [])
        for message in messages:
            ids += [ROLE_IDS[message["role"]]] + [100 + len(w) for w in message["content"].split()] + [END]
            ids += [30] * len(message.get("tool_calls") or [])
        return ids + GENERATION_PROMPT


def msg(role: str, words: int, **extra) -> dict:
    return {"role": role, "content": " ".join(["word"] * words), **extra}


def call(words: int = 1) -> dict:
    return msg("assistant", words, tool_calls=[{"function": {"name": "f", "arguments": {}}}])


def linear_oracle(messages, tools, render, n_ctx, max_tokens, context_shift=False):
    """The kept messages by trying every start from the oldest (None: refused)."""
    if context_shift:                                      # only the prompt must fit; a cut leaves <= half
        limit = n_ctx - 1
        budget = min(limit, n_ctx - min(n_ctx // 2, n_ctx // 2 if max_tokens is None else max_tokens))
    else:
        limit = n_ctx - max_tokens if max_tokens is not None else n_ctx - 1
        budget = limit if max_tokens is not None else min(limit, n_ctx - n_ctx // 2)
    if len(render(messages, tools)) <= limit:
        return messages
    newest = len(messages) - 1                             # the newest message, or its tool-call turn
    if messages[newest]["role"] == "tool":
        first = newest
        while first > 0 and messages[first - 1]["role"] == "tool":
            first -= 1
        if first > 0 and messages[first - 1].get("tool_calls"):
            newest = first - 1
    for start in range(1, newest + 1):
        if start < newest and messages[start]["role"] != "user":
            continue                                       # the kept turns open with a user message
        kept = [m for m in messages[:start] if m["role"] == "system"] + messages[start:]
        size = len(render(kept, tools))
        if size <= budget or (start == newest and size <= limit):
            return kept
    return None


def test_limits_and_budgets():
    assert prompt_limit(256, None) == 255 and prompt_budget(256, None) == 128
    assert prompt_limit(255, None) == 254 and prompt_budget(255, None) == 128
    assert prompt_limit(256, 100) == prompt_budget(256, 100) == 156
    assert prompt_limit(1, None) == 0 and prompt_budget(1, None) == 0
    with pytest.raises(ValueError, match="max_tokens must be None or >= 0"):
        prompt_limit(256, -1)
    with pytest.raises(ValueError, match="n_ctx must be a positive integer"):
        prompt_budget(0, None)


def test_limits_and_budgets_with_a_context_shift():
    assert prompt_limit(256, 1000, context_shift=True) == 255 and prompt_budget(256, 1000, context_shift=True) == 128
    assert prompt_limit(256, None, context_shift=True) == 255 and prompt_budget(256, None, context_shift=True) == 128
    assert prompt_budget(256, 4, context_shift=True) == 252
    assert prompt_budget(256, 0, context_shift=True) == 255


def test_with_a_context_shift_num_predict_need_not_fit():
    render = FakeTemplate()
    messages = [msg("user", 5)]
    with pytest.raises(ConversationTooLong):
        fit_conversation(messages, None, render, n_ctx=32, max_tokens=100)
    fitted = fit_conversation(messages, None, render, n_ctx=32, max_tokens=100, context_shift=True)
    assert fitted.messages == messages and fitted.dropped_tokens == 0
    messages = [msg("user", 30), msg("assistant", 30), msg("user", 5)]              # 1 + 32 + 32 + 7 + 2 = 74
    fitted = fit_conversation(messages, None, render, n_ctx=64, max_tokens=100, context_shift=True)
    assert fitted.messages == [messages[2]] and len(fitted.prompt_ids) == 10     # within half the window
    with pytest.raises(ConversationTooLong, match=r"needs 68 tokens \+ at least 1 to answer but the context "
                                                  r"window is 64 tokens"):
        fit_conversation([msg("user", 63)], None, render, n_ctx=64, max_tokens=100, context_shift=True)


def test_a_conversation_that_fits_is_sent_whole_even_past_the_budget():
    render = FakeTemplate()
    messages = [msg("system", 5), msg("user", 40), msg("assistant", 40), msg("user", 5)]
    size = len(render(messages, None))                    # 1 + 7 + 42 + 42 + 7 + 2 = 101
    assert size == 101
    fitted = fit_conversation(messages, None, render, n_ctx=102, max_tokens=None)   # limit 101, budget 51
    assert fitted.messages == messages and fitted.dropped_tokens == 0 and fitted.dropped_messages == 0
    assert fitted.prompt_ids == render(messages, None)


def test_oldest_turns_go_first_and_the_system_prompt_stays():
    render = FakeTemplate()
    system, first, answer, second, answer2, newest = (msg("system", 5), msg("user", 30), msg("assistant", 60),
                                                      msg("user", 10), msg("assistant", 10), msg("user", 8))
    messages = [system, first, answer, second, answer2, newest]
    full = len(render(messages, None))
    assert full == 1 + 7 + 32 + 62 + 12 + 12 + 10 + 2 == 138
    fitted = fit_conversation(messages, None, render, n_ctx=128, max_tokens=None)   # limit 127, budget 64
    assert fitted.messages == [system, second, answer2, newest]          # 1+7+12+12+10+2 = 44 <= 64
    assert fitted.prompt_ids == render(fitted.messages, None)
    assert fitted.dropped_tokens == full - 44 == 94 and fitted.dropped_messages == 2


def test_the_budget_leaves_num_predict_when_it_is_set():
    render = FakeTemplate()
    messages = [msg("user", 30), msg("assistant", 30), msg("user", 30), msg("assistant", 30), msg("user", 5)]
    fitted = fit_conversation(messages, None, render, n_ctx=128, max_tokens=50)     # limit = budget = 78
    assert fitted.messages == messages[2:]                                # 1 + 32 + 32 + 7 + 2 = 74
    assert len(fitted.prompt_ids) == 74 <= 128 - 50


def test_system_messages_anywhere_are_kept_in_place():
    render = FakeTemplate()
    messages = [msg("user", 40), msg("system", 3), msg("assistant", 40), msg("user", 4)]
    fitted = fit_conversation(messages, None, render, n_ctx=64, max_tokens=None)
    assert fitted.messages == [messages[1], messages[3]]
    assert fitted.dropped_messages == 2


def test_tools_are_always_rendered_and_count():
    render = FakeTemplate()
    tools = [{"type": "function", "function": {"name": "f"}}] * 4       # 20 tokens
    messages = [msg("user", 20), msg("assistant", 20), msg("user", 4)]
    fitted = fit_conversation(messages, tools, render, n_ctx=64, max_tokens=None)   # limit 63, budget 32
    assert fitted.messages == [messages[2]] and len(fitted.prompt_ids) == 1 + 20 + 6 + 2
    with pytest.raises(ConversationTooLong):
        fit_conversation(messages, tools * 3, render, n_ctx=64, max_tokens=None)  # 1 + 60 + 6 + 2 > 63


def test_a_tool_call_and_its_results_are_dropped_together():
    render = FakeTemplate()
    messages = [msg("user", 10), call(10), msg("tool", 30), msg("tool", 30), msg("assistant", 5), msg("user", 5),
                call(2), msg("tool", 3), msg("assistant", 3), msg("user", 2)]
    assert len(render(messages, None)) == 125
    assert len(render(messages[3:], None)) == 68          # from the second result on, 68 tokens would fit...
    fitted = fit_conversation(messages, None, render, n_ctx=150, max_tokens=80)     # limit = budget = 70
    assert fitted.messages == messages[5:]                # ...but never a result without its call
    assert fitted.messages[1]["tool_calls"] and len(fitted.prompt_ids) == 29       # (the newer call stays whole)
    assert fit_conversation(messages, None, render, n_ctx=200, max_tokens=20).messages == messages   # fits


def test_a_tool_result_as_newest_message_keeps_its_call():
    render = FakeTemplate()
    messages = [msg("user", 50), call(3), msg("tool", 4), msg("tool", 4)]
    fitted = fit_conversation(messages, None, render, n_ctx=64, max_tokens=None)
    assert fitted.messages == messages[1:]
    assert fitted.messages[0]["tool_calls"]


def test_the_kept_messages_open_with_a_user_turn():
    render = FakeTemplate()
    messages = [msg("user", 50), msg("tool", 3), msg("assistant", 3), msg("user", 3), msg("assistant", 3),
                msg("user", 3)]
    assert len(render(messages[2:], None)) == 23 and len(render(messages[3:], None)) == 18
    fitted = fit_conversation(messages, None, render, n_ctx=64, max_tokens=None)    # budget 32
    assert fitted.messages == messages[3:]                # not the orphan result, not the assistant


def test_a_newest_message_too_long_alone_is_refused():
    render = FakeTemplate()
    messages = [msg("system", 5), msg("user", 5), msg("assistant", 5), msg("user", 120)]
    with pytest.raises(ConversationTooLong) as refused:
        fit_conversation(messages, None, render, n_ctx=128, max_tokens=None)
    assert isinstance(refused.value, ContextLengthExceeded)
    assert str(refused.value) == ("the newest message, with the system prompt and tools, needs 132 tokens "
                                  "+ at least 1 to answer but the context window is 128 tokens: shorten the "
                                  "message or raise num_ctx")
    assert refused.value.needed == 133 and refused.value.n_ctx == 128
    with pytest.raises(ConversationTooLong, match=r"needs 10 tokens \+ num_predict 100 but the context window "
                                                  r"is 32 tokens"):
        fit_conversation([msg("user", 5)], None, render, n_ctx=32, max_tokens=100)


def test_the_never_dropped_part_may_use_the_room_past_the_budget():
    render = FakeTemplate()
    messages = [msg("user", 30), msg("assistant", 30), msg("user", 90)]
    fitted = fit_conversation(messages, None, render, n_ctx=128, max_tokens=None)   # budget 64, limit 127
    assert fitted.messages == [messages[2]] and len(fitted.prompt_ids) == 95


def test_renders_logarithmically_many_times():
    render = FakeTemplate()
    messages = [msg("user" if i % 2 == 0 else "assistant", 3) for i in range(2001)]
    fitted = fit_conversation(messages, None, render, n_ctx=256, max_tokens=None)
    assert render.calls <= 2 + 12                         # the whole, then a binary search over 2000 starts
    assert fitted.messages == messages[-25:]              # 5 tokens a message, BOS + generation prompt: 25 fit
    assert len(fitted.prompt_ids) == 1 + 25 * 5 + 2


def test_empty_messages_are_refused():
    with pytest.raises(ValueError, match="messages is empty"):
        fit_conversation([], None, FakeTemplate(), n_ctx=64)


ROLES = st.sampled_from(["system", "user", "assistant", "assistant-call", "tool"])


@st.composite
def conversations(draw):
    entries = draw(st.lists(st.tuples(ROLES, st.integers(0, 40)), min_size=1, max_size=14))
    messages = [call(words) if role == "assistant-call" else msg(role, words) for role, words in entries]
    tools = [{"function": {"name": "f"}}] * draw(st.integers(0, 2))
    return (messages, tools, draw(st.integers(16, 300)), draw(st.one_of(st.none(), st.integers(0, 60))),
            draw(st.booleans()))


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_generated_conversations_match_the_linear_scan(case):
    messages, tools, n_ctx, max_tokens, shift = case
    render = FakeTemplate()
    expected = linear_oracle(messages, tools, render, n_ctx, max_tokens, shift)
    if expected is None:
        with pytest.raises(ContextLengthExceeded):
            fit_conversation(messages, tools, render, n_ctx, max_tokens, shift)
        return
    fitted = fit_conversation(messages, tools, render, n_ctx, max_tokens, shift)
    assert fitted.messages == expected
    assert fitted.prompt_ids == render(expected, tools)
    assert fitted.dropped_tokens == len(render(messages, tools)) - len(fitted.prompt_ids)
    assert fitted.dropped_messages == len(messages) - len(expected)
    assert len(fitted.prompt_ids) <= prompt_limit(n_ctx, max_tokens, shift)
    assert fitted.messages[-1] is messages[-1]
    assert [m for m in fitted.messages if m["role"] == "system"] == [m for m in messages if m["role"] == "system"]
    for position, message in enumerate(fitted.messages):          # a kept result keeps its kept caller
        if message["role"] == "tool":
            index = next(i for i, m in enumerate(messages) if m is message)
            before = index - 1
            while before >= 0 and messages[before]["role"] == "tool":
                before -= 1
            if before >= 0 and messages[before].get("tool_calls"):
                assert any(m is messages[before] for m in fitted.messages[:position])


# ---- raw prompts: Ollama's runner cut ---------------------------------------------------------------

def test_a_prompt_that_fits_is_untouched():
    ids = list(range(50, 150))
    assert fit_prompt_ids(ids, n_ctx=101, max_tokens=None) == (ids, 0)
    assert fit_prompt_ids(ids, n_ctx=150, max_tokens=50) == (ids, 0)


def test_a_long_prompt_keeps_bos_num_keep_and_its_end():
    ids = [BOS] + list(range(100, 400))                    # 301 tokens
    kept, dropped = fit_prompt_ids(ids, n_ctx=128, max_tokens=None, bos_id=BOS)     # budget 64
    assert kept == [BOS, 100, 101, 102, 103] + list(range(400 - 59, 400))
    assert len(kept) == 64 and dropped == 301 - 64
    kept, dropped = fit_prompt_ids(ids, n_ctx=128, max_tokens=None, num_keep=0, bos_id=None)
    assert kept == list(range(400 - 64, 400)) and dropped == 237
    kept, _ = fit_prompt_ids(ids, n_ctx=128, max_tokens=28, num_keep=2, bos_id=BOS)  # budget 100
    assert kept == [BOS, 100, 101] + list(range(400 - 97, 400))


def test_num_keep_minus_one_keeps_the_start():
    ids = list(range(1000, 1300))
    kept, dropped = fit_prompt_ids(ids, n_ctx=128, max_tokens=None, num_keep=-1)
    assert kept == ids[:64] and dropped == 236
    with pytest.raises(ValueError, match="num_keep must be -1"):
        fit_prompt_ids(ids, n_ctx=128, max_tokens=None, num_keep=-2)


def test_no_room_for_the_answer_is_left_to_the_engine_to_refuse():
    ids = list(range(10, 40))
    assert fit_prompt_ids(ids, n_ctx=32, max_tokens=40) == (ids, 0)


def test_with_a_context_shift_only_the_prompt_must_fit():
    ids = list(range(10, 40))
    assert fit_prompt_ids(ids, n_ctx=32, max_tokens=40, context_shift=True) == (ids, 0)
    ids = [BOS] + list(range(100, 140))
    kept, dropped = fit_prompt_ids(ids, n_ctx=32, max_tokens=40, bos_id=BOS, context_shift=True)   # budget 16
    assert kept == [BOS, 100, 101, 102, 103] + list(range(140 - 11, 140)) and dropped == 41 - 16
