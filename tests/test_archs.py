"""Every llama-family architecture of the registry on a tiny random model, transformers as the float oracle:
Llama 3.x RoPE (rope_freqs), Mistral's sliding window, Qwen 2 (biases; tied and untied output), Qwen 3 (head
norms, head_dim != dim / n_heads), Phi-3 (fused matrices; LongRoPE with partial rotation; a window), Gemma 2
(alternate-layer window, soft-caps). Written as llama.cpp's converter lays the files out (tests/tiny_archs.py),
and cross-checked against the converter itself; chats through each family's own template format."""
from __future__ import annotations

import numpy as np
import pytest

from localllm.formats.gguf import read_gguf
from localllm.kv_cache import KVCache
from localllm.models.decoder import DecoderModel
from localllm.quants.kernels import cpu_has_avx2
from tests.test_decoder_step import forward as _per_op_or_one_launch  # the step on or off, same call
from tests.tiny_archs import (ARCHS, BYTE_VOCAB_SIZE, GEMMA_TEMPLATE, PHI3_LONGROPE, LLAMA3_ROPE, hf_logits, hf_tiny,
                              llama3_rope_factors, run_converter, save_hf_folder, write_gguf)

import transformers  # noqa: F401  (the float oracle; in the test extra)

NAMES = list(ARCHS)
PROMPT = 40            # tokens: longer than every sliding window (8)
REF_TOLERANCE = 1e-3   # |logit difference| of the float path against transformers


def _tokens(n: int, seed: int = 0, vocab: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n)


def _run(model, tokens, cache, pieces=None, slot: int = 0):
    """Logits of every position of one sequence: one call, or consecutive calls of the given sizes."""
    pieces = pieces or [len(tokens)]
    out, start = [], 0
    for size in pieces:
        positions = np.arange(start, start + size)
        out.append(model.forward(tokens[positions], positions, np.full(size, slot, dtype=np.int64), cache))
        start += size
    return np.concatenate(out)


class TinyModels:
    """The transformers models and their GGUF files, built on first use and kept for the module."""

    def __init__(self, folder):
        self.folder = folder
        self._hf, self._files = {}, {}

    def hf(self, name: str):
        if name not in self._hf:
            self._hf[name] = hf_tiny(ARCHS[name])
        return self._hf[name]

    def gguf(self, name: str, weight_type: str = "F32"):
        key = (name, weight_type)
        if key not in self._files:
            path = write_gguf(self.hf(name), ARCHS[name], self.folder / f"{name}-{weight_type}.gguf", weight_type)
            self._files[key] = read_gguf(path)
        return self._files[key]

    def model(self, name: str, weight_type: str = "F32", backend: str = "ref") -> DecoderModel:
        return DecoderModel.from_gguf(self.gguf(name, weight_type), backend=backend)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("archs"))


# ---------------------------------------------------------------------------- what the files declare
EXPECTED_CONFIG = {
    "llama3": dict(architecture="llama", rope_style="norm", layer_windows=(), head_dim=16, n_rot=16,
                   tie_embeddings=False, rope_freq_factors=tuple(llama3_rope_factors(LLAMA3_ROPE, 16))),
    "mistral": dict(architecture="llama", rope_style="norm", layer_windows=(8, 8), rope_theta=1e6),
    "qwen2": dict(architecture="qwen2", rope_style="neox", tie_embeddings=True, layer_windows=()),
    "qwen2_untied": dict(architecture="qwen2", rope_style="neox", tie_embeddings=False),
    "qwen3": dict(architecture="qwen3", rope_style="neox", head_dim=32, n_rot=32, q_dim=128),
    "phi3": dict(architecture="phi3", rope_style="neox", layer_windows=(), n_rot=16, rope_freq_factors=()),
    "phi3_longrope": dict(architecture="phi3", n_rot=8, n_ctx_orig=64,
                          rope_freq_factors=tuple(PHI3_LONGROPE["short_factor"]),
                          rope_freq_factors_long=tuple(PHI3_LONGROPE["long_factor"])),
    "phi3_window": dict(architecture="phi3", layer_windows=(8, 8)),
    "gemma2": dict(architecture="gemma2", rope_style="neox", layer_windows=(8, 0, 8), attention_softcap=2.0,
                   final_logit_softcap=3.0, tie_embeddings=True, embedding_scale=8.0),
}


