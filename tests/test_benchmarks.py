"""benchmarks/bench_archs.py cannot rot: its random GGUFs are the architectures they claim (tiny shapes, every
registered family), Llama 3's RoPE factors are transformers', and a run of the script (localllm only, no peers)
prints the JSON it documents with the greedy tokens the numpy reference gives."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from localllm.formats.gguf import read_gguf
from localllm.models.decoder import DecoderModel

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_archs.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_archs  # noqa: E402  (benchmarks/bench_archs.py)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (F16 source, Q8_0 file) in the tiny shapes."""
    folder = tmp_path_factory.mktemp("bench_archs")
    files = {}
    for arch, shape in bench_archs.SHAPES.items():
        small = bench_archs.tiny(shape)
        source, q8 = folder / f"{arch}-f16.gguf", folder / f"{arch}-q8_0.gguf"
        bench_archs.write_source(source, small)
        bench_archs.write_q8_0(q8, source, small)
        files[arch] = source, q8
    return files


@pytest.mark.parametrize("arch", list(bench_archs.SHAPES))
def test_random_file_is_the_architecture_it_claims(tiny_files, arch):
    shape = bench_archs.tiny(bench_archs.SHAPES[arch])
    model = DecoderModel.from_gguf(read_gguf(tiny_files[arch][1]), backend="ref")  # refuses any unused tensor
    c = model.config
    assert (c.architecture, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size) == \
        (arch, shape.dim, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.hidden_dim,
         shape.vocab_size)
    assert c.tie_embeddings == shape.tie_embeddings
    assert (c.block.qkv_bias, c.block.qk_norm, c.block.post_attn_norm) == (shape.qkv_bias, shape.qk_norm,
                                                                           shape.post_norms)
    assert c.attention_softcap == shape.attention_softcap and c.final_logit_softcap == shape.final_logit_softcap
    if arch == "gemma2":       # sliding window on layers 0, 2, ...
        assert c.layer_windows == (shape.sliding_window, 0)
    if arch == "llama":
        np.testing.assert_allclose(c.rope_freq_factors, bench_archs.llama3_rope_factors(shape.head_dim,
                                                                                        shape.rope_theta))
    tokens, _ = bench_archs.byte_level_vocab(shape.vocab_size)
    assert len(set(tokens)) == shape.vocab_size


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_q8_0_file_is_the_source_quantized(tiny_files, arch):
    source, q8 = (gguf.GGUFReader(str(path)) for path in tiny_files[arch])
    q8_tensors = {t.name: t for t in q8.tensors}
    assert [t.name for t in source.tensors] == list(q8_tensors)
    for tensor in source.tensors:
        other = q8_tensors[tensor.name]
        values = np.asarray(tensor.data, dtype=np.float32)
        if tensor.data.ndim == 2:
            assert other.tensor_type == gguf.GGMLQuantizationType.Q8_0
            restored = gguf.quants.dequantize(other.data, other.tensor_type)
            scale = np.abs(values).max(axis=1, keepdims=True) / 127
            assert np.abs(restored - values).max() <= scale.max() * 0.51 + 1e-3 * scale.max()
            assert 0.5 < values.std() * math.sqrt(values.shape[1]) < 1.5     # N(0, 1/cols)
        else:
            np.testing.assert_array_equal(np.asarray(other.data), values)


def test_llama3_rope_factors_are_transformers():
    import torch  # noqa: F401
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    scaled, _ = _compute_llama3_parameters(config, "cpu")
    plain = 500000.0 ** -(np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(bench_archs.llama3_rope_factors(64, 500000.0), plain / scaled.double().numpy(),
                               rtol=1e-5)


def test_script_prints_its_json_without_peers(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("LOCALLLM_LLAMA_BENCH", "LOCALLLM_IK_LLAMA_BENCH", "LOCALLLM_LLAMA_QUANTIZE")}
    command = [sys.executable, str(SCRIPT), "--tiny", "--quick", "--archs", "llama", "--mixes", "q8_0,q4_k_m",
               "--cache-dir", str(tmp_path), "--prompt-tokens", "40", "--decode-tokens", "6", "--threads", "2",
               "--quiet-below", "1", "--output", str(tmp_path / "out.json")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert json.loads((tmp_path / "out.json").read_text()) == result
    assert set(result["peers_skipped"]) == {"llama.cpp", "ik_llama.cpp"} and result["peers"] == {}
    assert (result["prompt_tokens"], result["decode_tokens"], result["rounds"]) == (40, 6, 1)
    q8, q4 = result["results"]
    assert (q8["arch"], q8["mix"], q4["mix"]) == ("llama", "q8_0", "q4_k_m")
    assert "llama-quantize" in q4["skipped"] and "localllm" not in q4
    assert q8["tensor_types"] == {"F32": 6, "Q8_0": 15}     # rope_freqs + 2 x 2 norms + output norm; 2 x 7 + embd
    local = q8["localllm"]
    assert local["prefill_tok_s"] > 0 and local["decode_tok_s"] > 0 and len(local["rounds"]) == 1
    assert "ratio_localllm_over" not in q8 and "faster_peer" not in q8
    assert "| tiny llama (llama) | q8_0 |" in done.stderr                # the markdown table

    # the worker's greedy tokens (after a 4-token prompt) are those of the fast path in this process, whose logits
    # sit on the numpy reference's (int8 activations: a random tiny model's near ties may break either way)
    fast, reference = (DecoderModel.from_gguf(read_gguf(q8["file"]), backend=b) for b in ("fast", "ref"))
    prompt = bench_archs.prompt_ids(bench_archs.SHORT_PROMPT, fast.config.vocab_size)
    first = [m.forward(prompt, np.arange(len(prompt)), np.zeros(len(prompt), dtype=np.int64), m.new_cache(1, 64))[-1]
             for m in (fast, reference)]
    assert np.abs(first[0] - first[1]).max() <= 0.05 * np.abs(first[1]).max()
    cache = fast.new_cache(n_slots=1, n_ctx=64)
    logits = fast.forward(prompt, np.arange(len(prompt)), np.zeros(len(prompt), dtype=np.int64), cache)
    expected = [int(logits[-1].argmax())]
    for position in range(len(prompt), len(prompt) + 3):
        expected.append(int(fast.forward([expected[-1]], [position], [0], cache)[-1].argmax()))
    assert local["first_tokens"][:4] == expected
