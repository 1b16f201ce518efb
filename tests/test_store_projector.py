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
from tests.tiny_vision import gradient_image
from tests.tiny_vlm import (GEMMA3_TEMPLATE, LLAVA_TEMPLATE, hf_gemma3_vlm, hf_llava_vlm, hf_vlm_logits, vocabulary,
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
def vlms(tmp_path_factory):
    """family -> (transformers model, language-model GGUF, mmproj GGUF, Hugging Face folder)."""
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for family, build in (("gemma3", hf_gemma3_vlm), ("llava", hf_llava_vlm)):
        vlm = build(seed=5)
        out[family] = (vlm, *write_vlm(vlm, root / family / "gguf"), save_vlm_folder(vlm, root / family / "hf"))
    return out


def picture(seed: int, size=(50, 40)):
    from PIL import Image
    rng = np.random.default_rng(seed)
    base = np.asarray(gradient_image(*size), dtype=np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


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
