"""One kernel cache filled by several processes: every kernel keeps its own code.

numba names a compiled function by its module, its qualified name and a counter of the process that compiled it,
and links what a kernel calls into the kernel's own code (the callees as "one definition" symbols). The row
kernels of the weight types were closures of one factory, so two of them compiled in two processes (two models
run in turn, or ``parallel_compile``'s helper) could carry the same symbol name; a third process loading both
from the cache kept one definition for both: one type's rows computed with the other's decoder (a second model
got all-zero or NaN logits). These tests compile in separate processes, as a fresh install does, then check
the loaded kernels' results.
"""
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from localllm.quants import kernels

pytestmark = pytest.mark.skipif("avx2" not in kernels.AVAILABLE_KERNELS, reason="needs the AVX2 kernels")

COMPILE_ONE = "from localllm.quants.kernels_avx2 import row_function; row_function({ggml_type!r})"

CHECK_ALL = """
import numpy as np
from localllm.quants import kernels, portable, ref
from localllm.quants.synthetic import random_weight
x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
xq, xd, _ = portable.quantize_activations(x)       # the kernels' int8 activations: against them, exact
x_exact = (xq.reshape(3, -1, 16) * xd[:, :, None]).reshape(3, 512).astype(np.float64)
for ggml_type in {types!r}:
    w = random_weight(ggml_type, 16, 512)
    got = kernels.matmul(w, x, kernels="avx2")
    want = x_exact @ ref.dequantize(w).astype(np.float64).T
    error = float(np.abs(got - want).max() / np.abs(want).max())
    print(ggml_type, error)
"""


SAVE_MANY = """
import os, sys, time
from numba.core.caching import IndexDataCacheFile
from localllm import kernel_cache
kernel_cache.configure()
cache = IndexDataCacheFile(sys.argv[1], "kernel", "stamp")
open(os.path.join(sys.argv[1], sys.argv[2] + ".ready"), "w").close()
while not os.path.exists(os.path.join(sys.argv[1], "go")):   # all writers start together
    time.sleep(0.001)
for i in range(int(sys.argv[3])):
    cache.save((sys.argv[2], i), (sys.argv[2], i))
"""


def run_python(code: str, cache, *args, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["LOCALLLM_KERNEL_CACHE"] = str(cache)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE, text=True,
                            **kw)


def test_row_kernels_compiled_by_different_processes_keep_their_own_code(tmp_path):
    types = ("Q4_0", "Q8_0", "Q4_K")
    # each compiled alone in a fresh process: the same sequence of compiles, so the same per-process counters
    for process in [run_python(COMPILE_ONE.format(ggml_type=t), tmp_path) for t in types]:
        process.communicate(timeout=600)
        assert process.returncode == 0
    check = run_python(CHECK_ALL.format(types=types), tmp_path)
    output, _ = check.communicate(timeout=600)
    assert check.returncode == 0
    errors = {line.split()[0]: float(line.split()[1]) for line in output.splitlines()}
    assert set(errors) == set(types)
    for ggml_type, error in errors.items():
        assert error < 1e-5, f"{ggml_type}: relative error {error} (another type's code?)"


def test_processes_adding_entries_to_one_index_take_turns(tmp_path):
    """numba's save (read the index, add an entry, write it, write the data) from two processes at once: every entry
    of both is in the index afterwards and names its own data (without turns, entries were lost, and an index
    could name the other process's data file)."""
    from numba.core.caching import IndexDataCacheFile

    names = ("a", "b", "c")
    writers = [run_python(SAVE_MANY, tmp_path / "kernels", tmp_path, name, 150) for name in names]
    while not all((tmp_path / f"{name}.ready").exists() for name in names):
        assert all(writer.poll() is None for writer in writers)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for writer in writers:
        writer.communicate(timeout=120)
        assert writer.returncode == 0
    cache = IndexDataCacheFile(str(tmp_path), "kernel", "stamp")
    for name in names:
        for i in range(150):
            assert cache.load((name, i)) == (name, i)


def test_factory_made_kernels_have_names_of_their_own():
    """The guard against the fault above for any kernel a factory makes: no two distinct numba dispatchers of the
    kernel packages that numba compiles as functions of their own (not inlined) share a module and qualified name
    (the part of a symbol name that does not depend on the process)."""
    from numba.core.registry import CPUDispatcher

    from localllm.ops import attention_kernels, decoder_step, encoder, kernels as op_kernels, vector
    from localllm.quants import intrinsics, kernels_avx2, portable

    seen: dict[int, object] = {}

    def visit(value, depth=0):
        if isinstance(value, CPUDispatcher):
            if id(value) in seen:
                return
            seen[id(value)] = value
            for cell in value.py_func.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:   # an empty cell
                    pass
        elif isinstance(value, (tuple, list)) and depth < 3:
            for item in value:
                visit(item, depth + 1)
        elif isinstance(value, dict) and depth < 3:
            for item in value.values():
                visit(item, depth + 1)

    for module in (attention_kernels, decoder_step, encoder, op_kernels, vector, intrinsics, kernels_avx2, portable):
        for value in vars(module).values():
            visit(value)
    functions = [d for d in seen.values() if d.targetoptions.get("inline", "never") != "always"]
    names = Counter((d.py_func.__module__, d.py_func.__qualname__) for d in functions)
    assert len(functions) > 50 and names[("localllm.quants.kernels_avx2", "rows_task_of_decode_Q6_K")] == 1
    assert [name for name, count in names.items() if count > 1] == []
