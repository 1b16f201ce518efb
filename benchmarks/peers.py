"""The native peers of the benchmarks: llama.cpp's and ik_llama.cpp's own ``llama-bench``.

They are built outside the repository, for benchmarking only (never in CI): cmake
from the llama-cpp-python 0.3.36 sdist (``vendor/llama.cpp``) and from the
ik-llama-cpp-python 0.1.5 sdist (``vendor/ik_llama.cpp``). A script finds each
through a command-line option or an environment variable (``PEERS``); there is no
default path, and a peer that is not given, or not an executable file, is skipped
with the reason (``locate``).

``LlamaBench.run`` runs one invocation,
``llama-bench -m MODEL -t THREADS -p PROMPT -n DECODE -r REPETITIONS -o json``
(the same flags in both forks), and returns the ``pp`` (prefill) and ``tg``
(decode) tokens/s, each ``avg_ts`` and ``stddev_ts`` over the repetitions, with the
process's peak resident memory (``ru_maxrss`` from ``wait4``, in a small launcher process). llama-bench's
``tg`` test decodes from an empty context, while the benchmarks' own decode runs
after the prompt: at equal speed the peer's decode number is slightly favoured.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# peer name -> (command-line option, environment variable) giving its llama-bench
PEERS = {
    "llama.cpp": ("--llama-bench", "LOCALLLM_LLAMA_BENCH"),
    "ik_llama.cpp": ("--ik-llama-bench", "LOCALLLM_IK_LLAMA_BENCH"),
}

# runs argv[2:] as a child of this small process and writes the child's peak RSS (KiB) to argv[1]: a process's
# ru_maxrss counts the memory of whoever forked it until its exec (Linux keeps the larger of the two), so the
# peer is started from here rather than straight from a benchmark driver holding numpy and a model
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""

# llama-bench JSON fields worth recording once per peer (how it ran)
INFO_FIELDS = ("build_commit", "build_number", "cpu_info", "model_type", "model_size", "n_threads", "n_batch",
               "n_ubatch", "type_k", "type_v", "flash_attn")


def locate(option_value: str | None, env_name: str) -> tuple[Path | None, str]:
    """(path to an executable llama-bench, how it was given) or (None, why the peer is skipped)."""
    given, source = option_value, "command line"
    if not given:
        given, source = os.environ.get(env_name), env_name
    if not given:
        return None, f"not given (command-line option or {env_name})"
    path = Path(given).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        return None, f"no executable at {path} (from {source})"
    return path, source


class LlamaBench:
    """One peer's llama-bench, run once per round."""

    def __init__(self, name: str, path: Path, source: str = ""):
        self.name, self.path, self.source = name, Path(path), source
        self.info: dict = {}

    def command(self, model: str, threads: int, prompt_tokens: int, decode_tokens: int, repetitions: int) -> list:
        return [str(self.path), "-m", str(model), "-t", str(threads), "-p", str(prompt_tokens),
                "-n", str(decode_tokens), "-r", str(repetitions), "-o", "json"]

    def run(self, model: str, threads: int, prompt_tokens: int, decode_tokens: int, repetitions: int) -> dict:
        """One invocation: prefill/decode tokens/s (avg and stddev over the repetitions) and peak RSS (MiB)."""
        command = self.command(model, threads, prompt_tokens, decode_tokens, repetitions)
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
                tempfile.NamedTemporaryFile("r") as rss:
            t0 = time.perf_counter()
            returncode = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, rss.name, *command],
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err).returncode
            wall = time.perf_counter() - t0
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            peak_kib = rss.read().strip()
        if returncode != 0:
            tail = "\n".join(stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"{self.name} llama-bench exited with {returncode}: {tail}")
        tests = json.loads(stdout)
        result = {}
        for test in tests:
            if test["n_prompt"] > 0 and test["n_gen"] == 0:
                kind = "prefill"
            elif test["n_prompt"] == 0 and test["n_gen"] > 0:
                kind = "decode"
            else:
                continue
            result[f"{kind}_tok_s"] = float(test["avg_ts"])
            result[f"{kind}_stddev"] = float(test["stddev_ts"])
            if not self.info:
                self.info = {key: test[key] for key in INFO_FIELDS if key in test}
        missing = {"prefill_tok_s", "decode_tok_s"} - set(result)
        if missing:
            raise RuntimeError(f"{self.name} llama-bench output lacks {sorted(missing)}: {stdout[:300]!r}")
        result["peak_rss_mb"] = int(peak_kib) / 1024 if peak_kib else float("nan")  # ru_maxrss: KiB on Linux
        result["wall_s"] = wall
        return result


# llama.cpp's quantizer (benchmarks that make their own files): (command-line option, environment variable)
QUANTIZE = ("--llama-quantize", "LOCALLLM_LLAMA_QUANTIZE")


def locate_quantize(option_value: str | None, llama_cpp: LlamaBench | None = None) -> tuple[Path | None, str]:
    """llama.cpp's ``llama-quantize``: given (``QUANTIZE``), else the one beside llama.cpp's llama-bench (one
    build directory), else (None, why not)."""
    path, how = locate(option_value, QUANTIZE[1])
    if path is not None or option_value or os.environ.get(QUANTIZE[1]):
        return path, how
    if llama_cpp is not None:
        beside = llama_cpp.path.parent / "llama-quantize"
        if beside.is_file() and os.access(beside, os.X_OK):
            return beside, f"beside {llama_cpp.path}"
        return None, f"not given, and no llama-quantize beside {llama_cpp.path}"
    return None, how
