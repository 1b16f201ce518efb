"""Modelfile parsing, rendering and model creation (localllm.modelfile)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from localllm.modelfile import (Modelfile, ModelfileError, create_model, format_parameters, is_path_reference,
                                modelfile_from_request, normalize_parameters, parse_modelfile, parse_parameter,
                                render_modelfile)
from localllm.store import InvalidModelFile, ModelStore

JINJA_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

EXAMPLE = f'''# a comment, then a blank line

FROM smollm2:135m
parameter num_ctx 8192
PARAMETER temperature 0.25
PARAMETER top_k 7
PARAMETER stop "<|im_end|>"
PARAMETER stop "User:"
PARAMETER seed 42
  PARAMETER repeat_penalty 1.1
SYSTEM You are Mario from Super Mario Bros.
TEMPLATE """{JINJA_TEMPLATE}"""
MESSAGE user Is Toronto in Canada?
MESSAGE assistant """yes,
it is"""
LICENSE """line one
line two"""
'''


def test_parse_example():
    modelfile = parse_modelfile(EXAMPLE)
    assert modelfile.from_ == "smollm2:135m"
    assert modelfile.parameters == {"num_ctx": 8192, "temperature": 0.25, "top_k": 7,
                                    "stop": ["<|im_end|>", "User:"], "seed": 42, "repeat_penalty": 1.1}
    assert type(modelfile.parameters["num_ctx"]) is int and type(modelfile.parameters["temperature"]) is float
    assert modelfile.system == "You are Mario from Super Mario Bros."
    assert modelfile.template == JINJA_TEMPLATE
    assert modelfile.messages == [{"role": "user", "content": "Is Toronto in Canada?"},
                                  {"role": "assistant", "content": "yes,\nit is"}]
    assert modelfile.license == "line one\nline two"
    assert modelfile.adapters == []


def test_quoted_values_and_escapes():
    modelfile = parse_modelfile('FROM "./my model.gguf"\nPARAMETER stop "say \\"hi\\"\\n"\nSYSTEM """ spaced """\n'
                                'PARAMETER stop """multi\nline"""\n')
    assert modelfile.from_ == "./my model.gguf"
    assert modelfile.parameters["stop"] == ['say "hi"\n', "multi\nline"]
    assert modelfile.system == " spaced "


def test_windows_line_endings():
    modelfile = parse_modelfile("FROM x\r\nPARAMETER top_p 0.5\r\nSYSTEM hello\r\n")
    assert modelfile.parameters == {"top_p": 0.5}
    assert modelfile.system == "hello"


@pytest.mark.parametrize("text, line, words", [
    ("FROM x\nPARAMETER num_ctx 8192\nBOGUS y\n", 3, "unknown directive 'BOGUS'"),
    ("FROM x\n\nPARAMETER mirostat 2\n", 3, "unknown parameter 'mirostat'"),
    ("FROM x\nPARAMETER num_ctx lots\n", 2, "expects an integer"),
    ("FROM x\nPARAMETER temperature warm\n", 2, "expects a number"),
    ("FROM x\nPARAMETER temperature -1\n", 2, "temperature"),
    ("FROM x\nPARAMETER top_p 2\n", 2, "top_p"),
    ("FROM x\nPARAMETER num_ctx 0\n", 2, "num_ctx"),
    ("FROM x\nPARAMETER num_ctx\n", 2, "needs a value"),
    ("FROM x\nSYSTEM\n", 2, "needs a value"),
    ("FROM x\nSYSTEM \"\"\"never closed\nstill open\n", 2, 'unterminated """'),
    ("FROM x\nSYSTEM \"open\n", 2, "unterminated \" quote"),
    ("FROM x\nMESSAGE robot hello\n", 2, "role 'robot'"),
    ("FROM x\nFROM y\nFROM z\n", 3, "a third FROM line"),
    ("FROM x\nSYSTEM \"a\" trailing\n", 2, "unexpected text"),
    ('FROM x\nTEMPLATE """{{ if .System }}{{ .System }}{{ end }}"""\n', 2, "Go template"),
    ('FROM x\n# c\nTEMPLATE """{% for m in messages %}"""\n', 3, "TEMPLATE"),
])
def test_errors_name_the_line(text, line, words):
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}: ")
    assert words in str(info.value)


