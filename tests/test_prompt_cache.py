"""The RAM prompt cache beyond the slots (kv_cache.PromptCache): an evicted slot's state comes back bit for bit,
the byte budget holds, sliding-window rings round-trip, and the Model API reports the restored tokens as cached."""
from __future__ import annotations

import numpy as np
import pytest

from localllm.formats.gguf import read_gguf
from localllm.kv_cache import CACHE_RAM_ENV, KVCache, default_cache_ram, parse_size
from localllm.models.decoder import DecoderModel
from tests.tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> DecoderModel:
    path = write_tiny_llama(tmp_path_factory.mktemp("prompt-cache") / "tiny.gguf", n_ctx=512, weight_type="Q8_0")
    return DecoderModel.from_gguf(read_gguf(path), backend="fast")


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> DecoderModel:
    """Window 8 on layers 0 and 1: rings of 256 rows that a 300-token prompt wraps."""
    from tests.tiny_gemma3 import hf_tiny_gemma3, write_gemma3_gguf
    path = write_gemma3_gguf(hf_tiny_gemma3(window=8), tmp_path_factory.mktemp("prompt-cache") / "gemma3.gguf",
                             weight_type="Q8_0")
    return DecoderModel.from_gguf(read_gguf(path), backend="fast")


def prompt(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, n)]


def prefill(model: DecoderModel, cache: KVCache, tokens: list[int]) -> np.ndarray:
    """What generate.step does for one prompt: take the best slot (restoring a saved state if one serves
    better), compute the tokens it does not hold, record them; returns the last token's logits."""
    slot = cache.allocate_best(tokens)
    start = cache.usable_prefix(slot, tokens, limit=len(tokens) - 1)
    todo = tokens[start:]
    logits = model.forward(np.array(todo), np.arange(start, len(tokens)), np.full(len(todo), slot), cache,
                           logits_for=[len(todo) - 1])
    cache.lengths[slot] = len(tokens)
    cache.tokens[slot] = list(tokens)
    cache.release(slot)
    return logits[0]


def fresh(model: DecoderModel, tokens: list[int]) -> np.ndarray:
    cache = model.new_cache(1, 512)
    return model.forward(np.array(tokens), np.arange(len(tokens)), np.zeros(len(tokens), dtype=np.int64), cache,
                         logits_for=[len(tokens) - 1])[0]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma3"])
def test_an_evicted_conversation_comes_back_bit_for_bit(which, request):
    model = request.getfixturevalue(which)
    cache = KVCache(model.config.n_layers, 1, 512, model.config.n_kv_heads, model.config.head_dim, np.float16,
                    model.config.layer_windows, model.max_batch_tokens, ram_budget=64 << 20)
    first, other = prompt(1, 300), prompt(2, 200)   # 300 positions wrap Gemma's 256-row rings
    prefill(model, cache, first)
    prefill(model, cache, other)                    # the only slot goes to another conversation: first is saved
    assert cache.prompt_cache.saved == 1 and cache.tokens[0] == other
    turn_two = first + prompt(3, 20)
    logits = prefill(model, cache, turn_two)        # restored, then 20 new tokens
    assert cache.prompt_cache.restored == 1 and cache.prompt_cache.restored_tokens == 300
    np.testing.assert_array_equal(logits, fresh(model, turn_two))
    # and the conversation it displaced went to RAM in turn
    assert [len(state.tokens) for state in cache.prompt_cache.entries.values()] == [200]


def test_a_ring_that_moved_past_a_shorter_prefix_cannot_serve_it(tiny_gemma3):
    model = tiny_gemma3
    cache = model.new_cache(1, 512)
    long = prompt(4, 400)
    prefill(model, cache, long)
    prefill(model, cache, prompt(5, 30))            # long goes to RAM
    # a prompt sharing only the first 100 tokens: the rings kept positions 144..399, not the window before 100
    branch = long[:100] + prompt(6, 10)
    restored_before = cache.prompt_cache.restored
    logits = prefill(model, cache, branch)
    assert cache.prompt_cache.restored == restored_before
    np.testing.assert_array_equal(logits, fresh(model, branch))


