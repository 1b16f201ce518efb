"""numba twins of ``ops.ref``: RMSNorm, RoPE and SwiGLU (attention: ``ops.attention_kernels``).

Same names, signatures and shapes as ``ops.ref`` (read it first: it is the
readable version). Differences are float32 rounding only, plus ``fast_exp``:
a vectorizable exp (Cephes polynomial, about 2 ulp) used by the softmax and by
SiLU, since LLVM calls libm's scalar ``expf`` once per element otherwise.

Parallel loops run only when there is enough work (prefill, large batches);
decode-sized calls stay on the calling thread to avoid a launch.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..quants.intrinsics import float32_from_bits
from . import ref

PARALLEL_MIN_ROWS = 16  # rows (tokens) from which rms_norm / rope / swiglu use threads

_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)
_LN2_LOW = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.3)
_EXP_MAX = np.float32(88.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@njit(cache=True, fastmath=True, inline="always")
def fast_exp(x):
    """exp(x) for float32 x: 2^k * e^f with |f| <= ln2/2, e^f by a degree-7 polynomial (Cephes expf).

    Inputs are clamped to [-87.3, 88.0] (results stay finite and normal).
    """
    x = min(max(x, _EXP_MIN), _EXP_MAX)
    k = np.floor(x * _LOG2E + _HALF)
    f = x - k * _LN2_HIGH - k * _LN2_LOW
    p = ((((_P0 * f + _P1) * f + _P2) * f + _P3) * f + _P4) * f + _P5
    p = p * (f * f) + f + _ONE
    # int32, not int64: AVX2 has no vector float -> int64 conversion, and with it the loops stay scalar
    return p * float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


# --------------------------------------------------------------------------- rms_norm

@njit(cache=True, fastmath=True)
def _sum_of_squares(x, i):
    total = np.float32(0.0)
    for k in range(x.shape[1]):
        total += x[i, k] * x[i, k]
    return total


@njit(cache=True, inline="always")  # no fastmath: scalar tails and vector bodies must round alike
def _rms_norm_row(x, weight, eps, out, i):
    scale = _ONE / np.sqrt(_sum_of_squares(x, i) / np.float32(x.shape[1]) + eps)
    for k in range(x.shape[1]):
        out[i, k] = x[i, k] * scale * weight[k]


@njit(cache=True)
def _rms_norm_serial(x, weight, eps, out):
    for i in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, i)


@njit(cache=True)
def _rms_norm_one(x, weight, eps, out, i):
    """Row i alone (workers of one parallel region take a row each)."""
    _rms_norm_row(x, weight, eps, out, i)


@njit(cache=True, parallel=True)
def _rms_norm_parallel(x, weight, eps, out):
    for i in prange(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, i)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (n, dim) -> x / rms(x) * weight."""
    x = _as_float32(x)
    weight = _as_float32(weight)
    if x.ndim != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: x must be (n, dim) and weight (dim,), got {x.shape} and {weight.shape}")
    out = np.empty_like(x)
    kernel = _rms_norm_parallel if x.shape[0] >= PARALLEL_MIN_ROWS else _rms_norm_serial
    kernel(x, weight, np.float32(eps), out)
    return out


# --------------------------------------------------------------------------- swiglu

# No reciprocal approximations ("arcp", "afn"): the vectorized and the scalar loop must agree bit for bit.
_EXACT_DIVISION = {"nnan", "ninf", "nsz", "contract"}
# numba's default error model checks every float division for a zero divisor (to raise ZeroDivisionError): that
# branch kept the gated activations' loops scalar (3.4 ns an element, about 6% of a SmolLM2 prefill). Their
# divisor, 1 + exp(.), is at least 1; with numpy's error model the loops vectorize (same bits).
_GATED = dict(cache=True, fastmath=_EXACT_DIVISION, error_model="numpy")


@njit(**_GATED, inline="always")
def _swiglu_row(gate, up, out, i):
    for k in range(gate.shape[1]):
        g = gate[i, k]
        out[i, k] = g / (_ONE + fast_exp(-g)) * up[i, k]


@njit(**_GATED)
def _swiglu_serial(gate, up, out):
    for i in range(gate.shape[0]):
        _swiglu_row(gate, up, out, i)


@njit(**_GATED)
def _swiglu_one(gate, up, out, i):
    _swiglu_row(gate, up, out, i)


@njit(**_GATED, parallel=True)
def _swiglu_parallel(gate, up, out):
    for i in prange(gate.shape[0]):
        _swiglu_row(gate, up, out, i)


def _run_gated(name: str, serial, parallel, gate, up) -> np.ndarray:
    """A gated activation kernel on gate, up (n, hidden_dim): threads from PARALLEL_MIN_ROWS rows on."""
    gate, up = _as_float32(gate), _as_float32(up)
    if gate.ndim != 2 or gate.shape != up.shape:
        raise ValueError(f"{name}: gate and up must be the same (n, hidden_dim), got {gate.shape} and {up.shape}")
    out = np.empty_like(gate)
    kernel = parallel if gate.shape[0] >= PARALLEL_MIN_ROWS else serial
    kernel(gate, up, out)
    return out


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, both (n, hidden_dim)."""
    return _run_gated("swiglu", _swiglu_serial, _swiglu_parallel, gate, up)


# --------------------------------------------------------------------------- geglu

_GELU_TWICE_SQRT_2_OVER_PI = np.float32(2.0 * 0.7978845608028654)
_GELU_CUBIC = np.float32(0.044715)


@njit(**_GATED, inline="always")
def _geglu_row(gate, up, out, i):
    # gelu_tanh(g) = g/2 (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3)
    for k in range(gate.shape[1]):
        g = gate[i, k]
        twice_u = _GELU_TWICE_SQRT_2_OVER_PI * (g + _GELU_CUBIC * g * g * g)
        out[i, k] = g / (_ONE + fast_exp(-twice_u)) * up[i, k]


@njit(**_GATED)
def _geglu_serial(gate, up, out):
    for i in range(gate.shape[0]):
        _geglu_row(gate, up, out, i)


@njit(**_GATED)
def _geglu_one(gate, up, out, i):
    _geglu_row(gate, up, out, i)


@njit(**_GATED, parallel=True)
def _geglu_parallel(gate, up, out):
    for i in prange(gate.shape[0]):
        _geglu_row(gate, up, out, i)


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu_tanh(gate) * up, both (n, hidden_dim)."""
    return _run_gated("geglu", _geglu_serial, _geglu_parallel, gate, up)