def test_missing_from():
    with pytest.raises(ModelfileError, match="no FROM line"):
        parse_modelfile("PARAMETER temperature 0\n")
    assert parse_modelfile("SYSTEM hi\n", require_from=False).from_ is None


def test_parse_parameter_for_cli():
    assert parse_parameter("temperature", "0.5") == 0.5
    assert parse_parameter("num_predict", " -1 ") == -1
    assert parse_parameter("stop", '"<|im_end|>"') == "<|im_end|>"
    assert parse_parameter("stop", "User:") == "User:"
    with pytest.raises(ModelfileError, match="unknown parameter 'bogus'"):
        parse_parameter("bogus", "1")
    with pytest.raises(ModelfileError, match="expects an integer"):
        parse_parameter("top_k", "1.5")


def test_normalize_parameters():
    assert normalize_parameters({"num_ctx": 8192.0, "temperature": 0, "stop": "x", "seed": None}) == \
        {"num_ctx": 8192, "temperature": 0.0, "stop": ["x"]}
    assert normalize_parameters(None) == {}
    for bad, words in [({"num_ctx": "8192"}, "num_ctx must be an integer"), ({"top_k": True}, "top_k"),
                       ({"temperature": "hot"}, "temperature must be a number"), ({"stop": [1]}, "stop"),
                       ({"typical_p": 0.5}, "unknown parameter 'typical_p'"), ({"min_p": 1.5}, "min_p")]:
        with pytest.raises(ModelfileError, match=words):
            normalize_parameters(bad)
    with pytest.raises(ModelfileError, match="parameters must be an object"):
        normalize_parameters([1, 2])


def test_format_parameters_like_ollama():
    # Ollama: fmt.Sprintf("%-*s %#v", 30, key, value) per value, joined by newlines
    text = format_parameters({"num_ctx": 8192, "temperature": 0.7, "stop": ["<|im_end|>", "a\"b"]})
    assert text.splitlines() == [
        "num_ctx" + " " * 23 + " 8192",
        "temperature" + " " * 19 + " 0.7",
        "stop" + " " * 26 + ' "<|im_end|>"',
        "stop" + " " * 26 + ' "a\\"b"',
    ]
    assert format_parameters({"temperature": 1.0}) == "temperature" + " " * 19 + " 1"


def test_render_round_trip():
    entry = SimpleNamespace(name="mario:latest", path="/store/blobs/sha256-abc",
                            parameters={"num_ctx": 8192, "temperature": 0.0, "stop": ["<|im_end|>", 'q"uote\n']},
                            template=JINJA_TEMPLATE, system="You are Mario.\nAlways.",
                            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello\n"}],
                            license="MIT")
    text = render_modelfile(entry)
    assert text.startswith('# Modelfile generated by "localllm show"\n')
    assert "\nFROM /store/blobs/sha256-abc\n" in text
    parsed = parse_modelfile(text)
    assert parsed.from_ == "/store/blobs/sha256-abc"
    assert parsed.parameters == entry.parameters
    assert (parsed.template, parsed.system, parsed.messages, parsed.license) == \
        (entry.template, entry.system, entry.messages, entry.license)
    assert "FROM smollm2:135m" in render_modelfile(entry, from_="smollm2:135m")


def test_create_request_body():
    modelfile = parse_modelfile(EXAMPLE)
    body = modelfile.create_request("mario")
    assert body["model"] == "mario" and body["from"] == "smollm2:135m"
    assert body["parameters"]["stop"] == ["<|im_end|>", "User:"]
    again = modelfile_from_request(body)
    assert again == modelfile
    local = parse_modelfile("FROM ./weights/model.gguf\n").create_request("m", base_dir="/models/here")
    assert local == {"model": "m", "from": "/models/here/weights/model.gguf"}


