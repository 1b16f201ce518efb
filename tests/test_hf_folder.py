"""Hugging Face decoder folders: every registered architecture against transformers (the float oracle) on a
tiny random model, sharded and BF16 saves, chat templates, sampling defaults, and the errors."""
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import localllm  # noqa: E402
from localllm.arch.spec import UnsupportedArchitecture, UnsupportedModelFeature  # noqa: E402
from localllm.formats.hf_decoder import read_hf_decoder  # noqa: E402
from localllm.formats.safetensors import HFFolderError  # noqa: E402
from tests.tiny_hf import ARCHITECTURES, PROMPT_LENGTH, WINDOW, hf_logits, hf_tiny_model, save_folder  # noqa: E402

PROMPT = "Sliding window: 24 bytes"
assert len(PROMPT) == PROMPT_LENGTH > WINDOW


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (transformers model, its saved folder), built on first use."""
    built = {}

    def get(kind):
        if kind not in built:
            model = hf_tiny_model(kind)
            built[kind] = model, save_folder(model, tmp_path_factory.mktemp(kind) / kind)
        return built[kind]
    return get


def _prompt_ids(model) -> list[int]:
    ids = model.tokenize(PROMPT, add_bos=False)
    assert len(ids) == PROMPT_LENGTH                                 # one byte a token (no merges)
    return ids


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_reference_logits_match_transformers(folders, kind):
    hf, folder = folders(kind)
    model = localllm.load(folder, backend="ref")
    ids = _prompt_ids(model)
    expected = hf_logits(hf, ids)                                     # (24, vocab)
    np.testing.assert_allclose(model.logits(ids), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "phi3", "gemma2"])
def test_fast_logits_close_to_transformers(folders, kind):
    hf, folder = folders(kind)
    model = localllm.load(folder, backend="fast")
    ids = _prompt_ids(model)
    expected = hf_logits(hf, ids)
    got = model.logits(ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.03 * np.abs(expected).max())
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.95


def test_gemma3_linear_scaling_on_the_global_layers_only(tmp_path):
    """Gemma 3 4B and larger scale RoPE linearly on the global layers; the sliding ones keep theirs."""
    hf = hf_tiny_model("gemma3", rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
    model = localllm.load(save_folder(hf, tmp_path / "gemma3-linear"), backend="ref")
    c = model.config
    assert c.rope_linear_factor == 8.0 and not c.rope_linear_on_windows
    assert c.rope(0).factors == () and set(c.rope(2).factors) == {8.0}      # layers 0, 1 slide; layer 2 is global
    ids = _prompt_ids(model)
    np.testing.assert_allclose(model.logits(ids), hf_logits(hf, ids), rtol=0, atol=1e-3)


def test_phi3_long_factors_past_the_original_context(folders):
    """Past original_max_position_embeddings (64) transformers switches to LongRoPE's long factors; a cache
    longer than that does too."""
    hf, folder = folders("phi3")
    model = localllm.load(folder, backend="ref")
    ids = model.tokenize(PROMPT * 3, add_bos=False)                   # 72 tokens
    assert len(ids) > 64
    np.testing.assert_allclose(model.logits(ids), hf_logits(hf, ids), rtol=0, atol=1e-3)


def test_config_read_from_config_json(folders):
    c = read_hf_decoder(folders("llama")[1]).config
    assert c.rope_style == "neox" and c.tie_embeddings and c.rope_freq_factors[0] == 1.0
    assert c.rope_freq_factors[-1] == 8.0 and 1.0 < c.rope_freq_factors[1] < 8.0   # llama3: short, blended, long
    c = read_hf_decoder(folders("mistral")[1]).config
    assert c.architecture == "llama" and c.layer_windows == (WINDOW,) * 3 and c.rope_linear_factor == 2.0
    assert set(c.rope(0).factors) == {2.0}  # linear scaling on every layer of a model whose layers all slide
    c = read_hf_decoder(folders("phi3")[1]).config
    assert c.rope_dim == 12 and c.n_ctx_orig == 64 and len(c.rope_freq_factors_long) == 6
    assert c.rope_attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(64)))
    c = read_hf_decoder(folders("gemma2")[1]).config
    assert c.layer_windows == (WINDOW, 0, WINDOW) and c.attention_scale == pytest.approx(24 ** -0.5)
    assert (c.attention_softcap, c.final_logit_softcap) == (5.0, 3.0)
    c = read_hf_decoder(folders("gemma3")[1]).config
    assert c.layer_windows == (WINDOW, WINDOW, 0) and c.layer_rope_theta == (1e4, 1e4, 1e6)


def test_weights_are_memory_mapped(folders):
    folder = read_hf_decoder(folders("qwen3")[1])
    weight = folder.tensors["blk.0.attn_q.weight"]
    assert weight.ggml_type == "F32" and isinstance(weight.data.base, np.memmap) and not weight.data.flags.writeable


def test_sharded_folder_gives_the_same_logits(folders, tmp_path):
    hf, folder = folders("qwen2")
    sharded = save_folder(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    one, many = localllm.load(folder, backend="ref"), localllm.load(sharded, backend="ref")
    ids = _prompt_ids(one)
    np.testing.assert_array_equal(many.logits(ids), one.logits(ids))


def test_bf16_folder(folders, tmp_path):
    """BF16 matrices stay BF16 (ggml's type); the model matches transformers run on the same rounded weights."""
    import torch
    hf, _ = folders("gemma3")
    folder = save_folder(hf, tmp_path / "bf16", dtype=torch.bfloat16)
    read = read_hf_decoder(folder)
    assert read.tensors["blk.0.ffn_up.weight"].ggml_type == "BF16"
    model = localllm.load(folder, backend="ref")
    ids = _prompt_ids(model)
    rounded = hf_tiny_model("gemma3")
    with torch.no_grad():                                # the weights rounded (not the RoPE buffers)
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    expected = hf_logits(rounded, ids)
    np.testing.assert_allclose(model.logits(ids), expected, rtol=0, atol=1e-3)
    assert np.abs(expected - hf_logits(hf, ids)).max() > 1e-3        # the rounding is visible: not the F32 model


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_chat_template_renders_like_transformers(folders, kind):
    from transformers import AutoTokenizer
    _, folder = folders(kind)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    expected = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)
    model = localllm.load(folder, backend="ref")
    assert model.render_chat(messages) == expected
    assert ("<start_of_turn>model\n" if kind == "gemma3" else "<|im_start|>assistant\n") in expected


