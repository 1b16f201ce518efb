"""Vision models through Ollama's model management, against a real server: /api/create with two FROM lines (a
``modelfile``), with ``from`` + ``projector``, and with Ollama's ``files`` (uploaded with the ollama client's
``create_blob``); /api/show's ``capabilities`` and ``projector_info``, /api/tags' families; the created model
answers about an image as the library does with the same files."""
from __future__ import annotations

import hashlib

import httpx
import ollama
import pytest

import localllm
from tests.tiny_vlm import picture, png_bytes

QUESTION = "What is it?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, its store) of a server over an empty store of its own."""
    from localllm.engine import Engine, EngineSettings
    from localllm.store import ModelStore
    from localllm_server.app import Settings, create_app
    from tests.server.conftest import RunningServer

    store = ModelStore(tmp_path_factory.mktemp("vision-models") / "store")
    engine = Engine(EngineSettings(n_slots=2, max_queue=8, keep_alive=600), store=store)
    settings = Settings(threads=8)
    app = create_app(engine, settings)
    running = RunningServer(app, settings)
    yield running.url, store
    running.close()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server[0], timeout=120)


def digest_of(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def create(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server[0]}/api/create", json={"stream": False, **body}, timeout=120)


def show(server, name: str) -> dict:
    response = httpx.post(f"{server[0]}/api/show", json={"model": name}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def image_chat(client, name: str, image) -> str:
    answer = client.chat(model=name, messages=[{"role": "user", "content": QUESTION, "images": [png_bytes(image)]}],
                         options={"temperature": 0, "num_predict": 6})
    return answer.message.content


def library_answer(model_gguf, mmproj, image) -> str:
    model = localllm.load(model_gguf, projector=mmproj, num_ctx=512)
    return model.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": QUESTION}]}],
                      max_tokens=6, temperature=0)


def test_create_from_a_modelfile_with_two_from_lines(server, client, tiny_vlm_files):
    _, model_gguf, mmproj = tiny_vlm_files["llava"]
    response = create(server, {"model": "seeing-llava", "modelfile": f"FROM {mmproj}\nFROM {model_gguf}\n"})
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "success"}
    shown = show(server, "seeing-llava")
    assert shown["capabilities"] == ["completion", "vision"]
    info = shown["projector_info"]
    assert info["general.architecture"] == "clip" and info["clip.projector_type"] == "mlp"
    assert info["clip.vision.image_size"] == 32 and info["general.parameter_count"] > 0
    assert shown["details"]["families"] == ["llama", "clip"]
    entry = server[1].get("seeing-llava")
    assert f"\nFROM {entry.path}\nFROM {entry.projector}\n" in shown["modelfile"]
    tags = {m["name"]: m for m in httpx.get(f"{server[0]}/api/tags", timeout=30).json()["models"]}
    assert tags["seeing-llava:latest"]["details"]["families"] == ["llama", "clip"]
    assert tags["seeing-llava:latest"]["size"] == model_gguf.stat().st_size + mmproj.stat().st_size
    assert client.show("seeing-llava").capabilities == ["completion", "vision"]
    image = picture(31)
    assert image_chat(client, "seeing-llava", image) == library_answer(model_gguf, mmproj, image)


def test_from_and_projector_fields_and_a_text_only_model(server, client, tiny_vlm_files):
    _, model_gguf, mmproj = tiny_vlm_files["gemma3"]
    client.create(model="gemma-text", from_=str(model_gguf))
    shown = show(server, "gemma-text")
    assert "vision" not in shown["capabilities"] and "projector_info" not in shown
    assert shown["details"]["families"] == ["gemma3"]
    with pytest.raises(ollama.ResponseError, match="has no vision"):
        image_chat(client, "gemma-text", picture(32))
    # FROM <store model> + a projector path (what `localllm create` sends for a second FROM)
    response = create(server, {"model": "gemma-seeing", "from": "gemma-text", "projector": str(mmproj),
                               "system": "Look closely."})
    assert response.status_code == 200, response.text
    shown = show(server, "gemma-seeing")
    assert "vision" in shown["capabilities"] and shown["projector_info"]["clip.projector_type"] == "gemma3"
    assert shown["system"] == "Look closely."
    assert "vision" not in show(server, "gemma-text")["capabilities"]


