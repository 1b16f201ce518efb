"""SmolLM2-135M Q4_1 against the golden references: the numpy float path vs transformers."""
import numpy as np
import pytest

from localllm.models.decoder import DecoderModel as LlamaModel

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def ref_model(smollm2_gguf):
    return LlamaModel.from_gguf(smollm2_gguf, backend="ref")


def teacher_forced_logits(model, case):
    tokens = np.array(case["prompt_tokens"] + case["llamacpp"]["greedy_tokens"])
    cache = model.new_cache(n_slots=1, n_ctx=len(tokens))
    return model.forward(tokens, np.arange(len(tokens)), np.zeros(len(tokens), dtype=np.int64), cache)


def test_config(smollm2_gguf):
    from localllm.arch.llama import config_from_gguf
    c = config_from_gguf(smollm2_gguf)
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (576, 1536, 30, 9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_embeddings and c.rope_theta == 100000.0


def test_float_path_matches_transformers(ref_model, golden_smollm2):
    """Top-10 logits within 0.01 of transformers at every position; top-1 agreement >= 99.5% per case."""
    for case in golden_smollm2:
        logits = teacher_forced_logits(ref_model, case)                 # (T, vocab)
        expected_ids = np.array(case["transformers"]["top10_ids"])      # (T, 10)
        expected = np.array(case["transformers"]["top10_logits"])       # (T, 10)
        assert logits.shape[0] == expected.shape[0], case["name"]
        ours = np.take_along_axis(logits, expected_ids, axis=1)
        worst = np.abs(ours - expected).max()
        assert worst < 0.01, f"{case['name']}: top-10 logits differ by {worst:.4f}"
        agreement = np.mean(logits.argmax(axis=1) == expected_ids[:, 0])
        assert agreement >= 0.995, f"{case['name']}: top-1 agreement {agreement:.3f}"
