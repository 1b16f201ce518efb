"""Vision projectors as part of a model: Hugging Face vision-language folders loaded whole, projector files in the
store (their own manifest layer, kept by cp and derive, collected by rm only when unused), Modelfiles with two
FROM lines, and the logits with an image through the created store model (transformers as the oracle)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import localllm
from localllm.formats.hf_decoder import read_hf_decoder
from tests.tiny_vlm import (GEMMA3_TEMPLATE, LLAVA_TEMPLATE, hf_gemma3_vlm, hf_vlm_logits, picture, vocabulary,
                            write_vlm)

FAMILIES = ("gemma3", "llava")


# ---------------------------------------------------------------------------- tiny vision-language files
def write_vlm_tokenizer(folder: Path, family: str) -> None:
    """tokenizer.json + tokenizer_config.json of the tiny VLMs' vocabulary (``tiny_vlm.vocabulary``: the 256
    bytes, then special tokens at the ids the GGUF files give them) with the family's BOS, EOS and template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, token_types = vocabulary()
    tokenizer = Tokenizer(models.BPE(vocab={text: i for i, (text, kind) in enumerate(zip(tokens, token_types))
                                            if kind == 1}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                  for text, kind in zip(tokens, token_types) if kind == 3])
    tokenizer.save(str(folder / "tokenizer.json"))
    bos, eos, template = (("<bos>", "<eos>", GEMMA3_TEMPLATE) if family == "gemma3"
                          else ("<|endoftext|>", "<|im_end|>", LLAVA_TEMPLATE))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": template}))