@pytest.mark.parametrize("name", NAMES)
def test_config_from_gguf(tiny, name):
    config = tiny.model(name).config
    for attribute, expected in EXPECTED_CONFIG[name].items():
        assert getattr(config, attribute) == pytest.approx(expected), attribute
    if name == "phi3_longrope":  # sqrt(1 + ln(256 / 64) / ln 64): LongRoPE's sharpness correction
        assert config.rope_attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(64)))


# ---------------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("name", NAMES)
def test_float_logits_match_transformers(tiny, name):
    """The numpy reference on the F32 file gives transformers' logits (eager attention) at every position of a
    prompt longer than any window."""
    model = tiny.model(name)
    tokens = _tokens(PROMPT)
    expected = hf_logits(tiny.hf(name), tokens)                                 # (PROMPT, vocab)
    ours = _run(model, tokens, model.new_cache(1, 64))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=REF_TOLERANCE)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()


def test_longrope_long_factors_past_the_original_context(tiny):
    """A cache longer than the original 64 positions turns RoPE with the long factors, as transformers does
    for a sequence longer than that."""
    model = tiny.model("phi3_longrope")
    tokens = _tokens(80, seed=4)
    expected = hf_logits(tiny.hf("phi3_longrope"), tokens)
    ours = _run(model, tokens, model.new_cache(1, 128))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=REF_TOLERANCE)


@pytest.mark.parametrize("name", NAMES)
def test_fast_logits_close_to_transformers(tiny, name):
    model = tiny.model(name, backend="fast")
    tokens = _tokens(PROMPT)
    expected = hf_logits(tiny.hf(name), tokens)
    ours = _run(model, tokens, model.new_cache(1, 64))                          # float16 cache, int8 activations
    # within 0.005 of the largest logit on every architecture here (it was 0.001 with 16-bit activations)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=0.005 * np.abs(expected).max())
    assert np.mean(ours.argmax(-1) == expected.argmax(-1)) >= 0.95


# ---------------------------------------------------------------------------- the fast path agrees with itself
@pytest.mark.skipif(not cpu_has_avx2(), reason="the one-launch layers use the AVX2 row tasks")
@pytest.mark.parametrize("name", NAMES)
def test_one_launch_decode_equals_per_op(tiny, name):
    """On a Q8_0 file, the one-launch decode step (batches of up to 16 tokens) gives the per-op path's bits:
    logits and every cache row, within a slot and across slots, past the window."""
    model = tiny.model(name, "Q8_0", backend="fast")
    assert model._one_launch_layers(1) is not None
    caches = [model.new_cache(2, 128) for _ in range(2)]
    prompt = _tokens(30, seed=5)
    for cache in caches:
        _per_op_or_one_launch(model, False, cache, prompt, np.arange(30), np.zeros(30, dtype=np.int64))
    for step in range(3):
        batch = ([40 + step, 7, 8], [30 + 2 * step, 2 * step, 2 * step + 1], [0, 1, 1])
        one = _per_op_or_one_launch(model, True, caches[0], *map(np.array, batch))
        per_op = _per_op_or_one_launch(model, False, caches[1], *map(np.array, batch))
        np.testing.assert_array_equal(one, per_op)
    for (_, k0, v0), (_, k1, v1) in zip(caches[0].groups, caches[1].groups):
        np.testing.assert_array_equal(k0, k1)
        np.testing.assert_array_equal(v0, v1)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_equals_one_shot(tiny, name):
    model = tiny.model(name, "Q8_0", backend="fast")
    tokens = _tokens(300, seed=2)
    one_shot = _run(model, tokens, model.new_cache(1, 512))
    model.max_batch_tokens = 7
    chunked = _run(model, tokens, model.new_cache(1, 512), [100, 1, 57, 142])
    np.testing.assert_array_equal(chunked, one_shot)


