"""Compute backends: the numpy reference and the numba fast path, same function names.

``get_backend("ref")`` is readable numpy (``quants.ref`` + ``ops.ref``);
``get_backend("fast")`` takes every function that ``quants.kernels`` /
``ops.kernels`` / ``ops.attention_kernels`` define and the reference for the rest; ``"auto"`` is
``fast`` unless ``LOCALLLM_BACKEND=ref``.
"""
from __future__ import annotations

from ..kernel_cache import configure as _configure_kernel_cache

_configure_kernel_cache()  # before any kernel module is imported

import importlib
import os
from types import SimpleNamespace

from . import ref as ops_ref
from ..quants import ref as quants_ref

OP_NAMES = ("rms_norm", "layer_norm", "rope", "attention", "attend", "swiglu", "geglu", "gated", "softmax")
QUANT_NAMES = ("matmul", "matmul_many", "embedding_rows", "rms_norm_matmul_many", "matmul_add", "swiglu_matmul_add",
               "gated_matmul")

_backends: dict[str, SimpleNamespace] = {}


def _matmul_many_of(matmul):
    def matmul_many(ws, x):
        """``[matmul(w, x) for w in ws]`` (the fast path does it in one launch)."""
        return [matmul(w, x) for w in ws]
    return matmul_many


def _collect(modules_by_kind: dict[str, object]) -> SimpleNamespace:
    functions = {}
    for name in QUANT_NAMES:
        functions[name] = getattr(modules_by_kind["quants"], name, None) or getattr(quants_ref, name, None)
    if functions["matmul_many"] is None:
        functions["matmul_many"] = _matmul_many_of(functions["matmul"])
    for name in OP_NAMES:
        found = [getattr(module, name) for module in modules_by_kind["ops"] if hasattr(module, name)]
        functions[name] = found[0] if found else getattr(ops_ref, name)
    return SimpleNamespace(**functions)


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def get_backend(name: str = "auto") -> SimpleNamespace:
    """The namespace of compute functions for ``name`` in {"auto", "fast", "ref"}."""
    if name == "auto":
        name = os.environ.get("LOCALLLM_BACKEND", "fast")
    if name not in ("fast", "ref"):
        raise ValueError(f"unknown backend '{name}' (expected 'fast', 'ref' or 'auto')")
    if name not in _backends:
        if name == "ref":
            _backends[name] = _collect({"quants": quants_ref, "ops": [ops_ref]})
        else:
            _backends[name] = _collect({
                "quants": _optional("localllm.quants.kernels") or quants_ref,
                "ops": [module for module in (_optional("localllm.ops.kernels"),
                                              _optional("localllm.ops.attention_kernels")) if module],
            })
        _backends[name].name = name
    return _backends[name]
