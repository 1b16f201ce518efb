"""Many streams at once: `localllm serve` beside the native peers' `llama-server`, same GGUF, same run.

    python benchmarks/bench_serve.py [--model smollm2:135m] [--streams 1,4,8,16] [--new-tokens 128]
        [--prompt-words 75] [--threads 2] [--llama-server PATH] [--ik-llama-server PATH]
        [--long-prompt-words 1200] [--avx2-only] [--llama-server-args ARGS] [--ik-llama-server-args ARGS]

Servers (each started by this script on a free local port, one after the other):

* ``localllm``: ``localllm serve`` with ``LOCALLLM_NUM_PARALLEL = N`` and
  ``NUMBA_NUM_THREADS = --threads`` (``--avx2-only``: compiled as for an AVX2-only CPU, as
  bench_generate.py's ``--avx2-only``);
* the native peers, llama.cpp's and ik_llama.cpp's own ``llama-server``
  (``--llama-server`` / ``LOCALLLM_LLAMA_SERVER``, ``--ik-llama-server`` /
  ``LOCALLLM_IK_LLAMA_SERVER``; not given or not found: skipped, with the reason),
  run as ``llama-server -m GGUF -np N -c N*1024 -t THREADS`` and the extra arguments given
  (``--ik-llama-server-args "-fa off"``: ik_llama.cpp 0.1.5's server aborts on parallel slots with its
  flash attention on, ``GGML_ASSERT(S > 0)`` in ``iqk_fa_templates.h``, SmolLM2 with 4 streams).

For every N in ``--streams``: N clients at once, each streaming a distinct prompt of
about ``--prompt-words`` words (~100 tokens) through ``POST /v1/completions``
(``stream: true``, ``max_tokens = --new-tokens``, temperature 0, ``ignore_eos`` for the
peers and a stop-free prompt for all, usage from ``stream_options.include_usage``).
Reported per server and N: aggregate completion tokens/s over the wall time, time to first
token p50/p95, inter-token latency p95 (gaps between content chunks), and, for the
largest N, the inter-token latency p95 of the streams while a ``--long-prompt-words``
prompt arrives one second in (a long prefill must not stall the others for more than one
prefill chunk). Ratios: localllm / faster peer, localllm at N / localllm at 1.

Prints one JSON object (CPU, load average at start and end, every figure).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_generate import cpu_info  # noqa: E402
from benchmarks.workers import avx2_only_env  # noqa: E402

SERVER_PEERS = {"llama.cpp": ("llama_server", "LOCALLLM_LLAMA_SERVER"),
                "ik_llama.cpp": ("ik_llama_server", "LOCALLLM_IK_LLAMA_SERVER")}
WORDS = ("river stone cloud lantern meadow copper violin harbor thunder orchard pebble canyon ember willow "
         "falcon glacier tapestry compass marble saffron beacon quartz prairie lighthouse nebula cedar").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_text(index: int, words: int) -> str:
    """A distinct prompt: a numbered list of words in an order of its own (no shared prefix beyond a few)."""
    picked = [WORDS[(index * 7 + i * (index % 5 + 3)) % len(WORDS)] for i in range(words)]
    return f"Story {index}: " + " ".join(picked) + ". Continue the story:"


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))], 4)


class Server:
    def __init__(self, name: str, argv: list[str], env: dict, port: int):
        self.name, self.port = name, port
        # the server's log goes to a file (a pipe nobody reads fills up and blocks a chatty server)
        self.log = tempfile.TemporaryFile()
        # in a folder of its own: ik_llama.cpp's server writes llama.log into its working directory
        self.folder = tempfile.TemporaryDirectory(prefix="bench-serve-")
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=self.folder.name)
        self.model_name = None

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/v1/models")
                response = connection.getresponse()
                body = response.read()
                if response.status == 200:
                    models = json.loads(body).get("data") or [{}]
                    self.model_name = models[0].get("id")
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} did not answer within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        self.folder.cleanup()


def stream_once(port: int, model: str, prompt: str, max_tokens: int, results: list, index: int,
                start_barrier: threading.Barrier | None) -> None:
    """One streaming completion: (ttft, chunk arrival times, completion tokens) into results[index]."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    if start_barrier is not None:
        start_barrier.wait()
    started = time.perf_counter()
    arrivals, tokens, error = [], None, None
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            error = f"HTTP {response.status}: {response.read()[:300]!r}"
        else:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens")
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    arrivals.append(time.perf_counter() - started)
    except (OSError, http.client.HTTPException, ValueError) as exc:   # counted as this stream's error
        error = f"{type(exc).__name__}: {exc}"
    results[index] = {"arrivals": arrivals, "tokens": tokens if tokens is not None else len(arrivals),
                      "seconds": time.perf_counter() - started, "error": error}


