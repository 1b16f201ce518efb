"""Fast path (int8 activations) on SmolLM2-135M Q4_1 against transformers, compared with llama.cpp.

Over the teacher-forced positions of the golden cases, the fast path must be at least as close to the float
reference (``transformers``) as llama.cpp is (``golden_fidelity``): its logits' error no larger, its top-1 misses no
further from a tie than llama.cpp's furthest, and its largest top-1 logit gap within llama.cpp's worst.
"""
import numpy as np
import pytest

from localllm.models.decoder import DecoderModel as LlamaModel
from localllm.quants import kernels

from tests.golden_fidelity import logit_errors, miss_margins, rms, widest_llama_cpp_miss

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def fast_model(smollm2_gguf):
    return LlamaModel.from_gguf(smollm2_gguf, backend="fast")


@pytest.fixture(scope="module")
def fast_logits(fast_model, golden_smollm2) -> list[np.ndarray]:
    """The fast path's teacher-forced logits (T, vocab) of every case."""
    logits = []
    for case in golden_smollm2:
        tokens = np.array(case["prompt_tokens"] + case["llamacpp"]["greedy_tokens"])
        cache = fast_model.new_cache(n_slots=1, n_ctx=len(tokens))
        logits.append(fast_model.forward(tokens, np.arange(len(tokens)), np.zeros(len(tokens), dtype=np.int64),
                                         cache))
    return logits


def test_fast_backend_uses_the_kernels(fast_model):
    assert fast_model.backend.matmul is kernels.matmul


def test_logit_error_at_most_llama_cpps(fast_logits, golden_smollm2):
    ours, theirs = [], []
    for case, logits in zip(golden_smollm2, fast_logits):
        float_ids = np.array(case["transformers"]["top10_ids"])                 # (T, 10)
        errors = logit_errors(case, np.take_along_axis(logits, float_ids, axis=1))
        ours.append(errors[0])
        theirs.append(errors[1])
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    assert ours.size > 5000
    assert rms(ours) <= rms(theirs), f"logit error {rms(ours):.4f} > llama.cpp's {rms(theirs):.4f}"


def test_top1_misses_are_near_ties(fast_logits, golden_smollm2):
    """Where the fast path's top-1 is not the float model's, the float model ranks it within llama.cpp's largest
    such margin (a near tie broken the other way, as llama.cpp breaks some)."""
    ours = [miss_margins(case, logits.argmax(axis=1)) for case, logits in zip(golden_smollm2, fast_logits)]
    widest = widest_llama_cpp_miss(golden_smollm2)
    for case, our_misses in zip(golden_smollm2, ours):
        assert (our_misses <= widest).all(), f"{case['name']}: a top-1 miss {our_misses.max():.3f} from a tie"


def test_top1_logit_error_within_llama_cpp_range(fast_logits, golden_smollm2):
    """The largest top-1 logit gap to transformers stays within llama.cpp's worst over all cases."""
    worst_llama_cpp = max(np.abs(np.array(c["llamacpp"]["top10_logits"])[:, 0]
                                 - np.array(c["transformers"]["top10_logits"])[:, 0]).max()
                          for c in golden_smollm2)
    for case, logits in zip(golden_smollm2, fast_logits):
        ids = np.array(case["transformers"]["top10_ids"])[:, :1]
        gap = np.abs(np.take_along_axis(logits, ids, axis=1)[:, 0] - np.array(case["transformers"]["top10_logits"])[:, 0])
        assert gap.max() <= worst_llama_cpp, f"{case['name']}: top-1 logit off by {gap.max():.3f}"
