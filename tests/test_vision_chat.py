"""Images in chats, through the library: tiny random Gemma 3 and LLaVA vision-language models built with
transformers (the oracle), written as a language-model GGUF + an mmproj GGUF, and run by localllm."""
from __future__ import annotations

import numpy as np
import pytest

import localllm
from localllm.generate import GenerationParams, make_sequences, release, step
from localllm.vision.loading import VisionModelError
from localllm.vision.prompt import (ImageInputError, NoVisionError, PromptTokens, image_ids, image_runs,
                                    split_image_id)
from tests.tiny_vlm import hf_vlm_logits, picture, png_bytes

FAMILIES = ("gemma3", "llava")


@pytest.fixture(scope="module")
def vlms(tiny_vlm_files):
    """family -> (transformers model, language-model GGUF, mmproj GGUF)."""
    return tiny_vlm_files


@pytest.fixture(scope="module")
def loaded(vlms):
    """(family, backend) -> a loaded Model with its projector."""
    cache = {}

    def get(family: str, backend: str = "ref"):
        if (family, backend) not in cache:
            _, model_path, mmproj = vlms[family]
            cache[family, backend] = localllm.load(model_path, projector=mmproj, backend=backend, num_ctx=256)
        return cache[family, backend]
    return get


def ask(image_part, text="What is it?"):
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


def prompt_of(model, messages):
    messages, images = model.images_in(messages)
    return model.tokenize(model.render_chat(messages), images=images)


def their_logits(vlms, model, family, ids, images):
    vlm = vlms[family][0]
    return hf_vlm_logits(vlm, list(ids), [model.vision.encoder.preprocess(image) for image in images])


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_with_an_image_match_transformers(vlms, loaded, family):
    model = loaded(family)
    image = picture(1)
    ids = prompt_of(model, ask({"type": "image", "image": image}))
    assert isinstance(ids, PromptTokens) and sum(1 for t in ids if t < 0) == model.vision.n_image_tokens
    ours = model.logits(ids)
    theirs = their_logits(vlms, model, family, ids, [image])
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_and_the_fast_backend(vlms, loaded, family):
    model = loaded(family, "auto")
    first, second = picture(2), picture(3, size=(30, 70))
    messages = [{"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": png_bytes(second)}]}]
    ids = prompt_of(model, messages)
    assert len(ids.images) == 2 and len(image_runs(ids)) == 2
    ours = model.logits(ids)
    theirs = their_logits(vlms, model, family, ids, [first, second])
    np.testing.assert_allclose(ours, theirs, atol=2e-2, rtol=0)     # the fast path's float16 K/V
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95


def test_gemma3_images_see_themselves_both_ways(vlms, loaded):
    """Causal attention over the image's positions would give other logits (the test above would catch it)."""
    model = loaded("gemma3")
    image = picture(4)
    ids = prompt_of(model, ask({"type": "image", "image": image}))
    causal = PromptTokens(ids, ids.images, bidirectional=False)
    assert np.abs(model.logits(causal) - model.logits(ids)).max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_the_answer_depends_on_the_image(loaded, family):
    model = loaded(family)
    logits = [model.logits(prompt_of(model, ask({"type": "image", "image": picture(seed)})))[-1]
              for seed in (5, 6)]
    assert np.abs(logits[0] - logits[1]).max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_chat_matches_transformers_generate(vlms, loaded, family):
    import torch
    model = loaded(family)
    image = picture(7)
    messages = ask({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + __import__("base64").b64encode(png_bytes(image)).decode()}})
    result = model.chat(messages, max_tokens=8, temperature=0, details=True)
    ids = prompt_of(model, messages)
    vlm = vlms[family][0]
    input_ids = torch.tensor([[t if t >= 0 else 299 for t in ids]])
    kwargs = dict(pixel_values=torch.from_numpy(model.vision.encoder.preprocess(image)[None]))
    if family == "gemma3":
        kwargs["token_type_ids"] = (input_ids == 299).long()
    with torch.no_grad():
        out = vlm.generate(input_ids, **kwargs, max_new_tokens=8, do_sample=False,
                           eos_token_id=sorted(model.tokenizer.eog_ids), pad_token_id=0)
    expected = [t for t in out[0, len(ids):].tolist() if t not in model.tokenizer.eog_ids]
    assert result.token_ids == expected
    assert result.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_small_prefill_chunks_keep_an_image_whole(loaded, family):
    """Prefill in chunks of 5 (an image has 16 positions): the logits equal those of one pass."""
    model = loaded(family)
    ids = prompt_of(model, ask({"type": "image", "image": picture(8)}, text="Say more about it, please."))
    want = model.logits(ids)[-1]
    cache = model.network.new_cache(1, 128)
    params = GenerationParams(max_tokens=1)
    sequences = make_sequences(ids, params, model.tokenizer, cache, 128)
    try:
        while sequences[0].prefilling:
            step(model.network, cache, sequences, prefill_chunk=5)
        np.testing.assert_allclose(sequences[0].prompt_last_logits, want, atol=1e-4)
    finally:
        release(cache, sequences)