@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_equals_recompute(tiny, name):
    """Prefill then one token at a time (rings of 256 rows on the windowed layers, wrapped by 300 positions)
    gives the logits of one pass over a cache that keeps every position."""
    model = tiny.model(name, "Q8_0", backend="fast")
    c = model.config
    tokens = _tokens(300, seed=1)
    full = KVCache(c.n_layers, 1, 512, c.n_kv_heads, c.head_dim, np.float16, c.layer_windows, max_batch_tokens=4096)
    model.max_batch_tokens = 1000
    expected = _run(model, tokens, full)
    model.max_batch_tokens = 128
    cache = model.new_cache(1, 512)
    if c.layer_windows:
        assert min(cache.rows) == 256
    got = _run(model, tokens, cache, [270] + [1] * 30)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", NAMES)
def test_batched_decode_equals_each_alone(tiny, name):
    """Three sequences decoded together, one token each per call, give each one's logits when decoded alone."""
    model = tiny.model(name, "Q8_0", backend="fast")
    prompts = [_tokens(n, seed=10 + n) for n in (30, 45, 20)]
    continuations = [_tokens(5, seed=20 + i) for i in range(3)]
    alone = []
    for prompt, continuation in zip(prompts, continuations):
        cache = model.new_cache(1, 128)
        _run(model, prompt, cache)
        alone.append([model.forward(continuation[[t]], [len(prompt) + t], [0], cache)[0] for t in range(5)])
    together = model.new_cache(3, 128)
    for slot, prompt in enumerate(prompts):
        _run(model, prompt, together, slot=slot)
    for t in range(5):
        logits = model.forward([c[t] for c in continuations], [len(p) + t for p in prompts], [0, 1, 2], together)
        for slot in range(3):
            np.testing.assert_array_equal(logits[slot], alone[slot][t])


# ---------------------------------------------------------------------------- llama.cpp's converter
# one model per family; SmolLM2's tokenizer (a pre-tokenizer the converter knows) for the GPT-2-style
# vocabularies, a SentencePiece tokenizer.model where the converter reads that first (Qwen 2 in transformers 5
# re-tokenizes SmolLM2's text with Qwen's own pre-tokenizer, which the converter does not recognize)
CONVERTED = {"llama3": "smollm2", "qwen3": "smollm2", "phi3_longrope": "smollm2", "qwen2_untied": "sentencepiece",
             "gemma2": "sentencepiece"}


def _sentencepiece_available() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def converted(llama_cpp_source, smollm2_gguf, tmp_path_factory):
    """name -> (transformers model, the converter's GGUF, our writer's GGUF of the same model): the converter
    runs once per model, two at a time."""
    from localllm.tokenizer import Tokenizer
    folder = tmp_path_factory.mktemp("converted")
    metadata = smollm2_gguf.metadata
    tokenizer_json = folder / "smollm2-tokenizer.json"
    Tokenizer.from_gguf_metadata(metadata).hf_tokenizer.save(str(tokenizer_json))
    smollm2_vocabulary = {name: metadata[f"tokenizer.ggml.{key}"] for name, key in (
        ("tokens", "tokens"), ("token_types", "token_type"), ("merges", "merges"), ("pre", "pre"),
        ("bos", "bos_token_id"), ("eos", "eos_token_id"))}
    names = [name for name, vocabulary in CONVERTED.items()
             if vocabulary == "smollm2" or _sentencepiece_available()]
    models, jobs, ours = {}, [], {}
    for name in names:
        arch = ARCHS[name]
        smollm2 = CONVERTED[name] == "smollm2"
        hf = hf_tiny(arch, vocab_size=len(smollm2_vocabulary["tokens"]) if smollm2 else BYTE_VOCAB_SIZE)
        hf_folder = save_hf_folder(hf, arch, folder / f"hf-{name}", tokenizer_json if smollm2 else None)
        jobs.append((hf_folder, folder / f"{name}-converter.gguf"))
        ours[name] = write_gguf(hf, arch, folder / f"{name}-ours.gguf",
                                vocabulary=smollm2_vocabulary if smollm2 else None)
        if not smollm2:  # localllm reads a folder's tokenizer.json (the converter reads the tokenizer.model)
            Tokenizer.from_gguf_metadata(read_gguf(ours[name]).metadata).hf_tokenizer.save(
                str(hf_folder / "tokenizer.json"))
        models[name] = hf
    run_converter(llama_cpp_source, jobs)
    return {name: (models[name], read_gguf(folder / f"{name}-converter.gguf"), read_gguf(ours[name]),
                   folder / f"hf-{name}") for name in names}


