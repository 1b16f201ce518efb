"""Vision encoders against transformers (tiny random Gemma 3 and LLaVA-1.5 models, both loaders), the image
preprocessing against the Hugging Face image processors, load_image's refusals, and llama.cpp's converter as
the check of the mmproj layout."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from localllm.arch.spec import UnsupportedModelFeature
from localllm.formats.gguf import read_gguf
from localllm.quants import ref as quants_ref
from localllm.vision import ImageError, VisionEncoder, VisionModelError, load_image
from localllm.vision.encoder import bidirectional_attention
from localllm.vision.kernels import gelu_tanh, gelu_tanh_ref, softmax_rows, softmax_rows_ref
from tests.tiny_vision import (encoded, exif_rotated_jpeg, gradient_image, hf_image_features, hf_image_processor,
                               hf_tiny_gemma3_vision, hf_tiny_llava, save_hf_vision_folder, two_frame_gif,
                               use_checkpoint_names, write_mmproj)

FAMILIES = ("gemma3", "llava")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> dict(model, folder (transformers' own names), checkpoint folder (the published names), mmproj
    F32, mmproj F16, mmproj without feature_layer (LLaVA))."""
    root = tmp_path_factory.mktemp("vision")
    out = {}
    for family, build in (("gemma3", hf_tiny_gemma3_vision), ("llava", hf_tiny_llava)):
        model = build(seed=1)
        out[family] = dict(
            model=model,
            folder=save_hf_vision_folder(model, root / f"{family}-hf"),
            checkpoint=use_checkpoint_names(save_hf_vision_folder(model, root / f"{family}-checkpoint")),
            mmproj=write_mmproj(model, root / f"{family}-f32.gguf"),
            mmproj_f16=write_mmproj(model, root / f"{family}-f16.gguf", weight_type="F16"),
            mmproj_no_feature_layer=write_mmproj(model, root / f"{family}-nfl.gguf", feature_layer=False))
    return out


def _pixels(family: str, built, image: Image.Image) -> np.ndarray:
    return hf_image_processor(built[family]["model"])(images=image, return_tensors="np")["pixel_values"][0]


# ---------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loader", ["folder", "checkpoint", "mmproj", "mmproj_no_feature_layer"])
def test_embeddings_match_transformers(built, family, loader):
    model = built[family]["model"]
    path = built[family][loader]
    encoder = VisionEncoder.from_hf(path) if loader in ("folder", "checkpoint") else VisionEncoder.from_mmproj(path)
    image = gradient_image(97, 61)
    pixels = encoder.preprocess(load_image(encoded(image, "PNG")))
    expected = hf_image_features(model, _pixels(family, built, image))
    got = encoder.encode(pixels)
    assert got.dtype == np.float32 and got.shape == expected.shape == (encoder.n_image_tokens, encoder.n_embd_text)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    assert np.abs(expected).max() > 0.5         # the comparison is not between two near-zero arrays


@pytest.mark.parametrize("family", FAMILIES)
def test_numpy_reference_path_matches_transformers(built, family):
    encoder = VisionEncoder.from_mmproj(built[family]["mmproj"], fast=False)
    pixels = np.random.default_rng(7).standard_normal((3, encoder.image_size, encoder.image_size)).astype(np.float32)
    np.testing.assert_allclose(encoder.encode(pixels), hf_image_features(built[family]["model"], pixels),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 300), (64, 1029)])
