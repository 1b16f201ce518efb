"""The vision encoders: an image -> the soft tokens a language model reads in place of ``<image>`` tokens.

Two families, one ViT walked by ``VisionEncoder.encode``:

- ``gemma3``: SigLIP. Patches (a convolution with stride = kernel = patch, written as one matmul) plus
  learned position embeddings, ``n_layers`` pre-LayerNorm blocks (bidirectional attention, GELU-tanh MLP),
  the post-LayerNorm; then Gemma 3's projector: average pooling of the patch grid (64x64 -> 16x16 at 896
  pixels), the soft-embedding RMSNorm (its scale stored with Gemma's +1 already added, as llama.cpp's
  converter writes it) and the input projection ``(n_embd, n_embd_text)``.
- ``llava`` (LLaVA-1.5): CLIP. A class embedding before the patches, position embeddings, the
  pre-LayerNorm, blocks with a quick-GELU MLP; the features are the hidden states after the feature layer
  (the second to last: the last block is never run) without the class token; then the two-layer MLP
  projector ``mm.0 -> GELU -> mm.2``.

Weights keep llama.cpp's mmproj names (``v.*``, ``mm.*``) whichever loader read them (``vision.loading``)
and stay in the file's own types, memory-mapped: each is dequantized to float32 when its layer runs. The
implementation is numpy: the matmuls go through numpy's BLAS in float32, attention one head and 1024
queries at a time into one reused score buffer. The measured hot spots beside BLAS have numba twins, used
unless ``fast=False`` (which runs the numpy references): the softmax over the scores and GELU-tanh
(``vision.kernels``), the LayerNorms (``ops.encoder.layer_norm``). Shapes: ``n`` positions (patches, plus
the class token for CLIP), ``dim`` the tower's width, ``n_embd_text`` the language model's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..ops import encoder as encoder_ops
from ..ops import ref as ops_ref
from ..quants import QTensor
from ..quants import ref as quants_ref
from .kernels import gelu_tanh, gelu_tanh_ref, softmax_rows, softmax_rows_ref

PROJECTORS = ("gemma3", "llava")
ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu", "silu")
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
ATTENTION_CHUNK = 1024          # queries whose scores are computed at once (a (1024, n) float32 buffer)


@dataclass(frozen=True)
class VisionConfig:
    """The shape of a vision tower and its projector."""

    projector: str              # "gemma3" | "llava"
    image_size: int             # the square the tower reads, in pixels
    patch_size: int
    dim: int                    # the tower's width
    hidden_dim: int             # its MLP's width
    n_layers: int               # blocks run (LLaVA: up to the feature layer; the file may hold more)
    n_heads: int
    eps: float                  # LayerNorm epsilon (and the soft-embedding RMSNorm's)
    activation: str             # the tower MLP's: "gelu_tanh" | "gelu" | "quick_gelu" | "silu"
    n_embd_text: int            # the language model's width: the projector's output
    pool: int = 1               # gemma3: the average pooling's kernel and stride, in patches
    keep_class_token: bool = False          # llava: the "full" feature strategy keeps the class token
    projector_activation: str = "gelu"      # llava: between mm.0 and mm.2

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_image_tokens(self) -> int:
        if self.projector == "gemma3":
            return (self.patches_per_side // self.pool) ** 2
        return self.n_patches + (1 if self.keep_class_token else 0)

    def check(self, where: str) -> None:
        """ValueError naming ``where`` for a configuration the forward pass cannot run."""
        problems = []
        if self.projector not in PROJECTORS:
            problems.append(f"projector '{self.projector}' (expected one of {', '.join(PROJECTORS)})")
        for name in ("image_size", "patch_size", "dim", "hidden_dim", "n_heads", "n_embd_text", "pool"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} = {getattr(self, name)!r} (expected a positive integer)")
        if not problems:
            if self.image_size % self.patch_size:
                problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
            if self.dim % self.n_heads:
                problems.append(f"width {self.dim} is not a multiple of the head count {self.n_heads}")
            if self.projector == "gemma3" and self.patches_per_side % self.pool:
                problems.append(f"{self.patches_per_side} patches a side do not pool by {self.pool}")
        if not isinstance(self.n_layers, int) or self.n_layers < 0:
            problems.append(f"n_layers = {self.n_layers!r}")
        if not (isinstance(self.eps, float) and math.isfinite(self.eps) and self.eps > 0):
            problems.append(f"eps = {self.eps!r} (expected a positive float)")
        if self.activation not in ACTIVATIONS or self.projector_activation not in ACTIVATIONS:
            problems.append(f"activation '{self.activation}' / '{self.projector_activation}' "
                            f"(expected one of {', '.join(ACTIVATIONS)})")
        if problems:
            raise ValueError(f"{where}: unusable vision configuration: {'; '.join(problems)}")


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image becomes the tower's input, as the Hugging Face image processor (its PIL backend) does it:
    resize (to ``size`` x ``size``, or the shortest edge to ``size`` then a center crop of ``crop`` x
    ``crop``), scale the 8-bit values by ``rescale_factor``, then ``(x - mean) / std`` per channel."""

    resize: str                 # "square" | "shortest_edge"
    size: int
    crop: int | None            # shortest_edge: the center crop's side
    resample: str               # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255

    @property
    def output_size(self) -> int:
        return self.size if self.resize == "square" else self.crop