@pytest.fixture(params=list(CONVERTED))
def converted_model(request, converted):
    if request.param not in converted:
        pytest.skip(f"the converter reads {request.param}'s tokenizer.model with the 'sentencepiece' package, "
                    "which is not installed")
    return converted[request.param]


def test_converter_file_gives_transformers_logits(converted_model):
    """The converter's file gives transformers' logits, and those of our writer's file and of the Hugging Face
    folder it was converted from, loaded by localllm."""
    from localllm.formats.hf_decoder import read_hf_decoder
    hf, converter_file, our_file, hf_folder = converted_model
    tokens = _tokens(PROMPT, seed=6)
    expected = hf_logits(hf, tokens)
    folder = read_hf_decoder(hf_folder)
    models = [DecoderModel.from_gguf(converter_file, backend="ref"), DecoderModel.from_gguf(our_file, backend="ref"),
              DecoderModel(folder.config, folder.tensors, backend="ref")]
    theirs, ours, from_folder = (_run(model, tokens, model.new_cache(1, 64)) for model in models)
    np.testing.assert_allclose(theirs, expected, rtol=0, atol=REF_TOLERANCE)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(from_folder, theirs, rtol=0, atol=1e-5)


def test_converter_layout_equals_our_writer(converted_model):
    """Same tensors (names, shapes, types, values: the Q/K permutation, Gemma's +1, fused Phi-3 matrices, RoPE
    factor tensors) and the same architecture metadata keys and values as the converter's."""
    _, converter_file, our_file, _ = converted_model
    assert sorted(our_file.tensors) == sorted(converter_file.tensors)
    for name, theirs in converter_file.tensors.items():
        ours = our_file.tensors[name]
        assert (ours.shape, ours.ggml_type) == (theirs.shape, theirs.ggml_type), name
        np.testing.assert_allclose(np.asarray(ours.data), np.asarray(theirs.data), rtol=1e-6, atol=0, err_msg=name)
    arch = converter_file.architecture

    def arch_keys(gguf_file):
        return {key: value for key, value in gguf_file.metadata.items() if key.startswith(arch + ".")}

    theirs, ours = arch_keys(converter_file), arch_keys(our_file)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value), key


# ---------------------------------------------------------------------------- chat templates
CHATS = {  # family -> the tiny model whose file carries (or whose registry entry gives) the template, messages
    "qwen": ("qwen2", [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                       {"role": "user", "content": "And 3+3?"}]),
    "llama3": ("llama3", [{"role": "system", "content": "  Answer briefly. "}, {"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}]),
    "phi3": ("phi3", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]),
    "gemma": ("gemma2", [{"role": "user", "content": "Hi there "}, {"role": "assistant", "content": " Hello."},
                         {"role": "user", "content": "Count to 3."}]),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("family", list(CHATS))
def test_chat_renders_like_transformers(tiny, family, add_generation_prompt):
    """localllm renders a chat with the file's template (Gemma 2's file has none: the registry's Gemma turns)
    as transformers' apply_chat_template does with the family's own template; the turn markers are single
    special tokens."""
    import localllm
    from transformers import PreTrainedTokenizerFast
    name, messages = CHATS[family]
    arch = ARCHS[name]
    model = localllm.load(str(tiny.gguf(name).path), backend="ref")
    extra = {"date_string": "26 Jul 2024"} if family == "llama3" else {}
    ours = model.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=model.tokenizer.hf_tokenizer, bos_token=arch.bos,
                                           eos_token=arch.eos)
    template = GEMMA_TEMPLATE if arch.chat_template is None else arch.chat_template
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=add_generation_prompt, **extra)
    assert ours == expected
    ids = model.tokenize(ours, add_bos=False)
    assert ids == hf_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert any(i >= 256 for i in ids[1:])                                         # markers are one token each
