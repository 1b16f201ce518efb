"""How close a fast path's logits are to the float reference (``transformers``), next to llama.cpp's.

llama.cpp quantizes activations to 8 bits inside its dot products, and so does localllm's fast path (per 16, where
llama.cpp quantizes per 32). ``../shared/golden/README.md`` asks such a path to be at least as close to the float
model as llama.cpp is. Measured two ways over the teacher-forced positions of every case:

* the error of the logits: over every (position, id) among the float model's top 10 that llama.cpp's top 10 also
  holds, the root mean square of (logit - float logit), ours against llama.cpp's;
* the top-1 misses: where a path's top-1 is not the float model's, how far below the float top-1 the float model
  puts that token (a near tie is a small margin; a token outside the float top 10 an infinite one).

Top-1 agreement per case is not a fair measure at 8 bits: on a case of 50 positions one near tie broken the other
way is 2%, and llama.cpp's own figure is one draw of that noise.
"""
from __future__ import annotations

import numpy as np


def float_reference(case) -> tuple[np.ndarray, np.ndarray]:
    """(ids, logits) (T, 10): the float model's top 10 at every teacher-forced position."""
    return np.array(case["transformers"]["top10_ids"]), np.array(case["transformers"]["top10_logits"])


def logit_errors(case, ours_at_float_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ours, llama.cpp's): logit - float logit over the (position, id) pairs of the float top 10 that llama.cpp's
    top 10 also holds. ``ours_at_float_ids`` (T, 10): our logits at the float model's top-10 ids."""
    float_ids, float_logits = float_reference(case)
    llama_ids, llama_logits = np.array(case["llamacpp"]["top10_ids"]), np.array(case["llamacpp"]["top10_logits"])
    ours, theirs = [], []
    for t in range(float_ids.shape[0]):
        llama_at = dict(zip(llama_ids[t].tolist(), llama_logits[t].tolist()))
        for k, token in enumerate(float_ids[t].tolist()):
            if token in llama_at:
                ours.append(ours_at_float_ids[t, k] - float_logits[t, k])
                theirs.append(llama_at[token] - float_logits[t, k])
    return np.array(ours), np.array(theirs)


def miss_margins(case, top1: np.ndarray) -> np.ndarray:
    """For the positions where ``top1`` (T,) is not the float top-1: the float logit of the float top-1 minus
    the float logit of ``top1`` (inf when the float model does not rank it in its top 10)."""
    float_ids, float_logits = float_reference(case)
    margins = []
    for t in np.nonzero(top1 != float_ids[:, 0])[0]:
        where = np.nonzero(float_ids[t] == top1[t])[0]
        margins.append(float_logits[t, 0] - float_logits[t, where[0]] if where.size else np.inf)
    return np.array(margins)


def llama_cpp_top1(case) -> np.ndarray:
    return np.array(case["llamacpp"]["top10_ids"])[:, 0]


def widest_llama_cpp_miss(cases) -> float:
    """llama.cpp's largest ``miss_margins`` over the cases: how far from a tie its own top-1 misses go."""
    return max(miss_margins(case, llama_cpp_top1(case)).max(initial=0) for case in cases)


def rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))
