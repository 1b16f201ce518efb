"""localllm's GGUF header parser against gguf.GGUFReader, and its errors on broken files."""
import gguf
import numpy as np
import pytest

from localllm.formats.gguf import GGUFError, read_gguf
from localllm.quants import UnsupportedTensorType
from tests.tiny_models import write_tiny_llama


def assert_same_as_gguf_reader(path):
    ours = read_gguf(path)
    reader = gguf.GGUFReader(path)
    expected_keys = {k for k in reader.fields if not k.startswith("GGUF.")}
    assert set(ours.metadata) == expected_keys
    for key in expected_keys:
        assert ours.metadata[key] == reader.fields[key].contents(), key
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors:
        q = ours.tensors[t.name]
        assert q.ggml_type == t.tensor_type.name
        assert q.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert np.asarray(q.data).tobytes() == np.asarray(t.data).tobytes(), t.name


@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q8_0", "Q4_1", "Q5_0"])
def test_tiny_models_match_gguf_reader(tmp_path, weight_type):
    assert_same_as_gguf_reader(write_tiny_llama(tmp_path / "m.gguf", weight_type=weight_type))


@pytest.mark.real_model
def test_smollm2_matches_gguf_reader(smollm2_gguf_path):
    assert_same_as_gguf_reader(smollm2_gguf_path)


def test_tensors_are_views_of_the_file(tiny_llama_path):
    tensor = read_gguf(tiny_llama_path).tensors["blk.0.attn_q.weight"]
    assert isinstance(tensor.data.base, np.memmap) or isinstance(tensor.data, np.memmap)


def test_truncated_and_foreign_files_are_clear_errors(tmp_path, tiny_llama_path):
    data = tiny_llama_path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:200])
    with pytest.raises(GGUFError):
        read_gguf(tmp_path / "header.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(tmp_path / "not.gguf")


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.odd.weight", np.zeros((2, 66), dtype=np.uint8), raw_shape=(2, 66),
                      raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(UnsupportedTensorType, match="blk.0.odd.weight.*IQ2_XXS"):
        read_gguf(path)


def test_every_ggml_type_size_is_ggmls():
    from localllm.formats.gguf import GGML_TYPE_NAMES, GGML_TYPE_SIZES
    for type_id, name in GGML_TYPE_NAMES.items():
        ggml_type = gguf.GGMLQuantizationType(type_id)
        assert ggml_type.name == name
        assert GGML_TYPE_SIZES[name] == gguf.GGML_QUANT_SIZES[ggml_type], name


def test_format_errors_are_one_class_naming_the_file(tmp_path, tiny_llama_path):
    from localllm.formats.errors import ModelFormatError
    data = tiny_llama_path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:1000])
    with pytest.raises(ModelFormatError) as caught:
        read_gguf(tmp_path / "cut.gguf")
    assert isinstance(caught.value, (GGUFError, ValueError)) and caught.value.path == tmp_path / "cut.gguf"
    assert "cut.gguf" in str(caught.value)
