"""Prefill and decode speed of localllm, side by side with the native llama.cpp peers on the same GGUF.

    python benchmarks/bench_generate.py [--model smollm2:135m | PATH] [--threads 2] [--prompt-tokens 512]
        [--decode-tokens 128] [--rounds 3] [--repetitions 1]
        [--llama-bench PATH] [--ik-llama-bench PATH] [--with-python-binding]
        [--avx2-only] [--no-startup]

``--model`` is a store name (``localllm.api.resolve``: ``smollm2:135m``,
``gemma3:270m``, ...) or a path to a GGUF file.

Engines, measured in the same run:

* ``localllm``, in a worker process of its own with ``NUMBA_NUM_THREADS = --threads``.
  A round is: prefill a prompt of ``--prompt-tokens`` token ids in one call, then
  decode ``--decode-tokens`` tokens greedily (argmax of the logits), one forward
  call each. Its peak resident memory (VmHWM) is reset after the warm-up, so a
  first-run compile does not count (``warmup_peak_rss_mb`` reports that one).
* the native anchors, llama.cpp's own ``llama-bench`` and ik_llama.cpp's
  (``peers.py``): ``--llama-bench PATH`` / ``LOCALLLM_LLAMA_BENCH`` and
  ``--ik-llama-bench PATH`` / ``LOCALLLM_IK_LLAMA_BENCH``, no default; a peer not
  given or not found is skipped and ``peers_skipped`` says why. A round is one
  ``llama-bench -m MODEL -t THREADS -p PROMPT -n DECODE -r REPETITIONS -o json``:
  its ``pp`` and ``tg`` tokens/s (``avg_ts``, ``stddev_ts``) and peak RSS.
  llama-bench's ``tg`` decodes from an empty context (its first token at position 0), and so does
  localllm's ``decode_tok_s`` (a one-token prompt, then one token at a time): like for like. localllm's
  ``decode_after_prompt_tok_s`` decodes after the prompt instead (positions 512 on: attention reads more).
* ``llama-cpp-python (Python binding)``, only with ``--with-python-binding``
  (``pip install -e .[bench]``): llama.cpp through its binding, whose per-token
  Python loop costs about half of llama.cpp's decode speed, so it is no anchor.

The rounds alternate between the engines (each round starting one engine later),
so that machine drift hits all alike; each engine's figure is the median of its rounds.

``--avx2-only`` runs localllm's workers as on an AVX2-only CPU: ``NUMBA_CPU_NAME=haswell``
with ``NUMBA_CPU_FEATURES=`` empty (the name alone keeps the host's feature flags,
AVX-512 included) and a kernel cache of its own (``LOCALLLM_KERNEL_CACHE``,
``~/.cache/localllm/kernels-haswell``). The peers stay as built.

Decode breakdown (localllm only, ``decode_breakdown_ms``): the same decode from an empty context again, with the
one-launch step's phase timers on (the CPU's time-stamp counter read around every phase inside the launch,
``DecoderLayersStep.phase_seconds``): a token's milliseconds, its matmul phases (each with its activations'
preparation and its wait for the other worker), attention, RoPE and the KV write, the post-norms, and what is
left: ``outside_the_launch`` (Python between tokens, the parallel launch and join) and ``outside_the_matmuls``
(all but the matmul phases). For a 135M model that overhead decides the race.

Startup (localllm only): ``first_compile_s`` is process start to first token
with an empty numba cache (everything compiled), ``cached_start_s`` the same
for a second process that finds the cache (numba ``cache=True``).

Prints one JSON object: the CPU (model name, relevant flags), the load average at
start and end (spinning thread pools collapse on a busy machine, llama.cpp's first:
``warning`` when it started above 1), the model file,
medians per engine, ratios localllm / peer for prefill and decode, the faster
native peer of each and the ratio against it, every round, localllm's kernels,
numba target CPU, whether the one-launch decode step ran, and its memory budget
(GGUF size + its KV cache + 200 MiB) with whether its peak stayed within it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/peers.py)
from workers import WorkerProcess, avx2_only_env, localllm_env  # noqa: E402

DEFAULT_MODEL = "smollm2:135m"
LOCAL = "localllm"
BINDING = "llama-cpp-python (Python binding)"
# /proc/cpuinfo flags that matter to the kernels compared here
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8")


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


def cpu_info() -> dict:
    """The CPU's model name and which of ``CPU_FLAGS`` it has (from /proc/cpuinfo)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())      # the first processor's
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"model_name": fields.get("model name") or fields.get("Model") or "unknown",
            "logical_cpus": os.cpu_count(), "flags": {flag: flag in flags for flag in CPU_FLAGS}}


