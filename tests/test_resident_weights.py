"""Weights read into huge pages (``formats.resident``): the same tensors as the file mapping, the same logits,
and the setting that chooses between them."""
import mmap

import numpy as np
import pytest

import localllm
from localllm.formats import resident
from localllm.formats.gguf import read_gguf
from localllm.models.decoder import DecoderModel
from tests.tiny_models import write_tiny_llama


@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q8_0", "Q4_1", "Q5_0"])
def test_resident_tensors_are_the_files_bytes_read_only_and_aligned(tmp_path, weight_type):
    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=weight_type)
    mapped, loaded = read_gguf(path), read_gguf(path, resident=True)
    assert list(loaded.tensors) == list(mapped.tensors) and loaded.metadata == mapped.metadata
    for name, tensor in loaded.tensors.items():
        twin = mapped.tensors[name]
        assert (tensor.ggml_type, tensor.shape, tensor.data.dtype, tensor.data.shape) == \
            (twin.ggml_type, twin.shape, twin.data.dtype, twin.data.shape), name
        assert tensor.data.tobytes() == twin.data.tobytes(), name
        assert not isinstance(tensor.data.base, np.memmap) and not tensor.data.flags.writeable, name
        assert tensor.data.ctypes.data % resident.TENSOR_ALIGNMENT == 0, name


@pytest.mark.parametrize("weight_type", ["F32", "Q4_1"])
def test_resident_weights_give_the_same_logits(tmp_path, weight_type):
    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=weight_type)
    tokens = [1, 5, 9, 3, 7]
    results = []
    for is_resident in (False, True):
        model = DecoderModel.from_gguf(read_gguf(path, resident=is_resident), backend="fast")
        cache = model.new_cache(n_slots=1, n_ctx=32)
        prompt = model.forward(tokens, np.arange(5), np.zeros(5, dtype=np.int64), cache)
        step = model.forward([4], [5], [0], cache)
        results.append((prompt, step))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_read_spans_starts_on_a_huge_page_and_reads_each_span(tmp_path):
    path = tmp_path / "bytes.bin"
    payload = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    path.write_bytes(payload.tobytes())
    first, second, empty = resident.read_spans(path, [(100, 3_000), (3_000, 3_007), (5, 5)])
    assert first.ctypes.data % resident.HUGE_PAGE == 0
    assert second.ctypes.data % resident.TENSOR_ALIGNMENT == 0
    np.testing.assert_array_equal(first, payload[100:3_000])
    np.testing.assert_array_equal(second, payload[3_000:3_007])
    assert empty.size == 0
    assert resident.read_spans(path, []) == []
    np.testing.assert_array_equal(resident.read_spans(str(path), [(0, 10)])[0], payload[:10])  # a str path too


def test_a_file_shorter_than_its_spans_is_a_clear_error(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(EOFError, match="short.bin ended at byte 100"):
        resident.read_spans(path, [(50, 200)])


@pytest.mark.parametrize("setting, use_mmap, expected", [
    ("always [madvise] never", None, True), ("[always] madvise never", "0", True),
    ("always madvise [never]", None, False), ("always [madvise] never", "1", False),
    (None, None, False)])
def test_resident_by_default_follows_the_kernel_and_LOCALLLM_USE_MMAP(tmp_path, monkeypatch, setting, use_mmap,
                                                                      expected):
    thp = tmp_path / "enabled"
    if setting is not None:
        thp.write_text(setting + "\n")
    monkeypatch.setattr(resident, "THP_SETTING", thp)
    if use_mmap is None:
        monkeypatch.delenv("LOCALLLM_USE_MMAP", raising=False)
    else:
        monkeypatch.setenv("LOCALLLM_USE_MMAP", use_mmap)
    assert resident.resident_by_default() is (expected and hasattr(mmap, "MADV_HUGEPAGE"))


def test_a_bad_LOCALLLM_USE_MMAP_is_refused(monkeypatch):
    monkeypatch.setenv("LOCALLLM_USE_MMAP", "maybe")
    with pytest.raises(ValueError, match="LOCALLLM_USE_MMAP must be 0 or 1"):
        resident.resident_by_default()


@pytest.mark.parametrize("use_mmap", ["0", "1"])
def test_load_reads_the_weights_in_unless_told_to_map_them(tiny_llama_path, monkeypatch, use_mmap):
    monkeypatch.setattr(resident, "huge_pages_available", lambda: True)
    monkeypatch.setenv("LOCALLLM_USE_MMAP", use_mmap)
    model = localllm.load(tiny_llama_path)
    weight = model.network.layers[0].wq.data
    assert isinstance(weight.base, np.memmap) is (use_mmap == "1")


def test_no_room_for_the_copy_leaves_the_weights_mapped(tiny_llama_path, monkeypatch):
    """An anonymous mapping refused (overcommit off, a cgroup's limit): a warning, and the file mapping instead."""
    from localllm.formats import gguf as gguf_format

    def refuse(path, spans):   # what mmap.mmap raises in read_spans then
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(gguf_format, "read_spans", refuse)
    with pytest.warns(ResourceWarning, match="stay mapped from the file.*Cannot allocate memory"):
        loaded = read_gguf(tiny_llama_path, resident=True)
    mapped = read_gguf(tiny_llama_path)
    for name, tensor in loaded.tensors.items():
        assert isinstance(tensor.data.base, np.memmap) and tensor.data.tobytes() == mapped.tensors[name].data.tobytes()
