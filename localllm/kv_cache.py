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

Beyond the slots, a ``PromptCache`` keeps the states of evicted slots in RAM
(least recently used first out, within a byte budget, ``LOCALLLM_CACHE_RAM``):
when a slot is handed to a prompt that would overwrite what it holds, its
tokens and K/V are copied out first, and a later prompt that shares a longer
usable prefix with a saved state than with any free slot gets it copied back.
"""
from __future__ import annotations

import mmap
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

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


CACHE_RAM_ENV = "LOCALLLM_CACHE_RAM"
DEFAULT_CACHE_RAM_SHARE = 0.25         # of the memory available when a cache is made
DEFAULT_CACHE_RAM_CAP = 8 << 30        # ... but at most this
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``"512MiB"``, ``"2g"``, ``"1.5GB"`` or ``"1000000"`` (ValueError otherwise)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"'{text}' is not a size (examples: 0, 1000000, 512MiB, 2GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def available_memory() -> int | None:
    """Bytes of memory the OS can give without swapping (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_cache_ram() -> int:
    """The prompt cache budget: ``LOCALLLM_CACHE_RAM`` (0 turns it off), else a quarter of the available
    memory, at most 8 GiB (1 GiB where the available memory is unknown)."""
    configured = os.environ.get(CACHE_RAM_ENV)
    if configured is not None and configured.strip():
        try:
            return parse_size(configured)
        except ValueError as exc:
            raise ValueError(f"{CACHE_RAM_ENV}: {exc}") from None
    available = available_memory()
    if available is None:
        return 1 << 30
    return int(min(available * DEFAULT_CACHE_RAM_SHARE, DEFAULT_CACHE_RAM_CAP))


@dataclass
class SavedState:
    """A slot's state copied out of the cache: its tokens and, per layer, the rows holding their K/V
    (min(len(tokens), rows): the whole ring of a sliding-window layer once it has wrapped)."""

    tokens: tuple[int, ...]
    k: list[np.ndarray]   # per layer (n_kv_heads, held rows, head_dim)
    v: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v))


