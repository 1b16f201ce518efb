"""Hostile model files: broken GGUF files, safetensors headers and tokenizer metadata are refused with
localllm's own errors before any kernel runs (issue 19).

Every mutated file either loads into a model whose one forward step gives logits of the right shape (finite
when its weights are), or raises one of REFUSALS: ``ModelFormatError`` (the file is broken: GGUFError,
HFFolderError, TokenizerMetadataError are kinds of it) or an "unsupported" error for a well-formed request
localllm does not implement. Anything else (MemoryError, IndexError, struct.error, UnicodeDecodeError, a numpy
error, a Rust panic) fails the test.

The loads run in this process. That is safe because nothing reads the file except through numpy views of
one memory map, made only after the header reader has checked the byte ranges, and the kernels only run after
``DecoderModel`` has checked every tensor's shape against the config: a read out of bounds would need a
view larger than the mapping, which numpy refuses with an exception, not a crash. ``tracemalloc`` bounds what
a load may allocate, so a count of 2^63 that got as far as an allocation fails the test instead of the machine.
"""
from __future__ import annotations

import json
import math
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import localllm
from localllm.api import Model
from localllm.arch.spec import UnsupportedArchitecture, UnsupportedModelFeature
from localllm.chat_template import ChatTemplateError
from localllm.formats.errors import ModelFormatError
from localllm.formats.gguf import GGUFError, read_gguf
from localllm.formats.safetensors import HFFolderError, read_safetensors
from localllm.formats.safetensors_header import read_safetensors_header
from localllm.models.decoder import DecoderModel
from localllm.quants import QTensor, UnsupportedTensorType
from localllm.quants.ref import dequantize
from localllm.tokenizer_build import TokenizerMetadataError, gguf_tokenizer_args
from tests.tiny_models import byte_level_vocab, write_tiny_llama

# a broken file's refusal; the "unsupported" ones for a flipped byte that makes a well-formed request (an
# architecture name, a RoPE scaling type, a ggml type localllm does not run); a template jinja cannot compile
REFUSALS = (ModelFormatError, UnsupportedArchitecture, UnsupportedModelFeature, UnsupportedTensorType,
            ChatTemplateError)
FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_LOAD_BYTES = 32 << 20          # a tiny model's load allocates a few MB; a corrupt count must not get further


