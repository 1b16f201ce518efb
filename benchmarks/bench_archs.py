"""Decode and prefill speed per architecture, on random-weight GGUFs in real models' shapes, beside the native peers.

    python benchmarks/bench_archs.py [--archs llama,qwen2,qwen3,phi3,gemma2,gemma3] [--mixes q4_k_m,q8_0]
        [--cache-dir DIR] [--threads 2] [--prompt-tokens 512] [--decode-tokens 64] [--rounds 2]
        [--repetitions 1] [--quick] [--tiny] [--llama-bench PATH] [--ik-llama-bench PATH]
        [--llama-quantize PATH] [--avx2-only] [--make-only] [--keep-source] [--quiet-below 0.3] [--max-wait 300]
        [--output JSON]

For each architecture, a GGUF with seeded random weights in the shape of a real
small model (``SHAPES``): every matrix the real file has, its dims, heads, KV heads,
head width, feed-forward width and its real vocabulary size, with the metadata and a
synthetic byte-level ("gpt2") vocabulary of that size, enough for llama.cpp to load
it. Weights are scaled as in a trained model so that activations stay finite:
matrices normal / sqrt(columns), norm scales near 1, small biases. Phi-3-mini and
Gemma-2-2B keep 8 of their layers so that they fit two cores.

Files, in ``--cache-dir`` (else ``$LOCALLLM_BENCH_CACHE``, else
``~/.cache/localllm/bench_archs``), are made once and reused; their names carry a
hash of the shape and of the generator, so a change makes new ones:

* ``<arch>-<hash>-f16.gguf``: the source, matrices in F16, vectors in F32, written
  tensor by tensor with gguf-py's writer (deleted once the mixes are made,
  unless ``--keep-source``);
* ``-q8_0.gguf``: every matrix Q8_0, quantized by gguf-py from the source;
* ``-q4_k_m.gguf``: llama.cpp's own ``llama-quantize SOURCE OUT Q4_K_M``, so the mix is
  the one llama.cpp picks for that architecture (Q6_K on some ``attn_v``/``ffn_down``
  and the output, Q5_0/Q8_0 where a row is not a multiple of 256, as in the real
  files). ``--llama-quantize PATH`` / ``$LOCALLLM_LLAMA_QUANTIZE``, else the
  ``llama-quantize`` beside llama.cpp's ``llama-bench``; none: the mix is skipped.

Then, per file, in rounds that alternate the engines (each round starting one engine
later) and keep each engine's median:

* localllm, in a worker process (``NUMBA_NUM_THREADS = --threads``, warmed up first
  so that no compile is timed): prefill of ``--prompt-tokens`` tokens in one forward
  call into an empty cache; then, in a fresh cache, a 4-token prompt and
  ``--decode-tokens`` greedy decode steps (argmax), one forward call each, every
  logit checked finite. A NaN or an exception is reported as that file's error;
* llama.cpp's and ik_llama.cpp's ``llama-bench -p PROMPT -n DECODE -t THREADS``
  (``peers.py``: ``--llama-bench`` / ``$LOCALLLM_LLAMA_BENCH``,
  ``--ik-llama-bench`` / ``$LOCALLLM_IK_LLAMA_BENCH``), same file. A peer that
  refuses a file (an architecture or a type it lacks) is that entry's error.

Before each measurement the script waits (``--quiet-below``, ``--max-wait``) until the
other processes on the machine leave the CPUs nearly idle, and every round records how
busy they were in the 2 s before it (``busy_before``) and the load average.

``--avx2-only`` compiles localllm's workers as for an AVX2-only CPU, as in
``bench_generate.py``. ``--quick``: prompt 128, decode 16, one round. ``--tiny``:
the same architectures in toy shapes (for tests of this script).

Prints one JSON object on stdout (CPU model and flags, load average before and after
every file, per architecture and mix: file, tensor types, each engine's tok/s,
localllm's ratio to each peer and to the faster one, against the goal of 1.1x)
and a markdown table of it on stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/peers.py)
from bench_generate import cpu_info  # noqa: E402
from workers import WorkerDied, WorkerProcess, avx2_only_env, localllm_env  # noqa: E402

LOCAL = "localllm"
GOAL = 1.1                       # issue 16: decode and prefill at least 1.1x the faster peer
GENERATOR_VERSION = 3            # bump when the files written here change (the cache names carry it)
SEED = 16
MIXES = ("q4_k_m", "q8_0")
SHORT_PROMPT = 4                 # tokens before the timed decode steps (llama-bench's tg starts from none)


# --------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    """A decoder's shape and the features its GGUF carries (as llama.cpp's converter writes them)."""

    arch: str                    # GGUF general.architecture
    model: str                   # the real model whose shape this is
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    n_ctx: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool = True
    qkv_bias: bool = False       # attn_q/k/v.bias (Qwen 2)
    qk_norm: bool = False        # attn_q_norm / attn_k_norm (Qwen 3, Gemma 3)
    fused: bool = False          # attn_qkv and gate+up in one ffn_up (Phi-3)
    post_norms: bool = False     # post_attention_norm, post_ffw_norm (Gemma 2/3)
    llama3_rope: bool = False    # rope_freqs.weight from Llama 3.x's scaling (factor 32, low 1, high 4, 8192)
    sliding_window: int = 0
    attention_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    head_dim_key: bool = False   # writes attention.key_length / value_length (head_dim is not dim / n_heads)
    n_ctx_orig: int = 0          # rope.scaling.original_context_length (Phi-3)
    real_layers: int = 0         # the real model's layer count when this shape keeps fewer

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


SHAPES = {
    "llama": Shape("llama", "Llama-3.2-1B", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                   hidden_dim=8192, vocab_size=128256, n_ctx=131072, rope_theta=500000.0, norm_eps=1e-5,
                   llama3_rope=True),
    "qwen2": Shape("qwen2", "Qwen2.5-0.5B", dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                   hidden_dim=4864, vocab_size=151936, n_ctx=32768, rope_theta=1000000.0, norm_eps=1e-6,
                   qkv_bias=True),
    "qwen3": Shape("qwen3", "Qwen3-0.6B", dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                   hidden_dim=3072, vocab_size=151936, n_ctx=40960, rope_theta=1000000.0, norm_eps=1e-6,
                   qk_norm=True, head_dim_key=True),
    "phi3": Shape("phi3", "Phi-3-mini-4k (8 of 32 layers)", dim=3072, n_layers=8, n_heads=32, n_kv_heads=32,
                  head_dim=96, hidden_dim=8192, vocab_size=32064, n_ctx=4096, rope_theta=10000.0, norm_eps=1e-5,
                  tie_embeddings=False, fused=True, sliding_window=2047, n_ctx_orig=4096, real_layers=32),
    "gemma2": Shape("gemma2", "Gemma-2-2B (8 of 26 layers)", dim=2304, n_layers=8, n_heads=8, n_kv_heads=4,
                    head_dim=256, hidden_dim=9216, vocab_size=256000, n_ctx=8192, rope_theta=10000.0,
                    norm_eps=1e-6, post_norms=True, sliding_window=4096, attention_softcap=50.0,
                    final_logit_softcap=30.0, head_dim_key=True, real_layers=26),
    "gemma3": Shape("gemma3", "Gemma-3-270M", dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
                    hidden_dim=2048, vocab_size=262144, n_ctx=32768, rope_theta=1000000.0, norm_eps=1e-6,
                    qk_norm=True, post_norms=True, sliding_window=512, head_dim_key=True),
}


def tiny(shape: Shape) -> Shape:
    """The same architecture and features in toy dims (multiples of 32, so Q8_0 applies to every matrix)."""
    head_dim = 32 if shape.head_dim_key else 16
    return replace(shape, model=f"tiny {shape.arch}", dim=64, n_layers=2, n_heads=4,
                   n_kv_heads=4 if shape.n_kv_heads == shape.n_heads else 2, head_dim=head_dim, hidden_dim=96,
                   vocab_size=512, n_ctx=1024, sliding_window=min(shape.sliding_window, 64), real_layers=0)


def llama3_rope_factors(head_dim: int, theta: float, factor: float = 32.0, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, original_context: int = 8192) -> np.ndarray:
    """Llama 3.x's RoPE scaling as per-pair divisors of the frequencies (the ``rope_freqs`` tensor): pairs
    turning faster than ``original_context / high_freq_factor`` keep theirs, slower than
    ``original_context / low_freq_factor`` turn ``factor`` times slower, and those between blend smoothly."""
    inverse_frequencies = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # (head_dim/2,)
    wavelength = 2 * math.pi / inverse_frequencies
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelength < original_context / high_freq_factor, 1.0,
                       np.where(wavelength > original_context / low_freq_factor, factor, blended))
    return factors.astype(np.float32)


# --------------------------------------------------------------------------- the files

# tensor kinds: how its random values are drawn
MATRIX, NORM, BIAS, FACTORS = "matrix", "norm", "bias", "factors"


def tensor_plan(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF tensor name, numpy shape (rows, cols) or (n,), kind), in the order llama.cpp's converter writes."""
    s = shape
    plan = []
    if s.llama3_rope:
        plan.append(("rope_freqs.weight", (s.head_dim // 2,), FACTORS))
    plan.append(("token_embd.weight", (s.vocab_size, s.dim), MATRIX))
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", (s.dim,), NORM))
        if s.fused:
            plan.append((p + "attn_qkv.weight", (s.q_dim + 2 * s.kv_dim, s.dim), MATRIX))
        else:
            plan += [(p + "attn_q.weight", (s.q_dim, s.dim), MATRIX), (p + "attn_k.weight", (s.kv_dim, s.dim), MATRIX),
                     (p + "attn_v.weight", (s.kv_dim, s.dim), MATRIX)]
        if s.qkv_bias:
            plan += [(p + "attn_q.bias", (s.q_dim,), BIAS), (p + "attn_k.bias", (s.kv_dim,), BIAS),
                     (p + "attn_v.bias", (s.kv_dim,), BIAS)]
        if s.qk_norm:
            plan += [(p + "attn_q_norm.weight", (s.head_dim,), NORM), (p + "attn_k_norm.weight", (s.head_dim,), NORM)]
        plan.append((p + "attn_output.weight", (s.dim, s.q_dim), MATRIX))
        if s.post_norms:
            plan.append((p + "post_attention_norm.weight", (s.dim,), NORM))
        plan.append((p + "ffn_norm.weight", (s.dim,), NORM))
        if s.fused:
            plan.append((p + "ffn_up.weight", (2 * s.hidden_dim, s.dim), MATRIX))      # gate rows, then up rows
        else:
            plan += [(p + "ffn_gate.weight", (s.hidden_dim, s.dim), MATRIX),
                     (p + "ffn_up.weight", (s.hidden_dim, s.dim), MATRIX)]
        plan.append((p + "ffn_down.weight", (s.dim, s.hidden_dim), MATRIX))
        if s.post_norms:
            plan.append((p + "post_ffw_norm.weight", (s.dim,), NORM))
    plan.append(("output_norm.weight", (s.dim,), NORM))
    if not s.tie_embeddings:
        plan.append(("output.weight", (s.vocab_size, s.dim), MATRIX))
    return plan


def random_tensor(shape: Shape, name: str, dims: tuple[int, ...], kind: str, seed: int) -> np.ndarray:
    """One tensor's values, seeded by its name (the same whatever the order): matrices N(0, 1/cols) in F16,
    norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), Llama 3's RoPE factors as its converter computes them."""
    if kind == FACTORS:
        return llama3_rope_factors(shape.head_dim, shape.rope_theta)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if kind == NORM:
        return (1.0 + 0.1 * rng.standard_normal(dims, dtype=np.float32)).astype(np.float32)
    if kind == BIAS:
        return 0.1 * rng.standard_normal(dims, dtype=np.float32)
    rows, cols = dims
    out = np.empty(dims, dtype=np.float16)
    scale = np.float32(1.0 / math.sqrt(cols))
    for start in range(0, rows, 8192):                     # in row blocks: a 256k vocabulary is 10^8 values
        block = rng.standard_normal((min(8192, rows - start), cols), dtype=np.float32)
        out[start:start + len(block)] = block * scale
    return out


def byte_level_vocab(vocab_size: int) -> tuple[list[str], list[int]]:
    """The GPT-2 byte alphabet, six control tokens and filler tokens "t<i>" up to ``vocab_size`` (at least t0 ...
    t9: the merges name them)."""
    from localllm.tokenizer import bytes_to_unicode
    byte_to_char = bytes_to_unicode()
    # control tokens: ChatML's, and SentencePiece's that llama.cpp looks up in a file named like Phi-3
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<s>", "</s>"]
    tokens = [byte_to_char[b] for b in range(256)] + control
    if vocab_size < len(tokens) + 10:
        raise ValueError(f"a vocabulary of {vocab_size} tokens is smaller than the byte alphabet, "
                         f"{len(control)} control tokens and t0 ... t9")
    types = [1] * 256 + [3] * len(control)                  # NORMAL, CONTROL
    tokens += [f"t{i}" for i in range(vocab_size - len(tokens))]
    types += [1] * (vocab_size - len(types))
    return tokens, types


def add_metadata(writer, shape: Shape, file_type: int) -> None:
    """The ``<arch>.*`` keys llama.cpp's converter writes for this architecture, and the tokenizer keys."""
    s = shape
    writer.add_name(f"random {s.model}")
    writer.add_context_length(s.n_ctx)
    writer.add_embedding_length(s.dim)
    writer.add_feed_forward_length(s.hidden_dim)
    writer.add_block_count(s.n_layers)
    writer.add_head_count(s.n_heads)
    writer.add_head_count_kv(s.n_kv_heads)
    writer.add_layer_norm_rms_eps(s.norm_eps)
    writer.add_rope_freq_base(s.rope_theta)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_vocab_size(s.vocab_size)
    writer.add_file_type(file_type)
    if s.head_dim_key:
        writer.add_key_length(s.head_dim)
        writer.add_value_length(s.head_dim)
    if s.sliding_window:
        writer.add_sliding_window(s.sliding_window)
    if s.n_ctx_orig:
        writer.add_rope_scaling_orig_ctx_len(s.n_ctx_orig)
    if s.attention_softcap:
        writer.add_attn_logit_softcapping(s.attention_softcap)
    if s.final_logit_softcap:
        writer.add_final_logit_softcapping(s.final_logit_softcap)
    tokens, types = byte_level_vocab(s.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"t {d}" for d in range(10)])   # llama.cpp wants merges: those of t0 ... t9
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(258)
    writer.add_add_bos_token(False)


def write_streamed(path: Path, shape: Shape, file_type: int, tensors) -> None:
    """A GGUF written tensor by tensor (never all in memory): ``tensors`` yields (name, array, ggml type or None)
    twice, first for the header (arrays may be None there: see ``header``), then with the data."""
    import gguf

    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), shape.arch)
    add_metadata(writer, shape, file_type)
    for name, dims, dtype, nbytes, raw_type in tensors("header"):
        writer.add_tensor_info(name, dims, dtype, nbytes, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in tensors("data"):
        writer.write_tensor_data(array)
    writer.close()
    partial.replace(path)                                   # a complete file or none under the cached name


def write_source(path: Path, shape: Shape, seed: int = SEED) -> None:
    """The F16 source: matrices F16, vectors F32."""
    plan = tensor_plan(shape)

    def tensors(phase):
        for name, dims, kind in plan:
            if phase == "header":
                dtype = np.float16 if kind == MATRIX else np.float32
                yield name, dims, dtype, int(np.prod(dims)) * np.dtype(dtype).itemsize, None
            else:
                yield random_tensor(shape, name, dims, kind, seed)

    write_streamed(path, shape, 1, tensors)                 # general.file_type 1: mostly F16


def write_q8_0(path: Path, source: Path, shape: Shape) -> None:
    """Every matrix of the source quantized to Q8_0 by gguf-py (in row blocks); vectors stay F32."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    reader = gguf.GGUFReader(str(source))
    by_name = {t.name: t for t in reader.tensors}
    plan = tensor_plan(shape)

    def tensors(phase):
        for name, dims, kind in plan:
            data = by_name[name].data                       # numpy view of the memory map, numpy shape
            if phase == "header":
                if kind == MATRIX:
                    byte_shape = quant_shape_to_byte_shape(dims, q8)
                    yield name, byte_shape, np.uint8, int(np.prod(byte_shape)), q8
                else:
                    yield name, dims, np.float32, data.nbytes, None
            elif kind == MATRIX:
                out = np.empty(quant_shape_to_byte_shape(dims, q8), dtype=np.uint8)
                for start in range(0, dims[0], 8192):
                    out[start:start + 8192] = quantize(np.asarray(data[start:start + 8192], dtype=np.float32), q8)
                yield out
            else:
                yield np.asarray(data, dtype=np.float32)

    write_streamed(path, shape, 7, tensors)                 # general.file_type 7: mostly Q8_0


def shape_tag(shape: Shape, seed: int) -> str:
    text = json.dumps({"shape": asdict(shape), "seed": seed, "generator": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def ensure_files(shape: Shape, mixes: list[str], cache_dir: Path, quantize: Path | None, keep_source: bool,
                 log) -> dict[str, Path | str]:
    """mix -> the cached GGUF (made when missing), or the reason it cannot be made."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{shape.arch}-{shape_tag(shape, SEED)}"
    source = cache_dir / f"{stem}-f16.gguf"
    files: dict[str, Path | str] = {}
    for mix in mixes:
        path = cache_dir / f"{stem}-{mix}.gguf"
        if path.exists():
            files[mix] = path
            continue
        if mix == "q4_k_m" and quantize is None:
            files[mix] = "no llama-quantize (--llama-quantize, $LOCALLLM_LLAMA_QUANTIZE or beside --llama-bench)"
            continue
        if not source.exists():
            log(f"writing {source.name} ({shape.model}, random weights)")
            write_source(source, shape)
        log(f"making {path.name}")
        if mix == "q8_0":
            write_q8_0(path, source, shape)
        elif mix == "q4_k_m":
            partial = path.with_name(path.name + ".partial")
            done = subprocess.run([str(quantize), str(source), str(partial), "Q4_K_M", "2"],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode != 0:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
                raise RuntimeError(f"llama-quantize failed on {source.name} ({done.returncode}): {tail}")
            partial.replace(path)
        else:
            raise ValueError(f"unknown type mix {mix!r} (known: {', '.join(MIXES)})")
        files[mix] = path
    if source.exists() and not keep_source and all(isinstance(f, Path) for f in files.values()):
        source.unlink()
    return files


def localllm_source() -> dict:
    """Where the measured localllm comes from, and its git commit when that is a checkout (``-dirty``: edited)."""
    import localllm
    folder = Path(localllm.__file__).resolve().parent.parent
    done = subprocess.run(["git", "-C", str(folder), "describe", "--always", "--dirty", "--abbrev=12"],
                          capture_output=True, text=True)
    return {"path": str(folder), "git": done.stdout.strip() if done.returncode == 0 else "not a git checkout"}


def describe_file(path: Path) -> dict:
    """Size, parameter count and how many tensors of each ggml type the file holds."""
    from localllm.formats.gguf import read_gguf
    gguf = read_gguf(path)
    types = Counter(t.ggml_type for t in gguf.tensors.values())
    params = sum(int(np.prod(t.shape)) for t in gguf.tensors.values())
    return {"file": str(path), "file_mb": round(path.stat().st_size / 2**20, 1), "params_m": round(params / 1e6, 1),
            "tensor_types": dict(sorted(types.items()))}


# --------------------------------------------------------------------------- localllm (inside a worker)

def prompt_ids(n: int, vocab_size: int) -> list[int]:
    """Deterministic ordinary token ids past the byte alphabet and the control tokens."""
    first = 262                                             # past the bytes and the control tokens
    return [first + (7919 * i + 101) % (vocab_size - first) for i in range(n)]


class NonFiniteLogits(RuntimeError):
    pass


class LocalRunner:
    """localllm's DecoderModel on one file: timed prefill, timed greedy decode after a short prompt."""

    def __init__(self, path: str, prompt_tokens: int, decode_tokens: int):
        from localllm.formats.gguf import read_gguf
        from localllm.formats.resident import resident_by_default
        from localllm.models.decoder import DecoderModel

        self.model = DecoderModel.from_gguf(read_gguf(path, resident=resident_by_default()), backend="fast")
        self.prompt_tokens, self.decode_tokens = prompt_tokens, decode_tokens
        self.n_ctx = max(prompt_tokens, SHORT_PROMPT + decode_tokens) + 16
        self.prompt = prompt_ids(prompt_tokens, self.model.config.vocab_size)

    @staticmethod
    def checked(logits: np.ndarray, where: str) -> int:
        row = logits[-1]
        if not np.isfinite(row).all():
            bad = int((~np.isfinite(row)).sum())
            raise NonFiniteLogits(f"{bad} of {row.size} logits are not finite {where}")
        return int(row.argmax())

    def prefill(self, tokens: list[int]):
        cache = self.model.new_cache(n_slots=1, n_ctx=self.n_ctx)
        n = len(tokens)
        logits = self.model.forward(tokens, np.arange(n), np.zeros(n, dtype=np.int64), cache, logits_for=[n - 1])
        return cache, self.checked(logits, f"after a prefill of {n} tokens")

    def decode(self, cache, token: int, position: int, steps: int) -> list[int]:
        out = []
        for step in range(steps):
            logits = self.model.forward([token], [position + step], [0], cache)
            token = self.checked(logits, f"at decode step {step + 1} (position {position + step})")
            out.append(token)
        return out

    def warm_up(self) -> None:
        """Everything a round runs, once: the prefill's pieces (128 tokens and the rest) and decode steps."""
        cache, token = self.prefill(self.prompt[:min(self.prompt_tokens, 130)])
        self.decode(cache, token, min(self.prompt_tokens, 130), 2)

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.prefill(self.prompt)
        t1 = time.perf_counter()
        cache, token = self.prefill(self.prompt[:SHORT_PROMPT])
        t2 = time.perf_counter()
        generated = self.decode(cache, token, SHORT_PROMPT, self.decode_tokens)
        t3 = time.perf_counter()
        return {"prefill_tok_s": self.prompt_tokens / (t1 - t0), "decode_tok_s": self.decode_tokens / (t3 - t2),
                "first_tokens": [token] + generated[:7]}


def run_worker(args) -> None:
    """Load, warm up, then answer 'run' / 'quit' on stdin with one JSON line each ({"error": ...} on failure)."""
    def reply(obj):
        print(json.dumps(obj), flush=True)

    try:
        runner = LocalRunner(args.worker, args.prompt_tokens, args.decode_tokens)
        t0 = time.perf_counter()
        runner.warm_up()
        reply({"ready": True, "warm_up_s": round(time.perf_counter() - t0, 1)})
    except Exception as error:  # noqa: BLE001 (reported, with its type, as this file's localllm error)
        import traceback
        traceback.print_exc()
        reply({"error": f"{type(error).__name__}: {error}"})
        return
    for command in sys.stdin:
        command = command.strip()
        if command == "quit":
            reply(worker_info(runner))
            return
        try:
            reply(runner.run())
        except Exception as error:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            reply({"error": f"{type(error).__name__}: {error}"})


def worker_info(runner: LocalRunner) -> dict:
    import numba
    from localllm.quants import kernels
    step = runner.model._one_launch_layers(1)
    features = numba.config.CPU_FEATURES
    return {"kernels": kernels.KERNELS, "threads": int(os.environ.get("NUMBA_NUM_THREADS", "0")) or os.cpu_count(),
            "numba_target_cpu": numba.config.CPU_NAME or "host",
            "numba_cpu_features": "host" if features is None else (features or "the target CPU's defaults"),
            "one_launch_decode": step is not None}


class Worker(WorkerProcess):
    """A localllm worker process on one file."""

    def __init__(self, path: Path, args):
        super().__init__([sys.executable, __file__, "--worker", str(path), "--prompt-tokens", str(args.prompt_tokens),
                          "--decode-tokens", str(args.decode_tokens)], env=localllm_env(args.threads, args.avx2_only))

    def ask(self, command: str | None = None) -> dict:
        try:
            return super().ask(command)
        except WorkerDied as exc:               # reported in the JSON beside the peers' figures
            return {"error": str(exc).replace("benchmark worker", "localllm worker")}


# --------------------------------------------------------------------------- driver

def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """Share of all CPUs' time spent busy (not idle, not waiting on I/O) over the next ``seconds`` (/proc/stat)."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]                 # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(threshold: float, max_wait_s: float, log) -> dict:
    """Wait (at most ``max_wait_s``) until the others' processes keep the CPUs at most ``threshold`` busy: the
    spinning thread pools of every engine here collapse when another process takes a core."""
    t0 = time.perf_counter()
    while True:
        busy = cpu_busy_fraction()
        waited = time.perf_counter() - t0
        if busy <= threshold or waited >= max_wait_s:
            if busy > threshold:
                log(f"still {busy:.0%} busy after {waited:.0f} s: measuring anyway")
            return {"busy_before": round(busy, 2), "waited_s": round(waited),
                    "load_1min": round(os.getloadavg()[0], 2)}

def median_summary(rounds: list[dict]) -> dict:
    out = {}
    for kind in ("prefill", "decode"):
        out[f"{kind}_tok_s"] = round(statistics.median(r[f"{kind}_tok_s"] for r in rounds), 2)
    return out


def measure_file(path: Path, args, benches: dict, log) -> dict:
    """Rounds over localllm and the peers on one file; medians, ratios, errors."""
    entry = {"load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    worker = Worker(path, args)
    ready = worker.ask()
    engines = [LOCAL] + list(benches)
    rounds: dict[str, list] = {name: [] for name in engines}
    errors: dict[str, str] = {}
    if "error" in ready:
        errors[LOCAL] = ready["error"]
    else:
        entry["localllm_warm_up_s"] = ready["warm_up_s"]
    for index in range(args.rounds):
        start = index % len(engines)
        for name in engines[start:] + engines[:start]:
            if name in errors:
                continue
            quiet = wait_for_quiet(args.quiet_below, args.max_wait, log)
            if name == LOCAL:
                answer = worker.ask("run")
                if "error" in answer:
                    errors[name] = answer["error"]
                else:
                    rounds[name].append({**answer, **quiet})
                continue
            try:
                rounds[name].append({**benches[name].run(path, args.threads, args.prompt_tokens, args.decode_tokens,
                                                         args.repetitions), **quiet})
            except (RuntimeError, ValueError, KeyError, OSError) as error:
                errors[name] = str(error)
    info = worker.close()
    for name in engines:
        if name in errors:
            entry[name] = {"error": errors[name]}
            continue
        result = median_summary(rounds[name])
        if name == LOCAL:
            result.update(info)
            result["first_tokens"] = rounds[name][0]["first_tokens"]
        result["rounds"] = [{key: round(r[key], 2) for key in ("prefill_tok_s", "decode_tok_s", "busy_before",
                                                               "waited_s", "load_1min")} for r in rounds[name]]
        entry[name] = result
    entry["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)

    local = entry[LOCAL]
    measured = [name for name in benches if "error" not in entry[name]]
    if "error" not in local and measured:
        keys = {"prefill": "prefill_tok_s", "decode": "decode_tok_s"}
        entry["ratio_localllm_over"] = {name: {kind: round(local[key] / entry[name][key], 2)
                                               for kind, key in keys.items()} for name in measured}
        entry["faster_peer"] = {}
        for kind, key in keys.items():
            best = max(measured, key=lambda name: entry[name][key])
            ratio = round(local[key] / entry[best][key], 2)
            entry["faster_peer"][kind] = {"engine": best, "tok_s": entry[best][key],
                                          "ratio_localllm_over_it": ratio, "meets_goal": ratio >= GOAL}
    return entry


def markdown_table(result: dict) -> str:
    """One row per architecture and mix: tok/s of each engine, localllm / the faster peer."""
    peer_names = list(peers.PEERS)
    head = ["model (arch)", "mix", "file MB"]
    for kind in ("prefill", "decode"):
        head += [f"{kind} localllm"] + [f"{kind} {name}" for name in peer_names] + [f"{kind} ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def figure(entry, name, key):
        engine = entry.get(name)
        if engine is None:
            return "n/a"
        return "error" if "error" in engine else f"{engine[key]:.1f}"

    for entry in result["results"]:
        row = [f"{entry['model']} ({entry['arch']})", entry["mix"], str(entry.get("file_mb", ""))]
        for kind in ("prefill", "decode"):
            key = f"{kind}_tok_s"
            row += [figure(entry, LOCAL, key)] + [figure(entry, name, key) for name in peer_names]
            faster = entry.get("faster_peer", {}).get(kind)
            row.append(f"{faster['ratio_localllm_over_it']:.2f}x" if faster else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(SHAPES), help="comma-separated (default %(default)s)")
    parser.add_argument("--mixes", default=",".join(MIXES), help="comma-separated (default %(default)s)")
    parser.add_argument("--cache-dir", help="where the GGUFs are made and kept (else $LOCALLLM_BENCH_CACHE, "
                                            "else ~/.cache/localllm/bench_archs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prefill length (default 512; quick 128)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decode steps (default 64; quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per file (default 2; quick 1)")
    parser.add_argument("--repetitions", type=int, default=1, help="llama-bench -r within each round")
    parser.add_argument("--quick", action="store_true", help="prompt 128, decode 16, one round")
    parser.add_argument("--tiny", action="store_true", help="toy shapes of the same architectures (tests)")
    parser.add_argument("--keep-source", action="store_true", help="keep the F16 source files")
    parser.add_argument("--make-only", action="store_true", help="make the files (and describe them), measure nothing")
    parser.add_argument("--output", metavar="JSON", help="also write the JSON here, rewritten after every file (a "
                                                         "long run cut short keeps what it measured)")
    for name, (option, env_name) in peers.PEERS.items():
        parser.add_argument(option, metavar="PATH", help=f"{name}'s llama-bench (else ${env_name}; none: skipped)")
    option, env_name = peers.QUANTIZE
    parser.add_argument(option, metavar="PATH", help=f"llama.cpp's llama-quantize (else ${env_name}, else beside "
                                                     "llama.cpp's llama-bench)")
    parser.add_argument("--quiet-below", type=float, default=0.3, metavar="FRACTION",
                        help="before each measurement, wait until other processes keep at most this share of the "
                             "CPUs busy (default %(default)s; 1 never waits)")
    parser.add_argument("--max-wait", type=float, default=300, metavar="SECONDS",
                        help="longest wait for such a quiet moment (default %(default)s)")
    parser.add_argument("--avx2-only", action="store_true",
                        help="localllm workers compile for haswell (AVX2, no AVX-512), in a kernel cache of their own")
    parser.add_argument("--worker", metavar="GGUF", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = {"prompt_tokens": 128, "decode_tokens": 16, "rounds": 1}
    full = {"prompt_tokens": 512, "decode_tokens": 64, "rounds": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        run_worker(args)
        return

    def log(message: str) -> None:
        print(f"[bench_archs {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    archs = [a for a in args.archs.split(",") if a]
    mixes = [m for m in args.mixes.split(",") if m]
    for arch in archs:
        if arch not in SHAPES:
            parser.error(f"unknown architecture {arch!r} (known: {', '.join(SHAPES)})")
    for mix in mixes:
        if mix not in MIXES:
            parser.error(f"unknown type mix {mix!r} (known: {', '.join(MIXES)})")
    cache_dir = Path(args.cache_dir or os.environ.get("LOCALLLM_BENCH_CACHE")
                     or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localllm" / "bench_archs")

    skipped, benches = {}, {}
    for name, (option, env_name) in peers.PEERS.items():
        found, how = peers.locate(getattr(args, option.lstrip("-").replace("-", "_")), env_name)
        if found:
            benches[name] = peers.LlamaBench(name, found, how)
        else:
            skipped[name] = how
    quantize, quantize_how = peers.locate_quantize(args.llama_quantize, benches.get("llama.cpp"))

    result = {"localllm_source": localllm_source(), "cpu": cpu_info(), "threads": args.threads,
              "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "decode_after_prompt_tokens": SHORT_PROMPT,
              "rounds": args.rounds, "peer_repetitions": args.repetitions, "goal_ratio": GOAL,
              "quiet_below": args.quiet_below, "max_wait_s": args.max_wait,
              "avx2_only": {**avx2_only_env(), "peers": "as built"} if args.avx2_only else False,
              "peers": {name: str(bench.path) for name, bench in benches.items()}, "peers_skipped": skipped,
              "llama_quantize": str(quantize) if quantize else quantize_how, "cache_dir": str(cache_dir),
              "load_average_1min": {"start": round(os.getloadavg()[0], 2)}, "results": []}
    for arch in archs:
        shape = tiny(SHAPES[arch]) if args.tiny else SHAPES[arch]
        files = ensure_files(shape, mixes, cache_dir, quantize, args.keep_source, log)
        for mix in mixes:
            entry = {"arch": arch, "model": shape.model, "mix": mix}
            if shape.real_layers:
                entry["layers"] = f"{shape.n_layers} of {shape.real_layers}"
            if isinstance(files[mix], str):
                entry["skipped"] = files[mix]
                result["results"].append(entry)
                continue
            entry.update(describe_file(files[mix]))
            if args.make_only:
                result["results"].append(entry)
                continue
            log(f"measuring {arch} {mix} ({entry['file_mb']} MB)")
            entry.update(measure_file(files[mix], args, benches, log))
            log(json.dumps({name: entry[name] for name in [LOCAL, *benches]}, default=str)[:400])
            result["results"].append(entry)
            if args.output:
                Path(args.output).write_text(json.dumps(result, indent=2))
    result["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    if max(e.get("load_average_1min", {}).get("start", 0) for e in result["results"] or [{}]) > 1:
        result["warning"] = "the machine was busy (load average above 1 at the start of a file): compare with care"
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    print(markdown_table(result), file=sys.stderr)


if __name__ == "__main__":
    main()
