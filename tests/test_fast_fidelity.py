"""Fast path (int8 activations) on SmolLM2-135M Q4_1 against transformers, compared with llama.cpp.

For every golden case, teacher-forced top-1 agreement with the float
reference (``transformers``) must be at least llama.cpp's own agreement on the
same sequence: the fast path loses no more than llama.cpp does to its 8-bit
activations. The top-1 logit must also stay as close as llama.cpp's worst case.
"""
import numpy as np
import pytest

from localllm.models.decoder import DecoderModel as LlamaModel
from localllm.quants import kernels

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def fast_model(smollm2_gguf):
    return LlamaModel.from_gguf(smollm2_gguf, backend="fast")


def teacher_forced_logits(model, case):
    tokens = np.array(case["prompt_tokens"] + case["llamacpp"]["greedy_tokens"])
    cache = model.new_cache(n_slots=1, n_ctx=len(tokens))
    return model.forward(tokens, np.arange(len(tokens)), np.zeros(len(tokens), dtype=np.int64), cache)


def test_fast_backend_uses_the_kernels(fast_model):
    assert fast_model.backend.matmul is kernels.matmul


def test_top1_agreement_at_least_llama_cpp(fast_model, golden_smollm2):
    for case in golden_smollm2:
        logits = teacher_forced_logits(fast_model, case)                      # (T, vocab)
        reference = np.array(case["transformers"]["top10_ids"])[:, 0]         # (T,)
        llama_cpp = np.array(case["llamacpp"]["top10_ids"])[:, 0]
        ours = np.mean(logits.argmax(axis=1) == reference)
        theirs = np.mean(llama_cpp == reference)
        assert ours >= theirs, f"{case['name']}: top-1 agreement {ours:.3f} < llama.cpp {theirs:.3f}"


def test_top1_logit_error_within_llama_cpp_range(fast_model, golden_smollm2):
    """The largest top-1 logit gap to transformers stays within llama.cpp's worst over all cases."""
    worst_llama_cpp = max(np.abs(np.array(c["llamacpp"]["top10_logits"])[:, 0]
                                 - np.array(c["transformers"]["top10_logits"])[:, 0]).max()
                          for c in golden_smollm2)
    for case in golden_smollm2:
        logits = teacher_forced_logits(fast_model, case)
        ids = np.array(case["transformers"]["top10_ids"])[:, :1]
        gap = np.abs(np.take_along_axis(logits, ids, axis=1)[:, 0] - np.array(case["transformers"]["top10_logits"])[:, 0])
        assert gap.max() <= worst_llama_cpp, f"{case['name']}: top-1 logit off by {gap.max():.3f}"
