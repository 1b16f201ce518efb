"""What the benchmark scripts share about their worker processes.

Each script measures in child processes (a fresh interpreter per engine, with its own thread
count and CPU target) that answer one JSON line per command read from stdin: a line when ready,
one per ``run``, and a last one for ``quit``.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path


class WorkerDied(RuntimeError):
    """The worker process ended before answering; the message ends with its last stderr lines."""


class WorkerProcess:
    """A child process that answers one JSON line per command; its stderr kept for the report if it dies."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: str | None = None):
        self.stderr = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, env=env, cwd=cwd)

    def ask(self, command: str | None = None) -> dict:
        """Send ``command`` (None: only read) and return the worker's next JSON line."""
        if command:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.stderr.seek(0)
            tail = "\n".join(self.stderr.read().strip().splitlines()[-8:])
            raise WorkerDied(f"benchmark worker died (exit code {code}): {tail}")
        return json.loads(line)

    def close(self) -> dict:
        """Ask the worker to quit; its last line (what it reports on leaving), or {} if it had already died."""
        info = {}
        if self.process.poll() is None:
            try:
                info = self.ask("quit")
            except (OSError, WorkerDied):       # it exited after an error, between poll and write
                pass
        self.process.wait()
        self.stderr.close()
        return info


def avx2_only_env() -> dict:
    """Environment of localllm workers compiled as for an AVX2-only CPU (Haswell), in a kernel cache of their own."""
    base = os.environ.get("LOCALLLM_KERNEL_CACHE")
    cache = (Path(base + "-haswell") if base else
             Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localllm" / "kernels-haswell")
    # NUMBA_CPU_FEATURES empty: LLVM takes haswell's own features (with the name alone numba passes the host's
    # feature flags, AVX-512 included, and haswell-tuned code then uses zmm registers on an AVX-512 host)
    return {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "", "LOCALLLM_KERNEL_CACHE": str(cache)}


def localllm_env(threads: int, avx2_only: bool) -> dict:
    """The whole environment of a localllm worker: this one, ``threads`` numba threads, AVX2-only if asked."""
    env = dict(os.environ)
    env["NUMBA_NUM_THREADS"] = str(threads)
    if avx2_only:
        env.pop("NUMBA_CACHE_DIR", None)        # it would win over LOCALLLM_KERNEL_CACHE (localllm.kernel_cache)
        env.update(avx2_only_env())
    return env
