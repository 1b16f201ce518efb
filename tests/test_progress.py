"""progress.slow_step: a slow step says so on stderr (and how long it took); a quick one stays silent."""
import io
import threading
import time

from localllm import progress


def test_a_slow_step_announces_itself_and_its_duration():
    out = io.StringIO()
    with progress.slow_step("compiling things", after=0.05, stream=out):
        assert progress.state() == ["compiling things"]
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "localllm: compiling things..."
    assert lines[1].startswith("localllm: compiling things: done in ") and lines[1].endswith(" s")
    assert progress.state() == []


def test_a_quick_step_is_silent_and_errors_pass_through():
    out = io.StringIO()
    with progress.slow_step("quick", after=5.0, stream=out):
        pass
    assert out.getvalue() == ""
    try:
        with progress.slow_step("failing", after=5.0, stream=out):
            raise KeyError("x")
    except KeyError:
        pass
    assert out.getvalue() == "" and progress.state() == []


def test_silenced_by_the_environment(monkeypatch):
    monkeypatch.setenv("LOCALLLM_PROGRESS", "0")
    out = io.StringIO()
    with progress.slow_step("slow", after=0.01, stream=out):
        time.sleep(0.1)
    assert out.getvalue() == ""


def test_steps_of_several_threads_are_listed():
    started, release = threading.Barrier(3), threading.Event()

    def work(name):
        with progress.slow_step(name, after=60, stream=io.StringIO()):
            started.wait()
            release.wait()

    threads = [threading.Thread(target=work, args=(f"step {i}",)) for i in range(2)]
    for t in threads:
        t.start()
    started.wait()
    assert sorted(progress.state()) == ["step 0", "step 1"]
    release.set()
    for t in threads:
        t.join()
    assert progress.state() == []
