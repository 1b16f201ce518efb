"""Llama dataflow on tiny random models: the batch contract and cache consistency."""
import numpy as np
import pytest

from localllm.formats.gguf import read_gguf
from localllm.kv_cache import ContextLengthExceeded
from localllm.models.decoder import DecoderModel as LlamaModel
from localllm.arch.spec import UnsupportedArchitecture
from tests.tiny_models import write_tiny_llama

BACKENDS = ["ref", "fast"]


@pytest.fixture(scope="module", params=["F32", "Q8_0", "Q4_1"])
def tiny_model_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / f"tiny-{request.param}.gguf"
    return write_tiny_llama(path, weight_type=request.param, tie_embeddings=request.param != "Q4_1")


def _tokens(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=n)


def _full_logits(model, tokens):
    cache = model.new_cache(n_slots=1, n_ctx=64)
    n = len(tokens)
    return model.forward(tokens, np.arange(n), np.zeros(n, dtype=np.int64), cache)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_equals_one_shot(tiny_model_file, backend):
    model = LlamaModel.from_gguf(read_gguf(tiny_model_file), backend=backend)
    tokens = _tokens(23)
    one_shot = _full_logits(model, tokens)                       # (23, vocab)
    cache = model.new_cache(n_slots=1, n_ctx=64)
    chunks = []
    for start, stop in [(0, 5), (5, 6), (6, 17), (17, 23)]:
        pos = np.arange(start, stop)
        chunks.append(model.forward(tokens[start:stop], pos, np.zeros_like(pos), cache))
    np.testing.assert_allclose(np.concatenate(chunks), one_shot, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decode_equals_full_recompute(tiny_model_file, backend):
    model = LlamaModel.from_gguf(read_gguf(tiny_model_file), backend=backend)
    tokens = _tokens(12, seed=2)
    cache = model.new_cache(n_slots=1, n_ctx=64)
    model.forward(tokens[:8], np.arange(8), np.zeros(8, dtype=np.int64), cache)
    for pos in range(8, 12):
        step = model.forward(tokens[pos:pos + 1], [pos], [0], cache)[0]
        recompute = _full_logits(model, tokens[:pos + 1])[-1]
        np.testing.assert_allclose(step, recompute, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_sequences_equal_separate_runs(tiny_model_file, backend):
    """Decode of several sequences in one call == each sequence alone (slots keep them apart)."""
    model = LlamaModel.from_gguf(read_gguf(tiny_model_file), backend=backend)
    prompts = [_tokens(n, seed=10 + n) for n in (3, 7, 5)]
    cache = model.new_cache(n_slots=3, n_ctx=64)
    # prefill all three prompts in one mixed batch
    tokens = np.concatenate(prompts)
    positions = np.concatenate([np.arange(len(p)) for p in prompts])
    slots = np.concatenate([np.full(len(p), s) for s, p in enumerate(prompts)])
    last = np.cumsum([len(p) for p in prompts]) - 1
    batched = model.forward(tokens, positions, slots, cache, logits_for=last)
    # then one decode step for all three at once
    next_tokens = np.array([1, 2, 3])
    step = model.forward(next_tokens, [len(p) for p in prompts], [0, 1, 2], cache)
    for s, p in enumerate(prompts):
        alone = _full_logits(model, np.concatenate([p, next_tokens[s:s + 1]]))
        np.testing.assert_allclose(batched[s], alone[-2], rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(step[s], alone[-1], rtol=2e-4, atol=2e-4)


def test_fast_backend_matches_ref(tiny_model_file):
    gguf_file = read_gguf(tiny_model_file)
    tokens = _tokens(9, seed=4)
    ref = _full_logits(LlamaModel.from_gguf(gguf_file, backend="ref"), tokens)
    fast = _full_logits(LlamaModel.from_gguf(gguf_file, backend="fast"), tokens)
    # the fast path quantizes activations to 8 bits for quantized weights: compare the ranking and the scale
    assert np.corrcoef(ref.ravel(), fast.ravel())[0, 1] > 0.999
    np.testing.assert_array_equal(ref.argmax(-1), fast.argmax(-1))


def test_position_past_context_is_refused(tiny_llama_path):
    model = LlamaModel.from_gguf(read_gguf(tiny_llama_path), backend="ref")
    cache = model.new_cache(n_slots=1, n_ctx=8)
    with pytest.raises(ContextLengthExceeded):
        model.forward(_tokens(9), np.arange(9), np.zeros(9, dtype=np.int64), cache)


def test_config_and_unsupported_architecture(tiny_llama_path, tmp_path):
    config = LlamaModel.from_gguf(read_gguf(tiny_llama_path)).config
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim) == (64, 2, 4, 2, 16)
    assert config.tie_embeddings and config.vocab_size == 259
    import gguf
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba9")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(UnsupportedArchitecture, match=r"'mamba9'.*supported: .*gemma3.*llama"):
        LlamaModel.from_gguf(read_gguf(path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_cache_is_close_to_float32(tiny_model_file, backend):
    """The cache dtype only rounds K/V: float16 and float32 caches give nearly the same logits, same ranking."""
    model = LlamaModel.from_gguf(read_gguf(tiny_model_file), backend=backend)
    assert model.new_cache(1, 8).dtype == (np.float32 if backend == "ref" else np.float16)
    tokens = _tokens(20, seed=6)
    logits = {}
    for dtype in (np.float16, np.float32):
        cache = model.new_cache(n_slots=1, n_ctx=32, dtype=dtype)
        assert cache.dtype == dtype and cache.k[0].dtype == dtype
        logits[dtype] = model.forward(tokens, np.arange(20), np.zeros(20, dtype=np.int64), cache)
    np.testing.assert_allclose(logits[np.float16], logits[np.float32], rtol=0, atol=0.02 * np.abs(logits[np.float32]).max())
    np.testing.assert_array_equal(logits[np.float16].argmax(-1), logits[np.float32].argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_batches_run_in_pieces_with_the_same_results(tiny_model_file, backend):
    """A batch longer than max_batch_tokens goes through the layers in pieces: the same logits (for any
    logits_for, in its order, repeats allowed) and the same cache as one pass."""
    model = LlamaModel.from_gguf(read_gguf(tiny_model_file), backend=backend)
    tokens = _tokens(40, seed=5)
    positions, slots = np.arange(40), np.zeros(40, dtype=np.int64)
    results = {}
    for max_batch_tokens in (1000, 16, 7):
        model.max_batch_tokens = max_batch_tokens
        cache = model.new_cache(n_slots=1, n_ctx=64)
        every = model.forward(tokens, positions, slots, cache)
        picked = model.forward(tokens[:3], positions[:3], slots[:3], model.new_cache(1, 64), logits_for=[2, 0, 2])
        results[max_batch_tokens] = (every, picked, np.stack(cache.k), np.stack(cache.v))
    # the fast kernels give a token the same bits in any batch; numpy's BLAS (ref) rounds by batch shape
    same = np.testing.assert_array_equal if backend == "fast" else \
        (lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5))
    for every, picked, k, v in (results[16], results[7]):
        same(every, results[1000][0])
        same(picked, results[1000][1])
        same(k, results[1000][2])
        same(v, results[1000][3])
    model.max_batch_tokens = 7
    cache = model.new_cache(n_slots=1, n_ctx=64)
    wanted = model.forward(tokens, positions, slots, cache, logits_for=[39, 3, 20, 3, -1])
    np.testing.assert_array_equal(wanted[1], wanted[3])
    same(wanted, results[1000][0][[39, 3, 20, 3, 39]])
    with pytest.raises(IndexError, match="logits_for"):
        model.forward(tokens, positions, slots, model.new_cache(1, 64), logits_for=[40])
    with pytest.raises(ValueError, match="one length"):
        model.forward(tokens, positions[:30], slots, model.new_cache(1, 64))


def test_kv_cache_pages_are_lazy_and_zero():
    from localllm.kv_cache import KVCache
    cache = KVCache(n_layers=2, n_slots=3, n_ctx=1000, n_kv_heads=2, head_dim=64)
    [(layers, k, v)] = cache.groups
    assert layers == (0, 1) and k.shape == (2, 3, 2, 1000, 64)
    assert k.dtype == np.float16 and k.flags.writeable and k.flags.c_contiguous
    assert not k.any() and not v.any()
    cache.k[1][2, 1, 999] = 1.5
    assert k[1, 2, 1, 999, 0] == 1.5 and k.sum() == 1.5 * 64


def test_unused_tensors_and_unknown_rope_scaling_are_load_errors(tmp_path):
    """A tensor the dataflow would not read and a RoPE scaling the engine does not implement refuse to load
    instead of giving silently wrong logits; a Llama 3 file's rope_freqs is read (factors of 1 change nothing,
    others change the logits; the wrong length is an error). Llama 3 against transformers: tests/test_archs.py."""
    import gguf
    from localllm.arch.spec import UnsupportedModelFeature
    path = write_tiny_llama(tmp_path / "plain.gguf")
    source = read_gguf(path)

    def rewrite(name: str, extra_tensor: tuple[str, np.ndarray] | None, scaling: bool):
        target = tmp_path / name
        writer = gguf.GGUFWriter(str(target), "llama")
        for key, value in source.metadata.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            else:
                writer.add_string(key, str(value))
        if scaling:
            writer.add_string("llama.rope.scaling.type", "yarn")
            writer.add_float32("llama.rope.scaling.factor", 4.0)
        for tensor_name, tensor in source.tensors.items():
            writer.add_tensor(tensor_name, np.asarray(tensor.data).reshape(tensor.shape))
        if extra_tensor:
            writer.add_tensor(*extra_tensor)
        writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
        return read_gguf(target)

    def logits(model):
        cache = model.new_cache(1, 64, np.float32)
        return model.forward(np.arange(1, 40), np.arange(39), np.zeros(39, dtype=np.int64), cache)

    plain = logits(LlamaModel.from_gguf(rewrite("same.gguf", None, False), backend="ref"))
    rope_dim = LlamaModel.from_gguf(source).config.n_rot
    ones = LlamaModel.from_gguf(rewrite("ones.gguf", ("rope_freqs.weight", np.ones(rope_dim // 2, np.float32)), False),
                                backend="ref")
    np.testing.assert_array_equal(logits(ones), plain)
    slower = np.linspace(1, 8, rope_dim // 2).astype(np.float32)
    stretched = LlamaModel.from_gguf(rewrite("llama3.gguf", ("rope_freqs.weight", slower), False), backend="ref")
    assert stretched.config.rope_freq_factors == tuple(float(f) for f in slower)
    assert np.abs(logits(stretched) - plain).max() > 1e-3
    with pytest.raises(ValueError, match="frequency factors"):
        LlamaModel.from_gguf(rewrite("short.gguf", ("rope_freqs.weight", np.ones(3, np.float32)), False))
    with pytest.raises(UnsupportedModelFeature, match=r"blk\.0\.attn_q\.bias"):
        LlamaModel.from_gguf(rewrite("bias.gguf", ("blk.0.attn_q.bias", np.ones(64, np.float32)), False))
    with pytest.raises(UnsupportedModelFeature, match="RoPE scaling 'yarn'"):
        LlamaModel.from_gguf(rewrite("yarn.gguf", None, True))
