"""Image encoding time: localllm's vision encoder on Gemma 3 4B's vision-tower shape, beside llama.cpp's.

    python benchmarks/bench_vision.py [--mmproj FILE] [--cache-dir DIR] [--repeats 1] [--threads N]
                                      [--llama-server PATH]

The encoder is random (no hub access here) but has the real shape: SigLIP so400m at 896 pixels (27 layers,
width 1152, MLP 4304, 16 heads, patch 14: 4096 patches) and Gemma 3's projector to 2560 (256 soft tokens),
written once as an F16 mmproj GGUF as llama.cpp's converter lays it out (the patch convolution F16, norms and
position embeddings F32) into ``--cache-dir`` (default ``~/.cache/localllm-bench``), or read from ``--mmproj``.
One 896x896 image (a gradient, fixed) is preprocessed and encoded ``--repeats`` times; the best time counts.

The peers, each skipped with the reason when it cannot run:
- llama-cpp-python's multimodal path (``llama_cpp``): its chat handlers load an mmproj beside a text model
  and expose no encoder timing of their own;
- llama.cpp's own ``llama-server`` (``--llama-server`` or ``LOCALLLM_LLAMA_SERVER``, built with cmake from
  the llama-cpp-python sdist): started with the same mmproj and a random one-layer Gemma 3 text model of
  width 2560 (the projector's output must match it), sent the same image as a PNG in one chat request
  (one token generated); the time is the request's, so it includes PNG decoding, llama.cpp's resize and
  a 260-token prefill through one layer, a small share next to the encoder.

Prints one JSON object: the shape, localllm's ``load_s``, ``preprocess_s``, ``encode_s`` (best) and
``encode_cpu_s``, each peer's result or ``skipped``, ``ratio`` (peer seconds over localllm's: above 1,
localllm is faster) and ``cpu_ratio`` (the same for CPU seconds, which other processes on a busy machine
disturb less than wall time).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEMMA3_4B_VISION = dict(image_size=896, patch_size=14, dim=1152, hidden_dim=4304, n_layers=27, n_heads=16,
                        n_embd_text=2560, pool=4, eps=1e-6)


def write_random_mmproj(path: Path, shape: dict = GEMMA3_4B_VISION, seed: int = 0) -> Path:
    """A random Gemma 3 mmproj GGUF of ``shape``: matrices F16, the rest F32 (written to ``path``.tmp, then
    renamed, so a killed run leaves no half file)."""
    import gguf

    s = shape
    rng = np.random.default_rng(seed)
    side = s["image_size"] // s["patch_size"]
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "clip")
    writer.add_type("mmproj")
    writer.add_file_type(1)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "gemma3")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.projection_dim", s["n_embd_text"])
    writer.add_uint32("clip.vision.image_size", s["image_size"])
    writer.add_uint32("clip.vision.patch_size", s["patch_size"])
    writer.add_uint32("clip.vision.embedding_length", s["dim"])
    writer.add_uint32("clip.vision.feed_forward_length", s["hidden_dim"])
    writer.add_uint32("clip.vision.block_count", s["n_layers"])
    writer.add_uint32("clip.vision.attention.head_count", s["n_heads"])
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", s["eps"])
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    if s["pool"] != 4:
        writer.add_uint32("clip.vision.projector.scale_factor", s["pool"])

    def matrix(name: str, *shape_: int) -> None:
        fan_in = int(np.prod(shape_[1:]))
        writer.add_tensor(name, (rng.standard_normal(shape_, np.float32) / np.sqrt(fan_in)).astype(np.float16))

    def vector(name: str, n: int, center: float = 0.0) -> None:
        writer.add_tensor(name, (center + 0.1 * rng.standard_normal(n, np.float32)).astype(np.float32))

    d, p, ff = s["dim"], s["patch_size"], s["hidden_dim"]
    matrix("v.patch_embd.weight", d, 3, p, p)
    vector("v.patch_embd.bias", d)
    writer.add_tensor("v.position_embd.weight", 0.1 * rng.standard_normal((side * side, d), np.float32))
    for layer in range(s["n_layers"]):
        blk = f"v.blk.{layer}"
        for norm in ("ln1", "ln2"):
            vector(f"{blk}.{norm}.weight", d, 1.0)
            vector(f"{blk}.{norm}.bias", d)
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            matrix(f"{blk}.{name}.weight", d, d)
            vector(f"{blk}.{name}.bias", d)
        matrix(f"{blk}.ffn_up.weight", ff, d)
        vector(f"{blk}.ffn_up.bias", ff)
        matrix(f"{blk}.ffn_down.weight", d, ff)
        vector(f"{blk}.ffn_down.bias", d)
    vector("v.post_ln.weight", d, 1.0)
    vector("v.post_ln.bias", d)
    vector("mm.soft_emb_norm.weight", d, 1.0)
    writer.add_tensor("mm.input_projection.weight",
                      (rng.standard_normal((d, s["n_embd_text"]), np.float32) / np.sqrt(d)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


def bench_image(size: int = 896):
    """The fixed test image: smooth ramps with some texture."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    rgb = np.stack([255 * x / (size - 1), 255 * y / (size - 1), 127.5 + 127.5 * np.sin(x / 9) * np.cos(y / 13)], -1)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8), "RGB")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_localllm(mmproj: Path, image, repeats: int) -> dict:
    from localllm.vision import VisionEncoder

    start = time.perf_counter()
    encoder = VisionEncoder.from_mmproj(mmproj)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    pixels = encoder.preprocess(image)
    preprocess_s = time.perf_counter() - start
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        embeddings = encoder.encode(pixels)
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    best = int(np.argmin(walls))
    return {"load_s": round(load_s, 3), "preprocess_s": round(preprocess_s, 3), "encode_s": round(walls[best], 2),
            "encode_cpu_s": round(cpus[best], 2), "encode_all_s": [round(w, 2) for w in walls],
            "n_image_tokens": int(embeddings.shape[0]), "n_embd_text": int(embeddings.shape[1]),
            "embeddings_finite": bool(np.isfinite(embeddings).all())}