def test_kernels_match_their_numpy_twins(shape):
    rng = np.random.default_rng(sum(shape))
    scores = (rng.standard_normal(shape) * 20).astype(np.float32)
    scores[0, 0] = 90.0                                  # exp() past float32's range before the max is taken
    np.testing.assert_allclose(softmax_rows(scores.copy()), softmax_rows_ref(scores.copy()), atol=1e-6, rtol=1e-5)
    x = (rng.standard_normal(shape) * 6).astype(np.float32)
    x[0, 0] = -1e4                                       # the tanh form's exp would overflow
    np.testing.assert_allclose(gelu_tanh(x.copy()), gelu_tanh_ref(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        softmax_rows(scores.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        gelu_tanh(np.zeros((4, 6), np.float32)[:, ::2])


def test_attention_chunks_change_nothing():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((37, 24)).astype(np.float32) for _ in range(3))
    whole = bidirectional_attention(q, k, v, n_heads=3, chunk=64)
    np.testing.assert_allclose(bidirectional_attention(q, k, v, n_heads=3, chunk=10), whole, atol=1e-6)
    scores = (q[:, :8] / np.sqrt(8)) @ k[:, :8].T                 # head 0, by the book
    expected = np.exp(scores - scores.max(1, keepdims=True))
    expected = expected / expected.sum(1, keepdims=True) @ v[:, :8]
    np.testing.assert_allclose(whole[:, :8], expected, atol=1e-5)


def test_attention_heads_shared_among_threads_give_the_same_numbers():
    from localllm.vision import blas
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((300, 96)).astype(np.float32) for _ in range(3))
    alone = bidirectional_attention(q, k, v, n_heads=4, softmax=softmax_rows)
    for workers in (2, 3, 8):
        np.testing.assert_array_equal(bidirectional_attention(q, k, v, n_heads=4, softmax=softmax_rows,
                                                              workers=workers), alone)
    if blas.available():                       # numpy's OpenBLAS: one thread inside, its setting back after
        _, get_threads = blas._openblas()
        before = get_threads()
        with blas.one_blas_thread():
            with blas.one_blas_thread():
                assert get_threads() == 1
            assert get_threads() == 1
        assert get_threads() == before


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_depend_on_the_image(built, family):
    encoder = VisionEncoder.from_mmproj(built[family]["mmproj"])
    a = encoder.encode_image(gradient_image(40, 40))
    b = encoder.encode_image(gradient_image(40, 40).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert np.abs(a - b).max() > 0.1


def test_attributes(built):
    gemma = VisionEncoder.from_mmproj(built["gemma3"]["mmproj"])
    assert (gemma.projector, gemma.image_size, gemma.n_image_tokens, gemma.n_embd_text) == ("gemma3", 64, 16, 40)
    assert gemma.config.pool == 2               # an 8x8 patch grid pooled to 4x4
    llava = VisionEncoder.from_hf(built["llava"]["folder"])
    assert (llava.projector, llava.image_size, llava.n_image_tokens, llava.n_embd_text) == ("llava", 32, 16, 40)
    assert llava.config.n_layers == 2           # the feature layer is the second to last of 3


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_file_is_close_to_f32(built, family):
    size = built[family]["model"].config.vision_config.image_size
    pixels = np.random.default_rng(3).standard_normal((3, size, size))
    f32 = VisionEncoder.from_mmproj(built[family]["mmproj"]).encode(pixels.astype(np.float32))
    f16 = VisionEncoder.from_mmproj(built[family]["mmproj_f16"]).encode(pixels.astype(np.float32))
    assert np.abs(f16 - f32).max() < 2e-2 * np.abs(f32).max()
    assert not np.array_equal(f16, f32)         # the F16 weights were read as F16


def test_encode_refuses_wrong_pixels(built):
    encoder = VisionEncoder.from_mmproj(built["gemma3"]["mmproj"])
    with pytest.raises(ValueError, match=r"\(3, 64, 64\)"):
        encoder.encode(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="finite"):
        encoder.encode(np.full((3, 64, 64), np.nan, np.float32))
    with pytest.raises(TypeError, match="PIL image"):
        encoder.preprocess(np.zeros((64, 64, 3), np.uint8))


# ---------------------------------------------------------------------------- broken or unsupported files
def _rewrite_mmproj(source, target, *, drop=(), metadata=None, extra_tensor=None):
    """A copy of an mmproj GGUF with tensors dropped, metadata changed or a tensor added."""
    import gguf
    original = read_gguf(source)
    writer = gguf.GGUFWriter(str(target), "clip")
    for key, value in {**original.metadata, **(metadata or {})}.items():
        if key.startswith(("general.architecture", "GGUF.")) or value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, tensor in original.tensors.items():
        if name not in drop:
            writer.add_tensor(name, quants_ref.dequantize(tensor))
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_broken_and_unsupported_mmproj(built, tmp_path):
    source = built["gemma3"]["mmproj"]
    with pytest.raises(VisionModelError, match="'v.blk.1.attn_q.weight' is missing"):
        VisionEncoder.from_mmproj(_rewrite_mmproj(source, tmp_path / "a.gguf", drop=("v.blk.1.attn_q.weight",)))
    with pytest.raises(UnsupportedModelFeature, match="projector type 'qwen2vl'"):
        VisionEncoder.from_mmproj(_rewrite_mmproj(source, tmp_path / "b.gguf",
                                                  metadata={"clip.projector_type": "qwen2vl"}))
    with pytest.raises(UnsupportedModelFeature, match="'v.blk.0.attn_sinks' is not used"):
        VisionEncoder.from_mmproj(_rewrite_mmproj(source, tmp_path / "c.gguf", extra_tensor="v.blk.0.attn_sinks"))
    with pytest.raises(VisionModelError, match="clip.vision.patch_size"):
        VisionEncoder.from_mmproj(_rewrite_mmproj(source, tmp_path / "d.gguf",
                                                  metadata={"clip.vision.patch_size": 0}))
    with pytest.raises(VisionModelError, match="has shape"):   # a width the tensors do not have
        VisionEncoder.from_mmproj(_rewrite_mmproj(source, tmp_path / "e.gguf",
                                                  metadata={"clip.vision.embedding_length": 64}))


def test_a_language_model_file_is_not_a_projector(tmp_path):
    from tests.tiny_models import write_tiny_llama
    path = tmp_path / "llama.gguf"
    write_tiny_llama(path)
    with pytest.raises(VisionModelError, match="not a projector"):
        VisionEncoder.from_mmproj(path)


def test_hf_folder_width_of_the_text_model_from_the_projector(built, tmp_path):
    """llava-1.5-7b-hf's text_config leaves hidden_size to its default: the projector's matrix says it."""
    import shutil
    folder = shutil.copytree(built["llava"]["folder"], tmp_path / "llava")
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    assert VisionEncoder.from_hf(folder).n_embd_text == 40


def test_hf_folder_without_vision(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelFeature, match="model_type 'llama'"):
        VisionEncoder.from_hf(tmp_path)


# ---------------------------------------------------------------------------- preprocessing
def _cases():
    """name -> the encoded image (bytes)."""
    return {
        "gradient-png": encoded(gradient_image(97, 61), "PNG"),
        "tall-odd": encoded(gradient_image(33, 129), "PNG"),
        "tiny-upscaled": encoded(gradient_image(5, 7), "PNG"),
        "exif-rotated-jpeg": exif_rotated_jpeg(80, 50),
        "gif": two_frame_gif(45, 70),
        "webp": encoded(gradient_image(70, 45), "WEBP", quality=90),
        "rgba-png": encoded(gradient_image(50, 50, "RGBA"), "PNG"),
        "grey-png": encoded(gradient_image(64, 40, "L"), "PNG"),
    }


CASES = _cases()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_preprocess_matches_hf_processor(built, family, case):
    data = CASES[case]
    encoder = VisionEncoder.from_mmproj(built[family]["mmproj"])
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))   # the processor itself ignores EXIF
    expected = _pixels(family, built, reference)
    got = encoder.preprocess(load_image(data))
    assert got.shape == expected.shape == (3, encoder.image_size, encoder.image_size)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_reads_the_processor_settings(built, family):
    encoder = VisionEncoder.from_hf(built[family]["folder"])
    image = gradient_image(61, 97)
    np.testing.assert_allclose(encoder.preprocess(image), _pixels(family, built, image), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- load_image
def test_load_image_sources_agree(tmp_path):
    data = CASES["gradient-png"]
    path = tmp_path / "image.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = np.asarray(gradient_image(97, 61))
    for source in (data, bytearray(data), str(path), path, uri, Image.open(io.BytesIO(data))):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (97, 61)
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_load_image_orientation_frames_and_alpha():
    rotated = load_image(exif_rotated_jpeg(80, 50))
    assert rotated.size == (50, 80)             # EXIF orientation 6: displayed a quarter turn clockwise
    first_frame = np.asarray(load_image(two_frame_gif(45, 70)), np.float32)
    gradient = np.asarray(gradient_image(45, 70), np.float32)
    assert np.abs(first_frame - gradient).mean() < np.abs(first_frame - (255 - gradient)).mean()
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(encoded(transparent, "PNG")).getpixel((0, 0)) == (255, 255, 255)   # onto white


@pytest.mark.parametrize("source, message", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot decode"),
    (b"definitely not an image", "cannot decode"),
    (b"", "empty"),
    (encoded(gradient_image(8, 8), "PNG")[:60], "cannot decode"),
    (encoded(gradient_image(8, 8), "BMP"), "cannot decode"),
    ("data:image/png;base64,!!!notbase64", "base64"),
    ("data:image/png;base64", "comma"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("/no/such/image.png", "cannot read the image file"),
    (12345, "must be bytes"),
])
def test_load_image_refuses(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)


def test_load_image_refuses_bombs(monkeypatch):
    big = encoded(Image.new("L", (3000, 2000)), "PNG")            # a few kB that decode to 6 megapixels
    assert len(big) < 100_000
    with pytest.raises(ImageError, match="6000000 pixels"):
        load_image(big, max_pixels=5_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)     # Pillow only warns between 1x and 2x its limit
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="decompression bomb"):
        load_image(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)     # past 2x: Pillow's own error
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(big)
    with pytest.raises(ImageError, match="more than the 1000 allowed"):
        load_image(big, max_bytes=1000)
    uri = "data:image/png;base64," + base64.b64encode(big).decode()
    with pytest.raises(ImageError, match="more than the 1000 allowed"):
        load_image(uri, max_bytes=1000)
    assert isinstance(ImageError("x"), ValueError)


