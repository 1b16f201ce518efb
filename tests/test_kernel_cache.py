"""The numba kernel cache is keyed by a hash of all kernel sources, not only the defining file."""
import shutil
from pathlib import Path

import numba

from localllm import kernel_cache
from localllm.quants import kernels_avx2, portable


def copy_kernel_packages(tmp_path: Path) -> Path:
    root = tmp_path / "localllm"
    for package in kernel_cache.KERNEL_PACKAGES:
        shutil.copytree(Path(kernel_cache.__file__).parent / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_hash_changes_with_any_kernel_source(tmp_path, monkeypatch):
    root = copy_kernel_packages(tmp_path)
    monkeypatch.setattr(kernel_cache, "_PACKAGE", root)
    before = kernel_cache.sources_hash()
    assert kernel_cache.sources_hash() == before                       # stable
    intrinsics = root / "quants" / "intrinsics.py"                     # a helper file, not a kernel's own file
    intrinsics.write_text(intrinsics.read_text() + "\n# changed\n")
    assert kernel_cache.sources_hash() != before


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert kernel_cache.cache_root() == tmp_path / "numba"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("LOCALLLM_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert kernel_cache.cache_root() == tmp_path / "kernels"
    monkeypatch.delenv("LOCALLLM_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_cache.cache_root() == tmp_path / "xdg" / "localllm" / "kernels"


def test_kernels_cache_under_the_hashed_directory():
    directory = kernel_cache.configure()
    assert directory.name == kernel_cache.sources_hash()
    assert numba.config.CACHE_DIR == str(directory)
    for kernel in (kernels_avx2.matmul_rows, kernels_avx2.rows_range_Q4_1, portable.quantize_activations):
        assert Path(kernel._cache._cache_path).is_relative_to(directory)
