"""ops.decoder_step: the layer loop as one parallel launch gives the per-op loop's bits, caches included,
for the Llama block, for Gemma 3's (QK-norm, post-norms, GeGLU, sliding-window rings, two RoPE bases,
four weight types) and for the other blocks' features (Qwen 2's q/k/v biases, Gemma 2's soft-capped scores,
Llama 3 / LongRoPE frequency factors and cos/sin scale, NEOX RoPE)."""
from __future__ import annotations

import time
from dataclasses import replace

import numba
import numpy as np
import pytest
from numba import njit, prange

from localllm.formats.gguf import read_gguf
from localllm.kv_cache import ContextLengthExceeded
from localllm.models.decoder import DecoderModel as LlamaModel
from localllm.quants.intrinsics import atomic_add
from localllm.quants.kernels import cpu_has_avx2
from localllm.quants.synthetic import random_weight
from tests.tiny_models import write_tiny_llama

pytestmark = pytest.mark.skipif(not cpu_has_avx2(), reason="the one-launch layers use the AVX2 row tasks")


# (name, types of the layer matrices, dim, hidden_dim); "Q4_K_M" mixes like llama.cpp's file type: Q6_K for
# attn_v and ffn_down, Q4_K for the rest; "gemma3" is a tiny Gemma 3 with the types of the real Q4_K_M file
# (every model takes the same program, compiled once; each type's row ranges are compiled once for all models)
MODELS = [("Q4_1", "Q4_1", 64, 96), ("Q4_K_M", "Q4_K_Q6_K", 256, 512),
          ("gemma3", "Q4_K_Q5_0_Q6_K_Q8_0", 256, 512), ("features", "Q4_1", 64, 96)]
SECOND_TYPE_MATRICES = ("wv", "w_down")
GEMMA3_TYPES = {"wq": "Q5_0", "wk": "Q5_0", "wv": "Q8_0", "wo": "Q4_K", "w_gate": "Q5_0", "w_up": "Q5_0",
                "w_down": "Q6_K"}


def tiny_gemma3_model(folder) -> LlamaModel:
    from tests.tiny_gemma3 import hf_tiny_gemma3, write_gemma3_gguf
    hf = hf_tiny_gemma3(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64, window=8)
    model = LlamaModel.from_gguf(read_gguf(write_gemma3_gguf(hf, folder / "tiny-gemma3.gguf")), backend="fast")
    for i, layer in enumerate(model.layers):
        for name, ggml_type in GEMMA3_TYPES.items():
            setattr(layer, name, random_weight(ggml_type, *getattr(layer, name).shape, seed=10 * i))
    return model


