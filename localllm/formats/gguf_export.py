"""Hugging Face decoder folder -> quantized GGUF file, as llama.cpp lays it out (``localllm create --quantize``).

The folder is read by ``formats.hf_decoder`` (GGUF tensor names, Gemma's +1 on norm scales already added);
this module writes what llama.cpp's loader (and ``formats.gguf`` + ``arch/*.config_from_gguf``) reads:

* ``<arch>.*`` hyperparameters, RoPE scaling (Llama 3's ``rope_freqs`` tensor, linear scaling keys, Phi-3's
  ``rope_factors_short/long`` tensors and attention factor), sliding windows (one flag a layer where not every
  layer slides), soft-caps and Gemma 3's local RoPE base;
* the tokenizer (``tokenizer.ggml.*``: byte-level BPE from ``tokenizer.json``, its pre-tokenizer named by
  matching its regexes against llama.cpp's), the chat template, and the sampling defaults of
  ``generation_config.json`` (``general.sampling.*``, as llama.cpp's converter writes them);
* the weights: 2-D matrices quantized to the requested type with gguf-py's ``gguf.quants.quantize``
  (a matrix whose rows are not a whole number of blocks stays F16), vectors as F32. For ``llama`` the q and k
  rows are permuted for RoPE on adjacent pairs, as llama.cpp's converter does (the folder keeps transformers'
  NEOX layout): the file then runs with llama.cpp's llama graph.

``quantized_tensors`` is the same quantization in memory (no permutation, NEOX RoPE): loading the folder
that way and loading the written file give the same logits (to float rounding: the permutation reorders
the sums of q.k).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..arch.spec import ModelConfig, UnsupportedModelFeature, hf_rope_parameters
from ..quants import QTensor
from .hf_decoder import HFDecoderFolder, read_hf_decoder

QUANTIZE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")     # Ollama's --quantize values (any case)
ROWS_PER_PIECE = 4096                                          # rows dequantized + quantized at a time
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
# tokenizer.ggml.pre names written for each pre-tokenizer (llama.cpp's spelling), tried before the others
PREFERRED_PRE_NAMES = ("gpt-2", "llama-bpe", "qwen2", "smollm", "qwen35", "gpt-4o", "tekken", "deepseek-v3")


def quantize_type(name: str) -> str:
    """The ggml type name of a ``--quantize`` value (``q8_0`` -> ``Q8_0``); ValueError listing the choices."""
    ggml_type = str(name).strip().upper()
    if ggml_type not in QUANTIZE_TYPES:
        raise ValueError(f"unsupported quantization '{name}' (supported: "
                         f"{', '.join(t.lower() for t in QUANTIZE_TYPES)})")
    return ggml_type


# ------------------------------------------------------------------------------------------------ tensors

def stored_type(tensor: QTensor, ggml_type: str) -> str:
    """The type a tensor is written in: vectors F32, matrices ``ggml_type`` (F16 when a row is not whole blocks)."""
    if len(tensor.shape) < 2:
        return "F32"
    return ggml_type if tensor.cols % 32 == 0 else "F16"


def quantize_matrix(tensor: QTensor, ggml_type: str) -> np.ndarray:
    """A tensor in ``stored_type(tensor, ggml_type)``: float32 vector, float16 or ggml block bytes (rows, row_bytes).

    Quantized with ``gguf.quants.quantize`` (llama.cpp's reference rounding), ROWS_PER_PIECE rows at a time.
    """
    import gguf
    from ..quants.ref import dequantize

    kind = stored_type(tensor, ggml_type)
    if kind == "F32":
        return np.ascontiguousarray(dequantize(tensor), dtype=np.float32).reshape(tensor.shape)
    if kind == "F16":
        return np.asarray(dequantize(tensor), dtype=np.float32).reshape(tensor.shape).astype(np.float16)
    qtype = gguf.GGMLQuantizationType[kind]
    rows = tensor.rows
    out = np.empty(gguf.quants.quant_shape_to_byte_shape((rows, tensor.cols), qtype), dtype=np.uint8)
    for start in range(0, rows, ROWS_PER_PIECE):                # (piece, cols) float32 -> block bytes
        stop = min(start + ROWS_PER_PIECE, rows)
        piece = np.asarray(dequantize(tensor.row_slice(start, stop)), dtype=np.float32).reshape(stop - start, -1)
        out[start:stop] = gguf.quants.quantize(piece, qtype)
    return out


def quantized_tensors(tensors: dict[str, QTensor], ggml_type: str) -> dict[str, QTensor]:
    """Every tensor quantized in memory as ``write_gguf`` stores it (without llama's q/k row permutation)."""
    ggml_type = quantize_type(ggml_type)
    return {name: QTensor(name, stored_type(t, ggml_type), t.shape, quantize_matrix(t, ggml_type))
            for name, t in tensors.items()}


def adjacent_pair_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order that turns a NEOX-layout q or k matrix (each head: first halves, then second halves) into
    the adjacent-pairs layout of GGUF llama files: new row 2i + j of a head is old row j * head_dim/2 + i."""
    half = head_dim // 2
    within = np.arange(head_dim).reshape(2, half).T.reshape(-1)       # (head_dim,) 0, half, 1, half+1, ...
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def _file_tensors(folder: HFDecoderFolder) -> dict[str, QTensor]:
    """The folder's tensors as the file holds them: llama's q/k rows permuted; RoPE factor vectors added."""
    c = folder.config
    tensors = dict(folder.tensors)
    if c.architecture == "llama":
        if c.n_rot != c.head_dim:
            raise UnsupportedModelFeature("GGUF llama: RoPE on part of each head cannot be written")
        for i in range(c.n_layers):
            for name, heads in ((f"blk.{i}.attn_q.weight", c.n_heads), (f"blk.{i}.attn_k.weight", c.n_kv_heads)):
                t = tensors[name]
                rows = adjacent_pair_rows(heads, c.head_dim)
                tensors[name] = QTensor(name, t.ggml_type, t.shape, np.ascontiguousarray(t.data[rows]))
    rope = hf_rope_parameters(folder.hf_config)["full_attention"]
    if rope["rope_type"] == "llama3":
        tensors["rope_freqs.weight"] = QTensor.from_float("rope_freqs.weight", np.array(c.rope_freq_factors))
    if rope["rope_type"] in ("longrope", "su"):
        for kind, factors in (("short", c.rope_freq_factors), ("long", c.rope_freq_factors_long)):
            tensors[f"rope_factors_{kind}.weight"] = QTensor.from_float(f"rope_factors_{kind}.weight",
                                                                        np.array(factors))
    return tensors


# ----------------------------------------------------------------------------------------------- metadata

def _check_expressible(folder: HFDecoderFolder) -> None:
    """What a GGUF file of this architecture cannot say (llama.cpp derives it) is refused, not dropped."""
    c = folder.config
    if c.architecture in ("gemma2", "gemma3"):
        layers_of_27b = 46 if c.architecture == "gemma2" else 62
        query_scale = c.dim / c.n_heads if c.n_layers == layers_of_27b else c.head_dim
        if not np.isclose(c.attention_scale, query_scale ** -0.5, rtol=1e-6):
            raise UnsupportedModelFeature(
                f"GGUF {c.architecture}: query_pre_attn_scalar {folder.hf_config.get('query_pre_attn_scalar')} "
                f"cannot be stated (llama.cpp scales queries by 1/sqrt({query_scale:g}))")
    if c.architecture == "gemma3" and c.attention_softcap:
        raise UnsupportedModelFeature("GGUF gemma3: attention soft-capping cannot be stated")
    if c.architecture not in ("gemma2",) and c.attention_softcap:
        raise UnsupportedModelFeature(f"GGUF {c.architecture}: attention soft-capping cannot be stated")


def _add_hyperparameters(writer, folder: HFDecoderFolder) -> None:
    c: ModelConfig = folder.config
    arch = c.architecture
    writer.add_context_length(c.n_ctx_train)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_block_count(c.n_layers)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.n_rot)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    rope = hf_rope_parameters(folder.hf_config)["full_attention"]
    if rope["rope_type"] == "linear":
        import gguf
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if c.rope_freq_factors_long:                                   # LongRoPE
        writer.add_rope_scaling_orig_ctx_len(c.n_ctx_orig)
        writer.add_rope_scaling_attn_factors(c.rope_attention_factor)
    windows = c.layer_windows
    if windows:
        writer.add_sliding_window(max(windows))
        if len(set(windows)) > 1:                                  # one flag a layer (True: sliding)
            writer.add_sliding_window_pattern([bool(w) for w in windows])
        elif arch in ("gemma2", "gemma3"):                         # every layer slides (their default: some)
            writer.add_sliding_window_pattern(0)
    elif arch == "phi3":
        writer.add_sliding_window(0)
    if arch == "gemma3" and windows:
        writer.add_rope_freq_base_swa(min(c.theta(i) for i, w in enumerate(windows) if w))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attention_softcap)
    if arch in ("gemma2", "gemma3") and c.final_logit_softcap:
        writer.add_final_logit_softcapping(c.final_logit_softcap)


def pre_tokenizer_name(spec: dict) -> str:
    """The ``tokenizer.ggml.pre`` of a byte-level ``tokenizer.json``: the llama.cpp pre-tokenizer whose regexes
    are the ones the file splits with (``Split`` regexes, ByteLevel's own GPT-2 regex, individual digits)."""
    from ..tokenizer_build import _GPT2, _PRE_TYPES, PRE_TOKENIZERS

    node = spec.get("pre_tokenizer") or {}
    parts = node.get("pretokenizers") if node.get("type") == "Sequence" else [node]
    regexes = []
    for part in parts or []:
        kind = part.get("type")
        if kind == "Split" and isinstance(part.get("pattern"), dict) and "Regex" in part["pattern"]:
            regexes.append(part["pattern"]["Regex"])
        elif kind == "ByteLevel" and part.get("use_regex", True):
            regexes.append(_GPT2)
        elif kind == "Digits" and part.get("individual_digits"):
            regexes.append(r"\p{N}")
        elif kind != "ByteLevel":
            raise UnsupportedModelFeature(f"tokenizer.json: pre-tokenizer step '{kind}' has no GGUF equivalent")
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges", False))
    names = list(PREFERRED_PRE_NAMES) + [name for name in _PRE_TYPES if name not in PREFERRED_PRE_NAMES]
    for name in names:
        key, ignores, _ = _PRE_TYPES[name]
        if PRE_TOKENIZERS[key] == tuple(regexes) and ignores == ignore_merges:
            return name
    raise UnsupportedModelFeature("tokenizer.json: its pre-tokenizer regexes match none llama.cpp knows")


def _add_tokenizer(writer, folder: HFDecoderFolder) -> None:
    """``tokenizer.ggml.*`` of a byte-level BPE ``tokenizer.json`` (llama.cpp's ``gpt2`` model), padded with
    UNUSED ``[PAD<i>]`` tokens to the model's vocab_size as llama.cpp's converter pads it."""
    import json

    spec = json.loads((folder.path / "tokenizer.json").read_text(encoding="utf-8"))
    model_spec = spec.get("model") or {}
    tokenizer = folder.tokenizer
    hf = tokenizer.hf_tokenizer
    decoder_types = {d.get("type") for d in [spec.get("decoder") or {}] + list((spec.get("decoder") or {})
                                                                               .get("decoders") or [])}
    if model_spec.get("type") != "BPE" or "ByteLevel" not in decoder_types:
        raise UnsupportedModelFeature("writing a GGUF tokenizer is implemented for byte-level BPE tokenizer.json "
                                      "files (Llama 3, Qwen, Phi-4, SmolLM); this one is "
                                      f"{model_spec.get('type')} with decoders {sorted(map(str, decoder_types))}")
    n_tokens = hf.get_vocab_size(with_added_tokens=True)
    if n_tokens > folder.config.vocab_size:
        raise UnsupportedModelFeature(f"tokenizer.json has {n_tokens} tokens for {folder.config.vocab_size} "
                                      "embedding rows")
    added = {entry["id"]: entry for entry in spec.get("added_tokens") or []}
    tokens, types = [], []
    for token_id in range(folder.config.vocab_size):
        text = hf.id_to_token(token_id) if token_id < n_tokens else None
        if text is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(text)
            entry = added.get(token_id)
            types.append(TOKEN_NORMAL if entry is None else
                         TOKEN_CONTROL if entry.get("special") else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    prefix = hf.encode("", add_special_tokens=True).ids                # what the post-processor adds
    if prefix not in ([], [tokenizer.bos_id]):
        raise UnsupportedModelFeature(f"tokenizer.json's post-processor adds {prefix}: only a BOS can be stated")
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                             (writer.add_pad_token_id, tokenizer.pad_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(bool(prefix))
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def _add_sampling(writer, defaults: dict) -> None:
    for key, setter in (("temperature", writer.add_sampling_temp), ("top_p", writer.add_sampling_top_p),
                        ("top_k", writer.add_sampling_top_k), ("min_p", writer.add_sampling_min_p)):
        if key in defaults:
            setter(defaults[key])


# --------------------------------------------------------------------------------------------------- write

def write_gguf(source: str | Path | HFDecoderFolder, path: str | Path, quantize: str = "Q8_0",
               progress: Callable[[dict], None] | None = None, name: str | None = None, bar: bool = True) -> Path:
    """Write the decoder folder ``source`` as a GGUF file at ``path`` with matrices in ``quantize``.

    Checks everything (architecture, what the format can state, the tokenizer) before the first byte is
    written. Tensors are quantized and written one at a time (memory: one tensor); ``progress`` gets
    ``{"status", "total", "completed"}`` events (tensors done), ``bar`` shows a tqdm bar over the tensors.
    """
    import gguf
    from tqdm import tqdm

    ggml_type = quantize_type(quantize)
    folder = source if isinstance(source, HFDecoderFolder) else read_hf_decoder(source)
    _check_expressible(folder)
    tensors = _file_tensors(folder)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), folder.architecture)
    try:
        writer.add_name(name or folder.path.name)
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{ggml_type}"])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, folder)
        _add_tokenizer(writer, folder)
        _add_sampling(writer, folder.generation_defaults)
        for tensor_name, t in tensors.items():
            kind = stored_type(t, ggml_type)
            if kind in ("F32", "F16"):
                dtype = np.float32 if kind == "F32" else np.float16
                nbytes = t.rows * t.cols * np.dtype(dtype).itemsize
                writer.add_tensor_info(tensor_name, t.shape, np.dtype(dtype), nbytes)
            else:
                qtype = gguf.GGMLQuantizationType[kind]
                byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, qtype)
                writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        emit = progress or (lambda event: None)
        with tqdm(total=len(tensors), desc=f"quantizing to {ggml_type}", unit="tensor", disable=not bar) as shown:
            for done, (tensor_name, t) in enumerate(tensors.items(), 1):
                writer.write_tensor_data(quantize_matrix(t, ggml_type))
                shown.update(1)
                emit({"status": f"quantizing {folder.architecture} model to {ggml_type}", "total": len(tensors),
                      "completed": done})
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    writer.close()
    return path