class VisionEncoder:
    """A vision tower and its projector (see the module docstring).

    Build one with ``VisionEncoder.from_mmproj(path)`` (llama.cpp's projector GGUF) or
    ``VisionEncoder.from_hf(folder)`` (a transformers Gemma3ForConditionalGeneration or
    LlavaForConditionalGeneration folder); then ``encode(preprocess(image))``.
    """

    def __init__(self, config: VisionConfig, preprocessing: ImagePreprocessing, tensors: dict[str, QTensor],
                 source: str = "", fast: bool = True):
        config.check(source or "vision encoder")
        self.fast = fast            # numba softmax and GELU-tanh (False: the numpy reference throughout)
        # attention heads shared among this many threads (one BLAS thread each), when the BLAS can be set so
        self.attention_workers = _cores() if fast else 1
        self.config = config
        self.preprocessing = preprocessing
        self.tensors = tensors
        self.source = source

    @classmethod
    def from_mmproj(cls, path: str | Path, fast: bool = True) -> "VisionEncoder":
        """The encoder of a llama.cpp mmproj GGUF (``clip.projector_type`` gemma3 or mlp)."""
        from .loading import read_mmproj
        return cls(*read_mmproj(path), source=str(path), fast=fast)

    @classmethod
    def from_hf(cls, folder: str | Path, fast: bool = True) -> "VisionEncoder":
        """The encoder of a Hugging Face folder (config.json ``vision_config`` + safetensors)."""
        from .loading import read_hf_vision
        return cls(*read_hf_vision(folder), source=str(folder), fast=fast)

    # ------------------------------------------------------------------ what the wiring reads
    @property
    def projector(self) -> str:
        return self.config.projector

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def n_image_tokens(self) -> int:
        return self.config.n_image_tokens

    @property
    def n_embd_text(self) -> int:
        return self.config.n_embd_text

    def __repr__(self) -> str:
        c = self.config
        return (f"VisionEncoder({c.projector}, {c.image_size}px, patch {c.patch_size}, {c.n_layers} layers x {c.dim}, "
                f"{c.n_image_tokens} tokens x {c.n_embd_text})")

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image (``vision.load_image``'s) -> the tower's input, float32 ``(3, H, W)``."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess takes a PIL image (see vision.load_image), not {type(image).__name__}")
        p = self.preprocessing
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        if p.resize == "square":
            target = (p.size, p.size)
        else:  # the shortest edge to p.size, the other in proportion (truncated, as transformers does)
            short, long = min(width, height), max(width, height)
            new_long = int(p.size * long / short)
            target = (p.size, new_long) if width <= height else (new_long, p.size)
        pixels = np.asarray(image.resize(target, resample=RESAMPLE[p.resample]))         # (H, W, 3) uint8
        if p.resize == "shortest_edge":
            pixels = _center_crop(pixels, p.crop)
        scaled = (pixels.astype(np.float64) * p.rescale_factor).astype(np.float32)       # (H, W, 3)
        normalized = (scaled - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
        return np.ascontiguousarray(normalized.transpose(2, 0, 1), dtype=np.float32)     # (3, H, W)

    # ------------------------------------------------------------------ the forward pass
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed pixels ``(3, image_size, image_size)`` -> ``(n_image_tokens, n_embd_text)`` float32."""
        c = self.config
        pixels = np.asarray(pixels)
        if pixels.shape != (3, c.image_size, c.image_size):
            raise ValueError(f"encode takes pixels of shape (3, {c.image_size}, {c.image_size}) (see preprocess), "
                             f"got {pixels.shape}")
        if pixels.dtype.kind != "f" or not np.isfinite(pixels).all():
            raise ValueError("encode takes finite floating-point pixels")
        x = self._embed(pixels.astype(np.float32))                   # (n, dim)
        for layer in range(c.n_layers):
            x = self._block(layer, x)
        if "v.post_ln.weight" in self.tensors:
            x = self._layer_norm(x, "v.post_ln")
        if c.projector == "gemma3":
            return self._gemma3_projector(x)
        return self._llava_projector(x)

    def encode_image(self, image: Image.Image) -> np.ndarray:
        """``encode(preprocess(image))``."""
        return self.encode(self.preprocess(image))

    def _w(self, name: str, default=...) -> np.ndarray | None:
        """Tensor ``name`` as float32 in its own shape (``default`` when it is absent, if given)."""
        if name not in self.tensors and default is not ...:
            return default
        return quants_ref.dequantize(self.tensors[name])

    def _embed(self, pixels: np.ndarray) -> np.ndarray:
        """(3, H, W) -> patch embeddings + position embeddings (CLIP: the class token first, then the
        pre-LayerNorm): (n, dim)."""
        c = self.config
        side, p = c.patches_per_side, c.patch_size
        patches = (pixels.reshape(3, side, p, side, p)                # (channel, row, y, column, x)
                   .transpose(1, 3, 0, 2, 4)                          # (row, column, channel, y, x)
                   .reshape(c.n_patches, 3 * p * p))                  # one patch a row, row-major over the grid
        kernel = self._w("v.patch_embd.weight").reshape(c.dim, 3 * p * p)   # the convolution (dim, 3, p, p)
        x = patches @ kernel.T                                        # (n_patches, dim)
        bias = self._w("v.patch_embd.bias", None)
        if bias is not None:
            x += bias
        if "v.class_embd" in self.tensors:
            x = np.concatenate([self._w("v.class_embd").reshape(1, c.dim), x])     # (1 + n_patches, dim)
        x += self._w("v.position_embd.weight")
        if "v.pre_ln.weight" in self.tensors:
            x = self._layer_norm(x, "v.pre_ln")
        return x.astype(np.float32, copy=False)

    def _layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """LayerNorm by ``<name>.weight`` and ``<name>.bias`` (optional): (n, dim) -> (n, dim)."""
        weight, bias = self._w(f"{name}.weight"), self._w(f"{name}.bias", None)
        if self.fast and bias is not None:
            return encoder_ops.layer_norm(x, weight, bias, self.config.eps)
        return ops_ref.layer_norm(x, weight, bias, self.config.eps)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """x (n, n_in) @ W.T + b for ``<name>.weight`` (n_out, n_in) and ``<name>.bias`` (n_out,)."""
        y = x @ self._w(f"{name}.weight").T
        bias = self._w(f"{name}.bias", None)
        if bias is not None:
            y += bias
        return y

    def _block(self, layer: int, x: np.ndarray) -> np.ndarray:
        """One pre-LayerNorm ViT block: x + attention(LN1(x)), then + MLP(LN2(.)). (n, dim) -> (n, dim)."""
        c = self.config
        blk = f"v.blk.{layer}"
        h = self._layer_norm(x, f"{blk}.ln1")
        q = self._linear(h, f"{blk}.attn_q")                          # (n, dim)
        k = self._linear(h, f"{blk}.attn_k")
        v = self._linear(h, f"{blk}.attn_v")
        softmax = softmax_rows if self.fast else softmax_rows_ref
        attended = bidirectional_attention(q, k, v, c.n_heads, softmax, workers=self.attention_workers)
        x = x + self._linear(attended, f"{blk}.attn_out")
        h = self._layer_norm(x, f"{blk}.ln2")
        h = activation(c.activation, self._linear(h, f"{blk}.ffn_up"), self.fast)    # (n, hidden_dim)
        return x + self._linear(h, f"{blk}.ffn_down")

    def _gemma3_projector(self, x: np.ndarray) -> np.ndarray:
        """(n_patches, dim) -> average pooling of the grid -> RMSNorm -> (n_image_tokens, n_embd_text)."""
        c = self.config
        side, pool = c.patches_per_side, c.pool
        grid = x.reshape(side // pool, pool, side // pool, pool, c.dim)  # (out row, y, out column, x, dim)
        pooled = grid.mean(axis=(1, 3), dtype=np.float32).reshape(-1, c.dim)   # (n_image_tokens, dim)
        normed = ops_ref.rms_norm(pooled, self._w("mm.soft_emb_norm.weight"), c.eps)
        return normed @ self._w("mm.input_projection.weight")          # (dim, n_embd_text)

    def _llava_projector(self, x: np.ndarray) -> np.ndarray:
        """(1 + n_patches, dim) -> the class token dropped -> mm.0 -> GELU -> mm.2: (n_image_tokens, n_embd_text)."""
        features = x if self.config.keep_class_token else x[1:]
        h = activation(self.config.projector_activation, self._linear(features, "mm.0"), self.fast)
        return self._linear(h, "mm.2").astype(np.float32, copy=False)


def _cores() -> int:
    """The cores the attention's heads are shared among: numba's thread count (``NUMBA_NUM_THREADS``, the
    machine's cores by default), or 1 when numpy's BLAS threads cannot be set (``blas.available``)."""
    from numba import get_num_threads

    from .blas import available
    return get_num_threads() if available() else 1


def _center_crop(pixels: np.ndarray, crop: int) -> np.ndarray:
    """The central ``crop`` x ``crop`` of (H, W, 3), zero-padded where the image is smaller (as transformers'
    ``center_crop``)."""
    height, width = pixels.shape[:2]
    top, left = (height - crop) // 2, (width - crop) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + crop, left:left + crop]
    out_h, out_w = max(crop, height), max(crop, width)
    padded = np.zeros((out_h, out_w, 3), pixels.dtype)
    pad_top, pad_left = math.ceil((out_h - height) / 2), math.ceil((out_w - width) / 2)
    padded[pad_top:pad_top + height, pad_left:pad_left + width] = pixels
    top, left = (out_h - crop) // 2, (out_w - crop) // 2
    return padded[top:top + crop, left:left + crop]


def bidirectional_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_heads: int,
                            softmax=softmax_rows_ref, chunk: int = ATTENTION_CHUNK, workers: int = 1) -> np.ndarray:
    """Every position attends to every position: q, k, v (n, dim) with the heads side by side -> (n, dim).

    One head at a time, ``chunk`` queries at a time, into one reused score buffer (``chunk``, n): a fresh
    64 MB array per head costs more in page faults than its matmul. ``softmax`` works in place on rows
    (``kernels.softmax_rows`` or its numpy twin). ``workers`` > 1: the heads are shared among that many
    threads, each with numpy's BLAS on one thread (``blas.one_blas_thread``); every head is computed as
    it would be alone, so the result is the same.
    """
    n, dim = q.shape
    head_dim = dim // n_heads
    out = np.empty((n, dim), np.float32)
    workers = max(1, min(workers, n_heads))
    if workers == 1:
        _attention_heads(q, k, v, range(n_heads), head_dim, softmax, chunk, out)
        return out
    from concurrent.futures import ThreadPoolExecutor

    from .blas import one_blas_thread
    shares = [range(first, n_heads, workers) for first in range(workers)]
    with one_blas_thread(), ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(_attention_heads, q, k, v, heads, head_dim, softmax, chunk, out)
                     for heads in shares]:
            done.result()
    return out


def _attention_heads(q, k, v, heads, head_dim: int, softmax, chunk: int, out: np.ndarray) -> None:
    """``bidirectional_attention`` of the heads ``heads``, written into their columns of ``out``."""
    n = q.shape[0]
    scale = np.float32(1 / math.sqrt(head_dim))
    buffer = np.empty((min(chunk, n), n), np.float32)
    for head in heads:
        cols = slice(head * head_dim, (head + 1) * head_dim)
        q_head = q[:, cols] * scale                                   # (n, head_dim)
        k_head_t = np.ascontiguousarray(k[:, cols].T)                 # (head_dim, n)
        v_head = np.ascontiguousarray(v[:, cols])                     # (n, head_dim)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            scores = buffer[:stop - start]                            # (queries, n)
            np.matmul(q_head[start:stop], k_head_t, out=scores)
            softmax(scores)
            out[start:stop, cols] = scores @ v_head                   # (queries, head_dim)


def activation(kind: str, x: np.ndarray, fast: bool = False) -> np.ndarray:
    """The MLP activations: ``gelu_tanh`` (SigLIP), ``quick_gelu`` (CLIP: x * sigmoid(1.702 x)), ``gelu``
    (exact, with erf: LLaVA's projector), ``silu``. ``fast``: GELU-tanh by ``kernels.gelu_tanh`` (numba, in
    place) instead of numpy; exact GELU always goes through ``ops.encoder.gelu`` (numpy has no vector erf)."""
    if kind == "gelu_tanh":
        return gelu_tanh(np.ascontiguousarray(x, np.float32)) if fast else gelu_tanh_ref(x)
    if kind == "quick_gelu":
        return (x / (1.0 + np.exp(np.float32(-1.702) * x))).astype(np.float32)
    if kind == "gelu":
        return encoder_ops.gelu(np.ascontiguousarray(x, np.float32), "gelu", threads=fast)
    if kind == "silu":
        return ops_ref.silu(x).astype(np.float32)
    raise ValueError(f"unknown activation '{kind}' (expected one of {', '.join(ACTIVATIONS)})")