def with_other_features(model: LlamaModel) -> LlamaModel:
    """The tiny Q4_1 Llama with what the other registered blocks switch on: q/k/v biases (Qwen 2), soft-capped
    attention scores (Gemma 2), RoPE frequency factors and a cos/sin scale (Llama 3, LongRoPE), NEOX RoPE, a
    sliding window on layer 0. Random weights: the bits of the two paths are compared, not a model's answer."""
    c = model.config
    rng = np.random.default_rng(5)
    model.config = replace(c, block=replace(c.block, qkv_bias=True), attention_softcap=3.0, rope_style="neox",
                           rope_freq_factors=tuple(np.linspace(1.0, 8.0, c.n_rot // 2)), rope_attention_factor=1.1,
                           layer_windows=(8,) + (0,) * (c.n_layers - 1))
    for layer in model.layers:
        layer.q_bias = rng.normal(0, 0.5, c.q_dim).astype(np.float32)
        layer.k_bias = rng.normal(0, 0.5, c.kv_dim).astype(np.float32)
        layer.v_bias = rng.normal(0, 0.5, c.kv_dim).astype(np.float32)
    model._step, model._step_checked = None, False
    return model


@pytest.fixture(scope="module", params=MODELS, ids=lambda p: p[0])
def model(request, tmp_path_factory) -> LlamaModel:
    weight_type, entry, dim, hidden_dim = request.param
    if weight_type == "gemma3":
        model = tiny_gemma3_model(tmp_path_factory.mktemp("step"))
        check_step(model, entry)
        return model
    k_quants = "_K" in weight_type
    path = write_tiny_llama(tmp_path_factory.mktemp("step") / f"tiny-{weight_type}.gguf", dim=dim,
                            hidden_dim=hidden_dim, n_layers=2, n_heads=8, n_kv_heads=2, n_ctx=512,
                            weight_type="Q8_0" if k_quants else entry, seed=3)
    model = LlamaModel.from_gguf(read_gguf(path), backend="fast")
    if weight_type == "features":
        model = with_other_features(model)
    if k_quants:  # gguf-py writes no K-quants: random K-quant blocks of the same shapes
        for i, layer in enumerate(model.layers):
            for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                ggml_type = "Q6_K" if weight_type == "Q6_K" or name in SECOND_TYPE_MATRICES else "Q4_K"
                setattr(layer, name, random_weight(ggml_type, *getattr(layer, name).shape, seed=10 * i))
    check_step(model, entry)
    return model


def check_step(model, layer_types):
    """The model takes the one-launch step, whose type slots hold its layer matrices' types (and its output
    matrix's when there is room: then the head runs in the launch too)."""
    assert model._one_launch_layers(1) is not None
    assert model._weight_types().replace("/", "_") == layer_types
    assert set(model._weight_types().split("/")) <= set(model._step.types)
    assert model._step.has_head == (model.output.ggml_type in model._step.types)


def forward(model, one_launch: bool, cache, tokens, positions, slots):
    model._one_launch_layers(1)  # made once
    step, model._step = model._step, (model._step if one_launch else None)
    try:
        return model.forward(tokens, positions, slots, cache)
    finally:
        model._step = step


def fresh_pair(model, dtype=None, prompt_tokens=150, n_slots=2):
    """Two caches holding the same prompt in slot 0 (written by the per-op path)."""
    caches = [model.new_cache(n_slots, 512, dtype=dtype) for _ in range(2)]
    prompt = np.arange(prompt_tokens) % 250 + 3
    for cache in caches:
        forward(model, False, cache, prompt, np.arange(prompt_tokens), np.zeros(prompt_tokens, dtype=np.int64))
    return caches


def assert_same(model, caches, tokens, positions, slots):
    one = forward(model, True, caches[0], tokens, positions, slots)
    per_op = forward(model, False, caches[1], tokens, positions, slots)
    np.testing.assert_array_equal(one, per_op)
    for (_, k0, v0), (_, k1, v1) in zip(caches[0].groups, caches[1].groups):
        np.testing.assert_array_equal(k0, k1)
        np.testing.assert_array_equal(v0, v1)
    return one


def test_decode_matches_per_op_bit_for_bit(model):
    caches = fresh_pair(model)  # 150 cached keys: two attention chunks of 128
    for i in range(3):
        logits = assert_same(model, caches, [40 + i], [150 + i], [0])
        assert logits.shape == (1, model.config.vocab_size) and np.isfinite(logits).all()


def test_batch_across_slots_and_within_a_slot(model):
    caches = fresh_pair(model)
    # two new tokens of slot 0 (the second attends to the first, written in the same launch) and the first
    # tokens of slot 1
    assert_same(model, caches, [7, 8, 9, 10], [150, 151, 0, 1], [0, 0, 1, 1])


def test_largest_batch_and_the_next_size_up(model):
    caches = fresh_pair(model, prompt_tokens=20)
    n = model._step.max_tokens
    assert_same(model, caches, np.arange(n) + 5, np.arange(20, 20 + n), np.zeros(n, dtype=np.int64))
    assert model._one_launch_layers(n + 1) is None  # prefill-sized batches take the per-op path


def test_decode_past_a_wrapped_ring(model):
    """Gemma 3's local layers keep rings of 256 rows (window 8): 300 cached positions have wrapped them."""
    caches = fresh_pair(model, prompt_tokens=300)
    if model.config.layer_windows:
        assert caches[0].rows[0] == 256 < caches[0].n_ctx
    for i in range(3):
        assert_same(model, caches, [40 + i, 3], [300 + i, i], [0, 1])


def test_float32_cache(model):
    caches = fresh_pair(model, dtype=np.float32)
    assert_same(model, caches, [11, 12], [150, 0], [0, 1])


def test_one_worker(model):
    caches = fresh_pair(model)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert_same(model, caches, [5, 6], [150, 151], [0, 0])
    finally:
        numba.set_num_threads(threads)


def test_phase_timers_add_up_each_kind_of_phase(model):
    """``start_timing`` / ``phase_seconds``: every phase kind the model has takes time, the parts fit in the
    workers' whole program, and that fits in the wall time of the runs; timing changes no bit."""
    from localllm.ops.decoder_step import PHASE_TIME_NAMES
    caches = fresh_pair(model)
    step = model._one_launch_layers(1)
    with pytest.raises(RuntimeError, match="start_timing"):
        type(step).for_model(model).phase_seconds()
    step.start_timing()
    started = time.perf_counter()
    for i in range(3):
        assert_same(model, caches, [40 + i], [150 + i], [0])
    wall = time.perf_counter() - started
    seconds = step.phase_seconds()
    assert step.stop_timing() == seconds
    with pytest.raises(RuntimeError, match="start_timing"):
        step.phase_seconds()
    assert seconds["runs"] == 3 and set(seconds) == {"runs", *PHASE_TIME_NAMES}
    has_post_norms = model.config.block.post_attn_norm or model.config.block.post_ffn_norm
    absent = {"post_norms"} if not has_post_norms else set()
    absent |= {"head_matmul"} if not step.has_head else set()   # the head runs in the launch if its type has a slot
    for name in PHASE_TIME_NAMES:
        assert (seconds[name] > 0) == (name not in absent), name
    parts = sum(seconds[name] for name in PHASE_TIME_NAMES if name != "worker_total")
    assert parts <= seconds["worker_total"] * 1.0001
    assert seconds["worker_total"] * seconds["runs"] < wall


def test_bad_slot_and_context_overflow_raise_like_the_per_op_path(model):
    cache = model.new_cache(1, 160)
    forward(model, False, cache, np.arange(10) + 3, np.arange(10), np.zeros(10, dtype=np.int64))
    with pytest.raises(IndexError, match="slots must lie"):
        forward(model, True, cache, [5], [10], [3])
    with pytest.raises(ContextLengthExceeded):
        forward(model, True, cache, [5], [160], [0])
    with pytest.raises(IndexError, match="must not be negative"):
        forward(model, True, cache, [5], [-1], [0])


def test_the_compiled_forms_take_the_arguments_of_a_run(model, monkeypatch):
    """``argument_types`` (what a fresh install compiles before any batch, in two processes) are the types of
    what a run hands the workers, for float16 and float32 caches."""
    from localllm.ops import decoder_step
    seen = []
    real = decoder_step.launch_for

    def recording(kind):
        worker, phases, launch = real(kind)

        def launch_and_record(worker_function, rows, phases, args, n_workers):
            seen.append((kind, (numba.typeof(rows), numba.typeof(phases), numba.typeof(args))))
            launch(worker_function, rows, phases, args, n_workers)
        return worker, phases, launch_and_record

    monkeypatch.setattr(decoder_step, "launch_for", recording)
    for dtype in (np.float16, np.float32):
        forward(model, True, model.new_cache(1, 64, dtype=dtype), [3, 4], [0, 1], [0, 0])
    assert [kind for kind, _ in seen] == ["f16", "f32"]
    for kind, arguments in seen:
        assert arguments == decoder_step.worker_types(kind)
    assert "rows-" + model._step.types[0] in model._step.units("f16")


def test_not_used_for_float_weights_or_too_many_types(tmp_path):
    from localllm.ops.decoder_step import DecoderLayersStep
    float_model = LlamaModel.from_gguf(read_gguf(write_tiny_llama(tmp_path / "f32.gguf")), backend="fast")
    assert DecoderLayersStep.for_model(float_model) is None
    q8 = LlamaModel.from_gguf(read_gguf(write_tiny_llama(tmp_path / "q8.gguf", weight_type="Q8_0")), backend="fast")
    assert DecoderLayersStep.for_model(q8) is not None
    q8.layers[1].wv = float_model.layers[1].wv  # one F32 matrix among Q8_0 ones
    assert DecoderLayersStep.for_model(q8) is None
    for name, ggml_type in zip(("wv", "wq", "wk", "wo"), ("Q4_0", "Q4_1", "Q5_0", "Q5_1")):
        setattr(q8.layers[1], name, random_weight(ggml_type, *getattr(float_model.layers[1], name).shape))
    assert DecoderLayersStep.for_model(q8) is None  # five types: more than the slots


def test_ref_backend_never_uses_it(tmp_path):
    model = LlamaModel.from_gguf(read_gguf(write_tiny_llama(tmp_path / "q8.gguf", weight_type="Q8_0")),
                                 backend="ref")
    assert model._one_launch_layers(1) is None


@njit(parallel=True)
def _count_together(counters, n_workers, per_worker):
    for _worker in prange(n_workers):
        for _ in range(per_worker):
            atomic_add(counters, 1, 1)
    return counters[1]


def test_atomic_add_loses_no_increment():
    counters = np.zeros(3, dtype=np.int64)
    assert _count_together(counters, 4, 50_000) == 200_000
    assert counters[0] == counters[2] == 0
