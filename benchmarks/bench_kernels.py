"""Decode speed of the AVX2 row tasks per weight type on one thread, and of the one-launch decode step.

    python benchmarks/bench_kernels.py [--types Q4_K,Q6_K,Q5_K,Q5_0,Q8_0] [--rounds 5] [--baseline REV]
        [--model gemma3:270m | PATH | none] [--avx2-only] [--cpu N]

Every figure is one thread, pinned to one CPU (``--cpu``, default the last one) with
``NUMBA_NUM_THREADS=1``, in a worker process of its own:

* ``rows_hot``: ``kernels_avx2.rows_<TYPE>`` over the row tasks of a matrix of about
  1 MB (cols 2048; it stays in L2), one token (decode: eight weight rows in the lanes):
  G weights/s, what the kernel computes when memory does not hold it back.
* ``rows_stream``: the same over a matrix of ``--stream-mb`` (default 512 MB, larger than
  the last-level cache), so every byte comes from DRAM: G weights/s and GB/s, beside
  ``read_gb_s``, a plain vectorized sum over the same bytes (the bandwidth one thread
  gets). ``Q8_0_head`` is the 262144 x 640 Q8_0 matrix of Gemma 3's tied output.
* ``step`` (with a model, default ``gemma3:270m`` when it is in the store): the
  one-launch decode step (``ops.decoder_step``, every layer of one token) at a few
  hundred positions: layers tokens/s and G weights/s of the layer matrices, and a whole
  ``forward`` of one token (layers + output head) in tokens/s.

``--baseline REV`` measures the kernels of git revision REV too, in the same run: its
``localllm`` is extracted (``git archive``) into a temporary folder and run by a
second worker; the rounds alternate between the two workers, and each figure is the
median of its rounds, with ``speedup`` = current / baseline.

``--avx2-only`` compiles as for an AVX2-only CPU: ``NUMBA_CPU_NAME=haswell``,
``NUMBA_CPU_FEATURES=`` empty and a kernel cache of its own (as ``bench_generate.py --avx2-only``).

Prints one JSON object: CPU, load average at start and end (other work on the machine
skews every figure: compare runs of a quiet machine), numba target, the figures per
worker and the speedups.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from workers import WorkerProcess, localllm_env  # noqa: E402  (benchmarks/workers.py)

DEFAULT_TYPES = "Q4_K,Q6_K,Q5_K,Q5_0,Q8_0"
HOT_BYTES = 1 << 20            # the in-cache matrix
HOT_COLS = 2048
HOT_REPEATS = 20               # passes over it per call
MIN_SECONDS = 0.15             # each measurement repeats its work for at least this long
# --------------------------------------------------------------------------- worker (one source tree, one thread)

def random_blocks(buffer, ggml_type: str, rows: int, cols: int, rng):
    """``buffer`` (uint8, at least rows * row_bytes) as a (rows, row_bytes) matrix of random blocks of
    ``ggml_type`` whose f16 scales are sane (0.001..0.05): random bits elsewhere, as the kernels see them."""
    import numpy as np
    from localllm.quants import GGML_BLOCK_SIZES
    from localllm.quants.synthetic import F16_FIELDS
    block_elems, block_bytes = GGML_BLOCK_SIZES[ggml_type]
    n_blocks = cols // block_elems
    w = buffer[:rows * n_blocks * block_bytes].reshape(rows, n_blocks, block_bytes)
    for offset in F16_FIELDS[ggml_type]:
        scales = rng.uniform(0.001, 0.05, (rows, n_blocks)).astype(np.float16)
        w[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, n_blocks, 2)
    return w.reshape(rows, n_blocks * block_bytes)


def timed(function, work_units: float) -> float:
    """work_units / seconds of ``function()``, repeated for at least MIN_SECONDS (best of three such runs)."""
    best = 0.0
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while True:
            function()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= MIN_SECONDS:
                break
        best = max(best, work_units * calls / elapsed)
    return best


class KernelWorker:
    def __init__(self, types: list[str], stream_mb: int, model: str | None):
        import numpy as np
        from numba import njit
        from localllm.quants import kernels_avx2, portable

        self.np = np
        self.types = types
        self.kernels_avx2 = kernels_avx2

        @njit
        def decode_rows(rows, w, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, repeats):
            for _ in range(repeats):  # repeated inside: the Python call costs a few us
                for r in range(0, w.shape[0], 8):
                    rows(w, r, xq, xd, xsums, xd_by_block, xsums_by_block, out, offset_table, False)

        @njit
        def read_all(words):
            total = np.uint64(0)
            for i in range(words.shape[0]):
                total += words[i]
            return total

        self.decode_rows, self.read_all = decode_rows, read_all
        self.rng = np.random.default_rng(0)
        self.stream_buffer = self.rng.integers(0, 256, stream_mb << 20, dtype=np.uint8)
        self.activations = {}
        for cols in (HOT_COLS, 640):
            x = self.rng.standard_normal((1, cols)).astype(np.float32)
            xq, xd, xsums = portable.quantize_activations(x)
            self.activations[cols] = (xq, xd, xsums, np.ascontiguousarray(xd.T), np.ascontiguousarray(xsums.T),
                                      np.empty((cols // 16, 8), dtype=np.float32), np.empty((1, 0), np.float32))
        self.hot = {}
        for t in types:
            row_bytes = self._row_bytes(t, HOT_COLS)
            rows = max(8, HOT_BYTES // row_bytes // 8 * 8)
            self.hot[t] = random_blocks(self.rng.integers(0, 256, rows * row_bytes, dtype=np.uint8), t, rows,
                                        HOT_COLS, self.rng)
            self._rows(t, self.hot[t], HOT_COLS)       # compile
        self.model = self._load_model(model) if model else None

    @staticmethod
    def _row_bytes(ggml_type: str, cols: int) -> int:
        from localllm.quants import GGML_BLOCK_SIZES
        block_elems, block_bytes = GGML_BLOCK_SIZES[ggml_type]
        return cols // block_elems * block_bytes

    def _rows(self, ggml_type: str, w, cols: int, repeats: int = 1) -> None:
        xq, xd, xsums, xd_by_block, xsums_by_block, offset_table, _ = self.activations[cols]
        out = self.np.empty((1, w.shape[0]), dtype=self.np.float32)
        self.decode_rows(getattr(self.kernels_avx2, f"rows_{ggml_type}"), w, xq, xd, xsums, xd_by_block,
                         xsums_by_block, out, offset_table, repeats)

    def _load_model(self, path: str):
        import numpy as np
        from localllm.formats.gguf import read_gguf
        from localllm.models.decoder import DecoderModel
        try:   # the weights as localllm.load reads them (a --baseline before formats/resident.py maps them)
            from localllm.formats.resident import resident_by_default
            gguf = read_gguf(path, resident=resident_by_default())
        except ImportError:
            gguf = read_gguf(path)
        model = DecoderModel.from_gguf(gguf, backend="fast")
        self.layer_weights = sum(w.rows * w.cols for layer in model.layers
                                 for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up,
                                           layer.w_down))
        self.layer_types = sorted({w.ggml_type for layer in model.layers
                                   for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up,
                                             layer.w_down)})
        self.n_ctx = 1024
        self.cache = model.new_cache(n_slots=1, n_ctx=self.n_ctx)
        prompt = np.arange(100, 356)
        model.forward(prompt, np.arange(256), np.zeros(256, dtype=np.int64), self.cache, logits_for=[255])
        model.forward([5], [256], [0], self.cache)          # compile / load the one-launch step
        return model

    def measure(self) -> dict:
        np = self.np
        result = {"rows_hot_g_weights_s": {}, "rows_stream_g_weights_s": {}, "rows_stream_gb_s": {}}
        for t in self.types:
            w = self.hot[t]
            result["rows_hot_g_weights_s"][t] = round(
                timed(lambda: self._rows(t, w, HOT_COLS, HOT_REPEATS), HOT_REPEATS * w.shape[0] * HOT_COLS / 1e9), 2)
        streams = [(t, HOT_COLS) for t in self.types]
        if "Q8_0" in self.types:
            streams.append(("Q8_0_head", 640))
        for name, cols in streams:
            t = name[:4]
            row_bytes = self._row_bytes(t, cols)
            rows = self.stream_buffer.shape[0] // row_bytes // 8 * 8
            if name == "Q8_0_head":
                rows = min(rows, 262144)
            w = random_blocks(self.stream_buffer, t, rows, cols, self.rng)
            self._rows(t, w, cols)  # once through (any page faults taken)
            seconds = 1.0 / timed(lambda: self._rows(t, w, cols), 1.0)
            result["rows_stream_g_weights_s"][name] = round(rows * cols / seconds / 1e9, 2)
            result["rows_stream_gb_s"][name] = round(rows * row_bytes / seconds / 1e9, 2)
        words = self.stream_buffer.view(np.uint64)
        result["read_gb_s"] = round(timed(lambda: self.read_all(words), words.nbytes / 1e9), 2)
        if self.model is not None:
            result.update(self._measure_step())
        return result

    def _measure_step(self) -> dict:
        np = self.np
        model, cache = self.model, self.cache
        step = model._one_launch_layers(1)
        position = 257
        slots = np.zeros(1, dtype=np.int64)
        tokens = 48

        def layers():
            nonlocal position
            for _ in range(tokens):
                if position >= self.n_ctx:
                    position = 257
                x = model.backend.embedding_rows(model.token_embd, np.array([7]))
                step.run(x, np.array([position]), slots, cache)
                position += 1

        def whole_tokens():
            nonlocal position
            for _ in range(tokens):
                if position >= self.n_ctx:
                    position = 257
                model.forward([7], [position], [0], cache)
                position += 1

        layers_tok_s = timed(layers, tokens)
        forward_tok_s = timed(whole_tokens, tokens)
        return {"step": {"layer_types": self.layer_types, "layers_tok_s": round(layers_tok_s, 1),
                         "layers_g_weights_s": round(layers_tok_s * self.layer_weights / 1e9, 2),
                         "forward_tok_s": round(forward_tok_s, 1), "one_launch": step is not None}}

    def info(self) -> dict:
        import llvmlite.binding as llvm
        import numba
        from localllm import kernel_cache
        features = numba.config.CPU_FEATURES
        return {"source": str(Path(sys.modules["localllm"].__file__).parent.parent),
                "numba_target_cpu": numba.config.CPU_NAME or llvm.get_host_cpu_name(),
                "numba_cpu_features": "host" if features is None else (features or "the target CPU's defaults"),
                "numba_threads": numba.get_num_threads(), "kernel_cache": str(kernel_cache.configure()),
                "pinned_cpus": sorted(os.sched_getaffinity(0))}


def run_worker(args) -> None:
    sys.path.insert(0, args.source)
    os.sched_setaffinity(0, {args.cpu})
    worker = KernelWorker(args.types.split(","), args.stream_mb, args.model_path)
    print(json.dumps({"ready": True}), flush=True)
    for command in sys.stdin:
        command = command.strip()
        if command == "run":
            print(json.dumps(worker.measure()), flush=True)
        elif command == "quit":
            print(json.dumps(worker.info()), flush=True)
            return


# --------------------------------------------------------------------------- driver

class Worker(WorkerProcess):
    def __init__(self, source: Path, args, env: dict):
        command = [sys.executable, __file__, "--worker", "--source", str(source), "--cpu", str(args.cpu),
                   "--types", args.types, "--stream-mb", str(args.stream_mb)]
        if args.model_path:
            command += ["--model-path", args.model_path]
        super().__init__(command, env=env, cwd=tempfile.gettempdir())
        self.ask()  # ready


def extract_revision(revision: str, folder: Path) -> str:
    """``localllm/`` of git revision ``revision`` into folder; returns the commit id."""
    commit = subprocess.run(["git", "rev-parse", "--verify", revision + "^{commit}"], cwd=REPOSITORY, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "localllm"], cwd=REPOSITORY, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return commit


def medians(rounds: list[dict]):
    """The median of every number over the rounds (same nested keys)."""
    first = rounds[0]
    if isinstance(first, dict):
        return {key: medians([r[key] for r in rounds]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return round(statistics.median(rounds), 2)
    return first


def ratios(current, baseline):
    if isinstance(current, dict):
        return {key: ratios(current[key], baseline[key]) for key in current
                if key in baseline and not isinstance(current[key], (bool, str, list))}
    return round(current / baseline, 2) if baseline else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated ggml types (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", metavar="REV", help="also measure the kernels of this git revision")
    parser.add_argument("--model", default="gemma3:270m",
                        help="store name or GGUF path for the step figures, 'none' to skip (default %(default)s)")
    parser.add_argument("--avx2-only", action="store_true", help="compile for haswell (AVX2, no AVX-512)")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the CPU the workers run on")
    parser.add_argument("--stream-mb", type=int, default=512, help="bytes of the DRAM-streaming matrices")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    args.model_path = None
    model_note = None
    if args.model != "none":
        sys.path.insert(0, str(REPOSITORY))
        from localllm.api import resolve
        try:
            args.model_path = str(resolve(args.model)[0])
        except Exception as error:  # a model that is not there skips the step figures, with the reason
            model_note = f"skipped: {error}"

    from bench_generate import cpu_info
    env = {**localllm_env(1, args.avx2_only), "OMP_NUM_THREADS": "1"}
    result = {"cpu": cpu_info(), "pinned_cpu": args.cpu, "types": args.types.split(","), "rounds": args.rounds,
              "avx2_only": bool(args.avx2_only), "model": args.model_path or model_note,
              "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory() as folder:
        sources = {"current": REPOSITORY}
        if args.baseline:
            result["baseline_commit"] = extract_revision(args.baseline, Path(folder))
            sources["baseline"] = Path(folder)
        workers = {name: Worker(source, args, env) for name, source in sources.items()}
        rounds = {name: [] for name in workers}
        for index in range(args.rounds):
            names = list(workers)[index % len(workers):] + list(workers)[:index % len(workers)]
            for name in names:
                rounds[name].append(workers[name].ask("run"))
        for name, worker in workers.items():
            result[name] = {**medians(rounds[name]), "worker": worker.close()}
    if "baseline" in result:
        result["speedup"] = ratios({k: v for k, v in result["current"].items() if k != "worker"},
                                   result["baseline"])
    result["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    if result["load_average_1min"]["start"] > 1:
        result["warning"] = "the machine was busy at the start (load average above 1): not a comparable run"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
