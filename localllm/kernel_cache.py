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
        _configured = directory
    return _configured