# ---------------------------------------------------------------------------- llama.cpp's converter
def test_llama_cpp_converter_layout(llama_cpp_source, built, tmp_path):
    """convert_hf_to_gguf.py --mmproj on the Gemma 3 checkpoint folder: the same tensors as our writer's (its
    input projection in F16), and embeddings within 1e-3 of transformers. (The converter refuses LLaVA-1.5's
    CLIP tower, which the older convert_image_encoder_to_gguf.py converts; not part of the converter files.)"""
    outfile = tmp_path / "gemma3-converter.gguf"
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_source / "gguf-py"))
    done = subprocess.run([sys.executable, str(llama_cpp_source / "convert_hf_to_gguf.py"),
                           str(built["gemma3"]["checkpoint"]), "--mmproj", "--outtype", "f32", "--outfile",
                           str(outfile)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and outfile.is_file(), done.stderr[-3000:]
    theirs, ours = read_gguf(outfile), read_gguf(built["gemma3"]["mmproj"])
    assert set(theirs.tensors) == set(ours.tensors)
    for name, tensor in theirs.tensors.items():
        np.testing.assert_allclose(quants_ref.dequantize(tensor), quants_ref.dequantize(ours.tensors[name]),
                                   atol=2e-3 if tensor.ggml_type == "F16" else 0, rtol=1e-3, err_msg=name)
    for key in ("clip.projector_type", "clip.vision.block_count", "clip.vision.image_size", "clip.use_gelu",
                "clip.vision.projector.scale_factor"):
        assert theirs.metadata[key] == ours.metadata[key], key
    encoder = VisionEncoder.from_mmproj(outfile)
    image = gradient_image(70, 90)
    expected = hf_image_features(built["gemma3"]["model"], _pixels("gemma3", built, image))
    np.testing.assert_allclose(encoder.encode(encoder.preprocess(image)), expected, atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------- the benchmark's file
def test_benchmark_writes_a_loadable_gemma3_mmproj(tmp_path):
    """benchmarks/bench_vision.py's random file, in a small shape, is a Gemma 3 projector the encoder runs."""
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_vision

    shape = dict(image_size=56, patch_size=14, dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_embd_text=24,
                 pool=2, eps=1e-6)
    encoder = VisionEncoder.from_mmproj(bench_vision.write_random_mmproj(tmp_path / "random.gguf", shape))
    assert (encoder.projector, encoder.image_size, encoder.n_image_tokens, encoder.n_embd_text) == \
        ("gemma3", 56, 4, 24)
    embeddings = encoder.encode_image(bench_vision.bench_image(100))
    assert embeddings.shape == (4, 24) and np.isfinite(embeddings).all() and embeddings.std() > 0.1
