"""Say so when a step is slow: a line on stderr once it has run for a second, and how long it took.

numba compiles the kernels a model needs on their first call (then caches them on
disk): on a fresh install the first answer waits for that, and a silent wait
looks like a hang. ``slow_step`` wraps such a step::

    with slow_step("compiling the decode kernels (first run only; cached for next time)"):
        model.forward(...)

Nothing is printed when the step ends within ``after`` seconds (a warm cache).
``LOCALLLM_PROGRESS=0`` silences it; ``state()`` tells a server what is under way
(``/api/ps`` shows it).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

_active: dict[int, str] = {}   # thread id -> what it is doing (slow steps under way)
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("LOCALLLM_PROGRESS", "1") != "0"


def state() -> list[str]:
    """The slow steps under way in this process (for a server's status)."""
    with _lock:
        return list(_active.values())


@contextmanager
def slow_step(what: str, after: float = 1.0, stream=None):
    """Run the body; if it takes more than ``after`` seconds, write ``localllm: <what>...`` when that second
    has passed and ``localllm: <what>: done in N s`` at the end (to ``stream``, default stderr)."""
    stream = stream or sys.stderr
    done = threading.Event()
    announced = threading.Event()
    ident = threading.get_ident()
    with _lock:
        _active[ident] = what

    def announce():
        if not done.wait(after) and enabled():
            announced.set()
            stream.write(f"localllm: {what}...\n")
            stream.flush()

    timer = threading.Thread(target=announce, daemon=True)
    started = time.perf_counter()
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.join()
        with _lock:
            _active.pop(ident, None)
        if announced.is_set():
            stream.write(f"localllm: {what}: done in {time.perf_counter() - started:.1f} s\n")
            stream.flush()