def test_create_with_uploaded_files(server, client, tiny_vlm_files, tmp_path):
    """The ollama client's way: create_blob (POST /api/blobs/<digest>) for each file, then create with files."""
    from tests.tiny_vlm import write_vlm
    model_gguf, mmproj = write_vlm(tiny_vlm_files["gemma3"][0], tmp_path, weight_type="F16")   # files of its own
    assert server[1].blob_file(digest_of(model_gguf)) is None
    digests = {"model.gguf": client.create_blob(model_gguf), "mmproj.gguf": client.create_blob(mmproj)}
    assert digests == {"model.gguf": digest_of(model_gguf), "mmproj.gguf": digest_of(mmproj)}
    assert httpx.head(f"{server[0]}/api/blobs/{digests['mmproj.gguf']}", timeout=30).status_code == 200
    client.create(model="uploaded", files=digests)
    entry = server[1].get("uploaded")
    assert (entry.path.name, entry.projector.name) == tuple(d.replace(":", "-") for d in digests.values())
    assert not any((server[1].root / "uploads").iterdir())             # stored as blobs, the uploads are gone
    assert client.show("uploaded").capabilities == ["completion", "vision"]
    image = picture(33)
    assert image_chat(client, "uploaded", image) == library_answer(model_gguf, mmproj, image)


def test_files_may_hold_only_the_projector(server, client, tiny_vlm_files):
    _, model_gguf, mmproj = tiny_vlm_files["llava"]
    client.create(model="llava-text", from_=str(model_gguf))
    client.create(model="llava-with-files", from_="llava-text", files={"mmproj.gguf": client.create_blob(mmproj)})
    assert "vision" in client.show("llava-with-files").capabilities


def test_blob_uploads_are_checked(server):
    url = server[0]
    body = b"not the file the digest names"
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    response = httpx.post(f"{url}/api/blobs/{wrong}", content=body, timeout=30)
    assert response.status_code == 400 and "not the digest it was sent under" in response.json()["error"]
    assert httpx.head(f"{url}/api/blobs/{wrong}", timeout=30).status_code == 404
    assert httpx.head(f"{url}/api/blobs/sha256:xyz", timeout=30).status_code == 400
    right = "sha256:" + hashlib.sha256(body).hexdigest()
    assert httpx.post(f"{url}/api/blobs/{right}", content=body, timeout=30).status_code == 201
    assert httpx.head(f"{url}/api/blobs/{right}", timeout=30).status_code == 200


@pytest.mark.parametrize("body, status, words", [
    ({"files": {"model.gguf": "sha256:" + "0" * 64}}, 400, "is not on the server; upload it first"),
    ({"files": {"config.json": "sha256:" + "0" * 64}}, 400, "'config.json' is not a .gguf file"),
    ({"files": {"model.gguf": "md5:1"}}, 400, "invalid digest"),
    ({"files": ["model.gguf"]}, 400, "files must map file names to digests"),
])
def test_bad_files_are_400s_naming_them(server, body, status, words):
    response = create(server, {"model": "bad", **body})
    assert response.status_code == status and words in response.json()["error"], response.text


def test_refusals_name_the_problem_and_store_nothing(server, tiny_vlm_files, tmp_path):
    from tests.tiny_models import write_tiny_llama
    _, llava_gguf, llava_mmproj = tiny_vlm_files["llava"]
    text64 = write_tiny_llama(tmp_path / "text64.gguf")
    for modelfile, words in ((f"FROM {text64}\nFROM {llava_mmproj}\n", "width 40, but the model text64.gguf is 64"),
                             (f"FROM {llava_gguf}\nFROM {text64}\n", "line 2: two models"),
                             (f"FROM {llava_mmproj}\n", "line 1: FROM")):
        response = create(server, {"model": "refused", "modelfile": modelfile})
        assert response.status_code == 400 and words in response.json()["error"], response.text
    assert httpx.post(f"{server[0]}/api/show", json={"model": "refused"}, timeout=30).status_code == 404


def test_cli_create_and_show_go_through_the_server(server, tiny_vlm_files, tmp_path, monkeypatch, capsys):
    """`localllm create` sends the second FROM as `projector`; `localllm show` prints the capabilities and the
    Projector section from /api/show."""
    from localllm import cli
    _, model_gguf, mmproj = tiny_vlm_files["llava"]
    monkeypatch.setenv("LOCALLLM_HOST", server[0].removeprefix("http://"))
    monkeypatch.setenv("LOCALLLM_MODELS", str(tmp_path / "empty-store"))      # everything happens in the server's
    (tmp_path / "Modelfile").write_text(f"FROM {model_gguf}\nFROM {mmproj}\nSYSTEM Be brief.\n")
    assert cli.main(["create", "cli-seeing", "-f", str(tmp_path / "Modelfile")]) == 0
    assert server[1].get("cli-seeing").projector is not None
    capsys.readouterr()
    assert cli.main(["show", "cli-seeing"]) == 0
    sections = {part.splitlines()[0].strip(): [line.split() for line in part.splitlines()[1:]]
                for part in capsys.readouterr().out.split("\n\n")}
    assert sections["Capabilities"] == [["completion"], ["vision"]]
    assert sections["Projector"][0] == ["architecture", "clip"] and ["dimensions", "16"] in sections["Projector"]
    assert not (tmp_path / "empty-store").exists()
