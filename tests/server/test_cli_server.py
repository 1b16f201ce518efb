"""The CLI against a running server, as a user drives it: list, one-shot run, and the interactive chat in a pty."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.real_model


def cli_env(server, tmp_path):
    env = dict(os.environ)
    env["LOCALLLM_HOST"] = server.removeprefix("http://")
    env["LOCALLLM_MODELS"] = str(tmp_path / "empty-store")      # the in-process store is empty on purpose
    return env


def test_list_and_run_go_through_the_server(server, tmp_path):
    env = cli_env(server, tmp_path)
    listed = subprocess.run([sys.executable, "-m", "localllm.cli", "list"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0 and "smollm2:135m" in listed.stdout and "all-minilm:latest" in listed.stdout
    created = urllib.request.urlopen(urllib.request.Request(
        server + "/api/create", method="POST", data=json.dumps({
            "model": "cli-short", "from": "smollm2:135m", "stream": False,
            "parameters": {"num_predict": 16, "temperature": 0}}).encode()), timeout=60)
    assert json.loads(created.read())["status"] == "success"
    run = subprocess.run([sys.executable, "-m", "localllm.cli", "run", "cli-short", "Say hello."], env=env,
                         capture_output=True, text=True, timeout=300)   # first load may compile kernels
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    refused = subprocess.run([sys.executable, "-m", "localllm.cli", "run", "all-minilm", "hi"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "does not support chat" in refused.stderr


class Terminal:
    """A child process on a pseudo-terminal: type lines, read until a marker appears."""

    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                                   # the child: become the CLI
            os.execve(argv[0], argv, env)
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while marker not in self.buffer:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; screen so far:\n{self.buffer}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    break
                self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, 9)
        raise AssertionError("the CLI did not exit")


def test_interactive_chat_in_a_terminal_keeps_history(server, tmp_path):
    """Greedy answers are deterministic, so the same question answered with and without the history differs."""
    terminal = Terminal([sys.executable, "-m", "localllm.cli", "run", "smollm2:135m"], cli_env(server, tmp_path))
    terminal.read_until(">>> ", timeout=300)
    terminal.type("/set parameter temperature 0")
    assert "Set parameter 'temperature' to '0" in terminal.read_until(">>> ")
    terminal.type("/set parameter num_predict 24")
    terminal.read_until(">>> ")
    terminal.type("My name is Alice and I live in Lisbon.")
    assert terminal.read_until(">>> ").strip()
    terminal.type("Where do I live?")
    with_history = terminal.read_until(">>> ")
    terminal.type("/clear")
    assert "Cleared" in terminal.read_until(">>> ")
    terminal.type("Where do I live?")
    without_history = terminal.read_until(">>> ")
    assert with_history.strip() and without_history.strip()
    assert with_history != without_history
    terminal.type("/bye")
    assert terminal.wait() == 0


def test_show_and_create_go_through_the_server(server, tmp_path):
    env = cli_env(server, tmp_path)
    (tmp_path / "Modelfile").write_text('FROM smollm2:135m\nPARAMETER temperature 0.3\nSYSTEM """Be brief."""\n')
    created = subprocess.run([sys.executable, "-m", "localllm.cli", "create", "cli-brief", "-f",
                              str(tmp_path / "Modelfile")], env=env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    shown = subprocess.run([sys.executable, "-m", "localllm.cli", "show", "cli-brief"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    assert "llama" in shown.stdout and "135M" in shown.stdout and "temperature" in shown.stdout
    assert "Be brief." in shown.stdout
    system = subprocess.run([sys.executable, "-m", "localllm.cli", "show", "cli-brief", "--system"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert system.stdout.strip() == "Be brief."
    tags = json.loads(urllib.request.urlopen(server + "/api/tags", timeout=30).read())
    assert any(m["name"] == "cli-brief:latest" for m in tags["models"])    # made in the server's store
