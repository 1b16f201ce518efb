"""Where numba keeps the compiled kernels: one directory per version of the kernel sources.

numba's ``cache=True`` checks only the file that defines a function: a kernel
whose intrinsics or inlined helpers live in another file (``quants.intrinsics``,
``ops.vector``, ``quants.portable``) would silently keep stale machine code after
that other file changed. So the cache directory is named after a hash of every
source file of ``localllm.quants`` and ``localllm.ops``: any change to kernel
code starts a fresh cache, and an unchanged tree reuses its cache across
processes.

The directory is ``$NUMBA_CACHE_DIR/<hash>`` when ``NUMBA_CACHE_DIR`` is set,
else ``$LOCALLLM_KERNEL_CACHE`` or ``~/.cache/localllm/kernels``, then ``/<hash>``.
``configure()`` must run before any kernel module is imported; the ``quants``
and ``ops`` packages call it first thing.

Several processes fill one cache (the compile helper of ``parallel_compile``, a server beside a notebook):
``configure()`` also makes numba's cache writes take turns (``_serialize_cache_writes``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
KERNEL_PACKAGES = ("quants", "ops")
_configured: Path | None = None


def sources_hash() -> str:
    """12 hex digits of sha256 over the names and bytes of the kernel packages' .py files."""
    digest = hashlib.sha256()
    for package in KERNEL_PACKAGES:
        for path in sorted((_PACKAGE / package).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    if os.environ.get("LOCALLLM_KERNEL_CACHE"):
        return Path(os.environ["LOCALLLM_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localllm" / "kernels"


def configure() -> Path:
    """Point numba's cache at ``cache_root() / sources_hash()`` (once per process); returns it."""
    global _configured
    if _configured is None:
        import numba

        directory = cache_root() / sources_hash()
        numba.config.CACHE_DIR = str(directory)
        _serialize_cache_writes()
        _configured = directory
    return _configured


def _serialize_cache_writes() -> None:
    """numba saves a cache entry as: read the function's index, add the entry (naming the first free data file),
    write the index, write the data file. Two processes adding entries to one index at once (two signatures of
    one kernel) can both pick the same data file name, and the index can end up naming the file the other
    process wrote last: another signature's code, loaded for this one. Each save here holds an exclusive lock on
    a file beside the index (``<index>.lock``; POSIX only, elsewhere numba's own saving stays)."""
    try:
        import fcntl
    except ImportError:
        return
    from numba.core import caching

    save = caching.IndexDataCacheFile.save
    if getattr(save, "takes_turns", False):
        return

    def save_in_turn(self, key, data):
        with open(self._index_path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)        # released when the file closes
            save(self, key, data)

    save_in_turn.takes_turns = True
    caching.IndexDataCacheFile.save = save_in_turn