def bench_llama_cpp_python() -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"llama-cpp-python is not installed here ({exc}); it is not built for this benchmark"}
    return {"skipped": "llama-cpp-python's multimodal chat handlers need a full text model beside the mmproj and "
                       "report no encoder time; llama.cpp's own llama-server is the anchor (see the docstring)"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmproj", type=Path, help="an mmproj GGUF (default: a random Gemma 3 4B-shaped one)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "localllm-bench")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--llama-server", help="llama.cpp's llama-server (or env LOCALLLM_LLAMA_SERVER)")
    args = parser.parse_args(argv)
    mmproj = args.mmproj
    if mmproj is None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        mmproj = args.cache_dir / "mmproj-gemma3-4b-vision-shape-random-f16.gguf"
        if not mmproj.is_file():
            write_random_mmproj(mmproj)
    image = bench_image()
    result = {"model": "Gemma 3 4B vision tower shape, random F16", "mmproj": str(mmproj),
              "mmproj_bytes": mmproj.stat().st_size, "shape": GEMMA3_4B_VISION, "threads": args.threads,
              "localllm": bench_localllm(mmproj, image, args.repeats),
              "llama-cpp-python": bench_llama_cpp_python()}
    server = args.llama_server or os.environ.get("LOCALLLM_LLAMA_SERVER")
    result["llama.cpp"] = bench_llama_server(server, mmproj, image, args) if server else {
        "skipped": "no llama-server given (--llama-server or LOCALLLM_LLAMA_SERVER)"}
    ours, ours_cpu = result["localllm"]["encode_s"], result["localllm"]["encode_cpu_s"]
    peers_run = [peer for peer in ("llama-cpp-python", "llama.cpp") if "seconds" in result[peer]]
    result["ratio"] = {peer: round(result[peer]["seconds"] / ours, 3) for peer in peers_run}
    result["cpu_ratio"] = {peer: round(result[peer]["cpu_seconds"] / ours_cpu, 3) for peer in peers_run}
    print(json.dumps(result, indent=2))
    return result


def bench_llama_server(server: str, mmproj: Path, image, args) -> dict:
    """llama.cpp's llama-server with ``mmproj`` and a random one-layer Gemma 3 text model of width 2560: the best
    wall time of ``--repeats`` chat requests carrying the image (prompt caching off) and the server's CPU
    seconds during it."""
    import base64
    import socket
    import subprocess
    import urllib.error
    import urllib.request
    from dataclasses import replace

    import bench_archs
    import peers

    path, source = peers.locate(server, "LOCALLLM_LLAMA_SERVER")
    if path is None:
        return {"skipped": f"llama-server: {source}"}
    text_shape = replace(bench_archs.SHAPES["gemma3"], model="Gemma 3 4B width, 1 layer", dim=2560, n_layers=1,
                         n_heads=8, n_kv_heads=4, head_dim=256, hidden_dim=1024, vocab_size=1024, n_ctx=4096)
    text = args.cache_dir / "gemma3-text-2560-1-layer-random-f16.gguf"
    if not text.is_file():
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        bench_archs.write_source(text, text_shape)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = args.cache_dir / "llama-server-vision.log"
    command = [str(path), "-m", str(text), "--mmproj", str(mmproj), "-t", str(args.threads), "-c", "4096",
               "-np", "1", "--host", "127.0.0.1", "--port", str(port), "--no-warmup"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 900                       # loading includes mtmd's own warm-up encode
            while True:
                if process.poll() is not None:
                    return {"skipped": f"llama-server exited with {process.returncode} at startup (log: {log_path})"}
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.time() > deadline:
                    return {"skipped": f"llama-server not ready after 900 s (log: {log_path})"}
                time.sleep(1)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            body = json.dumps({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri}}, {"type": "text", "text": "What is this?"}]}],
                "max_tokens": 1, "temperature": 0, "cache_prompt": False}).encode()
            walls, cpus = [], []
            for _ in range(args.repeats):
                request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                start, cpu = time.perf_counter(), process_cpu_seconds(process.pid)
                with urllib.request.urlopen(request, timeout=3600) as response:
                    answer = json.load(response)
                walls.append(time.perf_counter() - start)
                cpus.append(process_cpu_seconds(process.pid) - cpu)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    best = int(np.argmin(walls))
    return {"server": str(path), "seconds": round(walls[best], 2), "cpu_seconds": round(cpus[best], 2),
            "request_all_s": [round(w, 2) for w in walls],
            "prompt_tokens": answer.get("usage", {}).get("prompt_tokens"), "log": str(log_path)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux ``/proc/<pid>/stat``), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
