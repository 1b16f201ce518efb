"""Time to first token of returning conversations, with and without the RAM prompt cache.

    python benchmarks/bench_prompt_cache.py [--model smollm2:135m | PATH] [--conversations 16] [--slots 4]
        [--turns 3] [--history-tokens 1000] [--turn-tokens 30] [--budget 2GiB]

``--conversations`` conversations take turns round-robin over ``--slots`` sequence
slots (so a conversation's slot has been given to others by the time it speaks
again). Each starts with its own history of ``--history-tokens`` token ids; every
turn appends ``--turn-tokens`` new ids and the one generated token. A turn is
one ``Model.generate`` call of one new token: its wall time is the time to first
token. The run is made twice in one process, with ``LOCALLLM_CACHE_RAM`` = 0
(evicted slots are lost: turns 2+ prefill the whole history again) and =
``--budget``; the JSON gives turn 1 and turn 2+ time to first token (median, p95),
the tokens served from cache, the prompt cache's counters and its peak bytes
against the budget, and the speed-up of turn 2+.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_generate import cpu_info  # noqa: E402


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def run(args, budget: str) -> dict:
    import numpy as np

    import localllm
    from localllm.kv_cache import CACHE_RAM_ENV

    os.environ[CACHE_RAM_ENV] = budget
    model = localllm.load(args.model, num_ctx=args.context, n_slots=args.slots)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    histories = [[int(t) for t in rng.integers(100, vocab - 100, args.history_tokens)]
                 for _ in range(args.conversations)]
    model.generate(histories[0][:32], max_tokens=1, temperature=0)  # compile outside the timings
    ttft = {1: [], 2: []}
    cached = 0
    peak_bytes = 0
    for turn in range(1, args.turns + 1):
        for history in histories:
            history.extend(int(t) for t in rng.integers(100, vocab - 100, args.turn_tokens))
            started = time.perf_counter()
            result = model.generate(list(history), max_tokens=1, temperature=0, details=True)
            ttft[min(turn, 2)].append(time.perf_counter() - started)
            history.extend(result.choices[0].token_ids)
            if turn > 1:
                cached += result.usage.cached_tokens
            ram = model.cache.prompt_cache
            peak_bytes = max(peak_bytes, ram.nbytes if ram else 0)
    ram = model.cache.prompt_cache
    return {
        "cache_ram": budget,
        "ttft_turn1_s": {"median": round(statistics.median(ttft[1]), 4), "p95": round(percentile(ttft[1], 0.95), 4)},
        "ttft_later_turns_s": {"median": round(statistics.median(ttft[2]), 4),
                               "p95": round(percentile(ttft[2], 0.95), 4)},
        "later_turns_cached_tokens": cached,
        "prompt_cache": None if ram is None else {
            "budget_bytes": ram.budget, "peak_bytes": peak_bytes, "within_budget": peak_bytes <= ram.budget,
            "saved": ram.saved, "restored": ram.restored, "restored_tokens": ram.restored_tokens,
            "dropped": ram.dropped},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--turn-tokens", type=int, default=30)
    parser.add_argument("--budget", default="2GiB", help="LOCALLLM_CACHE_RAM of the run with the cache")
    args = parser.parse_args()
    if args.turns < 2 or args.conversations <= args.slots:
        parser.error("needs --turns >= 2 and more --conversations than --slots")
    args.context = args.history_tokens + args.turns * (args.turn_tokens + 1) + 64
    without = run(args, "0")
    with_cache = run(args, args.budget)
    print(json.dumps({
        "benchmark": "prompt_cache", "model": args.model, "cpu": cpu_info(), "load_average": os.getloadavg(),
        "conversations": args.conversations, "slots": args.slots, "turns": args.turns,
        "history_tokens": args.history_tokens, "turn_tokens": args.turn_tokens,
        "without_ram_cache": without, "with_ram_cache": with_cache,
        "later_turns_ttft_speedup": round(without["ttft_later_turns_s"]["median"]
                                          / with_cache["ttft_later_turns_s"]["median"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