# --------------------------------------------------------------------------- engines (inside workers)

class LocalEngine:
    name = LOCAL

    def __init__(self, model_path: str, n_ctx: int):
        import numpy as np
        from localllm.formats.gguf import read_gguf
        from localllm.formats.resident import resident_by_default
        from localllm.models.decoder import DecoderModel

        self.np = np
        self.model = DecoderModel.from_gguf(read_gguf(model_path, resident=resident_by_default()), backend="fast")
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

    def timed_decode(self, token: int, count: int) -> tuple[int, dict]:
        """``count`` decode steps from ``token`` with the one-launch step's phase timers on: (the last token,
        the step's ``phase_seconds``), or {} where the one-launch step does not run."""
        step = self.model._one_launch_layers(1)
        if step is None:
            for _ in range(count):
                token = self.decode(token)
            return token, {}
        step.start_timing()
        for _ in range(count):
            token = self.decode(token)
        return token, step.stop_timing()   # off again: the next round's untimed decode pays nothing for it

    def info(self) -> dict:
        import llvmlite.binding as llvm
        import numba
        from localllm import kernel_cache
        from localllm.quants import kernels
        step = self.model._one_launch_layers(1)        # after a forward: what the decode steps used
        features = numba.config.CPU_FEATURES
        return {"kernels": kernels.KERNELS, "threading_layer": kernels.threading_layer(),
                "threads": int(os.environ.get("NUMBA_NUM_THREADS", "0")) or os.cpu_count(),
                "numba_target_cpu": numba.config.CPU_NAME or llvm.get_host_cpu_name(),
                "numba_cpu_features": "host" if features is None else (features or "the target CPU's defaults"),
                "kernel_cache": str(kernel_cache.configure()),
                "one_launch_decode": step is not None,
                "one_launch_max_tokens": getattr(step, "max_tokens", None),
                "kv_cache_mb": self.cache.nbytes / 2**20 if self.cache is not None else 0.0}


class LlamaCppPythonEngine:
    name = BINDING

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
        engine = LlamaCppPythonEngine(args.model, n_ctx, args.threads)
    tokens = prompt_ids(args.prompt_tokens, engine.vocab_size)
    if args.prime:  # every kernel a round uses, compiled into the cache (a full prompt: its parallel forms too)
        engine.decode(engine.prefill(tokens))
        if engine.name == LOCAL:
            engine.timed_decode(engine.prefill(tokens[:1]), 2)
        print(json.dumps({"primed": True}), flush=True)
        return
    if args.startup:  # time to first token from process start
        engine.decode(engine.prefill(tokens[:8]))
        print(json.dumps({"start_to_first_token_s": time.perf_counter() - START}), flush=True)
        return
    engine.decode(engine.prefill(tokens[:16]))  # warm up (compile or load caches)
    if engine.name == LOCAL:
        engine.timed_decode(engine.prefill(tokens[:1]), 2)   # the breakdown's timers, loaded before the peak reset
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
            t3 = time.perf_counter()                       # as llama-bench's tg: from an empty context
            token = engine.prefill(tokens[:1])
            for _ in range(args.decode_tokens - 1):
                token = engine.decode(token)
            t4 = time.perf_counter()
            result = {"prefill_tok_s": args.prompt_tokens / (t1 - t0), "decode_tok_s": args.decode_tokens / (t4 - t3),
                      "decode_after_prompt_tok_s": args.decode_tokens / (t2 - t1)}
            if engine.name == LOCAL:   # the same decode again, timed inside the launch
                token = engine.prefill(tokens[:1])
                t5 = time.perf_counter()
                token, phases = engine.timed_decode(token, args.decode_tokens - 1)
                token_s = (time.perf_counter() - t5) / (args.decode_tokens - 1)
                if phases:
                    result["decode_breakdown_ms"] = decode_breakdown(token_s, phases)
            print(json.dumps(result), flush=True)
        elif command == "quit":
            print(json.dumps({"peak_rss_mb": peak_rss_mb(), "warmup_peak_rss_mb": compile_peak_mb,
                              **engine.info()}), flush=True)
            return


