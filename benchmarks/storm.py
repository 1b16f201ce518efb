"""A long disconnect storm against a real `localllm serve`: does anything stay behind?

    python benchmarks/storm.py [--model smollm2:135m] [--clients 64] [--rounds 5] [--leave 0.5]
        [--max-tokens 16] [--parallel 8] [--seed 19]

Starts ``localllm serve`` on a free local port (the user's store, ``LOCALLLM_NUM_PARALLEL =
--parallel``). Round 0 is quiet: every client streams its own prompt to the end (greedy), which
gives each client's reference text. Then ``--rounds`` storms: ``--clients`` clients at once, even
ones on ``/v1/completions`` (SSE), odd ones on ``/api/generate`` (NDJSON), a ``--leave`` share of
them closing their connection at a random byte of the answer (0: right after sending the request).

Reported per round: wall seconds, clients that completed and how many of those got a text other
than their reference (should be 0), the server's resident memory and OS thread count once it is
idle again (growth from round to round is a leak). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

BAN_END_OF_TEXT = {"0": -100, "2": -100}       # SmolLM2's end tokens: every completion runs to max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_request(model: str, i: int, max_tokens: int) -> tuple[str, dict]:
    prompt = f"{i} times {i + 1} is"
    if i % 2 == 0:
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                   "stream": True, "logit_bias": BAN_END_OF_TEXT}
    return "/api/generate", {"model": model, "prompt": prompt, "raw": True, "stream": True,
                             "options": {"num_predict": max_tokens, "temperature": 0}}


def run_client(port: int, path: str, body: dict, leave_after: int | None) -> str | None:
    """The streamed text (None if the client left early). HTTP/1.0 framing: the body is read to the close."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(f"POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        received = b""
        while leave_after is None or len(received) < leave_after:
            chunk = sock.recv(65536 if leave_after is None else min(4096, leave_after - len(received)))
            if not chunk:
                break
            received += chunk
    if leave_after is not None:
        return None
    head, _, payload = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n")[0].decode()
    if status_line.split()[1:2] != ["200"]:
        return f"<{status_line}>"
    if path == "/v1/completions":
        events = [json.loads(e[6:]) for e in payload.split(b"\n\n") if e.startswith(b"data: {")]
        return "".join(e["choices"][0]["text"] if "choices" in e else f"<{e['error']}>" for e in events)
    lines = [json.loads(line) for line in payload.splitlines() if line]
    return "".join(line.get("response", f"<{line.get('error')}>") for line in lines)


def wait_idle(process: psutil.Process, seconds: float = 5.0) -> None:
    """Until the server uses (almost) no CPU for a second, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.cpu_percent(interval=1.0) > 5:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--leave", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()

    port = free_port()
    env = dict(os.environ, LOCALLLM_HOST=f"127.0.0.1:{port}", LOCALLLM_NUM_PARALLEL=str(args.parallel),
               LOCALLLM_MAX_QUEUE=str(max(64, args.clients)))
    server = subprocess.Popen([sys.executable, "-m", "localllm.cli", "serve"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        server.stdout.readline()
        process = psutil.Process(server.pid)
        requests = [client_request(args.model, i, args.max_tokens) for i in range(args.clients)]
        rng = random.Random(args.seed)
        rounds, reference = [], None
        for round_index in range(args.rounds + 1):
            leaving = {} if round_index == 0 else {
                i: rng.choice([0, rng.randrange(1, 200 * args.max_tokens)])
                for i in rng.sample(range(args.clients), int(args.clients * args.leave))}
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                texts = list(pool.map(lambda i: run_client(port, *requests[i], leaving.get(i)), range(args.clients)))
            seconds = time.perf_counter() - started
            reference = reference or texts
            wait_idle(process)
            completed = [i for i in range(args.clients) if i not in leaving]
            rounds.append({"round": round_index, "seconds": round(seconds, 2), "left": len(leaving),
                           "completed": len(completed),
                           "different_text": sum(texts[i] != reference[i] for i in completed),
                           "rss_mb": round(process.memory_info().rss / 2**20, 1),
                           "threads": process.num_threads()})
        first, last = rounds[1] if len(rounds) > 1 else rounds[0], rounds[-1]
        print(json.dumps({"model": args.model, "clients": args.clients, "parallel": args.parallel,
                          "max_tokens": args.max_tokens, "load_average": os.getloadavg(), "rounds": rounds,
                          "rss_growth_after_first_storm": round(last["rss_mb"] / first["rss_mb"] - 1, 3),
                          "thread_growth_after_first_storm": last["threads"] - first["threads"]}, indent=1))
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
