"""Cost of constrained decoding: decode tokens/s unconstrained vs JSON-constrained, and the mask cost per token.

    python benchmarks/bench_constrain.py [MODEL.gguf] [--max-tokens 64] [--repeats 3] [--backend auto]

MODEL defaults to env LOCALLLM_TEST_SMOLLM2. For each case (a chat prompt and a JSON
constraint) the same prompt is generated greedily, once without and once with the
constraint, alternately, ``--repeats`` times (best run kept, after one warm-up each).
The constrained run gets ``--max-tokens`` and stops when its JSON is complete; the
unconstrained run then generates exactly as many tokens (end-of-generation banned), so
both rates cover the same number of decode steps. Decode speed is ``completion_tokens / decode_seconds`` (the
prompt is cached after the warm-up, so it barely counts). ``overhead`` is
unconstrained tokens/s over constrained tokens/s minus one (target: at most 0.15).

Wall time on a shared machine is noisy, so the grammar processor's own cost is measured
too: ``processor_us_in_generation`` is its mean time per call during the constrained
runs (median over the repeats) and ``processor_share_in_generation`` that over the
unconstrained time per token. It is also measured in isolation: the constrained output's tokens are replayed through a fresh
``GrammarProcessor`` (no model), timing each call (matcher update + bitmask +
applying it to float32 logits). ``mask_share`` is that mean over the unconstrained
time per token: the overhead the constraint adds when nothing else disturbs the
run. ``mask_cost_budget_tight`` replays the same tokens with a budget that ends right
after them, so the JSON closer plans on every one of the last tokens (its worst case).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
COLORS = {"type": "object", "properties": {"colors": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
    "required": ["name", "hex"], "additionalProperties": False}}}, "required": ["colors"], "additionalProperties": False}


def cases(constrain):
    return [
        ("json_schema person", "Extract person info: John Doe is 30 years old", constrain.json_schema(PERSON)),
        ("json_schema colors", "List 3 colors with their hex codes in JSON format", constrain.json_schema(COLORS)),
        ("json_object", "List 3 colors in JSON format", constrain.json_object()),
    ]


class Budgeted:
    """Hands the token budget to the processor, so the JSON closer runs (whether or not generate passes it),
    and times every processor call into ``seconds``."""

    def __init__(self, constraint, max_tokens: int):
        self.constraint, self.max_tokens = constraint, max_tokens
        self.seconds: list[float] = []

    def make_processor(self, tokenizer, max_new_tokens=None):
        processor = self.constraint.make_processor(tokenizer, max_new_tokens=max_new_tokens or self.max_tokens)

        def timed(logits, history, n_prompt):
            start = time.perf_counter()
            out = processor(logits, history, n_prompt)
            self.seconds.append(time.perf_counter() - start)
            return out

        return timed


def run(model, prompt: str, constraint, max_tokens: int, exact: bool = False):
    """Greedy chat; ``exact`` bans the end-of-generation tokens so exactly ``max_tokens`` come out."""
    budgeted = Budgeted(constraint, max_tokens) if constraint is not None else None
    bias = {token: -100 for token in model.tokenizer.eog_ids} if exact else None
    result = model.chat([{"role": "user", "content": prompt}], constraint=budgeted, max_tokens=max_tokens,
                        temperature=0, logit_bias=bias, details=True)
    seconds = result.timings["decode_seconds"]
    in_generation = float(np.mean(budgeted.seconds)) * 1e6 if budgeted and budgeted.seconds else 0.0
    return result, result.usage.completion_tokens / seconds if seconds > 0 else float("nan"), in_generation


def isolated_mask_cost(tokenizer, constraint, token_ids: list[int], vocab_size: int, repeats: int = 5,
                       budget: int | None = None) -> dict:
    """Microseconds per processor call, replaying ``token_ids`` (the constrained output) without the model.

    With ``budget`` the JSON closer is active (its plans near the end of the budget are timed too).
    """
    logits = np.random.default_rng(0).standard_normal(vocab_size).astype(np.float32)
    prompt = [0]
    times = []
    for _ in range(repeats):
        processor = constraint.make_processor(tokenizer, max_new_tokens=budget)
        history = list(prompt)
        for token in token_ids + [None]:
            start = time.perf_counter()
            processor(logits, history, len(prompt))
            times.append(time.perf_counter() - start)
            if token is not None:
                history.append(token)
    micro = np.array(times) * 1e6
    return {"mean_us": round(float(micro.mean()), 1), "median_us": round(float(np.median(micro)), 1),
            "p95_us": round(float(np.percentile(micro, 95)), 1), "calls": len(times)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=os.environ.get("LOCALLLM_TEST_SMOLLM2"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("give the SmolLM2 .gguf path or set LOCALLLM_TEST_SMOLLM2")

    import localllm
    from localllm import constrain

    model = localllm.load(args.model, backend=args.backend)
    report = {"model": os.path.basename(str(args.model)), "backend": model.network.backend.name,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "cases": []}
    for name, prompt, constraint in cases(constrain):
        n_tokens = run(model, prompt, constraint, args.max_tokens)[0].usage.completion_tokens   # warm-up
        run(model, prompt, None, n_tokens, exact=True)
        free, forced = [], []
        for _ in range(args.repeats):
            free.append(run(model, prompt, None, n_tokens, exact=True))
            forced.append(run(model, prompt, constraint, args.max_tokens))
        best_free = max(free, key=lambda r: r[1])
        best_forced = max(forced, key=lambda r: r[1])
        tokens = best_forced[0].token_ids
        mask = isolated_mask_cost(model.tokenizer, constraint, tokens, model.config.vocab_size)
        closing = isolated_mask_cost(model.tokenizer, constraint, tokens, model.config.vocab_size,
                                     budget=len(tokens) + 1)
        free_us = 1e6 / best_free[1]
        in_generation_us = float(np.median([r[2] for r in forced]))
        valid = True
        try:
            json.loads(best_forced[0].text)
        except ValueError:
            valid = False
        report["cases"].append({
            "case": name,
            "unconstrained": {"tokens": best_free[0].usage.completion_tokens, "tokens_per_s": round(best_free[1], 1)},
            "constrained": {"tokens": best_forced[0].usage.completion_tokens, "tokens_per_s": round(best_forced[1], 1),
                            "finish_reason": best_forced[0].finish_reason, "valid_json": valid},
            "overhead": round(best_free[1] / best_forced[1] - 1, 3),
            "processor_us_in_generation": round(in_generation_us, 1),
            "processor_share_in_generation": round(in_generation_us / free_us, 4),
            "mask_cost": mask,
            "mask_share": round(mask["mean_us"] / free_us, 4),
            "mask_cost_budget_tight": closing,
            "mask_share_budget_tight": round(closing["mean_us"] / free_us, 4),
        })
    report["max_overhead"] = max(case["overhead"] for case in report["cases"])
    report["max_mask_share"] = max(case["mask_share"] for case in report["cases"])
    report["max_processor_share_in_generation"] = max(c["processor_share_in_generation"] for c in report["cases"])
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