# --------------------------------------------------------------------------- driver

class Worker(WorkerProcess):
    def __init__(self, engine: str, args, env: dict | None = None, startup: bool = False, prime: bool = False):
        command = [sys.executable, __file__, "--worker", engine, "--model", str(args.model_path), "--threads",
                   str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                   "--decode-tokens", str(args.decode_tokens)] + (["--startup"] if startup else []) + (["--prime"] if prime else [])
        if engine == "localllm":
            base = localllm_env(args.threads, args.avx2_only)
        else:
            base = {**os.environ, "NUMBA_NUM_THREADS": str(args.threads)}
        super().__init__(command, env={**base, **(env or {})})


def llama_cpp_python_available() -> bool:
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


MATMUL_PHASES = ("qkv_matmul", "output_matmul", "gate_up_matmul", "down_matmul", "head_matmul")


def decode_breakdown(token_s: float, phases: dict) -> dict:
    """Where a decode token's milliseconds go, from the one-launch step's phase timers (``phase_seconds``): the
    token (wall), its matmul phases (each with its activations' preparation and its wait for the other
    worker), attention, RoPE with the KV write, the post-norms, the launch's whole program, and the rest:
    ``outside_the_launch`` (Python, the parallel launch and join) and ``outside_the_matmuls`` (everything
    but the matmul phases)."""
    matmuls = sum(phases[name] for name in MATMUL_PHASES)
    return {"token": 1000 * token_s, "matmul_phases": 1000 * matmuls,
            **{name: 1000 * phases[name] for name in MATMUL_PHASES},
            "attention": 1000 * phases["attention"], "rope_and_kv_write": 1000 * phases["rope"],
            "post_norms": 1000 * phases["post_norms"], "in_the_launch": 1000 * phases["worker_total"],
            "outside_the_launch": 1000 * (token_s - phases["worker_total"]),
            "outside_the_matmuls": 1000 * (token_s - matmuls)}


def rounded(value):
    return round(value, 1) if isinstance(value, float) else value