def test_generation_config_defaults_and_end_of_generation(folders, tmp_path):
    hf, _ = folders("qwen2")
    folder = save_folder(hf, tmp_path / "sampling", generation={"do_sample": True, "temperature": 0.6,
                                                                 "top_p": 0.9, "top_k": 20})
    model = localllm.load(folder, backend="ref")
    assert model.defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert {256, 258} <= model.tokenizer.eog_ids
    greedy = save_folder(hf, tmp_path / "greedy", generation={"do_sample": False, "temperature": 0.6})
    assert localllm.load(greedy, backend="ref").defaults == {"temperature": 0.0}


def test_greedy_generation_matches_transformers(folders):
    import torch
    hf, folder = folders("llama")
    model = localllm.load(folder, backend="ref")
    ids = _prompt_ids(model)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=256)[0, len(ids):].tolist()
    result = model.generate(ids, max_tokens=6, temperature=0, stop_token_ids=[], details=True)
    assert result.choices[0].token_ids[:len(expected)] == expected


def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_unsupported_architecture_is_named_before_weights_are_read(folders, tmp_path):
    folder = _copy(folders("llama")[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"],
                                                    "model_type": "gpt_neox"}))
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(UnsupportedArchitecture, match="GPTNeoXForCausalLM.*supported: LlamaForCausalLM.*"
                                                      "Gemma3ForCausalLM"):
        localllm.load(folder)


def test_missing_files_are_errors(folders, tmp_path):
    source = folders("qwen3")[1]
    no_config = _copy(source, tmp_path, "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        localllm.load(no_config)
    no_tokenizer = _copy(source, tmp_path, "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        localllm.load(no_tokenizer)
    no_weights = _copy(source, tmp_path, "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(HFFolderError, match="no model.safetensors"):
        localllm.load(no_weights)
    lost_shard = save_folder(folders("qwen3")[0], tmp_path / "lost_shard", max_shard_size="40KB")
    sorted(lost_shard.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(HFFolderError, match="shard file"):
        localllm.load(lost_shard)


def test_truncated_weights_are_an_error(folders, tmp_path):
    folder = _copy(folders("qwen3")[1], tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(HFFolderError, match="truncated"):
        localllm.load(folder)


def test_unknown_tensor_and_rope_scaling_are_errors(folders, tmp_path):
    from safetensors.numpy import save_file
    folder = _copy(folders("qwen3")[1], tmp_path, "extra_tensor")
    save_file({"model.layers.0.mlp.gate_proj.weight_scale": np.ones(4, np.float32)},
              str(folder / "model-extra.safetensors"))
    (folder / "model.safetensors").rename(folder / "model-main.safetensors")
    with pytest.raises(UnsupportedModelFeature, match="weight_scale"):
        localllm.load(folder)
    folder = _copy(folders("qwen3")[1], tmp_path, "yarn")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                 "original_max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelFeature, match="RoPE scaling 'yarn'"):
        localllm.load(folder)


def test_cli_run_takes_a_folder(folders, tmp_path, capsys, monkeypatch):
    """``localllm run ./folder "prompt"``: the folder's own greedy default (do_sample false) makes it exact."""
    from localllm import cli
    monkeypatch.setattr(cli, "server_available", lambda: False)
    hf, _ = folders("qwen3")
    folder = save_folder(hf, tmp_path / "greedy", generation={"do_sample": False})
    expected = localllm.load(folder).chat([{"role": "user", "content": "hi"}])
    assert cli.main(["run", str(folder), "hi"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip() and expected.strip()
