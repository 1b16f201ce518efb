"""Running numpy's BLAS on one thread per caller, for work that is split across Python threads instead.

The vision encoder's attention is many small matmuls (one head's scores: (1024, 72) @ (72, 4096)) with a
softmax between them. With BLAS's own threads, each matmul is cut in two and the softmax runs alone while
BLAS's other thread spins (measured on 2 cores: 2.5 s a layer). Giving each core a share of the heads, each
on one BLAS thread, keeps both cores on useful work (1.5 s a layer, the same numbers).

``one_blas_thread()`` sets numpy's OpenBLAS to one thread for the duration (reference-counted: nested and
concurrent users restore the setting once the last one leaves). It finds OpenBLAS's ``set_num_threads``
among the libraries this process has loaded (numpy's wheels bundle ``libscipy_openblas``); with another
BLAS, or none found, it changes nothing and the work is still right, only not as fast.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")
_GETTERS = tuple(name.replace("set_num", "get_num") for name in _SETTERS)

_lock = threading.Lock()
_users = 0
_saved = None
_functions: tuple | None = None     # (set, get) once looked up; () when there is no OpenBLAS to control


def _openblas() -> tuple:
    global _functions
    if _functions is None:
        _functions = ()
        try:
            with open("/proc/self/maps") as maps:
                paths = sorted({line.split()[-1] for line in maps if "openblas" in line and ".so" in line})
        except OSError:
            paths = []
        for path in paths:
            try:
                library = ctypes.CDLL(path)
            except OSError:
                continue
            for setter, getter in zip(_SETTERS, _GETTERS):
                if hasattr(library, setter) and hasattr(library, getter):
                    _functions = (getattr(library, setter), getattr(library, getter))
                    break
            if _functions:
                break
    return _functions


def available() -> bool:
    """Can the BLAS threads be set (numpy's OpenBLAS found)?"""
    import numpy  # noqa: F401  (loads the BLAS library)
    return bool(_openblas())


@contextmanager
def one_blas_thread():
    """numpy's BLAS on one thread inside the block (for every thread of the process), restored after."""
    global _users, _saved
    functions = _openblas()
    if not functions:
        yield
        return
    set_threads, get_threads = functions
    with _lock:
        if _users == 0:
            _saved = get_threads()
            set_threads(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _saved:
                set_threads(_saved)
