"""KV cache: preallocated keys and values for a pool of sequence slots.

Layout per layer: ``(n_slots, n_kv_heads, n_ctx, head_dim)``, so one
sequence's keys for one head are contiguous (what attention reads). Keys and
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


class KVCache:
    """K and V arrays ``(n_layers, n_slots, n_kv_heads, n_ctx, head_dim)`` of ``dtype`` plus per-slot bookkeeping."""

    def __init__(self, n_layers: int, n_slots: int, n_ctx: int, n_kv_heads: int, head_dim: int,
                 dtype=np.float16):
        dtype = np.dtype(dtype)
        if dtype not in (np.float16, np.float32):
            raise ValueError(f"KV cache dtype must be float16 or float32, got {dtype}")
        self.n_layers, self.n_slots, self.n_ctx = n_layers, n_slots, n_ctx
        self.dtype = dtype
        shape = (n_layers, n_slots, n_kv_heads, n_ctx, head_dim)
        self.k = lazy_zeros(shape, dtype)
        self.v = lazy_zeros(shape, dtype)
        self.lengths = np.zeros(n_slots, dtype=np.int64)   # tokens held per slot
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]  # ids held per slot (prefix reuse)
        self._free = list(range(n_slots))

    @property
    def nbytes_per_token(self) -> int:
        return int(2 * self.k.shape[0] * self.k.shape[2] * self.k.shape[4] * self.dtype.itemsize)

    def write(self, layer: int, slots: np.ndarray, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v (n, n_kv_heads, head_dim) of tokens at (slots[i], positions[i]), rounded to the cache's dtype."""
        if positions.size and int(positions.max()) >= self.n_ctx:
            raise ContextLengthExceeded(int(positions.max()) + 1, self.n_ctx, "sequence")
        self.k[layer, slots, :, positions] = k
        self.v[layer, slots, :, positions] = v

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
        """Take the free slot whose held tokens share the longest prefix with ``prompt`` (prefix reuse)."""
        if not self._free:
            raise NoFreeSlot(f"all {self.n_slots} sequence slots are in use")

        def shared(slot: int) -> int:
            held = self.tokens[slot]
            n = 0
            for a, b in zip(held, prompt):
                if a != b:
                    break
                n += 1
            return n

        best = max(self._free, key=shared)
        self._free.remove(best)
        return best

    def release(self, slot: int) -> None:
        if slot not in self._free:
            self._free.append(slot)

    def copy_prefix(self, source: int, destination: int, length: int) -> None:
        """Share the first ``length`` positions of ``source`` with ``destination`` (n > 1 choices)."""
        self.k[:, destination, :, :length] = self.k[:, source, :, :length]
        self.v[:, destination, :, :length] = self.v[:, source, :, :length]
        self.lengths[destination] = length
        self.tokens[destination] = list(self.tokens[source][:length])
