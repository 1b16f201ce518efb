"""``localllm create NAME -f Modelfile --quantize TYPE`` with ``FROM ./folder``: a Hugging Face folder written
as a quantized GGUF into the store gives the logits of the folder quantized in memory, close to transformers."""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import localllm  # noqa: E402
from localllm import cli  # noqa: E402
from localllm.formats.gguf import read_gguf  # noqa: E402
from localllm.formats.gguf_export import adjacent_pair_rows, quantized_tensors, write_gguf  # noqa: E402
from localllm.formats.hf_decoder import read_hf_decoder  # noqa: E402
from localllm.model_info import InvalidModelFile  # noqa: E402
from localllm.modelfile import ModelfileError, create_model, parse_modelfile  # noqa: E402
from localllm.models.decoder import DecoderModel  # noqa: E402
from localllm.store import ModelStore  # noqa: E402
from localllm.tokenizer import Tokenizer  # noqa: E402
from tests.tiny_hf import hf_logits, hf_tiny_model, save_folder  # noqa: E402

PROMPT = "Quantized: <|im_start|>tokens"
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    built = {}

    def get(kind, **overrides):
        key = (kind, tuple(sorted(overrides.items())))
        if key not in built:
            model = hf_tiny_model(kind, **overrides)
            built[key] = model, save_folder(model, tmp_path_factory.mktemp(kind) / f"tiny-{kind}",
                                            generation=SAMPLING)
        return built[key]
    return get


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALLLM_MODELS", str(tmp_path / "store"))
    monkeypatch.setattr(cli, "server_available", lambda: False)
    return ModelStore(tmp_path / "store")


def _in_memory(folder_path, ggml_type):
    folder = read_hf_decoder(folder_path)
    return DecoderModel(folder.config, quantized_tensors(folder.tensors, ggml_type), backend="ref")


def _logits(network, ids):
    n = len(ids)
    return network.forward(np.array(ids), np.arange(n), np.zeros(n, dtype=np.int64), network.new_cache(1, n))


@pytest.mark.parametrize("kind", ["llama", "phi3", "qwen2"])
def test_cli_create_quantize_q8_0(folders, store, tmp_path, kind):
    hf, folder = folders(kind)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM ./{folder.name}\nPARAMETER top_k 30\n")
    (tmp_path / folder.name).symlink_to(folder)
    assert cli.main(["create", "tiny", "-f", str(modelfile), "--quantize", "q8_0"]) == 0

    entry = store.get("tiny")
    assert entry.format == "gguf" and entry.details["quantization_level"] == "Q8_0"
    model = localllm.load("tiny", backend="ref", store=store)
    assert model.defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 30}     # Modelfile over generation_config
    ids = model.tokenize(PROMPT, add_bos=False)
    assert 257 in ids                                                             # <|im_start|> is one token
    ours = model.logits(ids)
    np.testing.assert_allclose(ours, _logits(_in_memory(folder, "Q8_0"), ids), rtol=0, atol=1e-5)
    expected = hf_logits(hf, ids)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=0.05 * np.abs(expected).max())
    assert np.mean(ours.argmax(-1) == expected.argmax(-1)) >= 0.75        # random weights: near-ties flip


def test_written_file_is_laid_out_as_llama_cpp_reads_it(folders, tmp_path):
    """llama: q/k rows permuted for adjacent-pair RoPE and rope_freqs; the tokenizer keys give tokenizer.json's
    ids; template and sampling defaults are in the file."""
    _, folder = folders("llama")
    path = write_gguf(folder, tmp_path / "tiny.gguf", "q8_0", bar=False)
    gguf_file = read_gguf(path)
    meta = gguf_file.metadata
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["general.sampling.top_k"] == 20
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")
    read = read_hf_decoder(folder)
    in_memory = quantized_tensors(read.tensors, "Q8_0")
    q = gguf_file.tensors["blk.0.attn_q.weight"]
    assert q.ggml_type == "Q8_0"
    rows = adjacent_pair_rows(read.config.n_heads, read.config.head_dim)
    np.testing.assert_array_equal(q.data, in_memory["blk.0.attn_q.weight"].data[rows])
    assert not np.array_equal(q.data, in_memory["blk.0.attn_q.weight"].data)
    np.testing.assert_array_equal(gguf_file.tensors["rope_freqs.weight"].data,
                                  np.float32(read.config.rope_freq_factors))
    from_gguf, from_json = Tokenizer.from_gguf_metadata(meta), Tokenizer.from_hf_folder(folder)
    text = "Hi <|im_start|>user\nwhy? <|im_end|> é"
    assert from_gguf.encode(text) == from_json.encode(text)
    assert (from_gguf.bos_id, from_gguf.eos_id) == (256, 258)


@pytest.mark.parametrize("ggml_type", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_other_types_equal_in_memory_quantization(folders, store, ggml_type):
    _, folder = folders("qwen3")
    create_model(store, f"tiny-{ggml_type}", parse_modelfile(f"FROM {folder}"), quantize=ggml_type)
    model = localllm.load(f"tiny-{ggml_type}", backend="ref", store=store)
    assert model.network.layers[0].wq.ggml_type == ggml_type.upper()
    ids = model.tokenize(PROMPT, add_bos=False)
    np.testing.assert_allclose(model.logits(ids), _logits(_in_memory(folder, ggml_type.upper()), ids),
                               rtol=0, atol=1e-5)


def test_gemma_folder_to_gguf(folders, tmp_path):
    """Gemma 2: norm scales +1, soft-caps and alternate windows stated in the file."""
    _, folder = folders("gemma2", query_pre_attn_scalar=16)
    path = write_gguf(folder, tmp_path / "gemma2.gguf", "q8_0", bar=False)
    model = localllm.load(path, backend="ref")
    assert model.config.layer_windows == (8, 0, 8) and model.config.attention_softcap == 5.0
    ids = model.tokenize(PROMPT, add_bos=False)
    np.testing.assert_allclose(model.logits(ids), _logits(_in_memory(folder, "Q8_0"), ids), rtol=0, atol=1e-5)


def test_create_quantize_errors(folders, store, tmp_path):
    _, folder = folders("qwen3")
    with pytest.raises(ModelfileError, match="unsupported quantization 'q2_k'.*q8_0, q4_0"):
        create_model(store, "bad", parse_modelfile(f"FROM {folder}"), quantize="q2_k")
    gguf_path = write_gguf(folder, tmp_path / "already.gguf", "q8_0", bar=False)
    with pytest.raises(ModelfileError, match="converts a Hugging Face folder"):
        create_model(store, "bad", parse_modelfile(f"FROM {gguf_path}"), quantize="q4_0")
    _, gemma = folders("gemma2")                              # query_pre_attn_scalar 24, head_dim 16
    with pytest.raises(InvalidModelFile, match="query_pre_attn_scalar 24"):
        create_model(store, "bad", parse_modelfile(f"FROM {gemma}"), quantize="q8_0")
    assert store.list() == [] and not list((store.tmp_dir).glob("*/files/*"))
