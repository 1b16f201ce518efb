"""Shared fixtures: golden data, the real models (pulled once into the store), tiny random models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("LOCALLLM_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


def _real_model_path(name: str, env_var: str) -> Path:
    """A real model: from an explicit env override, else the project's own store (pulled once if missing)."""
    override = os.environ.get(env_var)
    if override:
        return Path(override)
    from localllm.store import ModelStore

    return ModelStore().ensure(name).path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden data not found at {GOLDEN_DIR} (set LOCALLLM_GOLDEN_DIR)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden_smollm2(golden_dir) -> list[dict]:
    return json.loads((golden_dir / "smollm2_q4_1.json").read_text())


@pytest.fixture(scope="session")
def golden_minilm(golden_dir) -> dict:
    return json.loads((golden_dir / "all_minilm_l6_v2.json").read_text())


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return _real_model_path("smollm2:135m", "LOCALLLM_TEST_SMOLLM2")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 Hugging Face folder."""
    return _real_model_path("all-minilm", "LOCALLLM_TEST_MINILM")


@pytest.fixture(scope="session")
def golden_gemma3(golden_dir) -> dict:
    return json.loads((golden_dir / "gemma3_270m_q4_k_m.json").read_text())


@pytest.fixture(scope="session")
def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (base) Q4_K_M GGUF file."""
    return _real_model_path("gemma3:270m", "LOCALLLM_TEST_GEMMA3")


@pytest.fixture(scope="session")
def gemma3_gguf(gemma3_gguf_path):
    """The parsed Gemma 3 GGUF file, shared by the session."""
    from localllm.formats.gguf import read_gguf

    return read_gguf(gemma3_gguf_path)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_gguf_path):
    """The parsed GGUF file (metadata + memory-mapped tensors), shared by the session."""
    from localllm.formats.gguf import read_gguf

    return read_gguf(smollm2_gguf_path)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    """A tiny random llama GGUF (F32 weights) with a byte-level vocabulary."""
    from tests.tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python 0.3.36 sdist (its ``convert_hf_to_gguf.py`` and gguf-py):
    ``LOCALLLM_LLAMA_CPP_SOURCE`` (an unpacked sdist), else downloaded once with pip into
    ``LOCALLLM_TEST_CACHE`` (default ~/.cache/localllm-test). Not obtainable: a failure in CI, a skip elsewhere."""
    from tests.tiny_archs import llama_cpp_source as locate

    cache_dir = Path(os.environ.get("LOCALLLM_TEST_CACHE", Path.home() / ".cache" / "localllm-test"))
    try:
        return locate(cache_dir)
    except RuntimeError as exc:
        message = f"llama.cpp's convert_hf_to_gguf.py is not available: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_vlm_files(tmp_path_factory) -> dict:
    """family ("gemma3", "llava") -> (transformers model, language-model GGUF, mmproj GGUF): the tiny random
    vision-language models of tests/tiny_vlm.py, built once."""
    from tests.tiny_vlm import hf_gemma3_vlm, hf_llava_vlm, write_vlm

    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for family, build in (("gemma3", hf_gemma3_vlm), ("llava", hf_llava_vlm)):
        vlm = build(seed=3)
        out[family] = (vlm, *write_vlm(vlm, root / family))
    return out