def gated(activation: str, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """activation(gate) * up for a gated feed-forward; activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if activation == "silu":
        return swiglu(gate, up)
    if activation == "gelu_tanh":
        return geglu(gate, up)
    raise ValueError(f"unknown feed-forward activation '{activation}' (known: {sorted(ref.GATED_ACTIVATIONS)})")


# --------------------------------------------------------------------------- rope

@njit(cache=True, inline="always")
def _rope_row(x, cos, sin, neox, out, i):
    n_heads, head_dim = x.shape[1], x.shape[2]
    half = cos.shape[1]
    rope_dim = 2 * half
    for h in range(n_heads):
        for k in range(half):
            a_at, b_at = (k, k + half) if neox else (2 * k, 2 * k + 1)
            a, b = x[i, h, a_at], x[i, h, b_at]
            out[i, h, a_at] = a * cos[i, k] - b * sin[i, k]
            out[i, h, b_at] = a * sin[i, k] + b * cos[i, k]
        for k in range(rope_dim, head_dim):
            out[i, h, k] = x[i, h, k]


@njit(cache=True)
def _rope_serial(x, cos, sin, neox, out):
    for i in range(x.shape[0]):
        _rope_row(x, cos, sin, neox, out, i)


@njit(cache=True, parallel=True)
def _rope_parallel(x, cos, sin, neox, out):
    for i in prange(x.shape[0]):
        _rope_row(x, cos, sin, neox, out, i)


_angle_cache: dict = {}
ROPE_BLOCK = 1024          # positions a block of the decode table holds
ROPE_TABLE_ROWS = 256      # calls of at most this many tokens read the block table
_angle_blocks: dict = {}   # (frequencies, rope_dim, block) -> (cos, sin), each (ROPE_BLOCK, rope_dim / 2)


def _rope_table(positions: np.ndarray, theta: "float | ref.RopeFrequencies",
                rope_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``ref.rope_angles`` for these positions, remembered: every layer of a forward pass asks again, and a
    decode step asks for one new position: those rows come from tables of ROPE_BLOCK positions, each worked
    out once by ``ref.rope_angles`` (numpy's cos and sin go element by element: the same values)."""
    frequencies = ref.rope_frequencies(theta)
    if 0 < positions.shape[0] <= ROPE_TABLE_ROWS:
        first = int(positions.min())
        block = first // ROPE_BLOCK
        if first >= 0 and int(positions.max()) < (block + 1) * ROPE_BLOCK:
            key = (frequencies, int(rope_dim), block)
            table = _angle_blocks.get(key)
            if table is None:
                if len(_angle_blocks) >= 16:
                    _angle_blocks.clear()
                rows = np.arange(block * ROPE_BLOCK, (block + 1) * ROPE_BLOCK, dtype=np.int64)
                table = _angle_blocks[key] = ref.rope_angles(rows, frequencies, rope_dim)
            rows = positions - block * ROPE_BLOCK
            return table[0][rows], table[1][rows]
    key = (frequencies, int(rope_dim), positions.tobytes())
    table = _angle_cache.get(key)
    if table is None:
        if len(_angle_cache) >= 8:
            _angle_cache.clear()
        table = _angle_cache[key] = ref.rope_angles(positions, theta, rope_dim)
    return table


def rope(x: np.ndarray, positions: np.ndarray, theta: "float | ref.RopeFrequencies", rope_dim: int,
         style: str = "norm") -> np.ndarray:
    """Rotary position embedding on the first ``rope_dim`` dims of each head; x (n, n_heads, head_dim).

    ``norm`` rotates adjacent pairs (x[2i], x[2i+1]), ``neox`` rotates (x[i], x[i + rope_dim/2]).
    """
    if style not in ("norm", "neox"):
        raise ValueError(f"unknown rope style '{style}'")
    x = _as_float32(x)
    positions = _as_int64(positions)
    if x.ndim != 3 or positions.shape != (x.shape[0],):
        raise ValueError(f"rope: x must be (n, n_heads, head_dim) with positions (n,), got {x.shape}, {positions.shape}")
    if rope_dim % 2 or not 0 < rope_dim <= x.shape[2]:
        raise ValueError(f"rope: rope_dim must be even and in 1..{x.shape[2]}, got {rope_dim}")
    cos, sin = _rope_table(positions, theta, rope_dim)
    out = np.empty_like(x)
    kernel = _rope_parallel if x.shape[0] >= PARALLEL_MIN_ROWS else _rope_serial
    kernel(x, cos, sin, style == "neox", out)
    return out


# --------------------------------------------------------------------------- helpers

def _as_float32(a) -> np.ndarray:
    """a as a C-contiguous float32 array (no copy when it already is one)."""
    if type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_int64(a) -> np.ndarray:
    if type(a) is np.ndarray and a.dtype == np.int64 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.int64)
