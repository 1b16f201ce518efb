"""parallel_compile.compile_shared (on by default; LOCALLLM_COMPILE_HELPER=0 turns it off): a helper process takes units
from the same list; each unit is compiled once (this process or the helper), then this process loads every one; a second call, with every unit
marked compiled, starts no helper."""
import os
import time
import uuid
from pathlib import Path

from localllm import parallel_compile

LOG = "LOCALLLM_TEST_COMPILE_LOG"


def record_unit(unit: str) -> None:
    """The test's 'compile': a line 'pid unit' in the log named by the environment (a helper inherits it)."""
    time.sleep(0.3)
    with open(os.environ[LOG], "a") as log:
        log.write(f"{os.getpid()} {unit}\n")


def lines(path: Path) -> list[tuple[int, str]]:
    return [(int(pid), unit) for pid, unit in (line.split() for line in path.read_text().splitlines())]


def test_units_are_shared_with_a_helper_then_loaded_here(tmp_path, monkeypatch):
    log = tmp_path / "log"
    log.touch()
    monkeypatch.setenv(LOG, str(log))
    monkeypatch.setenv("LOCALLLM_COMPILE_HELPER", "1")
    units = [f"test-{uuid.uuid4().hex[:8]}-{i}" for i in range(8)]
    parallel_compile.compile_shared(units, record_unit)
    calls = lines(log)
    here = [unit for pid, unit in calls if pid == os.getpid()]
    helper = [unit for pid, unit in calls if pid != os.getpid()]
    assert helper and set(helper) <= set(units[1:])     # the helper took some (it starts after this process)
    assert len(helper) == len(set(helper))
    for unit in units:                                   # compiled once, by one of the two; loaded here at the end
        assert here.count(unit) + helper.count(unit) == 2 and here.count(unit) >= 1
    assert here[-len(units):] == units

    log.write_text("")
    parallel_compile.compile_shared(units, record_unit)  # every unit marked: loaded here, no helper
    assert lines(log) == [(os.getpid(), unit) for unit in units]


def test_on_by_default_and_off_by_the_environment(tmp_path, monkeypatch):
    log = tmp_path / "log"
    log.touch()
    monkeypatch.setenv(LOG, str(log))
    monkeypatch.delenv("LOCALLLM_COMPILE_HELPER", raising=False)
    units = [f"test-{uuid.uuid4().hex[:8]}-{i}" for i in range(6)]
    parallel_compile.compile_shared(units, record_unit)
    assert any(pid != os.getpid() for pid, _ in lines(log))          # a helper took some

    monkeypatch.setenv("LOCALLLM_COMPILE_HELPER", "0")
    log.write_text("")
    units = [f"test-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    parallel_compile.compile_shared(units, record_unit)
    assert lines(log) == [(os.getpid(), unit) for unit in units]