def rename_tensors(folder: Path, naming: str) -> Path:
    """The folder's tensors as a checkpoint of another transformers version names them: ``"current"``
    (``model.language_model.*``, ``lm_head.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``) or
    ``"legacy"`` (``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
    ``multi_modal_projector.*``)."""
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    renamed = {}
    for name, array in load_file(path).items():
        bare = name.removeprefix("model.")
        for old, new in (("language_model.model.", "language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.vision_model.", "vision_tower.")):
            if bare.startswith(old):
                bare = new + bare[len(old):]
        if naming == "current":
            renamed[bare if bare.startswith("lm_head.") else "model." + bare] = array
        else:
            for old, new in (("language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                             ("vision_tower.", "vision_tower.vision_model.")):
                if bare.startswith(old):
                    bare = new + bare[len(old):]
                    break
            renamed[bare] = array
    save_file(renamed, path, metadata={"format": "pt"})
    return folder


def save_vlm_folder(vlm, folder: Path, naming: str = "saved") -> Path:
    """The VLM as a Hugging Face folder with a tokenizer (``tiny_vision.save_hf_vision_folder`` + our tokenizer
    files), its tensors named as transformers saves them or as ``rename_tensors`` says."""
    from tests.tiny_vision import save_hf_vision_folder

    save_hf_vision_folder(vlm, folder)
    write_vlm_tokenizer(folder, vlm.config.model_type)
    return folder if naming == "saved" else rename_tensors(folder, naming)


@pytest.fixture(scope="module")
def vlms(tiny_vlm_files, tmp_path_factory):
    """family -> (transformers model, language-model GGUF, mmproj GGUF, Hugging Face folder of the same model)."""
    root = tmp_path_factory.mktemp("vlm-hf")
    return {family: (vlm, model_gguf, mmproj, save_vlm_folder(vlm, root / family))
            for family, (vlm, model_gguf, mmproj) in tiny_vlm_files.items()}


def ask(image, text="What is it?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def logits_with_image(model, vlm, image) -> tuple[np.ndarray, np.ndarray]:
    """(ours, transformers') logits of a one-image question, the same prompt ids for both."""
    messages, images = model.images_in(ask(image))
    ids = model.tokenize(model.render_chat(messages), images=images)
    assert sum(1 for t in ids if t < 0) == model.vision.n_image_tokens
    return model.logits(ids), hf_vlm_logits(vlm, list(ids), [model.vision.encoder.preprocess(image)])


# ---------------------------------------------------------------------------- Hugging Face VLM folders
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("naming", ["saved", "current", "legacy"])
def test_a_vision_language_folder_loads_with_its_vision(vlms, tmp_path, family, naming):
    vlm = vlms[family][0]
    folder = vlms[family][3] if naming == "saved" else save_vlm_folder(vlm, tmp_path / naming, naming)
    model = localllm.load(folder, backend="ref", num_ctx=128)
    assert model.vision is not None and "vision" in model.capabilities
    assert model.config.dim == vlm.config.text_config.hidden_size
    ours, theirs = logits_with_image(model, vlm, picture(1))
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    other, _ = logits_with_image(model, vlm, picture(2))
    assert np.abs(other[-1] - ours[-1]).max() > 1e-2                 # the image reaches the model


@pytest.mark.parametrize("family", FAMILIES)
def test_read_hf_decoder_takes_the_language_model_of_a_vlm_folder(vlms, family):
    vlm, model_gguf, _, folder = vlms[family]
    read = read_hf_decoder(folder)
    text = vlm.config.text_config
    assert read.has_vision and read.config.dim == text.hidden_size and read.config.n_layers == text.num_hidden_layers
    assert read.hf_config["model_type"] == text.model_type
    assert not any(name.startswith(("v.", "mm.")) for name in read.tensors)
    assert ("output.weight" in read.tensors) == (family == "llava")     # Gemma 3 ties its output to the embeddings
    # the same language model as the GGUF file llama.cpp's layout gives (both loaded, no image)
    ids = [10, 72, 101, 108, 108, 111, 33, 299 - 40]
    from_folder = localllm.load(folder, backend="ref", num_ctx=64)
    from_gguf = localllm.load(model_gguf, backend="ref", num_ctx=64)
    np.testing.assert_allclose(from_folder.logits(ids), from_gguf.logits(ids), atol=1e-4, rtol=0)


def test_a_vlm_folder_with_an_unknown_tensor_is_refused(vlms, tmp_path):
    from safetensors.numpy import load_file, save_file

    from localllm.arch.spec import UnsupportedModelFeature
    folder = tmp_path / "odd"
    shutil.copytree(vlms["llava"][3], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["language_model.model.extra_gate.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelFeature, match="model.extra_gate.weight"):
        read_hf_decoder(folder)


# ---------------------------------------------------------------------------- the store
PROJECTOR = "application/vnd.ollama.image.projector"


def manifest_of(store, name: str) -> dict:
    base, _, tag = name.partition(":")
    return json.loads((store.root / "manifests" / base / f"{tag or 'latest'}.json").read_text())


def blob_names(store) -> set[str]:
    return {p.name for p in (store.root / "blobs").iterdir()} if (store.root / "blobs").is_dir() else set()


def sha256_of(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path):
    from localllm.store import ModelStore
    return ModelStore(tmp_path / "store")


def test_a_projector_is_a_layer_of_its_own(vlms, store):
    _, model_gguf, mmproj, _ = vlms["llava"]
    entry = store.add_local("vlm", model_gguf, projector=mmproj)
    manifest = manifest_of(store, "vlm")
    model_layer, projector_layer = manifest["layers"]
    assert "mediaType" not in model_layer and model_layer["digest"] == f"sha256:{sha256_of(model_gguf)}"
    assert projector_layer == {"path": "mmproj.gguf", "digest": f"sha256:{sha256_of(mmproj)}",
                               "size": mmproj.stat().st_size, "mediaType": PROJECTOR}
    assert manifest["projector"]["format"] == "gguf" and manifest["projector"]["digest"] == projector_layer["digest"]
    assert entry.path.name == f"sha256-{sha256_of(model_gguf)}"
    assert entry.projector.name == f"sha256-{sha256_of(mmproj)}"
    assert entry.digest == model_layer["digest"]                    # the model's id is its model file's
    assert entry.size == model_gguf.stat().st_size + mmproj.stat().st_size
    info = entry.projector_info
    assert info["general.architecture"] == "clip" and info["clip.projector_type"] == "mlp"
    assert info["clip.vision.image_size"] == 32 and info["clip.vision.block_count"] == 2
    assert info["general.parameter_count"] > 0
    assert entry.details["family"] == "llama" and store.get("vlm").projector == entry.projector


def test_cp_derive_and_rm_share_the_projector_until_its_last_user(vlms, store):
    _, model_gguf, mmproj, _ = vlms["llava"]
    entry = store.add_local("vlm", model_gguf, projector=mmproj)
    store.copy("vlm", "alias")
    derived = store.derive("told", "vlm", system="Describe images tersely.")
    assert store.get("alias").projector == derived.projector == entry.projector
    assert derived.system == "Describe images tersely."
    store.delete("vlm")
    store.delete("alias")
    assert entry.projector.exists()                                  # "told" still names it
    store.delete("told")
    assert blob_names(store) == set()
    assert not (store.root / "folders").exists() or not any((store.root / "folders").iterdir())


def test_a_second_projector_replaces_the_first_and_the_unused_one_is_collected(vlms, store, tmp_path):
    _, model_gguf, mmproj, _ = vlms["gemma3"]
    first = store.add_local("g", model_gguf, projector=mmproj)
    other = write_vlm(hf_gemma3_vlm(seed=8), tmp_path / "other")[1]   # another projector of the same shape
    replaced = store.derive("g", "g", projector=other)
    assert replaced.projector.name == f"sha256-{sha256_of(other)}" and not first.projector.exists()
    assert [layer["digest"] for layer in manifest_of(store, "g")["layers"] if layer.get("mediaType") == PROJECTOR] \
        == [f"sha256:{sha256_of(other)}"]
    assert replaced.path == first.path and replaced.path.exists()


def test_a_model_without_a_projector_has_none(store):
    from tests.tiny_models import write_tiny_llama
    entry = store.add_local("text", write_tiny_llama(store.root.parent / "text.gguf"))
    assert entry.projector is None and entry.projector_info == {}
    assert manifest_of(store, "text")["projector"] is None


def test_a_projector_of_another_width_is_refused_before_anything_is_stored(vlms, store):
    from localllm.model_info import ProjectorMismatch
    from tests.tiny_models import write_tiny_llama
    text = write_tiny_llama(store.root.parent / "text64.gguf")      # 64 wide; the projector makes 40
    with pytest.raises(ProjectorMismatch, match=r"mmproj.gguf makes embeddings of width 40, but the model "
                                                r"text64.gguf is 64 wide"):
        store.add_local("wrong", text, projector=vlms["llava"][2])
    assert store.list() == [] and blob_names(store) == set()


def test_a_gemma3_projector_needs_the_image_tokens(vlms, store):
    from localllm.model_info import ProjectorMismatch
    from tests.tiny_models import write_tiny_llama
    text = write_tiny_llama(store.root.parent / "text40.gguf", dim=40, n_heads=2, n_kv_heads=2)
    with pytest.raises(ProjectorMismatch, match="has no <start_of_image> token"):
        store.add_local("wrong", text, projector=vlms["gemma3"][2])
    assert store.list() == []


def test_a_projector_file_is_not_a_model(vlms, store):
    from localllm.model_info import InvalidModelFile
    with pytest.raises(InvalidModelFile, match="is a vision projector"):
        store.add_local("p", vlms["llava"][2])
    with pytest.raises(InvalidModelFile, match="not a usable vision projector"):
        store.add_local("p", vlms["llava"][1], projector=vlms["llava"][1])    # a model given as the projector
    assert store.list() == []


def test_a_failed_manifest_write_leaves_no_projector_blob(vlms, store, monkeypatch):
    _, model_gguf, mmproj, _ = vlms["llava"]

    def fail(*args):
        raise OSError("the manifest cannot be written")
    monkeypatch.setattr(type(store), "_write_manifest", fail)
    with pytest.raises(OSError, match="cannot be written"):
        store.add_local("vlm", model_gguf, projector=mmproj)
    assert blob_names(store) == set() and store.list() == []


def test_a_vision_language_folder_is_its_own_projector(vlms, store):
    vlm, _, _, folder = vlms["gemma3"]
    entry = store.add_local("hfvlm", folder)
    assert entry.format == "safetensors" and entry.projector == entry.path
    assert entry.projector_info["clip.projector_type"] == "gemma3"
    assert entry.projector_info["clip.vision.projection_dim"] == 40
    assert entry.model_info["gemma3.embedding_length"] == 40 and entry.model_info["gemma3.block_count"] == 3
    assert not any(layer.get("mediaType") for layer in manifest_of(store, "hfvlm")["layers"])
    model = localllm.load("hfvlm", store=store, backend="ref", num_ctx=128)
    ours, theirs = logits_with_image(model, vlm, picture(3))
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


def test_a_folder_projector_beside_a_gguf_model(vlms, store):
    """FROM model.gguf + FROM <HF vision-language folder>: the folder's files are the projector's layers, rebuilt
    as a folder in the store; removed with the model."""
    vlm, model_gguf, _, folder = vlms["llava"]
    entry = store.add_local("mixed", model_gguf, projector=folder)
    assert entry.projector.parent == store.root / "folders" and (entry.projector / "config.json").is_file()
    layers = [layer for layer in manifest_of(store, "mixed")["layers"] if layer.get("mediaType") == PROJECTOR]
    assert {layer["path"] for layer in layers} >= {"config.json", "model.safetensors"}
    model = localllm.load("mixed", store=store, backend="ref", num_ctx=128)
    ours, theirs = logits_with_image(model, vlm, picture(4))
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    store.delete("mixed")
    assert blob_names(store) == set() and not entry.projector.exists()


# ---------------------------------------------------------------------------- Modelfiles with two FROM lines
def test_two_from_lines_parse_in_their_order():
    from localllm.modelfile import parse_modelfile
    modelfile = parse_modelfile("FROM ./model.gguf\n# the vision part\nFROM ./mmproj.gguf\nSYSTEM hi\n")
    assert (modelfile.from_, modelfile.projector) == ("./model.gguf", "./mmproj.gguf")
    assert (modelfile.from_line, modelfile.projector_line) == (1, 3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", ["model first", "projector first"])
def test_create_from_a_model_and_its_projector(vlms, store, family, order):
    """The store model made from the two FROM lines answers about an image as transformers does."""
    from localllm.modelfile import create_model, parse_modelfile
    vlm, model_gguf, mmproj, _ = vlms[family]
    lines = [f"FROM {model_gguf.name}", f"FROM {mmproj.name}"]
    text = "\n".join(lines if order == "model first" else lines[::-1]) + "\nPARAMETER temperature 0\n"
    events = []
    entry = create_model(store, "vlm", parse_modelfile(text), base_dir=model_gguf.parent, progress=events.append)
    assert entry.projector.name == f"sha256-{sha256_of(mmproj)}"
    assert entry.path.name == f"sha256-{sha256_of(model_gguf)}"
    assert {"status": "copying projector file mmproj.gguf"} in events and events[-1] == {"status": "success"}
    model = localllm.load("vlm", store=store, backend="ref", num_ctx=128)
    assert model.vision is not None and model.defaults["temperature"] == 0
    ours, theirs = logits_with_image(model, vlm, picture(5))
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("second, line, words", [
    ("model", 3, "two models"),
    ("projector", 3, "two vision projectors"),
])
def test_two_of_a_kind_name_the_second_line(vlms, store, second, line, words):
    from localllm.modelfile import ModelfileError, create_model, parse_modelfile
    _, model_gguf, mmproj, _ = vlms["llava"]
    same = model_gguf if second == "model" else mmproj
    text = f"FROM {same}\nSYSTEM hi\nFROM {same}\n"
    with pytest.raises(ModelfileError, match=words) as info:
        create_model(store, "x", parse_modelfile(text))
    assert info.value.line == line and store.list() == []


def test_a_projector_alone_is_not_a_model(vlms, store):
    from localllm.modelfile import ModelfileError, create_model, parse_modelfile
    with pytest.raises(ModelfileError, match="is a vision projector .* add a FROM line naming the model") as info:
        create_model(store, "x", parse_modelfile(f"\nFROM {vlms['llava'][2]}\n"))
    assert info.value.line == 2


def test_a_projector_that_does_not_fit_is_refused_at_create(vlms, store, tmp_path):
    from localllm.model_info import ProjectorMismatch
    from localllm.modelfile import create_model, parse_modelfile
    from tests.tiny_models import write_tiny_llama
    text = write_tiny_llama(tmp_path / "text64.gguf")
    with pytest.raises(ProjectorMismatch, match="do not belong together"):
        create_model(store, "x", parse_modelfile(f"FROM {vlms['gemma3'][2]}\nFROM {text}\n"))
    assert store.list() == [] and blob_names(store) == set()


def test_from_a_store_model_and_a_projector(vlms, store):
    """FROM <store name> + FROM mmproj.gguf: the store model's file with a projector; the base keeps none."""
    from localllm.modelfile import create_model, parse_modelfile
    vlm, model_gguf, mmproj, _ = vlms["gemma3"]
    base = store.add_local("text-only", model_gguf, parameters={"top_k": 5})
    entry = create_model(store, "seeing", parse_modelfile(f"FROM {mmproj}\nFROM text-only\nSYSTEM Look.\n"))
    assert entry.path == base.path and entry.projector is not None and entry.parameters == {"top_k": 5}
    assert store.get("text-only").projector is None
    model = localllm.load("seeing", store=store, backend="ref", num_ctx=128)
    ours, theirs = logits_with_image(model, vlm, picture(6))
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


def test_the_rendered_modelfile_recreates_the_model_with_its_projector(vlms, store):
    from localllm.modelfile import create_model, parse_modelfile, render_modelfile
    _, model_gguf, mmproj, folder = vlms["llava"]
    entry = store.add_local("vlm", model_gguf, projector=mmproj, system="Be brief.")
    text = render_modelfile(entry)
    assert f"\nFROM {entry.path}\nFROM {entry.projector}\n" in text
    again = create_model(store, "again", parse_modelfile(text))
    assert (again.path, again.projector, again.system) == (entry.path, entry.projector, "Be brief.")
    own = store.add_local("own", folder)                              # its own projector: one FROM line
    assert render_modelfile(own).count("\nFROM ") == 1


def test_a_quantized_vision_language_folder_keeps_its_vision(vlms, store):
    from localllm.modelfile import create_model, parse_modelfile
    vlm, _, _, folder = vlms["llava"]
    events = []
    entry = create_model(store, "q", parse_modelfile(f"FROM {folder}\n"), quantize="q8_0", progress=events.append)
    assert entry.format == "gguf" and entry.details["quantization_level"] == "Q8_0"
    assert entry.projector is not None and (entry.projector / "config.json").is_file()
    assert any("keeping the vision encoder" in event["status"] for event in events)
    model = localllm.load("q", store=store, backend="ref", num_ctx=128)
    ours, theirs = logits_with_image(model, vlm, picture(7))
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9          # 8-bit language model weights
    assert np.abs(ours - theirs).max() < 0.2


def test_create_requests_carry_the_projector(vlms, tmp_path):
    from localllm.modelfile import ModelfileError, modelfile_from_request, parse_modelfile
    _, model_gguf, mmproj, _ = vlms["llava"]
    body = parse_modelfile(f"FROM {model_gguf.name}\nFROM ./{mmproj.name}\n").create_request("x", model_gguf.parent)
    assert body["from"] == str(model_gguf.resolve()) and body["projector"] == str(mmproj.resolve())
    from_body = modelfile_from_request(body)
    assert (from_body.from_, from_body.projector) == (body["from"], body["projector"])
    from_files = modelfile_from_request({"model": "x"}, files={"model.gguf": model_gguf, "mmproj.gguf": mmproj})
    assert (from_files.from_, from_files.projector) == (str(model_gguf), str(mmproj))
    text = modelfile_from_request({"modelfile": f"FROM {model_gguf}\nFROM {mmproj}\n"})
    assert (text.from_line, text.projector_line) == (1, 2)
    with pytest.raises(ModelfileError, match="3 model sources"):
        modelfile_from_request({"from": "a", "projector": str(mmproj)}, files={"b.gguf": model_gguf})
    with pytest.raises(ModelfileError, match="projector must be the path"):
        modelfile_from_request({"from": "a", "projector": 3})


def test_uploads_are_kept_only_under_their_digest(vlms, store):
    import io

    from localllm.store import DigestMismatch
    _, model_gguf, mmproj, _ = vlms["llava"]
    digest = f"sha256:{sha256_of(mmproj)}"
    with pytest.raises(DigestMismatch, match="not the digest it was sent under"):
        store.save_upload(digest, io.BytesIO(mmproj.read_bytes()[:-1]))
    with pytest.raises(DigestMismatch, match="invalid digest"):
        store.save_upload("md5:abc", io.BytesIO(b""))
    assert store.blob_file(digest) is None and not any((store.root / "uploads").glob("*"))
    uploaded = store.save_upload(digest, io.BytesIO(mmproj.read_bytes()))
    assert uploaded == store.root / "uploads" / f"sha256-{sha256_of(mmproj)}" and store.blob_file(digest) == uploaded
    assert store.blob_file(f"sha256-{sha256_of(mmproj)}") == uploaded        # Ollama's file-name form
    store.add_local("other", model_gguf)
    store.delete("other")                                  # a delete sweeps unused blobs, never waiting uploads
    assert uploaded.exists()
    entry = store.add_local("vlm", model_gguf, projector=uploaded)
    store.discard_uploads([uploaded, entry.path])
    assert not uploaded.exists() and entry.path.exists()
    assert store.blob_file(digest) == entry.projector                          # now a model's blob
    assert store.save_upload(digest, io.BytesIO(b"not read")) == entry.projector


# ---------------------------------------------------------------------------- the command line
def test_cli_create_and_show_with_a_projector(vlms, tmp_path, monkeypatch, capsys):
    import socket

    from localllm import cli
    with socket.socket() as s:                                 # no server: the in-process store
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("LOCALLLM_HOST", f"127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.setenv("LOCALLLM_MODELS", str(tmp_path / "models"))
    from localllm.model_info import human_count
    vlm, model_gguf, mmproj, _ = vlms["gemma3"]
    n_vision = sum(p.numel() for name, p in vlm.named_parameters()
                   if "vision_tower" in name or "multi_modal_projector" in name)
    folder = tmp_path / "build"
    folder.mkdir()
    shutil.copy(model_gguf, folder / "gemma.gguf")
    shutil.copy(mmproj, folder / "mmproj-gemma.gguf")
    (folder / "Modelfile").write_text("FROM ./mmproj-gemma.gguf\nFROM ./gemma.gguf\nPARAMETER temperature 0\n")
    assert cli.main(["create", "cli-vision", "-f", str(folder / "Modelfile")]) == 0
    assert "copying projector file mmproj-gemma.gguf" in capsys.readouterr().err
    assert cli.main(["show", "cli-vision"]) == 0
    out = capsys.readouterr().out
    projector = out[out.index("  Projector\n"):].split("\n\n")[0].splitlines()
    assert [line.split() for line in projector[1:]] == [["architecture", "clip"],
                                                        ["parameters", human_count(n_vision)],
                                                        ["embedding", "length", "32"], ["dimensions", "40"]]
    assert cli.main(["show", "cli-vision", "--modelfile"]) == 0
    assert capsys.readouterr().out.count("\nFROM ") == 2
