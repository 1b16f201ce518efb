"""Weights read into memory backed by transparent huge pages, instead of mapped from the file.

A token of decode streams every weight once: 97 MB for SmolLM2 135M Q4_1. Mapped from the file, that is
24,000 pages of 4 KiB, each a TLB miss and a new start for the hardware prefetchers, which do not cross a
page. In 2 MiB pages it is 48. On a 2-core AVX2 machine that makes the one-launch decode 12-20% faster
(SmolLM2 Q4_1: 172-194 -> 210-222 tok/s, alternating runs; ``benchmarks/bench_generate.py``).

The weights are read (``readinto``, no mapping of the file) into one anonymous mapping, 2 MiB aligned and
``madvise(MADV_HUGEPAGE)``; every tensor starts on a 64-byte boundary and its view is read-only, as a
file mapping's is. Resident weights are the default for inference where the kernel offers transparent
huge pages (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``).
``LOCALLLM_USE_MMAP=1`` keeps them mapped from the file (llama.cpp's default, Ollama's ``use_mmap``): the
page cache is then shared by every process that maps the same file, and loading reads nothing ahead.
"""
from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HUGE_PAGE = 2 << 20
TENSOR_ALIGNMENT = 64              # each tensor's first byte: a cache line (float data at natural alignment too)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
READERS = 2                        # threads reading the weights in


def huge_pages_available() -> bool:
    """Whether this kernel gives anonymous memory transparent huge pages on ``madvise`` (Linux)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def resident_by_default() -> bool:
    """Whether inference loads read the weights into huge pages: yes where the kernel offers them, unless
    ``LOCALLLM_USE_MMAP=1`` asks for the file mapping."""
    use_mmap = os.environ.get("LOCALLLM_USE_MMAP", "0").strip().lower()
    if use_mmap not in ("0", "1", "false", "true", "no", "yes", ""):
        raise ValueError(f"LOCALLLM_USE_MMAP must be 0 or 1, got {os.environ['LOCALLLM_USE_MMAP']!r}")
    return use_mmap not in ("1", "true", "yes") and huge_pages_available()


def read_spans(path: Path, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """The bytes [start, end) of ``path`` for each span, as read-only uint8 arrays in one anonymous mapping
    in huge pages (each span from a 64-byte boundary). The mapping lives as long as any of the arrays."""
    path = Path(path)
    offsets, size = [], 0
    for start, end in spans:
        offsets.append(size)
        size += -(-(end - start) // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
    if size == 0:
        return [np.zeros(0, dtype=np.uint8) for _ in spans]
    # room to start on a 2 MiB boundary, whatever address the kernel picks
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    arena = np.frombuffer(mapping, dtype=np.uint8)
    base = -arena.ctypes.data % HUGE_PAGE
    arena = arena[base:base + size]
    views = [arena[offset:offset + end - start] for (start, end), offset in zip(spans, offsets)]
    # READERS threads, each about an equal share of the bytes: the copy and the kernel's zeroing of the new
    # pages take longer than reading the file from the page cache, and readinto lets go of the GIL
    shares = [[] for _ in range(min(READERS, len(spans)))]
    for span, view, offset in zip(spans, views, offsets):
        shares[min(offset * len(shares) // size, len(shares) - 1)].append((span, view))
    shares = [share for share in shares if share]
    with ThreadPoolExecutor(len(shares)) as pool:
        for done in [pool.submit(_read_into, path, share) for share in shares]:
            done.result()                    # the first error, if any
    for view in views:
        view.flags.writeable = False
    return views


def _read_into(path: Path, share: list) -> None:
    """Each ((start, end), view) of ``share``: the file's bytes [start, end) into the view."""
    with open(path, "rb") as file:
        for (start, end), view in share:
            file.seek(start)
            done = 0
            while done < view.size:          # readinto may return less than asked (signals, pipes)
                got = file.readinto(memoryview(view[done:]))
                if not got:
                    raise EOFError(f"{path.name} ended at byte {start + done}, inside a tensor's data "
                                   f"(bytes {start}..{end})")
                done += got
