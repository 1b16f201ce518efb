"""Context shift (Ollama's native behaviour): a full window drops older tokens and generation goes on.

Checked against a recompute: the same shift rule applied to a token list, each window generated afresh
from what is left by a model without context shift. Exact on a plain cache and on a sliding-window ring that the shift leaves
holding other positions (the kept tokens' K/V are recomputed, never reused from a stale ring row).
"""
import numpy as np
import pytest

import localllm
from localllm.kv_cache import ContextLengthExceeded


def shifted_greedy_by_recompute(path, backend: str, prompt: list[int], n_ctx: int, num_keep: int, n_new: int,
                                banned: int) -> tuple[list[int], list[float], int]:
    """(generated ids, their logprobs, tokens dropped): keep ``num_keep`` leading tokens, drop half of the rest when full.

    Each window is generated afresh from its token list by a model with a window one larger, without
    any context shift: the tokens until the list would outgrow ``n_ctx``, then the list is shifted.
    """
    reference = localllm.load(path, backend=backend, num_ctx=n_ctx + 1)
    tokens, generated, logprobs, dropped = list(prompt), [], [], 0
    while len(generated) < n_new:
        if len(tokens) > n_ctx:
            keep = min(num_keep, len(prompt), n_ctx - 2)
            discard = (n_ctx - keep) // 2
            tokens = tokens[:keep] + tokens[keep + discard:]
            dropped += discard
        todo = min(n_ctx + 1 - len(tokens), n_new - len(generated))
        window = reference.generate(tokens, temperature=0, max_tokens=todo, logit_bias={banned: -100},
                                    logprobs=True, details=True).choices[0]
        assert len(window.token_ids) == todo
        generated += window.token_ids
        logprobs += [record.logprob for record in window.logprobs]
        tokens += window.token_ids
    return generated, logprobs, dropped


@pytest.fixture(scope="module")
def tiny_gemma3_path(tmp_path_factory):
    """Window 8 on layers 0 and 1: rings of 256 rows, which a 300-token window wraps."""
    from tests.tiny_gemma3 import hf_tiny_gemma3, write_gemma3_gguf
    return write_gemma3_gguf(hf_tiny_gemma3(window=8), tmp_path_factory.mktemp("shift") / "gemma3.gguf",
                             weight_type="Q8_0")


@pytest.mark.parametrize("case", ["llama", "gemma3-ring"])
def test_generation_past_the_window_equals_the_shifted_recompute(case, tiny_llama_path, tiny_gemma3_path):
    path, backend, n_ctx, n_new = ((tiny_llama_path, "ref", 48, 110) if case == "llama" else
                                   (tiny_gemma3_path, "fast", 300, 420))
    model = localllm.load(path, backend=backend, num_ctx=n_ctx)
    prompt = model.tokenize("the context shifts when the window is full")
    eos = model.tokenizer.eos_id
    result = model.generate(prompt, temperature=0, max_tokens=n_new, context_shift=True, num_keep=4,
                            logit_bias={eos: -100}, logprobs=True, details=True)
    expected, expected_logprobs, dropped = shifted_greedy_by_recompute(path, backend, prompt, n_ctx, 4, n_new, eos)
    assert dropped > n_ctx // 2                                          # it shifted at least twice
    assert result.token_ids == expected
    logprobs = [record.logprob for record in result.choices[0].logprobs]
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-5)   # the distributions, not only the argmax
    assert result.finish_reason == "length" and result.usage.completion_tokens == n_new
    assert result.usage.prompt_tokens == len(prompt)


def test_without_context_shift_the_window_still_bounds_the_request(tiny_llama_path):
    model = localllm.load(tiny_llama_path, backend="ref", num_ctx=48)
    with pytest.raises(ContextLengthExceeded):
        model.generate("hello", temperature=0, max_tokens=100)
    unbounded = model.generate("hello", temperature=0, details=True, logit_bias={model.tokenizer.eos_id: -100})
    assert unbounded.usage.completion_tokens == 48 - 5                 # stops at the end of the window
    shifted = model.generate("hello", temperature=0, details=True, context_shift=True,
                             logit_bias={model.tokenizer.eos_id: -100})
    assert shifted.usage.completion_tokens == 10 * 48                  # Ollama's limit: ten windows


def test_prompt_must_still_fit_and_num_keep_is_checked(tiny_llama_path):
    model = localllm.load(tiny_llama_path, backend="ref", num_ctx=48)
    with pytest.raises(ContextLengthExceeded):
        model.generate("x" * 60, max_tokens=4, context_shift=True)
    with pytest.raises(ValueError, match="num_keep"):
        model.generate("hello", max_tokens=4, context_shift=True, num_keep=-2)


def test_num_keep_minus_one_keeps_the_whole_prompt(tiny_llama_path):
    model = localllm.load(tiny_llama_path, backend="ref", num_ctx=48)
    prompt = model.tokenize("keep all of this prompt")
    eos = model.tokenizer.eos_id
    result = model.generate(prompt, temperature=0, max_tokens=80, context_shift=True, num_keep=-1,
                            logit_bias={eos: -100}, details=True)
    expected, _, _ = shifted_greedy_by_recompute(tiny_llama_path, "ref", prompt, 48, len(prompt), 80, eos)
    assert result.token_ids == expected
