"""KV cache: preallocated keys and values for a pool of sequence slots.

Layout per layer: ``(n_slots, n_kv_heads, rows, head_dim)``, so one
sequence's keys for one head are contiguous (what attention reads); rows is
n_ctx, or a ring for sliding-window layers. Keys and
values are float16 by default, like llama.cpp (half the memory and the
bytes attention reads per token), or float32. The
arrays live in anonymous memory maps, whose pages the OS maps on first touch:
an unused slot or the unused tail of a context costs no resident memory, and a
dropped cache goes back to the OS at once. (``np.zeros`` gives neither for
long: once a freed cache raises glibc's mmap threshold, a new cache of that
size comes from the heap and ``calloc`` writes all of it.)
"""
from __future__ import annotations

import mmap

import numpy as np


def lazy_zeros(shape: tuple, dtype) -> np.ndarray:
    """A writeable zero array in its own anonymous memory map (pages resident only once written)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


class ContextLengthExceeded(ValueError):
    """A sequence would grow past the context window."""

    def __init__(self, needed: int, n_ctx: int, what: str = "prompt"):
        super().__init__(f"{what} needs {needed} tokens but the context window is {n_ctx} tokens")
        self.needed = needed
        self.n_ctx = n_ctx


class NoFreeSlot(RuntimeError):
    """Every sequence slot of the cache is in use."""


KEY_CHUNK = 128  # attention reads keys in chunks of this many positions (ops.attention_kernels)


def ring_rows(window: int, n_ctx: int, max_batch_tokens: int) -> int:
    """Cache rows a layer needs: n_ctx for a global layer (window 0); for a sliding-window layer a ring of
    ``window + max_batch_tokens`` rows rounded up to a multiple of KEY_CHUNK (a batch writes its keys before
    its first token has read the window behind it), or n_ctx when that is no more."""
    if window <= 0:
        return n_ctx
    rows = -(-(window + max_batch_tokens) // KEY_CHUNK) * KEY_CHUNK
    return min(rows, n_ctx)


class KVCache:
    """K and V per layer ``(n_slots, n_kv_heads, rows, head_dim)`` of ``dtype`` plus per-slot bookkeeping.

    Global layers keep ``rows = n_ctx`` positions; sliding-window layers (``layer_windows[i] > 0``) a ring
    of ``ring_rows(window, n_ctx, max_batch_tokens)`` rows, position p at row p % rows, so their memory does
    not grow with the context. Layers with the same row count share one array
    ``(n_group_layers, n_slots, n_kv_heads, rows, head_dim)`` (``groups``); ``k[i]``/``v[i]`` are views.
    """

    def __init__(self, n_layers: int, n_slots: int, n_ctx: int, n_kv_heads: int, head_dim: int,
                 dtype=np.float16, layer_windows: tuple[int, ...] = (), max_batch_tokens: int = 128):
        dtype = np.dtype(dtype)
        if dtype not in (np.float16, np.float32):
            raise ValueError(f"KV cache dtype must be float16 or float32, got {dtype}")
        windows = tuple(int(w) for w in layer_windows) or (0,) * n_layers
        if len(windows) != n_layers:
            raise ValueError(f"layer_windows must have one value per layer ({n_layers}), got {len(windows)}")
        self.n_layers, self.n_slots, self.n_ctx = n_layers, n_slots, n_ctx
        self.dtype = dtype
        self.windows = windows                                               # per layer, 0: global
        self.rows = tuple(ring_rows(w, n_ctx, max_batch_tokens) for w in windows)  # per layer
        self.groups: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]] = []  # (layers, k, v) per row count
        k_views: list = [None] * n_layers
        v_views: list = [None] * n_layers
        for rows in dict.fromkeys(self.rows):
            layers = tuple(i for i in range(n_layers) if self.rows[i] == rows)
            shape = (len(layers), n_slots, n_kv_heads, rows, head_dim)
            k, v = lazy_zeros(shape, dtype), lazy_zeros(shape, dtype)
            self.groups.append((layers, k, v))
            for index, layer in enumerate(layers):
                k_views[layer], v_views[layer] = k[index], v[index]
        self.k: tuple[np.ndarray, ...] = tuple(k_views)   # per layer (n_slots, n_kv_heads, rows, head_dim)
        self.v: tuple[np.ndarray, ...] = tuple(v_views)
        self.lengths = np.zeros(n_slots, dtype=np.int64)   # tokens held per slot
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]  # ids held per slot (prefix reuse)
        self._free = list(range(n_slots))

    @property
    def nbytes_per_token(self) -> int:
        """Bytes one more position of context costs (global layers; rings are fixed)."""
        return int(sum(2 * k.shape[1] * k.shape[3] * self.dtype.itemsize
                       for layer, k in enumerate(self.k) if self.rows[layer] == self.n_ctx))

    @property
    def nbytes(self) -> int:
        return int(sum(k.nbytes + v.nbytes for _, k, v in self.groups))

    def write(self, layer: int, slots: np.ndarray, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v (n, n_kv_heads, head_dim) of tokens at (slots[i], positions[i]) of one layer, rounded to the
        cache's dtype (a ring layer at row positions[i] % rows)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and int(positions.max()) >= self.n_ctx:
            raise ContextLengthExceeded(int(positions.max()) + 1, self.n_ctx, "sequence")
        rows = positions % self.rows[layer]
        self.k[layer][slots, :, rows] = k
        self.v[layer][slots, :, rows] = v

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take a free slot (its length reset to 0)."""
        if not self._free:
            raise NoFreeSlot(f"all {self.n_slots} sequence slots are in use")
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        self.tokens[slot] = []
        return slot

    def allocate_best(self, prompt: list[int]) -> int:
        """Take the free slot whose held tokens share the longest usable prefix with ``prompt`` (prefix reuse)."""
        if not self._free:
            raise NoFreeSlot(f"all {self.n_slots} sequence slots are in use")
        best = max(self._free, key=lambda slot: self.usable_prefix(slot, prompt))
        self._free.remove(best)
        return best

    def shared_prefix(self, slot: int, prompt: list[int]) -> int:
        """How many leading tokens of ``prompt`` the slot holds."""
        n = 0
        for a, b in zip(self.tokens[slot], prompt):
            if a != b:
                break
            n += 1
        return n

    def usable_prefix(self, slot: int, prompt: list[int], limit: int | None = None) -> int:
        """How many leading tokens of ``prompt`` can be kept from the slot (at most ``limit``): the shared
        prefix, if every sliding-window ring still holds the window before its end, else 0."""
        shared = self.shared_prefix(slot, prompt)
        if limit is not None:
            shared = min(shared, limit)
        held = int(self.lengths[slot])
        for window, rows in zip(self.windows, self.rows):
            if window > 0 and rows < self.n_ctx and max(0, shared - window + 1) < held - rows:
                return 0  # the positions the next token needs were overwritten by later ones
        return shared

    def release(self, slot: int) -> None:
        if slot not in self._free:
            self._free.append(slot)

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """Share the first ``length`` positions of ``source`` with ``destination`` (n > 1 choices); a ring is
        copied whole (it holds the latest positions of the source, which has ``length`` tokens)."""
        for layer in range(self.n_layers):
            held = self.rows[layer] if self.rows[layer] < self.n_ctx else length
            self.k[layer][destination, :, :held] = self.k[layer][source, :, :held]
            self.v[layer][destination, :, :held] = self.v[layer][source, :, :held]
        self.lengths[destination] = length
        self.tokens[destination] = list(self.tokens[source][:length])