def test_the_budget_is_never_exceeded_and_the_oldest_go_first(tiny_llama):
    model = tiny_llama
    probe = KVCache(model.config.n_layers, 2, 512, model.config.n_kv_heads, model.config.head_dim,
                    ram_budget=1 << 30)
    state_bytes = 100 * probe.nbytes_per_token     # a 100-token state
    budget = int(2.5 * state_bytes)
    cache = KVCache(model.config.n_layers, 2, 512, model.config.n_kv_heads, model.config.head_dim,
                    ram_budget=budget)
    prompts = [prompt(10 + i, 100) for i in range(7)]
    for p in prompts:
        prefill(model, cache, p)
        ram = cache.prompt_cache
        assert ram.nbytes <= budget
        assert ram.nbytes == sum(state.nbytes for state in ram.entries.values())
    # two slots hold the last two prompts; RAM the two before them (a third does not fit)
    held = {tuple(cache.tokens[slot]) for slot in range(2)}
    assert held == {tuple(prompts[-1]), tuple(prompts[-2])}
    assert [list(state.tokens) for state in cache.prompt_cache.entries.values()] == prompts[-4:-2]
    assert cache.prompt_cache.dropped >= 1
    # a state larger than the whole budget is not kept (and nothing else is dropped for it)
    small = KVCache(model.config.n_layers, 1, 512, model.config.n_kv_heads, model.config.head_dim,
                    ram_budget=state_bytes // 2)
    prefill(model, small, prompts[0])
    prefill(model, small, prompts[1])
    assert len(small.prompt_cache) == 0 and small.prompt_cache.nbytes == 0


def test_a_state_lent_for_its_shared_prefix_stays_for_its_own_conversation(tiny_llama):
    """Two conversations with one system prompt over one slot: the second restores the first's state for the
    shared prefix, and the first's state must still be in RAM for its next turn (it was taken out and lost)."""
    model = tiny_llama
    cache = KVCache(model.config.n_layers, 1, 512, model.config.n_kv_heads, model.config.head_dim, np.float16,
                    model.config.layer_windows, model.max_batch_tokens, ram_budget=64 << 20)
    system = prompt(30, 60)
    first, second = system + prompt(31, 40), system + prompt(32, 40)
    prefill(model, cache, first)
    prefill(model, cache, prompt(33, 30))           # the slot goes elsewhere: first is saved
    prefill(model, cache, second)                   # lent first's 60 shared tokens
    assert cache.prompt_cache.restored_tokens == 60
    assert any(list(state.tokens) == first for state in cache.prompt_cache.entries.values())
    turn_two = first + prompt(34, 10)
    logits = prefill(model, cache, turn_two)        # first comes back whole
    assert cache.prompt_cache.restored_tokens == 60 + len(first)
    np.testing.assert_array_equal(logits, fresh(model, turn_two))


def test_a_prompt_extending_the_slot_saves_nothing(tiny_llama):
    cache = tiny_llama.new_cache(1, 512)
    first = prompt(20, 50)
    prefill(tiny_llama, cache, first)
    prefill(tiny_llama, cache, first + prompt(21, 10))
    assert cache.prompt_cache.saved == 0


def test_a_zero_budget_keeps_no_prompt_cache(tiny_llama, monkeypatch):
    monkeypatch.setenv(CACHE_RAM_ENV, "0")
    assert tiny_llama.new_cache(1, 64).prompt_cache is None
    monkeypatch.setenv(CACHE_RAM_ENV, "512MiB")
    assert tiny_llama.new_cache(1, 64).prompt_cache.budget == 512 << 20
    monkeypatch.setenv(CACHE_RAM_ENV, "lots")
    with pytest.raises(ValueError, match=f"{CACHE_RAM_ENV}: 'lots' is not a size"):
        tiny_llama.new_cache(1, 64)
    monkeypatch.delenv(CACHE_RAM_ENV)
    assert 0 < default_cache_ram() <= 8 << 30


@pytest.mark.parametrize("text, expected", [("0", 0), ("1000000", 1000000), ("512MiB", 512 << 20),
                                            ("2g", 2 << 30), ("1.5GB", 1500000000), ("64 kib", 64 << 10)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


def test_the_model_api_reports_restored_tokens_as_cached(tiny_llama_path, monkeypatch):
    import localllm
    monkeypatch.setenv(CACHE_RAM_ENV, "64MiB")
    model = localllm.load(tiny_llama_path, num_ctx=256, n_slots=1)
    first = "a long first conversation " * 4
    model.generate(first, max_tokens=3, temperature=0)
    model.generate("something else entirely", max_tokens=3, temperature=0)
    again = model.generate(first + " and more", max_tokens=3, temperature=0, details=True)
    assert again.usage.cached_tokens >= len(model.tokenize(first)) - 1
    assert model.cache.prompt_cache.restored == 1