def summary(rounds: list[dict]) -> dict:
    """Medians over the rounds (and the median of llama-bench's own stddev over its repetitions)."""
    out = {}
    for kind in ("prefill", "decode"):
        out[f"{kind}_tok_s"] = round(statistics.median(r[f"{kind}_tok_s"] for r in rounds), 1)
        if f"{kind}_stddev" in rounds[0]:
            out[f"{kind}_stddev"] = round(statistics.median(r[f"{kind}_stddev"] for r in rounds), 2)
    if "decode_after_prompt_tok_s" in rounds[0]:
        out["decode_after_prompt_tok_s"] = round(statistics.median(r["decode_after_prompt_tok_s"] for r in rounds), 1)
    if "decode_breakdown_ms" in rounds[0]:  # localllm: where a decode token's time goes (medians, ms)
        out["decode_breakdown_ms"] = {key: round(statistics.median(r["decode_breakdown_ms"][key] for r in rounds), 2)
                                      for key in rounds[0]["decode_breakdown_ms"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="store name or GGUF path (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=1, help="llama-bench -r within each round")
    for name, (option, env_name) in peers.PEERS.items():
        parser.add_argument(option, metavar="PATH", help=f"{name}'s llama-bench (else ${env_name}; none: skipped)")
    parser.add_argument("--with-python-binding", action="store_true",
                        help=f"also measure {BINDING} (off by default)")
    parser.add_argument("--avx2-only", action="store_true",
                        help="localllm workers compile for haswell (AVX2, no AVX-512), in a kernel cache of their own")
    parser.add_argument("--no-startup", action="store_true", help="skip the compile / cached start timings")
    parser.add_argument("--worker", choices=["localllm", "llama-cpp-python"], help=argparse.SUPPRESS)
    parser.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prime", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    from localllm.api import resolve
    path, entry = resolve(args.model)
    args.model_path = Path(path)

    skipped = {}
    benches = {}
    for name, (option, env_name) in peers.PEERS.items():
        found, how = peers.locate(getattr(args, option.lstrip("-").replace("-", "_")), env_name)
        if found:
            benches[name] = peers.LlamaBench(name, found, how)
        else:
            skipped[name] = how
    if args.with_python_binding and not llama_cpp_python_available():
        skipped[BINDING] = "llama_cpp is not importable (pip install -e .[bench])"
    elif not args.with_python_binding:
        skipped[BINDING] = "off (--with-python-binding)"
    engines = [LOCAL] + list(benches) + ([BINDING] if BINDING not in skipped else [])

    result = {"model": {"name": entry.name if entry else args.model_path.name, "path": str(args.model_path),
                        "file_mb": round(os.path.getsize(args.model_path) / 2**20, 1)},
              "cpu": cpu_info(), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "decode_tokens": args.decode_tokens, "rounds": args.rounds, "peer_repetitions": args.repetitions,
              "avx2_only": {**avx2_only_env(), "peers": "as built"} if args.avx2_only else False,
              "engines": engines, "peers_skipped": skipped,
              "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    if not args.no_startup:
        result["startup"] = startup_times(args)
    # a first process runs a whole round's prefill and a decode step, so that every kernel a round uses is in
    # the cache: the measured worker then loads kernels, and its memory is that of inference, not of the
    # compiler's leftovers (a worker that compiled showed 408 MB and a 23 tok/s first prefill)
    Worker("localllm", args, prime=True).ask()
    workers = {LOCAL: Worker("localllm", args)}
    if BINDING in engines:
        workers[BINDING] = Worker("llama-cpp-python", args)
    rounds = {name: [] for name in engines}
    for index in range(args.rounds):
        start = index % len(engines)
        for name in engines[start:] + engines[:start]:
            if name not in rounds:  # a peer that failed in an earlier round
                continue
            if name in workers:
                rounds[name].append(workers[name].ask("run"))
                continue
            try:
                rounds[name].append(benches[name].run(args.model_path, args.threads, args.prompt_tokens,
                                                      args.decode_tokens, args.repetitions))
            except (RuntimeError, ValueError, KeyError, OSError) as error:
                skipped[name] = f"failed: {error}"
                del rounds[name]
    engines = [name for name in engines if name in rounds]
    result["engines"] = engines

    for name in engines:
        entry_result = summary(rounds[name])
        if name in workers:
            entry_result.update({key: rounded(value) for key, value in workers[name].close().items()})
        else:
            bench = benches[name]
            entry_result.update({"llama_bench": str(bench.path), "given_by": bench.source,
                                 "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rounds[name]), 1),
                                 **bench.info})
        entry_result["rounds"] = [{key: ({k: round(v, 2) for k, v in value.items()} if isinstance(value, dict)
                                         else round(value, 2 if key.endswith("stddev") else 1))
                                   for key, value in r.items()} for r in rounds[name]]
        result[name] = entry_result
    for name, worker in workers.items():
        if name not in engines:
            worker.close()

    # a busy machine ruins the spinning thread pools of every engine (llama.cpp's first): 0.5 tok/s decoding
    # with 2 threads under a load of 9 on 2 cores, 35 with 1 thread; compare the runs of a quiet machine only
    result["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    if result["load_average_1min"]["start"] > 1:
        result["warning"] = "the machine was busy at the start (load average above 1): not a comparable run"

    # the memory target: resident memory at most GGUF size + KV cache + 200 MB (MiB throughout)
    local = result[LOCAL]
    budget = os.path.getsize(args.model_path) / 2**20 + local["kv_cache_mb"] + 200
    local["memory_budget_mb"] = round(budget, 1)
    local["within_memory_budget"] = local["peak_rss_mb"] <= budget

    keys = {"prefill": "prefill_tok_s", "decode": "decode_tok_s"}
    result["ratio_localllm_over"] = {
        name: {kind: round(local[key] / result[name][key], 2) for kind, key in keys.items()}
        for name in engines if name != LOCAL}
    native = [name for name in engines if name in benches]
    if native:
        result["faster_peer"] = {}
        for kind, key in keys.items():
            best = max(native, key=lambda name: result[name][key])
            result["faster_peer"][kind] = {"engine": best, "tok_s": result[best][key],
                                           "ratio_localllm_over_it": round(local[key] / result[best][key], 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