class PromptCache:
    """Saved slot states in RAM, least recently used first out, never more than ``budget`` bytes in all."""

    def __init__(self, budget: int):
        if budget < 0:
            raise ValueError(f"prompt cache budget must be >= 0 bytes, got {budget}")
        self.budget = int(budget)
        self.entries: OrderedDict[int, SavedState] = OrderedDict()   # oldest first
        self.nbytes = 0
        self._next_key = 0
        self.saved = self.restored = self.restored_tokens = self.dropped = 0   # counters (tests, benchmarks)

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, state: SavedState) -> bool:
        """Keep ``state``, dropping the least recently used ones as the budget needs; False if it cannot fit."""
        size = state.nbytes
        if size > self.budget:
            self.dropped += 1
            return False
        while self.nbytes + size > self.budget:
            self._remove(next(iter(self.entries)))
            self.dropped += 1
        self.entries[self._next_key] = state
        self._next_key += 1
        self.nbytes += size
        self.saved += 1
        return True

    def remove(self, key: int) -> None:
        """Forget an entry (a newer state serves everything it did)."""
        self._remove(key)

    def take(self, key: int) -> SavedState:
        """Remove and return an entry (it moves back into a slot)."""
        state = self.entries[key]
        self._remove(key)
        self.restored += 1
        self.restored_tokens += len(state.tokens)
        return state

    def lend(self, key: int, used: int) -> SavedState:
        """Return an entry of which a prompt uses only the first ``used`` tokens: it stays (most recently used),
        since the rest of it still serves the conversation it came from."""
        self.entries.move_to_end(key)
        self.restored += 1
        self.restored_tokens += used
        return self.entries[key]

    def _remove(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes


class KVCache:
    """K and V per layer ``(n_slots, n_kv_heads, rows, head_dim)`` of ``dtype`` plus per-slot bookkeeping.

    Global layers keep ``rows = n_ctx`` positions; sliding-window layers (``layer_windows[i] > 0``) a ring
    of ``ring_rows(window, n_ctx, max_batch_tokens)`` rows, position p at row p % rows, so their memory does
    not grow with the context. Layers with the same row count share one array
    ``(n_group_layers, n_slots, n_kv_heads, rows, head_dim)`` (``groups``); ``k[i]``/``v[i]`` are views.
    """

    def __init__(self, n_layers: int, n_slots: int, n_ctx: int, n_kv_heads: int, head_dim: int,
                 dtype=np.float16, layer_windows: tuple[int, ...] = (), max_batch_tokens: int = 128,
                 ram_budget: int | None = None):
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
        # evicted slot states (ram_budget None: default_cache_ram(); 0: none kept)
        budget = default_cache_ram() if ram_budget is None else int(ram_budget)
        self.prompt_cache: PromptCache | None = PromptCache(budget) if budget > 0 else None

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
        """Take a free slot (its length reset to 0; what it held goes to the prompt cache)."""
        if not self._free:
            raise NoFreeSlot(f"all {self.n_slots} sequence slots are in use")
        slot = self._free.pop(0)
        self._save(slot)
        self.lengths[slot] = 0
        self.tokens[slot] = []
        return slot

    def allocate_best(self, prompt: list[int]) -> int:
        """Take the free slot whose held tokens share the longest usable prefix with ``prompt`` (prefix reuse),
        or, when a state in the prompt cache shares a longer one, the emptiest free slot with that state
        restored into it. What a slot held beyond the prefix the prompt keeps goes to the prompt cache."""
        if not self._free:
            raise NoFreeSlot(f"all {self.n_slots} sequence slots are in use")
        best = max(self._free, key=lambda slot: self.usable_prefix(slot, prompt))
        best_usable = self.usable_prefix(best, prompt)
        saved_key, saved_usable = self._best_saved(prompt)
        if saved_key is not None and saved_usable > best_usable:
            best = min(self._free, key=lambda slot: self.lengths[slot])
            self._free.remove(best)
            self._save(best)
            state = self.prompt_cache.entries[saved_key]
            if saved_usable < len(state.tokens):  # a shared prefix (a system prompt): the state stays for its owner
                self._restore(best, self.prompt_cache.lend(saved_key, saved_usable))
            else:                                 # the prompt goes on from the whole state: it moves into the slot
                self._restore(best, self.prompt_cache.take(saved_key))
            return best
        self._free.remove(best)
        if best_usable < self.lengths[best]:
            self._save(best)  # the prompt overwrites what follows its prefix: keep the whole state in RAM
        return best

    @staticmethod
    def _shared(held: list[int] | tuple[int, ...], prompt: list[int]) -> int:
        n = 0
        for a, b in zip(held, prompt):
            if a != b:
                break
            n += 1
        return n

    def shared_prefix(self, slot: int, prompt: list[int]) -> int:
        """How many leading tokens of ``prompt`` the slot holds."""
        return self._shared(self.tokens[slot], prompt)

    def _usable(self, held_tokens, prompt: list[int], limit: int | None = None) -> int:
        """The prefix of ``prompt`` a state holding ``held_tokens`` can serve: the shared prefix, if every
        sliding-window ring still holds the window before its end, else 0."""
        shared = self._shared(held_tokens, prompt)
        if limit is not None:
            shared = min(shared, limit)
        held = len(held_tokens)
        for window, rows in zip(self.windows, self.rows):
            if window > 0 and rows < self.n_ctx and max(0, shared - window + 1) < held - rows:
                return 0  # the positions the next token needs were overwritten by later ones
        return shared

    def usable_prefix(self, slot: int, prompt: list[int], limit: int | None = None) -> int:
        """How many leading tokens of ``prompt`` can be kept from the slot (at most ``limit``)."""
        return self._usable(self.tokens[slot][:int(self.lengths[slot])], prompt, limit)

    def _best_saved(self, prompt: list[int]) -> tuple[int | None, int]:
        """(key, usable prefix) of the prompt cache's best state for ``prompt`` ((None, 0) if none helps)."""
        best_key, best_usable = None, 0
        for key, state in (self.prompt_cache.entries.items() if self.prompt_cache else ()):
            usable = self._usable(state.tokens, prompt)
            if usable > best_usable:
                best_key, best_usable = key, usable
        return best_key, best_usable

    def _held_rows(self, layer: int, length: int) -> int:
        return min(length, self.rows[layer])

    def _save(self, slot: int) -> None:
        """Copy the slot's state into the prompt cache (nothing if it holds nothing or there is no cache)."""
        length = int(self.lengths[slot])
        if self.prompt_cache is None or length == 0:
            return
        tokens = tuple(self.tokens[slot][:length])
        for key, old in list(self.prompt_cache.entries.items()):
            if self._usable(tokens, old.tokens) == len(old.tokens):  # this state serves all the old one did
                self.prompt_cache.remove(key)
        k = [self.k[i][slot, :, :self._held_rows(i, length)].copy() for i in range(self.n_layers)]
        v = [self.v[i][slot, :, :self._held_rows(i, length)].copy() for i in range(self.n_layers)]
        self.prompt_cache.put(SavedState(tokens, k, v))

    def _restore(self, slot: int, state: SavedState) -> None:
        length = len(state.tokens)
        for i in range(self.n_layers):
            held = self._held_rows(i, length)
            self.k[i][slot, :, :held] = state.k[i]
            self.v[i][slot, :, :held] = state.v[i]
        self.lengths[slot] = length
        self.tokens[slot] = list(state.tokens)

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