def test_the_same_image_again_reuses_cache_and_encoding(loaded):
    """Turn 2 of a conversation sends the same image: it is not encoded again and its K/V come from the cache."""
    model = loaded("gemma3")
    image = png_bytes(picture(9))
    turn1 = ask({"type": "image", "image": image})
    first = model.chat(turn1, max_tokens=4, temperature=0, details=True)
    encoded = model.vision.encoded
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second = model.chat(turn2, max_tokens=4, temperature=0, details=True)
    assert model.vision.encoded == encoded
    assert second.usage.cached_tokens > model.vision.n_image_tokens
    other = model.chat(ask({"type": "image", "image": png_bytes(picture(10))}), max_tokens=1, temperature=0,
                       details=True)
    first_image_position = next(i for i, t in enumerate(prompt_of(model, turn1)) if t < 0)
    assert other.usage.cached_tokens == first_image_position   # the text before; another image never matches


def test_an_image_given_as_a_path_bytes_or_pil_is_the_same(loaded, tmp_path):
    model = loaded("llava")
    image = picture(13)
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes(image))
    prompts = [list(prompt_of(model, ask({"type": "image", "image": source})))
               for source in (image, png_bytes(image), path, str(path))]
    assert all(p == prompts[0] for p in prompts)


def test_ollama_style_images_go_before_the_text(loaded):
    model = loaded("gemma3")
    image = png_bytes(picture(11))
    import base64
    listed = [{"role": "user", "content": "What is it?", "images": [base64.b64encode(image).decode()]}]
    as_parts = ask({"type": "image", "image": image})
    assert list(prompt_of(model, listed)) == list(prompt_of(model, as_parts))


def test_streaming_chat_with_an_image(loaded):
    model = loaded("llava")
    messages = ask({"type": "image", "image": picture(12)})
    streamed = "".join(model.chat(messages, stream=True, max_tokens=6, temperature=0))
    assert streamed == model.chat(messages, max_tokens=6, temperature=0)


def test_image_ids_round_trip():
    ids = image_ids(0xABCDEF0123, 16)
    assert all(t < 0 for t in ids) and len(set(ids)) == 16
    assert [split_image_id(t) for t in ids] == [(0xABCDEF0123, row) for row in range(16)]
    assert image_runs([5, *ids, 7, *ids[:3]]) == [(1, 17), (18, 21)]


# ---------------------------------------------------------------------------- refusals
def test_a_text_only_model_refuses_images(tmp_path):
    from tests.tiny_models import write_tiny_llama
    model = localllm.load(write_tiny_llama(tmp_path / "text.gguf"), backend="ref")
    with pytest.raises(NoVisionError, match="has no vision"):
        model.chat(ask({"type": "image", "image": picture(1)}), max_tokens=1)
    assert "vision" not in model.capabilities


@pytest.mark.parametrize("part, message", [
    ({"type": "image", "image": b"not an image"}, r"messages\[0\]\.content\[0\]: .*cannot|messages\[0\]\.content\[0\]"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, r"messages\[0\]\.content\[0\]"),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, r"messages\[0\]\.content\[0\]: only data"),
    ({"type": "image_url", "image_url": {}}, r"messages\[0\]\.content\[0\]: image_url needs a url"),
    ({"type": "image"}, r"messages\[0\]\.content\[0\]: an image part needs"),
])
def test_bad_images_name_their_place(loaded, part, message):
    model = loaded("llava")
    with pytest.raises(ImageInputError, match=message):
        model.chat(ask(part), max_tokens=1)


def test_ollama_images_must_be_base64(loaded):
    model = loaded("llava")
    with pytest.raises(ImageInputError, match=r"messages\[0\]\.images\[0\]: not valid base64"):
        model.chat([{"role": "user", "content": "hi", "images": ["%%%"]}], max_tokens=1)


def test_a_projector_of_another_width_is_refused(vlms, tmp_path):
    from tests.tiny_models import write_tiny_llama
    text = write_tiny_llama(tmp_path / "text.gguf")                  # 64 wide; the projector makes 40
    with pytest.raises(VisionModelError, match="do not belong together"):
        localllm.load(text, projector=vlms["llava"][2], backend="ref")


def test_gemma3_images_need_their_tokens(vlms, tmp_path):
    """A Gemma 3 projector on a model whose vocabulary has no <start_of_image>."""
    from tests.tiny_models import write_tiny_llama
    text = write_tiny_llama(tmp_path / "text40.gguf", dim=40, n_heads=2, n_kv_heads=2)
    with pytest.raises(VisionModelError, match="no <start_of_image> token"):
        localllm.load(text, projector=vlms["gemma3"][2], backend="ref")


def test_prompt_ids_without_their_images_are_refused(loaded):
    model = loaded("llava")
    ids = prompt_of(model, ask({"type": "image", "image": picture(1)}))
    with pytest.raises(ValueError, match="image position without its image"):
        model.generate(PromptTokens(ids, {}, bidirectional=False), max_tokens=1)
    with pytest.raises(ValueError, match="must be in"):
        model.generate(list(ids), max_tokens=1)
