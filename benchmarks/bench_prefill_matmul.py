"""Time one quantized matmul of a prefill batch: ``kernels.matmul(w, x)`` with x float32 (tokens, cols).

    PYTHONPATH=<tree> python benchmarks/bench_prefill_matmul.py [--types Q4_1,Q4_K] [--rows 1536] [--cols 576]
        [--k-rows 640] [--k-cols 2048] [--tokens 128] [--repeats 30] [--rounds 3] [--avx2-only] [--threads 2]

K types (256-element super-blocks) use the shape ``--k-rows`` x ``--k-cols`` (default Gemma 3 270M's
ffn_down), the others ``--rows`` x ``--cols`` (default SmolLM2 135M's ffn_up). Random weights (random bytes with sane f16 scales: ``localllm.quants.synthetic``). For each type
it prints the median and the best of ``--repeats`` calls per round (ms) and G multiply-adds/s of the best.
Includes what every call does: the activations' quantization and the parallel launch. ``--avx2-only`` compiles
as for an AVX2-only CPU (``NUMBA_CPU_NAME=haswell``, kernel cache of its own, as bench_generate.py
``--avx2-only``); the environment is set before localllm is imported. Prints the load average too: compare
runs of a quiet machine, alternating the trees.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workers import avx2_only_env  # noqa: E402  (benchmarks/workers.py)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="Q4_1,Q4_K")
    parser.add_argument("--rows", type=int, default=1536)
    parser.add_argument("--cols", type=int, default=576)
    parser.add_argument("--k-rows", type=int, default=640)
    parser.add_argument("--k-cols", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--avx2-only", action="store_true")
    args = parser.parse_args()
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    if args.avx2_only:
        os.environ.pop("NUMBA_CACHE_DIR", None)
        os.environ.update(avx2_only_env())

    import numpy as np
    import localllm
    from localllm.quants import GGML_BLOCK_SIZES, kernels
    from localllm.quants.synthetic import random_weight

    load_start = os.getloadavg()
    shapes = {t: (args.k_rows, args.k_cols) if GGML_BLOCK_SIZES[t][0] == 256 else (args.rows, args.cols)
              for t in args.types.split(",")}
    weights = {t: random_weight(t, *shape) for t, shape in shapes.items()}
    xs = {t: np.random.default_rng(1).standard_normal((args.tokens, shape[1])).astype(np.float32)
          for t, shape in shapes.items()}
    for t, w in weights.items():
        kernels.matmul(w, xs[t])  # compile or load from the kernel cache
    results = {t: [] for t in weights}
    for _ in range(args.rounds):  # the types alternate round by round
        for ggml_type, w in weights.items():
            times = []
            x = xs[ggml_type]
            for _ in range(args.repeats):
                start = time.perf_counter()
                kernels.matmul(w, x)
                times.append(time.perf_counter() - start)
            results[ggml_type].append((statistics.median(times), min(times)))
    report = {"tree": str(Path(localllm.__file__).resolve().parent.parent), "tokens": args.tokens,
              "threads": args.threads, "avx2_only": args.avx2_only,
              "load": [round(v, 2) for v in load_start], "load_end": [round(v, 2) for v in os.getloadavg()]}
    for ggml_type, rounds in results.items():
        best = min(b for _, b in rounds)
        macs = args.tokens * shapes[ggml_type][0] * shapes[ggml_type][1]
        report[ggml_type] = {"shape": list(shapes[ggml_type]), "median_ms": [round(1e3 * m, 3) for m, _ in rounds], "best_ms": round(1e3 * best, 3),
                             "gmac_s": round(macs / best / 1e9, 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
