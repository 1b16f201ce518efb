"""Model names that try path traversal are refused everywhere a name is accepted: every store entry point,
Modelfile creation (the new name and FROM), the command line. (HTTP: tests/server/test_model_names_http.py.)

A name is ``[namespace/]name[:tag]`` with Ollama's characters (letters, digits, ``_ . -``; parts start with a
letter, digit or ``_``), so ``..``, absolute paths, backslashes, NUL and other control characters never reach
the file system. A Modelfile's FROM is a path only when it is written as one (``/``, ``./``, ``../``, ``~``,
``.gguf``, or a path that exists, as Ollama decides); anything else is a model name, checked like any other.
"""
from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localllm import cli, registry
from localllm.modelfile import Modelfile, create_model, is_path_reference
from localllm.store import InvalidModelName, ModelStore, canonical_name, parse_model_name
from tests.store_helpers import tiny_gguf  # noqa: F401  (fixture)

HOSTILE_NAMES = [
    "..", ".", "../x", "x/..", "x/../y", "a/../../b", "../../etc/passwd:latest", "x:../y", "x:..", "./x", "x/./y",
    "/etc/passwd", "/abs/model:tag", "//server/share", "a\\b", "..\\..\\x", "C:\\models\\x", "x:a\\b",
    "x\x00y", "x:\x00", "\x00", "x\ny", "x\n", "x\ty", "x\r", "~/x", "~root", ".hidden", "x/.hidden", "x//y",
    "x/", "/x", "", " x", "x ", "x y", "%2e%2e/x", "x%2f..", "x:", ":tag", "x:y:z", "x:a/b", "ｘ", "x\u202e",
    "a" * 81, "x:" + "t" * 129, "a/b/c/d/e/f", "x/latest.json", "x.json/y", "-x", "x:-t",
]
GOOD = "good:latest"


@pytest.fixture
def store(tmp_path, tiny_gguf):
    """A store inside ``tmp_path/store`` holding ``good``; the files of ``tmp_path`` are compared after."""
    (tmp_path / "m.gguf").write_bytes(tiny_gguf)
    store = ModelStore(tmp_path / "store")
    store.add_local(GOOD, tmp_path / "m.gguf")
    return store


def tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_nothing(path):
    raise AssertionError("add_written must refuse the name before it writes")


ENTRY_POINTS = {
    "parse_model_name": lambda store, name: parse_model_name(name),
    "canonical_name": lambda store, name: canonical_name(name),
    "get": lambda store, name: store.get(name),
    "pull": lambda store, name: store.pull(name),
    "ensure": lambda store, name: store.ensure(name),
    "add_local": lambda store, name: store.add_local(name, store.root.parent / "m.gguf"),
    "add_written": lambda store, name: store.add_written(name, "x.gguf", write_nothing),
    "derive name": lambda store, name: store.derive(name, GOOD),
    "derive base": lambda store, name: store.derive("new", name),
    "copy source": lambda store, name: store.copy(name, "new"),
    "copy destination": lambda store, name: store.copy(GOOD, name),
    "delete": lambda store, name: store.delete(name),
    "create name": lambda store, name: create_model(store, name, Modelfile(from_=GOOD)),
    "create from a path": lambda store, name: create_model(store, name, Modelfile(from_=str(store.root.parent
                                                                                              / "m.gguf"))),
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_hostile_names_are_refused_by_every_entry_point(store, tmp_path, entry_point):
    before = tree(tmp_path)
    call = ENTRY_POINTS[entry_point]
    accepted = []
    for name in HOSTILE_NAMES:
        try:
            call(store, name)
        except InvalidModelName as exc:
            assert str(exc).startswith(f"invalid model name {name!r}"), str(exc)
        else:
            accepted.append(name)
    assert accepted == []
    assert tree(tmp_path) == before
    assert [e.name for e in store.list()] == [GOOD]


@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n == n.strip() and n and not is_path_reference(n)])
def test_from_a_hostile_model_name_is_refused(store, tmp_path, name):
    """(Surrounding whitespace of a FROM value is trimmed, as the Modelfile parser trims it.)"""
    before = tree(tmp_path)
    with pytest.raises(InvalidModelName):
        create_model(store, "new", Modelfile(from_=name), base_dir=tmp_path)
    assert tree(tmp_path) == before


def test_from_explicit_paths_are_paths_relative_to_the_modelfile(store, tmp_path, tiny_gguf):
    """As in Ollama, a FROM written as a path names a file (here one folder above the Modelfile's): that is the
    user's own file system, not a model name, and only the new model's name is checked."""
    modelfile_dir = tmp_path / "project"
    modelfile_dir.mkdir()
    for written in ("../m.gguf", str(tmp_path / "m.gguf"), "m.gguf"):
        assert is_path_reference(written, modelfile_dir)
    entry = create_model(store, "from-path", Modelfile(from_="../m.gguf"), base_dir=modelfile_dir)
    assert entry.path.read_bytes() == tiny_gguf
    assert not is_path_reference("x/../m", modelfile_dir)  # not written as a path, and no such file
    with pytest.raises(InvalidModelName):
        create_model(store, "new", Modelfile(from_="x/../m"), base_dir=modelfile_dir)


def test_registry_names_are_valid():
    for name in [*registry.KNOWN_MODELS, *registry.ALIASES, *registry.ALIASES.values()]:
        assert canonical_name(name) == name


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from("aZ09_.-/:\\~ \x00\n%"), max_size=24) | st.text(max_size=12))
def test_any_accepted_name_stays_inside_the_manifests_folder(name):
    store = ModelStore("/nonexistent-root/models")
    try:
        canonical = canonical_name(name)
    except InvalidModelName:
        return
    path = store._manifest_path(name)
    relative = path.relative_to(store.manifests_dir)
    assert ".." not in relative.parts and "." not in relative.parts
    assert path.resolve() == path and path.resolve().is_relative_to(store.manifests_dir)
    assert not any(c in name for c in "\\\x00\n ~%")
    assert canonical_name(canonical) == canonical


# ---- the command line ----------------------------------------------------------------------------------

@pytest.fixture
def cli_store(store, monkeypatch):
    """The in-process CLI on ``store`` (LOCALLLM_HOST at a port nobody listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LOCALLLM_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("LOCALLLM_MODELS", str(store.root))
    return store


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a\\b", "x\x00y", "x:../y"])
def test_cli_refuses_hostile_names(cli_store, tmp_path, capsys, name):
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {GOOD}\n")
    before = tree(tmp_path)
    commands = [["pull", name], ["show", name], ["cp", name, "new"], ["cp", GOOD, name], ["rm", name],
                ["create", name, "-f", str(modelfile)]]
    for argv in commands:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"Error: invalid model name {name!r}"), (argv, err)
        assert "Traceback" not in err
    assert tree(tmp_path) == before