# ------------------------------------------------------------------------------------------- the tiny file
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The bytes of a valid tiny llama GGUF (Q8_0 matrices, F32 norms) and its layout as gguf-py reads it."""
    path = write_tiny_llama(tmp_path_factory.mktemp("hostile") / "tiny.gguf", weight_type="Q8_0")
    return path.read_bytes(), Layout(gguf.GGUFReader(path))


class Layout:
    """Where the header's parts lie (gguf-py's reader, an independent parser): every part's byte range, the
    u64 and u32 parts (counts, lengths, dims, offsets, value and tensor types), tensor offset fields, data."""

    def __init__(self, reader: gguf.GGUFReader):
        fields = list(reader.fields.values()) + [tensor.field for tensor in reader.tensors]
        self.parts: list[tuple[int, int, np.dtype]] = []
        for field in fields:
            start = field.offset
            for part in field.parts:
                self.parts.append((start, start + part.nbytes, part.dtype))
                start += part.nbytes
        self.header_end = max(end for _, end, _ in self.parts)
        self.data_start = int(reader.data_offset)
        self.u64_parts = [start for start, end, dtype in self.parts if dtype == np.uint64 and end - start == 8]
        self.u32_parts = [start for start, end, dtype in self.parts if dtype == np.uint32 and end - start == 4]
        # per tensor: the byte offset of its info's data-offset field (the last part of its field)
        self.offset_fields = {tensor.name: tensor.field.offset + sum(p.nbytes for p in tensor.field.parts[:-1])
                              for tensor in reader.tensors}
        self.dims_fields = {tensor.name: tensor.field.offset + sum(p.nbytes for p in tensor.field.parts[:3])
                            for tensor in reader.tensors}
        self.tensor_ranges = [(int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in reader.tensors]
        # scalar metadata values: (byte offset of the value, its numpy dtype), for every numeric key
        self.scalar_values = [(field.offset + sum(p.nbytes for p in field.parts[:-1]), field.parts[-1].dtype)
                              for field in reader.fields.values()
                              if not field.name.startswith("GGUF.") and len(field.types) == 1
                              and field.types[0] not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY)]

    @property
    def boundaries(self) -> list[int]:
        edges = {edge for start, end, _ in self.parts for edge in (start, end)}
        edges |= {edge for start, end in self.tensor_ranges for edge in (start, end)}
        return sorted(edges | {self.data_start})


def write(tmp_path, data: bytes, name: str = "mutant.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def weights_finite(model) -> bool:
    network = model.network
    tensors = [network.token_embd, network.output] + [getattr(layer, name) for layer in network.layers
                                                      for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    vectors = [network.output_norm] + [v for layer in network.layers for v in (layer.attn_norm, layer.ffn_norm)]
    return all(np.isfinite(dequantize(t)).all() for t in tensors) and all(np.isfinite(v).all() for v in vectors)


def outcome(path, backend: str = "ref"):
    """Load ``path`` and run one step: the model, or the refusal raised (anything else propagates)."""
    tracemalloc.start()
    try:
        model = localllm.load(path, backend=backend)
    except REFUSALS as exc:
        return exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MAX_LOAD_BYTES, f"loading allocated {peak} bytes"
    ids = [i % model.config.vocab_size for i in (1, 2, 3)]
    logits = model.logits(ids)
    assert logits.shape == (3, model.config.vocab_size)
    if weights_finite(model):
        assert np.isfinite(logits).all()
    return model


# ------------------------------------------------------------------------------------------- truncation
def test_truncation_at_every_region_boundary_is_refused(tmp_path, tiny):
    data, layout = tiny
    cuts = sorted({max(0, min(len(data) - 1, edge + delta)) for edge in layout.boundaries for delta in (-1, 0, 1)})
    for cut in cuts:
        with pytest.raises(ModelFormatError) as caught:
            read_gguf(write(tmp_path, data[:cut]))
        assert caught.value.path is None or caught.value.path.name == "mutant.gguf"


@settings(FUZZ, max_examples=30)
@given(st.data())
def test_truncation_anywhere_is_refused(tmp_path, tiny, draw):
    data, _ = tiny
    cut = draw.draw(st.integers(0, len(data) - 1), label="cut")
    assert isinstance(outcome(write(tmp_path, data[:cut])), ModelFormatError)


# ------------------------------------------------------------------------------------------- byte flips
@settings(FUZZ, max_examples=150)
@given(st.data())
def test_byte_flips_in_the_header_load_or_are_refused(tmp_path, tiny, draw):
    data, layout = tiny
    mutant = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 3), label="flips")):
        where = draw.draw(st.integers(0, layout.data_start - 1), label="offset")
        mutant[where] = draw.draw(st.integers(0, 255).filter(lambda b: b != mutant[where]), label="byte")
    outcome(write(tmp_path, bytes(mutant)))


@settings(FUZZ, max_examples=25)
@given(st.data())
def test_byte_flips_in_tensor_data_load(tmp_path, tiny, draw):
    data, layout = tiny
    mutant = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 8), label="flips")):
        where = draw.draw(st.integers(layout.data_start, len(data) - 1), label="offset")
        mutant[where] = draw.draw(st.integers(0, 255), label="byte")
    assert isinstance(outcome(write(tmp_path, bytes(mutant))), Model)


def test_byte_flips_in_tensor_data_run_on_the_fast_kernels(tmp_path, tiny):
    data, layout = tiny
    mutant = bytearray(data)
    rng = np.random.default_rng(0)
    for where in rng.integers(layout.data_start, len(data), 16):
        mutant[where] = 0xFF
    assert isinstance(outcome(write(tmp_path, bytes(mutant)), backend="auto"), Model)


# ------------------------------------------------------------------------------------------- crafted values
HUGE_U64 = (2**64 - 1, 2**63, 2**63 - 1, 2**62, 2**32, 2**31, 10**12)


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_huge_counts_lengths_dims_and_offsets_are_refused(tmp_path, tiny, draw):
    """Every u64 of the header (key/tensor counts, string and array lengths, dims, data offsets, u64 values)
    set to a huge value, or to the file size and just past it: refused without allocating for it."""
    data, layout = tiny
    where = draw.draw(st.sampled_from(layout.u64_parts), label="u64 part")
    value = draw.draw(st.sampled_from(HUGE_U64 + (len(data), len(data) + 1)), label="value")
    result = outcome(write(tmp_path, patched(data, where, "<Q", value)))
    assert not isinstance(result, Model) or value in (len(data), len(data) + 1)


@settings(FUZZ, max_examples=80)
@given(st.data())
def test_wrong_value_types_dimension_counts_and_type_ids_are_refused(tmp_path, tiny, draw):
    """Every u32 of the header (value types, array item types, dimension counts, ggml type ids, u32 values)
    set to another small or huge number: the file loads (a value that still makes sense) or is refused."""
    data, layout = tiny
    where = draw.draw(st.sampled_from(layout.u32_parts), label="u32 part")
    value = draw.draw(st.sampled_from((0, 1, 4, 5, 7, 8, 9, 10, 12, 13, 16, 39, 40, 255, 2**31, 2**32 - 1)),
                      label="value")
    outcome(write(tmp_path, patched(data, where, "<I", value)))


EDGE_VALUES = {np.dtype(np.uint32): (0, 1, 3, 2**31, 2**32 - 1), np.dtype(np.uint64): (0, 1, 2**63, 2**64 - 1),
               np.dtype(np.int32): (0, -1, -2**31, 2**31 - 1),
               np.dtype(np.float32): (0.0, -1.0, float("nan"), float("inf"), -float("inf"), 3e38, 1e-45),
               np.dtype(np.bool_): (0, 1, 2, 255)}


@settings(FUZZ, max_examples=60)
@given(st.data())
def test_hyperparameter_values_at_their_edges_load_or_are_refused(tmp_path, tiny, draw):
    """Every numeric metadata value (block count, widths, head counts, RoPE base, norm epsilon, ...) set to
    0, -1, NaN, infinity, the largest value of its type...: a model with finite logits, or a refusal."""
    data, layout = tiny
    where, dtype = draw.draw(st.sampled_from(layout.scalar_values), label="value")
    value = draw.draw(st.sampled_from(EDGE_VALUES[dtype]), label="edge")
    mutant = bytearray(data)
    raw_type = np.uint8 if dtype == np.bool_ else dtype             # a bool byte may be anything in a file
    mutant[where:where + dtype.itemsize] = np.array(value, raw_type).tobytes()
    outcome(write(tmp_path, bytes(mutant)))


def test_tensor_offsets_outside_overlapping_or_misaligned_are_refused(tmp_path, tiny):
    data, layout = tiny
    names = list(layout.offset_fields)
    first, second = layout.offset_fields[names[0]], layout.offset_fields[names[1]]
    second_offset = struct.unpack_from("<Q", data, second)[0]
    cases = {
        "outside": (second, len(data)),
        "overlap": (second, 0),                          # the second tensor's data on top of the first's
        "alignment": (second, second_offset + 4),        # not a multiple of 32
    }
    for expected, (where, value) in cases.items():
        with pytest.raises(GGUFError, match="truncated|overlap|alignment") as caught:
            read_gguf(write(tmp_path, patched(data, where, "<Q", value)))
        assert expected in str(caught.value) or (expected == "outside" and "truncated" in str(caught.value))
    with pytest.raises(GGUFError, match="overlap"):
        read_gguf(write(tmp_path, patched(data, first, "<Q", second_offset)))


def test_dimension_count_shape_overflow_and_type_ids_are_refused(tmp_path, tiny):
    data, layout = tiny
    name = next(iter(layout.dims_fields))                # token_embd.weight: 2 dims
    n_dims_at = layout.dims_fields[name] - 4
    with pytest.raises(GGUFError, match="5 dimensions"):
        read_gguf(write(tmp_path, patched(data, n_dims_at, "<I", 5)))
    with pytest.raises(GGUFError, match="0 dimensions"):
        read_gguf(write(tmp_path, patched(data, n_dims_at, "<I", 0)))
    overflow = patched(patched(data, layout.dims_fields[name], "<Q", 2**62 - 32), layout.dims_fields[name] + 8,
                       "<Q", 2**62)
    with pytest.raises(GGUFError, match="ends past the end of the file"):
        read_gguf(write(tmp_path, overflow))
    type_at = layout.dims_fields[name] + 16
    with pytest.raises(GGUFError, match="unknown ggml type id 200"):
        read_gguf(write(tmp_path, patched(data, type_at, "<I", 200)))
    with pytest.raises(UnsupportedTensorType, match="IQ4_NL"):      # known, same block size as Q8_0's rows
        read_gguf(write(tmp_path, patched(data, type_at, "<I", 20)))


def _with_alignment(tmp_path, alignment_value: int, value_type=gguf.GGUFValueType.UINT32):
    """A tiny GGUF with general.alignment 64 in its header, then patched to ``alignment_value``."""
    path = tmp_path / "aligned.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.data_alignment = 64
    writer.add_key_value("general.alignment", 64, value_type)
    writer.add_tensor("a.weight", np.ones(32, np.float32))
    writer.add_tensor("b.weight", np.ones(32, np.float32))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    data = path.read_bytes()
    key = b"general.alignment"
    at = data.index(key) + len(key) + 4
    fmt = "<I" if value_type == gguf.GGUFValueType.UINT32 else "<Q"
    return write(tmp_path, patched(data, at, fmt, alignment_value), "aligned.gguf")


def test_alignment_must_be_a_u32_power_of_two(tmp_path):
    assert set(read_gguf(_with_alignment(tmp_path, 64)).tensors) == {"a.weight", "b.weight"}
    for bad in (0, 3, 48, 2**31 + 1):
        with pytest.raises(GGUFError, match="not a power of two"):
            read_gguf(_with_alignment(tmp_path, bad))
    with pytest.raises(GGUFError, match="not u32"):
        read_gguf(_with_alignment(tmp_path, 64, gguf.GGUFValueType.UINT64))


def test_nested_arrays_unknown_value_types_and_duplicate_keys_are_refused(tmp_path):
    def file_with(add) -> bytes:
        path = tmp_path / "kv.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        add(writer)
        writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()

    nested = file_with(lambda w: w.add_array("x.nested", [[1, 2], [3]]))
    with pytest.raises(GGUFError, match="array of arrays"):
        read_gguf(write(tmp_path, nested))
    plain = file_with(lambda w: w.add_uint32("x.value", 7))
    type_at = plain.index(b"x.value") + len(b"x.value")
    with pytest.raises(GGUFError, match="unknown GGUF value type 13"):
        read_gguf(write(tmp_path, patched(plain, type_at, "<I", 13)))
    twice = file_with(lambda w: (w.add_uint32("x.value", 7), w.add_uint32("x.valuf", 8)))
    twice = twice.replace(b"x.valuf", b"x.value")
    with pytest.raises(GGUFError, match="'x.value' appears twice"):
        read_gguf(write(tmp_path, twice))


# ------------------------------------------------------------------------------------------- shapes vs config
@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "tiny.gguf"
    path.write_bytes(tiny[0])
    return read_gguf(path)


def test_tensor_shapes_must_match_the_config(tiny_gguf):
    model = DecoderModel.from_gguf(tiny_gguf, backend="ref")
    config, tensors = model.config, dict(tiny_gguf.tensors)
    wrong = dict(tensors, **{"token_embd.weight": QTensor.from_float("token_embd.weight",
                                                                       np.zeros((config.vocab_size, 32)))})
    with pytest.raises(ModelFormatError, match=r"'token_embd.weight' has shape \(259, 32\).*\(259, 64\)"):
        DecoderModel(config, wrong, backend="ref", source="tiny.gguf")
    short_norm = dict(tensors, **{"blk.1.ffn_norm.weight": QTensor.from_float("blk.1.ffn_norm.weight",
                                                                              np.ones(63))})
    with pytest.raises(ModelFormatError, match=r"blk.1.ffn_norm.weight"):
        DecoderModel(config, short_norm, backend="ref")
    missing_layer = {name: t for name, t in tensors.items() if not name.startswith("blk.1.")}
    with pytest.raises(GGUFError, match=r"no tensor 'blk\.1\."):
        DecoderModel(config, missing_layer, backend="ref")
    from dataclasses import replace
    for bad, message in ((dict(n_kv_heads=3), "evenly"), (dict(rope_dim=18), "RoPE over 18"),
                         (dict(rope_theta=float("nan")), "rope_theta"), (dict(dim=0), "dim is 0")):
        with pytest.raises(ModelFormatError, match=message):
            DecoderModel(replace(config, **bad), tensors, backend="ref")


def test_hyperparameters_of_the_wrong_kind_or_out_of_range_are_refused(tiny_gguf):
    from localllm.formats.gguf import GGUFFile
    for key, value, message in (("llama.block_count", 10**12, "block_count"),
                                ("llama.attention.head_count", 0, "head_count"),
                                ("llama.embedding_length", 64.0, "embedding_length"),
                                ("llama.embedding_length", True, "embedding_length"),
                                ("llama.rope.freq_base", float("inf"), "freq_base"),
                                ("llama.attention.layer_norm_rms_epsilon", "1e-5", "epsilon"),
                                ("llama.context_length", [4096], "context_length"),
                                ("llama.vocab_size", 300, "300 for a vocabulary|259 tokens")):
        broken = GGUFFile(tiny_gguf.path, dict(tiny_gguf.metadata, **{key: value}), tiny_gguf.tensors)
        with pytest.raises(ModelFormatError, match=message):
            DecoderModel.from_gguf(broken, backend="ref")


# ------------------------------------------------------------------------------------------- tokenizer metadata
def byte_level_metadata() -> dict:
    """gpt2 vocabulary metadata with two merges ("a b" -> "ab", "ab c" -> "abc")."""
    tokens, types = byte_level_vocab()
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens + ["ab", "abc"], "tokenizer.ggml.token_type": types + [1, 1],
            "tokenizer.ggml.merges": ["a b", "ab c"], "tokenizer.ggml.bos_token_id": 256,
            "tokenizer.ggml.eos_token_id": 258}


def sentencepiece_metadata() -> dict:
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab", "<0x41>"]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5, -0.7, 0.0],
            "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1, 6],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def test_valid_tokenizer_metadata_builds():
    from localllm.tokenizer import Tokenizer
    assert Tokenizer(**gguf_tokenizer_args(byte_level_metadata())).encode("abc") == [260]
    assert Tokenizer(**gguf_tokenizer_args(sentencepiece_metadata())).encode("a", add_bos=False) == [6]


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.tokens": []}, "missing or empty"),
    ({"tokenizer.ggml.tokens": None}, "missing or empty"),
    ({"tokenizer.ggml.token_type": [1] * 10}, "10 entries for 261 tokens"),
    ({"tokenizer.ggml.token_type": [1] * 260 + [7]}, "entry 260 is 7"),
    ({"tokenizer.ggml.token_type": [1] * 260 + [-1]}, "entry 260 is -1"),
    ({"tokenizer.ggml.merges": ["a b", "abc"]}, "entry 1"),
    ({"tokenizer.ggml.merges": ["a b", "b c"]}, r"entry 1 \('b c'\)"),        # "bc" is not a token
    ({"tokenizer.ggml.merges": ["a x\u0101"]}, "entry 0"),
    ({"tokenizer.ggml.merges": [7]}, "entry 0"),
    ({"tokenizer.ggml.bos_token_id": 261}, "bos_token_id' is 261"),
    ({"tokenizer.ggml.eos_token_id": -1}, "eos_token_id' is -1"),
    ({"tokenizer.ggml.eos_token_id": "2"}, "expected a token id"),
    ({"tokenizer.ggml.tokens": ["a", "a"], "tokenizer.ggml.token_type": None, "tokenizer.ggml.merges": None,
      "tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.eos_token_id": None}, "duplicate token"),
    ({"tokenizer.ggml.model": "gpt3"}, "'gpt3'"),
    ({"tokenizer.chat_template": 5}, "chat_template"),
])
def test_malformed_byte_level_metadata_is_refused(change, message):
    metadata = {key: value for key, value in {**byte_level_metadata(), **change}.items() if value is not None}
    with pytest.raises(TokenizerMetadataError, match=message):
        gguf_tokenizer_args(metadata)


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.scores": [0.0] * 8}, "8 entries for 9 tokens"),
    ({"tokenizer.ggml.scores": [0.0] * 10}, "10 entries for 9 tokens"),
    ({"tokenizer.ggml.scores": [0.0] * 8 + ["x"]}, "entry 8 is 'x'"),
    ({"tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1, 9]}, "entry 8 is 9"),
    ({"tokenizer.ggml.bos_token_id": 9}, "bos_token_id' is 9"),
])
def test_malformed_sentencepiece_metadata_is_refused(change, message):
    with pytest.raises(TokenizerMetadataError, match=message):
        gguf_tokenizer_args({**sentencepiece_metadata(), **change})


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=12), max_leaves=40)


@settings(FUZZ, max_examples=120)
@given(st.sampled_from(["byte_level", "sentencepiece"]), st.data())
def test_any_tokenizer_metadata_value_builds_or_is_refused(kind, draw):
    from localllm.tokenizer import Tokenizer
    metadata = byte_level_metadata() if kind == "byte_level" else sentencepiece_metadata()
    key = draw.draw(st.sampled_from(sorted(metadata) + ["tokenizer.ggml.padding_token_id",
                                                        "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]))
    value = draw.draw(JSON_VALUES | st.lists(st.text(max_size=4), max_size=300)
                      | st.lists(st.integers(-3, 300), min_size=8, max_size=262), label="value")
    try:
        tokenizer = Tokenizer(**gguf_tokenizer_args({**metadata, key: value}))
    except TokenizerMetadataError:
        return
    ids = tokenizer.encode("ab c")
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    tokenizer.decode(ids)


# ------------------------------------------------------------------------------------------- safetensors
def safetensors_file(tmp_path, header: dict | bytes, data: bytes, name: str = "model.safetensors"):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


VALID_HEADER = {"a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                "b": {"dtype": "F16", "shape": [4], "data_offsets": [32, 40]},
                "__metadata__": {"format": "pt"}}


def test_valid_safetensors_file_reads(tmp_path):
    values = np.arange(8, dtype=np.float32)
    path = safetensors_file(tmp_path, VALID_HEADER, values.tobytes() + np.ones(4, np.float16).tobytes())
    tensors = read_safetensors(path)
    np.testing.assert_array_equal(tensors["a"].data, values.reshape(2, 4))
    assert tensors["b"].shape == (4,)


def _entry(**change):
    return {**VALID_HEADER, "a": {**VALID_HEADER["a"], **change}}


@pytest.mark.parametrize("header, message", [
    (b"{not json", "unreadable"),
    (b"\xff\xfe{}", "unreadable"),
    (b"[1, 2]", "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "unreadable"),
    (b'{"a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}, '
     b'"a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}', "appears twice"),
    (_entry(data_offsets=[0, 48]), "truncated"),
    (_entry(data_offsets=[8, 40]), "overlap"),
    (_entry(data_offsets=[32, 0]), "data_offsets"),
    (_entry(data_offsets=[0, 32.0]), "data_offsets"),
    (_entry(data_offsets=[0, 2**70]), "truncated"),
    (_entry(data_offsets=[0]), "data_offsets"),
    (_entry(dtype="F33"), "unknown dtype 'F33'"),
    (_entry(dtype=None), "unknown dtype"),
    (_entry(shape=[2, 5]), "holds 32 bytes for shape"),
    (_entry(shape=[2, -4]), "shape"),
    (_entry(shape=[True, 8]), "shape"),
    (_entry(shape="2x4"), "shape"),
    ({**VALID_HEADER, "a": [1, 2]}, "malformed header entry"),
])
def test_malformed_safetensors_headers_are_refused(tmp_path, header, message):
    path = safetensors_file(tmp_path, header, bytes(40))
    with pytest.raises(HFFolderError, match=message):
        read_safetensors(path)


def test_safetensors_header_length_beyond_the_file_or_huge_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    for length in (2**64 - 1, 2**63, 10**9):
        path.write_bytes(struct.pack("<Q", length) + b"{}")
        with pytest.raises(ModelFormatError, match="truncated"):
            read_safetensors_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ModelFormatError, match="shorter than"):
        read_safetensors_header(path)


def test_misaligned_float_tensor_is_copied_not_viewed(tmp_path):
    header = {"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = safetensors_file(tmp_path, raw, b"\x07" + np.array([1.5, -2.0], np.float32).tobytes())
    tensor = read_safetensors(path)["a"]
    assert tensor.data.flags.aligned
    np.testing.assert_array_equal(tensor.data, [1.5, -2.0])


@settings(FUZZ, max_examples=100)
@given(st.data())
def test_mutated_safetensors_read_or_are_refused(tmp_path, draw):
    values = np.arange(8, dtype=np.float32).tobytes() + np.ones(4, np.float16).tobytes()
    good = safetensors_file(tmp_path, VALID_HEADER, values).read_bytes()
    mutant = bytearray(good)
    for _ in range(draw.draw(st.integers(1, 4), label="flips")):
        where = draw.draw(st.integers(0, len(good) - 1 - len(values)), label="offset")
        mutant[where] = draw.draw(st.integers(0, 255), label="byte")
    cut = draw.draw(st.sampled_from([len(mutant), len(mutant) - 1, 9, 8, 3]), label="cut")
    path = tmp_path / "mutant.safetensors"
    path.write_bytes(bytes(mutant[:cut]))
    try:
        tensors = read_safetensors(path)
    except (ModelFormatError, UnsupportedTensorType):
        return
    for tensor in tensors.values():
        assert tensor.data.nbytes == math.prod(tensor.shape) * (4 if tensor.ggml_type == "F32" else 2)


# ------------------------------------------------------------------------------------------- HF decoder folders
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.tiny_hf import hf_tiny_model, save_folder
    return save_folder(hf_tiny_model("llama"), tmp_path_factory.mktemp("hf") / "llama")


def _copy_folder(source, target):
    import shutil
    shutil.copytree(source, target)
    return target


def test_hf_config_sizes_must_be_positive_integers(hf_folder, tmp_path):
    for key, value in (("num_hidden_layers", 10**12), ("hidden_size", "64"), ("num_attention_heads", 0),
                       ("intermediate_size", 96.5), ("sliding_window", -1)):
        folder = _copy_folder(hf_folder, tmp_path / f"{key}-{value}")
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(HFFolderError, match=key):
            localllm.load(folder, backend="ref")


def test_hf_tensor_with_the_wrong_shape_is_refused_before_any_kernel(hf_folder, tmp_path):
    folder = _copy_folder(hf_folder, tmp_path / "transposed")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    (header_len,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + header_len])
    name = "model.layers.0.mlp.gate_proj.weight"
    header[name]["shape"] = header[name]["shape"][::-1]             # same bytes, transposed shape
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (header_len - len(raw))
    assert len(raw) == header_len
    weights.write_bytes(data[:8] + raw + data[8 + header_len:])
    with pytest.raises(ModelFormatError, match=r"blk.0.ffn_gate.weight' has shape \(64, 96\)"):
        localllm.load(folder, backend="ref")


def test_hf_tokenizer_json_the_tokenizers_library_refuses_is_a_format_error(hf_folder, tmp_path):
    folder = _copy_folder(hf_folder, tmp_path / "tokenizer")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["merges"] = [["a", "b"]]                           # "ab" is not in the vocabulary
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerMetadataError, match="tokenizer.json"):
        localllm.load(folder, backend="ref")
    (folder / "tokenizer.json").write_text("{" * 10)
    with pytest.raises(TokenizerMetadataError, match="not readable JSON"):
        localllm.load(folder, backend="ref")
