"""Tiny random models of every llama-family architecture, built with transformers (the float oracle) and written
to GGUF the way llama.cpp's ``convert_hf_to_gguf.py`` lays them out; and the converter itself, run on the saved
Hugging Face folder, as the cross-check of that layout.

What the converter does, per architecture, and so what ``write_gguf`` does:

* ``llama`` (Llama, Mistral): Q and K rows permuted so that RoPE turns adjacent pairs (``permute``);
  Llama 3.x's ``rope_type: llama3`` becomes a ``rope_freqs.weight`` tensor of per-pair divisors
  (``llama3_rope_factors``); the converter writes no sliding window for Mistral, ours writes
  ``llama.attention.sliding_window`` (what localllm reads for a windowed Mistral);
* ``qwen2`` (biases on q, k, v), ``qwen3`` (q/k head norms, ``key_length``): no permutation (NEOX RoPE);
* ``phi3``: the fused ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``, ``ffn_up``); LongRoPE's
  short and long factors become ``rope_factors_short/long.weight`` with ``rope.scaling.attn_factor``;
  ``rope.dimension_count`` is the rotated part of a head; ``attention.sliding_window`` (0: none);
* ``gemma2``: every norm scale stored with Gemma's +1 added; ``attn_logit_softcapping``,
  ``final_logit_softcapping``, ``attention.sliding_window`` (the alternate-layer pattern is implied).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from localllm.tokenizer import bytes_to_unicode
from tests.tiny_models import _store, hf_logits  # noqa: F401  (hf_logits: the tests take it from here)

# ---------------------------------------------------------------------------- vocabulary
SPECIAL_TOKENS = (  # the turn markers of the chat formats under test, after the 256 byte tokens
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",                                  # Qwen (ChatML)
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama 3
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",                            # Phi-3
    "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",                   # Gemma
)
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def special_id(token: str) -> int:
    return 256 + SPECIAL_TOKENS.index(token)


# ---------------------------------------------------------------------------- chat templates
# Representative templates of each family's own turn format (as the models' tokenizer_config.json carry them).
QWEN_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GEMMA_TEMPLATE = (  # Gemma 2's own (no system role: a system message raises)
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


# ---------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class TinyArch:
    """One tiny model: its transformers class and config, its GGUF architecture, its chat format."""

    name: str
    gguf_arch: str
    hf_class: str                    # transformers causal-LM class
    hf_config_class: str
    config: dict = field(default_factory=dict)
    bos: str = "<|endoftext|>"
    eos: str = "<|im_end|>"
    chat_template: str | None = QWEN_CHATML_TEMPLATE   # None: the GGUF carries none (Gemma: the registry's turns)
    prompt_window: int = 0           # the largest sliding window (0: none); prompts are longer

    @property
    def gemma(self) -> bool:
        return self.gguf_arch.startswith("gemma")


COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
PHI3_ROPE_DIMS = 8  # partial_rotary_factor 0.5 of a 16-wide head: 4 pairs of short and long factors
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                 "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.5, 4.0, 9.0, 17.0],
                 "original_max_position_embeddings": 64}

ARCHS = {
    "llama3": TinyArch("llama3", "llama", "LlamaForCausalLM", "LlamaConfig",
                       dict(COMMON, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
                       bos="<|begin_of_text|>", eos="<|eot_id|>", chat_template=LLAMA3_TEMPLATE),
    "mistral": TinyArch("mistral", "llama", "MistralForCausalLM", "MistralConfig",
                        dict(COMMON, sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                        prompt_window=8),
    "qwen2": TinyArch("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2Config",
                      dict(COMMON, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2_untied": TinyArch("qwen2_untied", "qwen2", "Qwen2ForCausalLM", "Qwen2Config",
                             dict(COMMON, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": TinyArch("qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3Config",
                      dict(COMMON, head_dim=32, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "phi3": TinyArch("phi3", "phi3", "Phi3ForCausalLM", "Phi3Config",
                     dict(COMMON, original_max_position_embeddings=512, bos_token_id=None, pad_token_id=None,
                          eos_token_id=None),
                     bos="<|endoftext|>", eos="<|end|>", chat_template=PHI3_TEMPLATE),
    "phi3_longrope": TinyArch("phi3_longrope", "phi3", "Phi3ForCausalLM", "Phi3Config",
                              dict(COMMON, max_position_embeddings=256, original_max_position_embeddings=64,
                                   rope_parameters=PHI3_LONGROPE, bos_token_id=None, pad_token_id=None,
                                   eos_token_id=None),
                              bos="<|endoftext|>", eos="<|end|>", chat_template=PHI3_TEMPLATE),
    "phi3_window": TinyArch("phi3_window", "phi3", "Phi3ForCausalLM", "Phi3Config",
                            dict(COMMON, original_max_position_embeddings=512, sliding_window=8, bos_token_id=None,
                                 pad_token_id=None, eos_token_id=None),
                            bos="<|endoftext|>", eos="<|end|>", chat_template=PHI3_TEMPLATE, prompt_window=8),
    # caps far below the real 50 and 30 so that they bite on a tiny random model
    "gemma2": TinyArch("gemma2", "gemma2", "Gemma2ForCausalLM", "Gemma2Config",
                       dict(COMMON, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rms_norm_eps=1e-6,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            hidden_activation="gelu_pytorch_tanh"),
                       bos="<bos>", eos="<eos>", chat_template=None, prompt_window=8),
}


def hf_tiny(arch: TinyArch, vocab_size: int = BYTE_VOCAB_SIZE, seed: int = 0):
    """The random transformers model of ``arch`` in float32, eval mode, eager attention."""
    import torch
    import transformers

    config_class = getattr(transformers, arch.hf_config_class)
    extra = {}
    if not arch.gemma and "bos_token_id" not in arch.config:
        extra = dict(bos_token_id=special_id(arch.bos), eos_token_id=special_id(arch.eos), pad_token_id=None)
    config = config_class(vocab_size=vocab_size, attn_implementation="eager", **extra, **arch.config)
    torch.manual_seed(seed)
    model = getattr(transformers, arch.hf_class)(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma scales by (1 + weight), the others by weight: both far from the identity
                offset = 0.0 if arch.gemma else 1.0
                parameter.copy_(offset + 0.3 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.copy_(0.5 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / math.sqrt(parameter.shape[-1]))
    return model


# ---------------------------------------------------------------------------- our GGUF writer
LAYER_NAMES = {  # transformers' names in a layer -> llama.cpp's (gguf-py's TensorNameMap)
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
LLAMA_NORM_NAMES = {"post_attention_layernorm": "ffn_norm"}            # Llama's second norm precedes the FFN
GEMMA_NORM_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                    "post_feedforward_layernorm": "post_ffw_norm"}


def permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Q or K rows of each head reordered from halves (HF) to adjacent pairs (GGUF llama): the converter's
    ``LlamaModel.permute``. (rows, ...) -> (rows, ...)."""
    rows = weights.shape[0]
    return (weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.x's per-pair RoPE divisors (``rope_freqs``): 1 for the fast pairs, ``factor`` for the slow ones
    and a smooth blend between (Meta's formula, as the converter computes it). (head_dim/2,) float32."""
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    old_context = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    wavelengths = 2 * math.pi / inv_freq
    smooth = (old_context / wavelengths - low) / (high - low)
    factors = np.where(wavelengths < old_context / high, 1.0,
                       np.where(wavelengths > old_context / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def add_tokenizer(writer: gguf.GGUFWriter, arch: TinyArch, vocabulary: dict | None = None) -> None:
    """The byte-level vocabulary with the chat formats' special tokens (or ``vocabulary``: the tokenizer.*
    keys of a real model, for models with its vocabulary) and the arch's chat template."""
    if vocabulary is not None:  # a real model's byte-level BPE (tokens, token types, merges, pre-tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocabulary["pre"])
        writer.add_token_list(vocabulary["tokens"])
        writer.add_token_types(vocabulary["token_types"])
        writer.add_token_merges(vocabulary["merges"])
        writer.add_bos_token_id(vocabulary["bos"])
        writer.add_eos_token_id(vocabulary["eos"])
        return
    byte_to_char = bytes_to_unicode()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([byte_to_char[b] for b in range(256)] + list(SPECIAL_TOKENS))
    writer.add_token_types([1] * 256 + [3] * len(SPECIAL_TOKENS))  # NORMAL, CONTROL
    writer.add_token_merges([])
    writer.add_bos_token_id(special_id(arch.bos))
    writer.add_eos_token_id(special_id(arch.eos))
    writer.add_add_bos_token(False)
    if arch.chat_template is not None:
        writer.add_chat_template(arch.chat_template)


def write_gguf(model, arch: TinyArch, path: str | Path, weight_type: str = "F32",
               vocabulary: dict | None = None, tokenizer_keys=None) -> Path:
    """The transformers model as llama.cpp's converter writes it; ``weight_type`` applies to 2-D matrices;
    ``tokenizer_keys(writer)``, when given, writes the tokenizer keys in place of ``add_tokenizer``."""
    path = Path(path)
    c = model.config
    name = arch.gguf_arch
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = dict(c.rope_parameters or {})
    writer = gguf.GGUFWriter(str(path), name)
    writer.add_name(f"tiny-{arch.name}")
    # the keys each converter class writes (phi3 and gemma2 write their own set)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if name in ("llama", "qwen2", "qwen3"):
        writer.add_rope_freq_base(rope["rope_theta"])
    if getattr(c, "head_dim", None) and name != "phi3":          # stated in config.json
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if name == "llama":
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        if getattr(c, "sliding_window", None):                   # Mistral v0.1's window (the converter omits it)
            writer.add_sliding_window(c.sliding_window)
    if name == "phi3":
        rope_dims = int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
        writer.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        writer.add_rope_dimension_count(rope_dims)
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_sliding_window(c.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / c.original_max_position_embeddings
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(c.original_max_position_embeddings)) if scale > 1 else 1.0)
    if name == "gemma2":                                          # no RoPE base: the default 10000
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
        writer.add_sliding_window(c.sliding_window)
    if tokenizer_keys is not None:
        tokenizer_keys(writer)
    else:
        add_tokenizer(writer, arch, vocabulary)

    state = {key: tensor.detach().float().numpy() for key, tensor in model.state_dict().items()}

    def add(gguf_name: str, array: np.ndarray) -> None:
        if array.ndim == 1:
            writer.add_tensor(gguf_name, (array + 1.0 if arch.gemma and gguf_name.endswith("norm.weight")
                                          else array).astype(np.float32))  # the converter's +1 on Gemma norms
        else:
            _store(writer, gguf_name, array, weight_type)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])
    if name == "llama" and rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    if name == "phi3" and rope.get("rope_type") == "longrope":
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    layer_names = {**LAYER_NAMES, **(GEMMA_NORM_NAMES if arch.gemma else LLAMA_NORM_NAMES)}
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf_name, gguf_name in layer_names.items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{hf_name}.{kind}"
                if key not in state:
                    continue
                array = state[key]
                if name == "llama" and hf_name == "self_attn.q_proj":
                    array = permute(array, c.num_attention_heads)
                elif name == "llama" and hf_name == "self_attn.k_proj":
                    array = permute(array, c.num_key_value_heads)
                add(f"blk.{i}.{gguf_name}.{kind}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------- llama.cpp's converter
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")   # what the converter needs of the sdist


def llama_cpp_source(cache_dir: Path) -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist: from ``LOCALLLM_LLAMA_CPP_SOURCE`` (the unpacked sdist
    or its llama.cpp folder), else downloaded once with pip into ``cache_dir`` and the converter's files unpacked.
    Raises RuntimeError saying what failed."""
    override = os.environ.get("LOCALLLM_LLAMA_CPP_SOURCE")
    if override:
        for candidate in (Path(override), Path(override) / "vendor" / "llama.cpp"):
            if (candidate / "convert_hf_to_gguf.py").is_file():
                return candidate
        raise RuntimeError(f"LOCALLLM_LLAMA_CPP_SOURCE={override} holds no convert_hf_to_gguf.py "
                           "(nor vendor/llama.cpp/convert_hf_to_gguf.py)")
    root = cache_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    source = root / "vendor" / "llama.cpp"
    if (source / "convert_hf_to_gguf.py").is_file():
        return source
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(cache_dir)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            raise RuntimeError(f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist with pip "
                               f"(exit {done.returncode}): {done.stderr.strip()[-800:]}")
    prefix = f"{root.name}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        wanted = [m for m in archive.getmembers()
                  if m.name.startswith(prefix) and m.name[len(prefix):].startswith(CONVERTER_FILES)]
        archive.extractall(cache_dir, members=wanted, filter="data")
    if not (source / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{sdist} has no {prefix}convert_hf_to_gguf.py")
    return source


def save_hf_folder(model, arch: TinyArch, folder: Path, tokenizer_json: Path | None = None) -> Path:
    """The model as a Hugging Face folder the converter accepts: safetensors, config.json and a tokenizer it
    recognizes: ``tokenizer_json``, a byte-level BPE whose pre-tokenizer hash the converter knows (SmolLM2's;
    the model's vocabulary must hold it), or else a small SentencePiece ``tokenizer.model`` trained here (the
    converter pads it to the model's vocabulary; it reads it with the ``sentencepiece`` package)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer_json is None:
        write_sentencepiece_model(folder / "tokenizer.model")
    else:
        (folder / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
        # Phi-3's converter takes the GPT-2 path only for this class (else it wants a tokenizer.model)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer" if arch.gguf_arch == "phi3" else "PreTrainedTokenizerFast"}))
    return folder


def write_sentencepiece_model(path: Path) -> Path:
    """A small SentencePiece BPE model (``tokenizer.model``) trained on a few lines; the converter pads the
    vocabulary to the model's."""
    import io

    import sentencepiece

    text = ["the quick brown fox jumps over the lazy dog", "a tiny model for tests of the converter",
            "gemma turns: user and model", "sliding windows and soft caps"] * 8
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=64,
                                             model_type="bpe", character_coverage=1.0, bos_id=2, eos_id=1,
                                             pad_id=0, unk_id=3, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def run_converter(source: Path, jobs: list[tuple[Path, Path]], parallel: int = 2) -> None:
    """``convert_hf_to_gguf.py <folder> --outtype f32 --outfile <outfile>`` for each (folder, outfile) of
    ``jobs``, ``parallel`` at a time, with the sdist's own gguf-py first on the path. RuntimeError with the
    converter's last words when one fails."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ, PYTHONPATH=str(source / "gguf-py"))

    def convert(job: tuple[Path, Path]) -> str | None:
        folder, outfile = job
        done = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder),
                               "--outtype", "f32", "--outfile", str(outfile)], capture_output=True, text=True,
                              env=env)
        if done.returncode != 0 or not outfile.is_file():
            return f"convert_hf_to_gguf.py failed on {folder} (exit {done.returncode}):\n{done.stderr[-3000:]}"
        return None

    with ThreadPoolExecutor(parallel) as pool:
        errors = [error for error in pool.map(convert, jobs) if error]
    if errors:
        raise RuntimeError("\n".join(errors))
