"""Cache affinity over replicas: multi-turn conversations through nginx, with and without ``X-Session-Id``.

    python benchmarks/bench_replicas.py [--model smollm2:135m] [--replicas 3] [--conversations 24] [--turns 4]
        [--max-tokens 24] [--concurrency 6] [--parallel 2] [--threads-per-replica 1] [--seed 0]
        [--modes affinity,round_robin]

Starts ``--replicas`` ``localllm serve`` processes on loopback ports (the user's model store,
``LOCALLLM_NUM_PARALLEL=--parallel``) and nginx with the shipped ``deploy/nginx/localllm.conf`` in front of them
(``tests/deploy/cluster.py`` runs both, as the deployment tests do). Each conversation has its own system prompt
and questions; turn after turn (all conversations' turn 1, then all turn 2, ..., the conversations in a new
random order each turn, ``--seed``; ``--concurrency`` requests at a time) it sends its whole history to
``/v1/chat/completions`` (greedy, ``--max-tokens``). The order changes because real conversations do not speak in
lockstep: with a fixed order, round-robin over a multiple of the replica count would send every conversation back
to the same replica by coincidence.

Two runs, each on freshly started replicas (empty caches):

- ``affinity``: every request carries ``X-Session-Id: <conversation>``: nginx's consistent hash sends a
  conversation to one replica;
- ``round_robin``: no header: nginx spreads requests round-robin.

For every turn 2+, its *history* is what the conversation's previous turn left in a KV cache (that turn's prompt
and answer tokens, at most this prompt's length); ``usage.prompt_tokens_details.cached_tokens`` is what the
replica took from its cache instead of prefilling. The JSON gives, per run, the share of turn 2+ history tokens
served from cache (issue 22's goal with affinity: at least 0.9), the share of all turn 2+ prompt tokens, the
requests per replica, and turn 2+ response times (median, p95; informative, 2 shared cores).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.deploy.cluster import Nginx, find_nginx, http_request, start_replica  # noqa: E402

TOPICS = ["oceans", "volcanoes", "bread", "bicycles", "owls", "glaciers", "chess", "tea", "bridges", "comets",
          "bees", "deserts", "violins", "lighthouses", "maps", "rivers", "clocks", "mushrooms", "kites", "salt",
          "trains", "caves", "paper", "whales", "gardens", "storms", "glass", "islands", "candles", "wolves"]
QUESTIONS = ["Tell me one fact about {topic}.", "Why does that matter?", "Give an example.",
             "Say it more simply.", "What else should I know?", "Summarize our talk in one line."]


def conversation_start(index: int) -> list[dict]:
    topic = TOPICS[index % len(TOPICS)]
    return [{"role": "system", "content": f"You are conversation {index}, a patient teacher who talks about "
                                          f"{topic} in short answers."},
            {"role": "user", "content": QUESTIONS[0].format(topic=topic)}]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))] if ordered else 0.0


def run(args, nginx_binary: str, mode: str) -> dict:
    """One run on fresh replicas: ``mode`` "affinity" (X-Session-Id) or "round_robin" (no header)."""
    store_root = Path(os.environ.get("LOCALLLM_MODELS", Path.home() / ".localllm" / "models"))
    folder = Path(tempfile.mkdtemp(prefix=f"bench-replicas-{mode}-"))
    replicas, nginx = [], None
    extra = {"LOCALLLM_NUM_PARALLEL": str(args.parallel), "NUMBA_NUM_THREADS": str(args.threads_per_replica),
             "LOCALLLM_ACCESS_LOG": "0", "LOCALLLM_MAX_QUEUE": str(4 * args.concurrency)}
    try:
        for i in range(args.replicas):
            replicas.append(start_replica(store_root, folder, f"r{i}", warm_model=args.model, **extra))
        nginx = Nginx(nginx_binary, folder / "nginx", [replica.port for replica in replicas])
        conversations = [conversation_start(i) for i in range(args.conversations)]
        previous = [None] * args.conversations          # (prompt_tokens, completion_tokens) of the last turn
        records = []

        def turn(index: int, number: int) -> dict:
            headers = {"X-Session-Id": f"conversation-{index}"} if mode == "affinity" else {}
            body = {"model": args.model, "messages": conversations[index], "max_tokens": args.max_tokens,
                    "temperature": 0}
            started = time.perf_counter()
            status, response_headers, raw = http_request(nginx.port, "POST", "/v1/chat/completions", body,
                                                         headers=headers, timeout=600)
            seconds = time.perf_counter() - started
            if status != 200:
                raise RuntimeError(f"turn {number} of conversation {index}: HTTP {status}: {raw[:300]!r}")
            reply = json.loads(raw)
            usage = reply["usage"]
            record = {"conversation": index, "turn": number, "seconds": seconds, "replica": response_headers.get("x-localllm-replica"),
                      "prompt_tokens": usage["prompt_tokens"],
                      "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                      "history_tokens": 0}
            if previous[index] is not None:
                record["history_tokens"] = min(sum(previous[index]), usage["prompt_tokens"])
            previous[index] = (usage["prompt_tokens"], usage["completion_tokens"])
            topic = TOPICS[index % len(TOPICS)]
            conversations[index] += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                                     {"role": "user", "content": QUESTIONS[number % len(QUESTIONS)].format(
                                         topic=topic)}]
            return record

        order = random.Random(args.seed)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for number in range(1, args.turns + 1):
                speakers = order.sample(range(args.conversations), args.conversations)   # who speaks first varies
                records += pool.map(lambda index: turn(index, number), speakers)
        wall = time.perf_counter() - started
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.stop()

    later = [r for r in records if r["turn"] >= 2]
    history = sum(r["history_tokens"] for r in later)
    cached_history = sum(min(r["cached_tokens"], r["history_tokens"]) for r in later)
    prompt = sum(r["prompt_tokens"] for r in later)
    cached = sum(r["cached_tokens"] for r in later)
    per_replica = {}
    for r in records:
        per_replica[r["replica"]] = per_replica.get(r["replica"], 0) + 1
    seconds = [r["seconds"] for r in later]
    if args.records:
        with open(f"{args.records}.{mode}.jsonl", "w") as out:
            out.writelines(json.dumps(r) + "\n" for r in records)
    return {"requests": len(records), "wall_seconds": round(wall, 1),
            "turn2plus_history_tokens": history, "turn2plus_history_tokens_from_cache": cached_history,
            "history_share_from_cache": round(cached_history / history, 4) if history else None,
            "turn2plus_prompt_tokens": prompt, "turn2plus_cached_tokens": cached,
            "prompt_share_from_cache": round(cached / prompt, 4) if prompt else None,
            "requests_per_replica": dict(sorted(per_replica.items(), key=lambda kv: str(kv[0]))),
            "turn2plus_seconds": {"median": round(statistics.median(seconds), 3) if seconds else None,
                                  "p95": round(percentile(seconds, 0.95), 3)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=6, help="requests in flight at once")
    parser.add_argument("--parallel", type=int, default=2, help="LOCALLLM_NUM_PARALLEL of each replica")
    parser.add_argument("--threads-per-replica", type=int, default=1, help="NUMBA_NUM_THREADS of each replica")
    parser.add_argument("--seed", type=int, default=0, help="the conversations' order in each turn")
    parser.add_argument("--modes", default="affinity,round_robin")
    parser.add_argument("--records", help="also write every request's figures to RECORDS.<mode>.jsonl")
    args = parser.parse_args(argv)
    if args.turns < 2 or args.replicas < 1 or args.conversations < 1:
        parser.error("--turns must be at least 2, --replicas and --conversations at least 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"affinity", "round_robin"}
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)} (affinity, round_robin)")
    nginx_binary = find_nginx()
    if nginx_binary is None:
        parser.error("nginx is not installed (apt-get install nginx-light)")
    results = {"model": args.model, "replicas": args.replicas, "conversations": args.conversations,
               "turns": args.turns, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
               "parallel_per_replica": args.parallel, "runs": {}}
    for mode in modes:
        results["runs"][mode] = run(args, nginx_binary, mode)
    if "affinity" in results["runs"]:
        share = results["runs"]["affinity"]["history_share_from_cache"]
        results["affinity_goal_met"] = share is not None and share >= 0.9
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
