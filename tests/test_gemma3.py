"""Gemma 3's dataflow on a tiny random model, transformers as the float oracle; the sliding-window ring cache."""
import numpy as np
import pytest

from localllm.formats.gguf import read_gguf
from localllm.kv_cache import KVCache
from localllm.models.decoder import DecoderModel

import transformers  # noqa: F401  (the float oracle; in the test extra)
BACKENDS = ["ref", "fast"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_gemma3 import hf_tiny_gemma3, write_gemma3_gguf
    hf = hf_tiny_gemma3()
    return hf, read_gguf(write_gemma3_gguf(hf, tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf"))


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n)


def _run(model, tokens, cache, pieces=None):
    """Logits of every position: one call, or consecutive calls of the given sizes (decode when 1)."""
    pieces = pieces or [len(tokens)]
    out, start = [], 0
    for size in pieces:
        positions = np.arange(start, start + size)
        out.append(model.forward(tokens[positions], positions, np.zeros(size, dtype=np.int64), cache))
        start += size
    return np.concatenate(out)


def test_config_from_gguf(tiny):
    _, gguf_file = tiny
    c = DecoderModel.from_gguf(gguf_file, backend="ref").config
    assert c.architecture == "gemma3" and c.layer_windows == (8, 8, 0) and c.head_dim == 32
    assert c.layer_rope_theta == (1e4, 1e4, 1e6) and c.rope_style == "neox" and c.embedding_scale == pytest.approx(8.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(tiny, backend):
    """Past the window of 8 the local layers must see only the last 8 positions, as transformers does."""
    from tests.tiny_gemma3 import hf_logits
    hf, gguf_file = tiny
    model = DecoderModel.from_gguf(gguf_file, backend=backend)
    tokens = _tokens(40)
    expected = hf_logits(hf, tokens.tolist())                                   # (40, vocab)
    ours = _run(model, tokens, model.new_cache(1, 64, dtype=np.float32))
    tolerance = 1e-4 if backend == "ref" else 0.03                              # fast: int8 activations
    np.testing.assert_allclose(ours, expected, rtol=0, atol=tolerance * np.abs(expected).max())
    assert np.mean(ours.argmax(-1) == expected.argmax(-1)) >= (1.0 if backend == "ref" else 0.95)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ring_cache_decode_equals_full_recompute(tiny, backend):
    """Local layers keep a ring of 256 rows (window 8 + 128 batch tokens, rounded to the key chunk); 400
    positions wrap it. Prefill in pieces then decode one token at a time gives the logits of one pass over
    a cache that keeps every position."""
    _, gguf_file = tiny
    model = DecoderModel.from_gguf(gguf_file, backend=backend)
    c = model.config
    tokens = _tokens(400, seed=1)
    ring = model.new_cache(1, 512)
    assert ring.rows == (256, 256, 512)
    full = KVCache(c.n_layers, 1, 512, c.n_kv_heads, c.head_dim, ring.dtype, c.layer_windows, max_batch_tokens=4096)
    assert full.rows == (512, 512, 512)
    model.max_batch_tokens = 1000
    expected = _run(model, tokens, full)
    model.max_batch_tokens = 128
    got = _run(model, tokens, ring, [300] + [1] * 100)
    same = np.testing.assert_array_equal if backend == "fast" else \
        (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5))
    same(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_equals_one_shot(tiny, backend):
    _, gguf_file = tiny
    model = DecoderModel.from_gguf(gguf_file, backend=backend)
    tokens = _tokens(300, seed=2)
    one_shot = _run(model, tokens, model.new_cache(1, 512))
    model.max_batch_tokens = 7
    chunked = _run(model, tokens, model.new_cache(1, 512), [100, 1, 57, 142])
    same = np.testing.assert_array_equal if backend == "fast" else \
        (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5))
    same(chunked, one_shot)


def test_ring_refuses_a_batch_it_cannot_hold():
    from localllm.ops import attention_kernels
    cache = np.zeros((1, 1, 128, 8), dtype=np.float32)
    q, k = np.zeros((130, 1, 8), dtype=np.float32), np.zeros((130, 1, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="ring of 128 rows"):
        attention_kernels.attend(q, k, k, np.arange(200, 330), np.zeros(130, dtype=np.int64), cache, cache.copy(),
                                 10000.0, 8, "neox", window=8)


def test_prefix_reuse_with_rings(tiny):
    """A slot's tokens are reusable while its rings still hold the window before the shared prefix's end."""
    _, gguf_file = tiny
    model = DecoderModel.from_gguf(gguf_file, backend="fast")
    cache = model.new_cache(1, 512)                                              # rings of 256 rows
    history = _tokens(400, seed=3).tolist()
    slot = cache.allocate()
    _run(model, np.array(history), cache, [128, 128, 128, 16])
    cache.lengths[slot], cache.tokens[slot] = 400, history
    cache.release(slot)
    assert cache.usable_prefix(slot, history + [1, 2, 3]) == 400                 # the next turn: all reused
    assert cache.usable_prefix(slot, history[:390] + [7]) == 390                 # a few tokens back: still there
    assert cache.usable_prefix(slot, history[:100] + [7]) == 0                   # overwritten: start again
    # the reused prefix gives the same logits as a fresh prefill of the whole new prompt
    prompt = np.array(history + [5, 6, 7])
    fresh = _run(model, prompt, model.new_cache(1, 512), [128, 128, 128, 19])[-1]
    reused = model.forward(prompt[400:], np.arange(400, 403), np.zeros(3, dtype=np.int64), cache)[-1]
    np.testing.assert_array_equal(reused, fresh)
