"""What a first answer costs on a fresh install: numba compile time per kernel, first and warm ``localllm run``.

    python benchmarks/bench_compile.py [--model smollm2:135m] [--model gemma3:270m] [--prompt "Say hi."]
        [--warm-runs 3] [--avx2-only] [--no-profile] [--no-first-answer] [--top 10]

For each model (store names or GGUF paths), in child processes with ``NUMBA_NUM_THREADS=2``:

* ``profile``: ``localllm run MODEL PROMPT`` inside one process (``localllm.cli.main``) with an
  empty kernel cache (a fresh ``LOCALLLM_KERNEL_CACHE``) and a listener on numba's
  ``numba:compile`` events. Per kernel (dispatcher and signature): ``self_s`` (its own compile,
  the kernels it calls excluded: numba compiles a callee while typing its caller), ``inclusive_s``
  and how many signatures; the top ``--top`` by ``self_s``. Also ``compile_total_s`` (every
  top-level compile), ``cache_save_s`` (writing the cache: numba's ``Cache.save_overload``),
  and the wall and CPU seconds of the whole run.
* ``first_answer_s``: wall seconds of ``python -m localllm.cli run MODEL PROMPT`` from process start to
  the first byte of its answer on stdout, in a fresh empty kernel cache (what a new user waits for);
  ``first_run``: its seconds to exit and CPU seconds (user + sys of the child and its compile helper:
  less noisy than wall time on a busy machine). The model samples as its defaults say, so an answer's
  length (and the time to exit) differs from run to run; the first byte does not wait for it.
* ``warm_run_s``: the same command again ``--warm-runs`` times with that cache filled (medians of the
  first byte and of the exit, each run's, and the answer's length), and,
  in one more child with the cache filled, ``warm_breakdown``: seconds to import ``localllm.cli``, to load
  the model (store + GGUF + tokenizer), to load its kernels from the cache (numba's ``Cache.load_overload``,
  summed) and to answer.

The command runs the model in process: ``LOCALLLM_HOST`` points at a port where nothing listens (a
running server would answer instead). ``--avx2-only`` compiles as for an AVX2-only CPU
(``NUMBA_CPU_NAME=haswell``, ``NUMBA_CPU_FEATURES=`` empty), as ``bench_generate.py --avx2-only``.

Prints one JSON object: the load average at start and end (compile times double on a busy 2-core
machine: compare figures taken under the same load), the CPU, and per model the figures above.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from workers import avx2_only_env  # noqa: E402

NOBODY_LISTENS = "127.0.0.1:9"   # the discard port: `localllm run` finds no server there and runs in process


# --------------------------------------------------------------------------- in the child

def compile_listener():
    """A numba event listener: per kernel (dispatcher), the inclusive and self seconds of its compiles."""
    from numba.core.event import Listener

    class CompileListener(Listener):
        def __init__(self):
            super().__init__()
            self.stack: list[list] = []      # [name, start, seconds spent in nested compiles]
            self.kernels: dict[str, dict] = {}
            self.top_level_s = 0.0

        def on_start(self, event):
            self.stack.append([kernel_name(event), time.perf_counter(), 0.0])

        def on_end(self, event):
            name, started, nested = self.stack.pop()
            inclusive = time.perf_counter() - started
            entry = self.kernels.setdefault(name, {"self_s": 0.0, "inclusive_s": 0.0, "signatures": 0})
            entry["self_s"] += inclusive - nested
            entry["inclusive_s"] += inclusive
            entry["signatures"] += 1
            if self.stack:
                self.stack[-1][2] += inclusive
            else:
                self.top_level_s += inclusive

    return CompileListener()


def kernel_name(event) -> str:
    dispatcher = (event.data or {}).get("dispatcher")
    function = getattr(dispatcher, "py_func", None)
    return f"{function.__module__}.{function.__qualname__}" if function is not None else repr(dispatcher)


def timed_method(cls, name: str, totals: dict):
    """Wrap ``cls.name`` to add its seconds (and calls) to totals[name]."""
    original = getattr(cls, name)
    totals[name] = {"s": 0.0, "calls": 0}

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name]["s"] += time.perf_counter() - started
            totals[name]["calls"] += 1

    setattr(cls, name, wrapper)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_profile(model: str, prompt: str) -> dict:
    """``localllm run model prompt`` in this process, its compiles recorded (the cache is empty)."""
    started, cpu_started = time.perf_counter(), cpu_seconds()
    import numba.core.caching
    from numba.core import event

    from localllm import cli

    import_s = time.perf_counter() - started
    cache_totals: dict = {}
    timed_method(numba.core.caching.Cache, "save_overload", cache_totals)
    timed_method(numba.core.caching.Cache, "load_overload", cache_totals)
    listener = compile_listener()
    event.register("numba:compile", listener)
    stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        status = cli.main(["run", model, prompt])
    finally:
        sys.stdout.close()
        sys.stdout = stdout
    if status:
        raise SystemExit(f"localllm run {model} failed with status {status}")
    kernels = sorted(({"kernel": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}}
                      for name, figures in listener.kernels.items()), key=lambda k: -k["self_s"])
    return {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(cpu_seconds() - cpu_started, 2),
            "import_s": round(import_s, 2), "compile_total_s": round(listener.top_level_s, 2),
            "cache_save_s": round(cache_totals["save_overload"]["s"], 2),
            "cache_load_s": round(cache_totals["load_overload"]["s"], 2), "kernels": kernels}


def child_warm_breakdown(model: str, prompt: str) -> dict:
    """With the cache filled: seconds to import, load the model, load kernels from the cache, answer."""
    started = time.perf_counter()
    import numba.core.caching

    from localllm import cli

    from numba.core import event

    imported = time.perf_counter()
    cache_totals: dict = {}
    timed_method(numba.core.caching.Cache, "load_overload", cache_totals)
    listener = compile_listener()
    event.register("numba:compile", listener)
    model_object = cli.load_in_process(model)
    loaded = time.perf_counter()
    stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        cli.stream_reply(model_object, [{"role": "user", "content": prompt}], {}, sys.stdout)
    finally:
        sys.stdout.close()
        sys.stdout = stdout
    answered = time.perf_counter()
    return {"import_s": round(imported - started, 3), "load_model_s": round(loaded - imported, 3),
            "kernel_cache_load_s": round(cache_totals["load_overload"]["s"], 3),
            "kernels_loaded": cache_totals["load_overload"]["calls"],
            "answer_s": round(answered - loaded, 3), "total_s": round(answered - started, 3),
            "compiled_anyway_s": round(listener.top_level_s, 3),
            "compiled_anyway": {name: round(figures["inclusive_s"], 3) for name, figures in listener.kernels.items()}}


# --------------------------------------------------------------------------- the driver

def child_env(cache: Path, avx2_only: bool) -> dict:
    env = dict(os.environ)
    env.pop("NUMBA_CACHE_DIR", None)                 # it would win over LOCALLLM_KERNEL_CACHE
    if avx2_only:
        env.update(avx2_only_env())
    env.update({"LOCALLLM_KERNEL_CACHE": str(cache), "LOCALLLM_HOST": NOBODY_LISTENS, "NUMBA_NUM_THREADS": "2",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    return env


def run_child(args: list[str], env: dict) -> tuple[float, float, str, float]:
    """(wall seconds, CPU seconds of the child, stdout, seconds to its first byte of stdout) of ``python args``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=errors)
        first = child.stdout.read(1)
        first_byte = time.perf_counter() - started
        out = first + child.stdout.read()
        code = child.wait()
        wall = time.perf_counter() - started
        errors.seek(0)
        if code:
            raise RuntimeError(f"{' '.join(args)} failed ({code}): {errors.read().decode()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.decode("utf-8", errors="replace"), first_byte


def measure_model(model: str, args) -> dict:
    result: dict = {"model": model}
    workdir = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    try:
        if args.profile:
            cache = workdir / "profile"
            _, _, out, _ = run_child([__file__, "--child", "profile", "--model", model, "--prompt", args.prompt],
                                  child_env(cache, args.avx2_only))
            profile = json.loads(out.strip().splitlines()[-1])
            profile["kernels_compiled"] = len(profile["kernels"])
            profile["top"] = profile.pop("kernels")[:args.top]
            result["profile"] = profile
        if args.first_answer:
            cache = workdir / "run"
            env = child_env(cache, args.avx2_only)
            command = ["-m", "localllm.cli", "run", model, args.prompt]
            wall, cpu, answer, first_byte = run_child(command, env)
            result["first_answer_s"] = round(first_byte, 2)
            result["first_run"] = {"exit_s": round(wall, 2), "cpu_s": round(cpu, 2), "answer_chars": len(answer),
                                   "answer": answer.strip()[:120]}
            warm = [run_child(command, env) for _ in range(args.warm_runs)]
            result["warm_run_s"] = {
                "first_answer_median": round(statistics.median(w[3] for w in warm), 2),
                "exit_median": round(statistics.median(w[0] for w in warm), 2),
                "runs": [{"first_answer_s": round(w[3], 2), "exit_s": round(w[0], 2), "answer_chars": len(w[2])}
                         for w in warm],
                "cpu_median": round(statistics.median(w[1] for w in warm), 2)}
            _, _, out, _ = run_child([__file__, "--child", "warm", "--model", model, "--prompt", args.prompt], env)
            result["warm_breakdown"] = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="store name or GGUF path (repeat; default smollm2:135m)")
    parser.add_argument("--prompt", default="Say hi.")
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--avx2-only", action="store_true", help="compile for haswell (AVX2, no AVX-512)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-first-answer", dest="first_answer", action="store_false")
    parser.add_argument("--child", choices=("profile", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.model or ["smollm2:135m"]
    if args.child == "profile":
        print(json.dumps(child_profile(models[0], args.prompt)), flush=True)
        return
    if args.child == "warm":
        print(json.dumps(child_warm_breakdown(models[0], args.prompt)), flush=True)
        return
    load_start = os.getloadavg()
    results = [measure_model(model, args) for model in models]
    print(json.dumps({"load_average_start": [round(x, 2) for x in load_start],
                      "load_average_end": [round(x, 2) for x in os.getloadavg()], "cpu": cpu_model(),
                      "avx2_only": {**avx2_only_env(), "LOCALLLM_KERNEL_CACHE": "fresh per run"} if args.avx2_only
                      else False,
                      "models": results}, indent=1))


if __name__ == "__main__":
    main()
