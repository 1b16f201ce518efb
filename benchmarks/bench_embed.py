"""Sentence-embedding throughput: localllm vs sentence-transformers (torch, CPU), same model, same inputs.

    python benchmarks/bench_embed.py [MODEL_FOLDER] [--threads N] [--sentences 256] [--batch-size 32]

MODEL_FOLDER is a Hugging Face sentence-transformers folder (default: env
LOCALLLM_TEST_MINILM). Both libraries embed the same sentences (mixed lengths,
fixed seed) with the same thread count, after one warm-up pass each, timed
alternately (best of ``--repeats``); prints one JSON object. ``ratio`` is
sentence-transformers' wall time over localllm's (above 1: localllm is
faster); ``cpu_ratio`` the same for CPU seconds, which other processes on a
busy machine disturb less than wall time. Without sentence-transformers installed only localllm runs
and ``ratio`` is null. ``max_cosine_gap`` is 1 - the smallest cosine between
the two libraries' vectors for the same sentence.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

WORDS = (
    "the of and to in is was for on that with as by it at from his an were are which this be or has had "
    "not but first one their its new after who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made also team season film music river house "
    "water light energy language history science model network computer system local cloud embedding "
    "sentence vector search question answer weather mountain ocean garden kitchen bicycle library"
).split()


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """Mixed lengths: mostly short sentences, some paragraphs, a few past 256 tokens."""
    import random

    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        roll = rng.random()
        n_words = rng.randint(3, 20) if roll < 0.6 else rng.randint(20, 80) if roll < 0.9 else rng.randint(80, 300)
        words = [rng.choice(WORDS) for _ in range(n_words)]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (spin-waiting included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=os.environ.get("LOCALLLM_TEST_MINILM"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.model:
        sys.exit("give a model folder (or set LOCALLLM_TEST_MINILM)")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy / numba / torch are imported

    import numpy as np

    from localllm.embeddings import load_embedding_model

    sentences = make_sentences(args.sentences)
    model = load_embedding_model(args.model)
    n_tokens = sum(min(n, model.max_seq_length) for n in model.count_tokens(sentences))
    ours_run = lambda: model.embed(sentences, batch_size=args.batch_size)  # noqa: E731
    theirs_run = None
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        note = "sentence-transformers not installed: localllm only"
    else:
        note = None
        torch.set_num_threads(args.threads)
        st_model = SentenceTransformer(args.model, device="cpu")
        theirs_run = lambda: st_model.encode(sentences, batch_size=args.batch_size,  # noqa: E731
                                             normalize_embeddings=True)

    # warm-up (JIT, allocator), then alternate the two so that load from other processes hits both alike
    ours, theirs = ours_run(), theirs_run() if theirs_run else None
    load_before = os.getloadavg()[0]
    ours_s = theirs_s = ours_cpu = theirs_cpu = float("inf")
    for _ in range(args.repeats):
        wall, cpu = timed(ours_run)
        ours_s, ours_cpu = min(ours_s, wall), min(ours_cpu, cpu)
        if theirs_run:
            wall, cpu = timed(theirs_run)
            theirs_s, theirs_cpu = min(theirs_s, wall), min(theirs_cpu, cpu)
    result = {
        "model": str(args.model),
        "sentences": len(sentences),
        "tokens": n_tokens,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "localllm_sentences_per_s": round(len(sentences) / ours_s, 1),
        "sentence_transformers_sentences_per_s": round(len(sentences) / theirs_s, 1) if theirs_run else None,
        "ratio": round(theirs_s / ours_s, 3) if theirs_run else None,
        "localllm_cpu_s": round(ours_cpu, 2),
        "sentence_transformers_cpu_s": round(theirs_cpu, 2) if theirs_run else None,
        "cpu_ratio": round(theirs_cpu / ours_cpu, 3) if theirs_run else None,
        "max_cosine_gap": float(1.0 - np.min(np.sum(ours * theirs, axis=1))) if theirs_run else None,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other processes: before, after
    }
    if note:
        result["note"] = note
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