def run_streams(server: Server, n: int, args, long_prompt_at: float | None = None) -> dict:
    """N concurrent streams (+ optionally one long prompt arriving long_prompt_at seconds in)."""
    results: list = [None] * n
    barrier = threading.Barrier(n)
    threads = [threading.Thread(target=stream_once, args=(server.port, server.model_name,
                                                          prompt_text(i + 100 * n, args.prompt_words),
                                                          args.new_tokens, results, i, barrier))
               for i in range(n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    long_result: list = [None]
    if long_prompt_at is not None:
        time.sleep(long_prompt_at)
        long_thread = threading.Thread(target=stream_once, args=(server.port, server.model_name,
                                                                 prompt_text(9999, args.long_prompt_words), 8,
                                                                 long_result, 0, None))
        long_thread.start()
        threads.append(long_thread)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    errors = [r["error"] for r in results if r["error"]]
    ttft = [r["arrivals"][0] for r in results if r["arrivals"]]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["tokens"] or 0 for r in results)
    return {"streams": n, "aggregate_tokens_per_s": round(tokens / wall, 2), "completion_tokens": tokens,
            "wall_s": round(wall, 3), "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "itl_p95_s": percentile(gaps, 0.95), "errors": errors[:3]}


def start_localllm(args, n: int) -> Server:
    port = free_port()
    env = dict(os.environ, LOCALLLM_HOST=f"127.0.0.1:{port}", LOCALLLM_NUM_PARALLEL=str(n),
               NUMBA_NUM_THREADS=str(args.threads))
    if args.avx2_only:
        env.pop("NUMBA_CACHE_DIR", None)        # it would win over LOCALLLM_KERNEL_CACHE
        env.update(avx2_only_env())
    server = Server("localllm", [sys.executable, "-c", "import sys; from localllm.cli import main; "
                                 "sys.exit(main(['serve']))"], env, port)
    server.wait_ready()
    server.model_name = args.model
    return server


def start_peer(name: str, binary: Path, gguf: Path, args, n: int) -> Server:
    port = free_port()
    argv = [str(binary), "-m", str(gguf), "-np", str(n), "-c", str(n * 1024), "-t", str(args.threads),
            "--port", str(port), "--host", "127.0.0.1", *shlex.split(getattr(args, SERVER_PEERS[name][0] + "_args"))]
    server = Server(name, argv, dict(os.environ), port)
    server.wait_ready()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2:135m", help="store name (its GGUF goes to the peers)")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=75)
    parser.add_argument("--long-prompt-words", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-server", dest="llama_server", metavar="PATH")
    parser.add_argument("--ik-llama-server", dest="ik_llama_server", metavar="PATH")
    parser.add_argument("--llama-server-args", dest="llama_server_args", default="", metavar="ARGS")
    parser.add_argument("--ik-llama-server-args", dest="ik_llama_server_args", default="", metavar="ARGS")
    parser.add_argument("--avx2-only", action="store_true", help="localllm compiled as for an AVX2-only CPU")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]

    from localllm.api import resolve
    gguf, _ = resolve(args.model)
    load_start = os.getloadavg()
    peers, skipped = {}, {}
    for name, (attribute, env_name) in SERVER_PEERS.items():
        given = getattr(args, attribute) or os.environ.get(env_name)
        if not given:
            skipped[name] = f"not given (--{attribute.replace('_', '-')} or {env_name})"
        elif not (Path(given).is_file() and os.access(given, os.X_OK)):
            skipped[name] = f"{given} is not an executable file"
        else:
            peers[name] = Path(given)

    figures: dict[str, list[dict]] = {}
    for n in counts:
        for name in ["localllm", *peers]:
            server = start_localllm(args, n) if name == "localllm" else start_peer(name, peers[name], gguf, args, n)
            try:
                run_streams(server, 1, args)            # warm-up (localllm compiles on its first request)
                result = run_streams(server, n, args)
                if n == max(counts):
                    busy = run_streams(server, n, args, long_prompt_at=1.0)
                    result["itl_p95_with_long_prompt_s"] = busy["itl_p95_s"]
                if result["errors"]:
                    result["server_log_tail"] = server.log_tail()[-800:]
                figures.setdefault(name, []).append(result)
            finally:
                server.stop()

    def at(name: str, n: int) -> dict | None:
        return next((r for r in figures.get(name, []) if r["streams"] == n), None)

    ratios = {}
    single = at("localllm", 1)
    for n in counts:
        ours = at("localllm", n)
        peer_rates = {name: at(name, n)["aggregate_tokens_per_s"] for name in peers if at(name, n)}
        faster = max(peer_rates, key=peer_rates.get) if peer_rates else None
        ratios[str(n)] = {
            "vs_faster_peer": round(ours["aggregate_tokens_per_s"] / peer_rates[faster], 2) if faster else None,
            "faster_peer": faster,
            "vs_own_single_stream": round(ours["aggregate_tokens_per_s"] / single["aggregate_tokens_per_s"], 2)
            if single else None,
        }
    print(json.dumps({"benchmark": "serve", "model": args.model, "gguf": str(gguf), "cpu": cpu_info(),
                      "threads": args.threads, "avx2_only": avx2_only_env() if args.avx2_only else False,
                      "peer_args": {"llama.cpp": args.llama_server_args, "ik_llama.cpp": args.ik_llama_server_args},
                      "load_average_start": load_start,
                      "load_average_end": os.getloadavg(), "peers_skipped": skipped, "results": figures,
                      "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
