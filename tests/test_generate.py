"""Generation on a tiny random model: every control checked against a full recompute of the logits."""
import numpy as np
import pytest

import localllm
from localllm.kv_cache import ContextLengthExceeded
from localllm.sampling import log_softmax


@pytest.fixture(scope="module")
def model(tiny_llama_path):
    return localllm.load(tiny_llama_path, backend="ref", num_ctx=64)


def greedy_by_recompute(model, prompt_ids, n_tokens):
    """Greedy continuation computed the slow way: full forward over the whole sequence every step."""
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        ids.append(int(model.logits(ids)[-1].argmax()))
    return ids[len(prompt_ids):]


def test_greedy_equals_recompute(model):
    result = model.generate("hello", temperature=0, max_tokens=8, details=True)
    assert result.token_ids == greedy_by_recompute(model, model.tokenize("hello"), 8)
    assert result.finish_reason == "length"
    assert result.usage.prompt_tokens == 5 and result.usage.completion_tokens == 8


def test_prefix_reuse_gives_the_same_tokens(model):
    first = model.generate("hello world", temperature=0, max_tokens=6)
    again = model.generate("hello world", temperature=0, max_tokens=6)       # whole prompt cached but the last token
    longer = model.generate("hello world!", temperature=0, max_tokens=6)     # shares a prefix
    fresh = localllm.load(model.path, backend="ref", num_ctx=64)
    assert first == again
    assert longer == fresh.generate("hello world!", temperature=0, max_tokens=6)


def test_stream_pieces_join_to_generate(model):
    pieces = list(model.stream("abc", temperature=0, max_tokens=10))
    assert "".join(pieces) == model.generate("abc", temperature=0, max_tokens=10)


def test_stop_string_cuts_before_it(model):
    full = model.generate("hello", temperature=0, max_tokens=12)
    stop = full[3:5]
    result = model.generate("hello", temperature=0, max_tokens=12, stop=[stop], details=True)
    assert result.text == full[:full.index(stop)]
    assert result.finish_reason == "stop"


def test_stop_token_id(model):
    tokens = model.generate("hello", temperature=0, max_tokens=6, details=True).token_ids
    stop_at = tokens.index(tokens[-1])
    result = model.generate("hello", temperature=0, max_tokens=6, stop_token_ids=[tokens[-1]], details=True)
    assert result.token_ids == tokens[:stop_at] and result.finish_reason == "stop"


def test_logprobs_are_of_the_model_distribution(model):
    prompt = model.tokenize("hey")
    result = model.generate(prompt, temperature=0, max_tokens=4, logprobs=True, top_logprobs=5, details=True)
    records = result.choices[0].logprobs
    ids = list(prompt)
    for record in records:
        expected = log_softmax(model.logits(ids)[-1].astype(np.float64))
        assert record.token_id == int(expected.argmax())
        assert record.logprob == pytest.approx(expected.max(), abs=1e-4)
        assert [t.token_id for t in record.top] == list(np.argsort(-expected, kind="stable")[:5])
        assert record.top[0].logprob == pytest.approx(record.logprob)
        assert record.bytes == model.tokenizer.token_bytes(record.token_id)
        ids.append(record.token_id)


def test_echo_with_prompt_logprobs(model):
    prompt = model.tokenize("hello")
    result = model.generate(prompt, max_tokens=0, echo=True, logprobs=True, details=True)
    records = result.choices[0].logprobs
    assert result.text == "hello" and result.finish_reason == "length"
    assert records[0].logprob is None and len(records) == len(prompt)
    expected = log_softmax(model.logits(prompt).astype(np.float64))
    for position, record in enumerate(records[1:], start=1):
        assert record.token_id == prompt[position]
        assert record.logprob == pytest.approx(expected[position - 1, prompt[position]], abs=1e-4)


def test_n_choices_share_the_prompt_and_are_independent(model):
    result = model.generate("once", temperature=1.0, seed=11, max_tokens=8, n=3, details=True)
    texts = [c.text for c in result.choices]
    assert len(set(texts)) > 1
    for index, choice in enumerate(result.choices):    # choice i is the request with seed + i
        alone = model.generate("once", temperature=1.0, seed=11 + index, max_tokens=8)
        assert choice.text == alone
    assert result.usage.completion_tokens == sum(len(c.token_ids) for c in result.choices)


def test_seed_reproducible_and_different_seeds_differ(model):
    a = model.generate("x", temperature=1.0, seed=5, max_tokens=12)
    b = model.generate("x", temperature=1.0, seed=5, max_tokens=12)
    c = model.generate("x", temperature=1.0, seed=6, max_tokens=12)
    assert a == b and a != c


def test_context_overflow_raises_before_any_work(model, monkeypatch):
    calls = []
    monkeypatch.setattr(model.network, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ContextLengthExceeded) as info:
        model.generate("a" * 60, max_tokens=10)
    assert "70" in str(info.value) and "64" in str(info.value)
    with pytest.raises(ContextLengthExceeded):
        model.generate("a" * 64)
    assert calls == []


def test_no_max_tokens_runs_until_the_window_is_full(model):
    result = model.generate("abc", temperature=0, details=True, num_ctx=16)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 16 - 3
    model.set_context(64)


def test_bad_settings_name_the_parameter(model):
    with pytest.raises(ValueError, match="top_logprobs"):
        model.generate("a", top_logprobs=21)
    with pytest.raises(ValueError, match="n must"):
        model.generate("a", n=0)
    with pytest.raises(ValueError, match="unknown generation setting"):
        model.generate("a", temprature=0.5)


def test_a_failing_sequence_ends_its_request_alone(model):
    """A processor that raises (a grammar with no way on, a bad bias) ends that request's choices only."""
    from localllm.generate import GenerationParams, make_sequences, release, step, stream_generate
    from localllm.sampling import SamplingParams

    def broken_after_three(logits, history, n_prompt):
        if len(history) - n_prompt >= 3:
            raise ValueError("every token is banned: all logits are -inf after the logits processors")
        return logits

    prompt = model.tokenize("hello world")
    greedy = GenerationParams(SamplingParams(temperature=0), max_tokens=10)
    two_choices = GenerationParams(SamplingParams(temperature=0), max_tokens=10, n=2)
    innocent = make_sequences(prompt, greedy, model.tokenizer, model.cache, 64)
    hostile = make_sequences(model.tokenize("abc"), two_choices, model.tokenizer, model.cache, 64,
                             extra_processors_factory=lambda: [broken_after_three])
    live = innocent + hostile
    tokens, failures = [], []
    try:
        while not all(seq.finished for seq in live):
            for seq, event in step(model.network, model.cache, live):
                if isinstance(event, Exception):
                    failures.append((seq, event))
                elif seq is innocent[0]:
                    tokens += event.token_ids
    finally:
        release(model.cache, live)
    assert tokens == greedy_by_recompute(model, prompt, 10)            # as if alone
    assert len(failures) == 1 and failures[0][0] is hostile[0]         # one error for the request
    assert "every token is banned" in str(failures[0][1])
    assert [seq.finish_reason for seq in hostile] == ["error", "error"]  # its other choice ended with it
    assert len(hostile[0].generated) == 3
    with pytest.raises(ValueError, match="every token is banned"):      # one request alone: the error is raised
        list(stream_generate(model.network, model.cache, model.tokenizer, model.tokenize("abc"), greedy, 64,
                             extra_processors_factory=lambda: [broken_after_three]))
    assert model.cache.free_slots == model.cache.n_slots                # and its slot is given back
