"""Compile independent kernels in two processes at once: a fresh install's first answer on two cores.

numba compiles on one thread, under a process-wide lock. A model's first run needs a few kernels that do
not depend on each other (the one-launch program, its parallel launch, the row ranges of each weight type,
the embedding lookup): ``compile_shared`` starts a helper process that compiles some of them into the
kernel cache while this process compiles the others, then loads the helper's from the cache.

Both processes take *units* (names that one function, ``compile_unit(name)``, knows how to compile or
load) from one list, longest first, each the next one nobody has claimed (a claim is a file created with
``O_EXCL`` in a directory of their own), so that no unit is compiled twice and the two finish close together. At the end this process calls ``compile_unit`` on every unit: numba loads what the
helper compiled from the cache, and compiles anything the helper could not (a helper that failed or
was killed costs time, never a result).

A unit compiled once leaves a marker in the kernel cache (``compiled/<cpu>/<unit>``): when every unit
of a model has one, no helper is started (a warm start loads everything in this process). The markers
are per CPU target, as numba's cache entries are. ``LOCALLLM_COMPILE_HELPER=0`` compiles everything in
this process.

    python -m localllm.parallel_compile MODULE:FUNCTION CLAIMS_DIR UNIT...   (the helper; not for users)
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

HELPER_TIMEOUT_S = 900   # a helper still compiling after this long is stopped (this process compiles the rest)


def enabled() -> bool:
    """On unless ``LOCALLLM_COMPILE_HELPER=0``. (It was off for a while: kernels compiled by two processes into one
    cache could share a symbol name, and a process loading both kept one definition for both; the kernels a
    factory makes now have names of their own, ``quants.portable.njit_named``.)"""
    return os.environ.get("LOCALLLM_COMPILE_HELPER", "1") != "0"


def _marker_folder() -> Path:
    """``<kernel cache>/compiled/<12 hex digits of numba's CPU target>``."""
    from numba.core.registry import cpu_target

    from .kernel_cache import configure
    target = repr(cpu_target.target_context.codegen().magic_tuple())
    return configure() / "compiled" / hashlib.sha256(target.encode()).hexdigest()[:12]


def _mark(unit: str) -> None:
    folder = _marker_folder()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / unit).touch()


def _claim(claims: Path, unit: str) -> bool:
    """True for the first process to claim ``unit`` in ``claims``."""
    try:
        os.close(os.open(claims / unit, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _compile_claimed(units: Sequence[str], compile_unit: Callable[[str], None], claims: Path) -> None:
    for unit in units:
        if _claim(claims, unit):
            compile_unit(unit)
            _mark(unit)


def compile_shared(units: Sequence[str], compile_unit: Callable[[str], None]) -> None:
    """``compile_unit(unit)`` for every unit (each compiles one kernel form, or loads it from the kernel cache),
    the ones never compiled here shared with a helper process. Both take them in list order: put the longest
    first. ``compile_unit`` must be a module-level function (the helper
    imports it by name); unit names are file names."""
    folder = _marker_folder()
    missing = [unit for unit in units if not (folder / unit).exists()]
    if len(missing) > 1 and enabled():
        claims = Path(tempfile.mkdtemp(prefix="localllm-compile-"))
        helper = _start_helper(compile_unit, claims, missing)
        try:
            _compile_claimed(missing, compile_unit, claims)
            helper.wait(timeout=HELPER_TIMEOUT_S)
        except BaseException:
            helper.kill()   # the cache files numba writes are replaced atomically: a killed helper leaves none half
            raise
        finally:
            if helper.poll() is None:
                helper.kill()
            helper.wait()
            shutil.rmtree(claims, ignore_errors=True)
    for unit in units:          # load what the helper compiled; compile what is still missing
        compile_unit(unit)
        if unit in missing:
            _mark(unit)


def _start_helper(compile_unit: Callable[[str], None], claims: Path, units: list[str]) -> subprocess.Popen:
    """The helper process, with this process's environment and the folder this ``localllm`` was imported from
    first on its path (the same sources, hence the same kernel cache)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                            if p])
    target = f"{compile_unit.__module__}:{compile_unit.__qualname__}"
    return subprocess.Popen([sys.executable, "-m", "localllm.parallel_compile", target, str(claims), *units],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _helper_main(argv: list[str]) -> int:
    target, claims, units = argv[0], Path(argv[1]), argv[2:]
    module, function = target.split(":")
    _compile_claimed(units, getattr(importlib.import_module(module), function), claims)
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