def test_modelfile_from_request_fields_and_legacy_text():
    modelfile = modelfile_from_request({"modelfile": "FROM base\nPARAMETER temperature 0.5\nSYSTEM old\n",
                                        "system": "new", "parameters": {"top_k": 3}, "license": ["a", "b"]})
    assert modelfile.from_ == "base"
    assert modelfile.parameters == {"temperature": 0.5, "top_k": 3}
    assert modelfile.system == "new" and modelfile.license == "a\nb"
    assert modelfile_from_request({"from": "x", "modelfile": "SYSTEM s\n"}).from_ == "x"
    for body, words in [({}, "from must name"), ({"from": "x", "template": 5}, "template must be a string"),
                        ({"from": "x", "messages": [{"role": "robot", "content": "x"}]}, "messages\\[0\\].role"),
                        ({"from": "x", "license": [1]}, "license"), ({"modelfile": 7}, "modelfile must be")]:
        with pytest.raises(ModelfileError, match=words):
            modelfile_from_request(body)


def test_is_path_reference(tmp_path):
    (tmp_path / "sub").mkdir()
    assert is_path_reference("/abs/model.gguf") and is_path_reference("./m") and is_path_reference("~/m")
    assert is_path_reference("model.gguf") and is_path_reference("../x")
    assert not is_path_reference("smollm2:135m") and not is_path_reference("hf.co/user/repo:file")
    assert not is_path_reference("sub/model", base_dir=tmp_path)          # a name with '/' unless it exists
    (tmp_path / "sub" / "model").write_bytes(b"")
    assert is_path_reference("sub/model", base_dir=tmp_path)


# ---- creating models in a store -------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "models")


def test_create_from_file_then_derive(store, tiny_llama_path, tmp_path):
    events = []
    base = create_model(store, "tiny", parse_modelfile(f"FROM {tiny_llama_path}\nPARAMETER temperature 0.3\n"
                                                      "PARAMETER stop a\n"), progress=events.append)
    assert base.name == "tiny:latest" and base.parameters == {"temperature": 0.3, "stop": ["a"]}
    assert events[-1] == {"status": "success"} and {"status": "writing manifest"} in events

    derived = create_model(store, "tiny:ctx", parse_modelfile(f'FROM tiny\nPARAMETER num_ctx 64\nSYSTEM """be brief"""\n'
                                                              f'MESSAGE user hi\nTEMPLATE """{JINJA_TEMPLATE}"""\n'))
    assert derived.path == base.path and derived.digest == base.digest
    assert derived.parameters == {"temperature": 0.3, "stop": ["a"], "num_ctx": 64}
    assert (derived.system, derived.template, derived.messages) == ("be brief", JINJA_TEMPLATE,
                                                                     [{"role": "user", "content": "hi"}])
    # render -> parse -> create gives the same model again
    again = create_model(store, "tiny:again", parse_modelfile(render_modelfile(derived)))
    assert (again.parameters, again.system, again.template, again.messages, again.digest) == \
        (derived.parameters, derived.system, derived.template, derived.messages, derived.digest)

    # a relative FROM starts at the Modelfile's folder
    (tmp_path / "mf").mkdir()
    (tmp_path / "mf" / "model.gguf").write_bytes(tiny_llama_path.read_bytes())
    relative = create_model(store, "tiny:relative", parse_modelfile("FROM ./model.gguf\n"), base_dir=tmp_path / "mf")
    assert relative.digest == base.digest


def test_create_refuses_corrupt_gguf_and_leaves_nothing(store, tiny_llama_path, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_llama_path.read_bytes()[:-1000])
    with pytest.raises(InvalidModelFile, match="truncated"):
        create_model(store, "broken", parse_modelfile(f"FROM {truncated}\n"))
    assert store.list() == []
    assert not any((store.root / "blobs").glob("*"))


def test_create_errors(store, tiny_llama_path, tmp_path):
    with pytest.raises(ModelfileError, match="no such file"):
        create_model(store, "x", parse_modelfile(f"FROM {tmp_path}/nothing.gguf\n"))
    with pytest.raises(ModelfileError, match="ADAPTER"):
        create_model(store, "x", parse_modelfile(f"FROM {tiny_llama_path}\nADAPTER ./lora.gguf\n"))
    with pytest.raises(Exception, match="not found"):
        create_model(store, "x", Modelfile(from_="no-such-model:1b"))
    assert store.list() == []
