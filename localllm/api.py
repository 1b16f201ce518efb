"""The public library API: ``load`` a model by name or path and use its handle.

>>> import localllm
>>> model = localllm.load("smollm2:135m")
>>> model.chat([{"role": "user", "content": "Why is the sky blue?"}], max_tokens=64)
"""
from __future__ import annotations

import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .chat_template import ChatTemplate, ChatTemplateError, MissingChatTemplate
from .formats.gguf import read_gguf
from .formats.resident import resident_by_default
from .generate import GenerationEvent, GenerationParams, GenerationResult, generate, stream_generate
from . import arch, reasoning
from .sampling import SamplingParams
from .tokenizer import Tokenizer

DEFAULT_NUM_CTX = 4096
SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))
GENERATION_KEYS = ("max_tokens", "stop", "stop_token_ids", "logprobs", "top_logprobs", "echo", "n", "constraint",
                   "context_shift", "num_keep")
# Ollama option names that map onto the keys above
OPTION_ALIASES = {"num_predict": "max_tokens"}


def resolve(name_or_path, store=None):
    """(path, store entry or None) for a model name, a store entry, or a path to a .gguf file / HF folder."""
    from .store import ModelEntry, ModelStore

    if isinstance(name_or_path, ModelEntry):
        return name_or_path.path, name_or_path
    candidate = Path(str(name_or_path)).expanduser()
    if str(name_or_path).endswith(".gguf") or candidate.is_dir() or candidate.is_file():
        if not candidate.exists():
            raise FileNotFoundError(f"no model file at {candidate}")
        return candidate, None
    entry = (store or ModelStore()).get(str(name_or_path))
    return entry.path, entry


def load(name_or_path, *, num_ctx: int | None = None, backend: str = "auto", n_slots: int = 1, store=None,
         projector=None):
    """Load a model by store name (``"smollm2:135m"``), store entry, ``.gguf`` path or HF folder.

    Returns a :class:`Model` for text generation, or an
    :class:`~localllm.embeddings.EmbeddingModel` for encoders (BERT family).
    ``projector``: a vision encoder for the model (llama.cpp's ``mmproj`` GGUF or a Hugging Face
    folder with a ``vision_config``), so that chats may hold images; a store model made from a
    Modelfile with two ``FROM`` lines brings its own, and so does a Hugging Face vision-language
    folder (Gemma 3, LLaVA): its language model is loaded with the vision encoder beside it.
    """
    path, entry = resolve(name_or_path, store)
    name = entry.name if entry else str(name_or_path)
    projector = projector or (getattr(entry, "projector", None) if entry else None)
    if projector is None and path.is_dir():
        from .formats import hf_decoder
        if hf_decoder.is_vision_language_config(hf_decoder.read_config(path)):
            projector = path
    model = _load(path, entry, name, num_ctx, backend, n_slots)
    if projector is not None:
        if not isinstance(model, Model):
            raise TypeError(f"model '{name}' is an embedding model: a vision projector cannot be attached to it")
        from .vision import VisionEncoder
        projector = Path(projector)
        model.attach_vision(VisionEncoder.from_hf(projector) if projector.is_dir()
                            else VisionEncoder.from_mmproj(projector))
    return model


def _load(path: Path, entry, name: str, num_ctx, backend: str, n_slots: int):
    if path.is_dir():
        from .formats import hf_decoder
        if hf_decoder.is_encoder_config(hf_decoder.read_config(path)):
            from .embeddings import load_embedding_model
            return load_embedding_model(path, name=name, backend=backend)
        from .models.decoder import DecoderModel
        folder = hf_decoder.read_hf_decoder(path)    # UnsupportedArchitecture names the known ones
        network = DecoderModel(folder.config, folder.tensors, backend=backend, source=str(path))
        return Model(name, path, folder.metadata, network, entry=entry, num_ctx=num_ctx, n_slots=n_slots,
                     tokenizer=folder.tokenizer, defaults=folder.generation_defaults)
    gguf_file = read_gguf(path, resident=resident_by_default())   # weights in huge pages where the kernel has them
    if gguf_file.architecture in arch.ENCODER_ARCHITECTURES:
        from .embeddings import load_embedding_model
        return load_embedding_model(path, name=name, backend=backend)
    from .models.decoder import DecoderModel
    network = DecoderModel.from_gguf(gguf_file, backend=backend)   # UnsupportedArchitecture names the known ones
    return Model(name, path, gguf_file.metadata, network, entry=entry, num_ctx=num_ctx, n_slots=n_slots)


class Model:
    """A loaded text-generation model: tokenizer, chat template, weights, KV cache and defaults.

    Generation methods take the request's settings as keyword arguments
    (``max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
    repeat_last_n, frequency_penalty, presence_penalty, logit_bias, seed, stop,
    stop_token_ids, logprobs, top_logprobs, n, echo, num_ctx``; Ollama's
    ``num_predict`` is accepted for ``max_tokens``). Unset ones come from the
    model's defaults (its Modelfile ``PARAMETER`` lines), then the library's.
    """

    capabilities = ("completion",)

    def __init__(self, name: str, path: Path, metadata: dict, network, entry=None,
                 num_ctx: int | None = None, n_slots: int = 1, tokenizer: Tokenizer | None = None,
                 defaults: dict | None = None):
        self.name = name
        self.path = Path(path)
        self.metadata = metadata
        self.network = network
        self.config = network.config
        self.entry = entry
        self.tokenizer = tokenizer or Tokenizer.from_gguf_metadata(metadata)   # (HF folders bring theirs)
        template = ((entry.template if entry and entry.template else None) or metadata.get("tokenizer.chat_template")
                    or arch.default_chat_template(self.config.architecture))
        self.has_chat_template = template is not None
        try:
            self.template = (ChatTemplate(template, self.tokenizer.bos_token, self.tokenizer.eos_token)
                             if template is not None else MissingChatTemplate())
        except ChatTemplateError as exc:     # a broken template fails chat (a 400), not the model's raw completion
            self.template = MissingChatTemplate(f"the model's chat template cannot be used: {exc}")
        # what /api/show lists for a store entry, for this model: tools and thinking as its template has them
        from .reasoning import thinking_support
        self.capabilities = ("completion",) + (("tools",) if "tools" in (template or "") else ()) + \
            (("insert",) if getattr(self.tokenizer, "fim_ids", None) else ()) + \
            (("thinking",) if thinking_support(template) is not None else ())
        self.vision = None          # vision.prompt.ImageEmbedder once attach_vision gave the model an encoder
        self.system = entry.system if entry else None
        self.defaults: dict[str, Any] = dict(defaults or {})       # the folder's generation_config.json, then
        self.defaults.update(entry.parameters if entry and entry.parameters else {})   # the Modelfile's PARAMETERs
        self.n_slots = n_slots
        self._lock = threading.RLock()
        self.n_ctx = 0
        self.cache = None
        self.set_context(num_ctx or self.defaults.get("num_ctx") or min(self.config.n_ctx_train, DEFAULT_NUM_CTX))

    def __repr__(self) -> str:
        return f"Model({self.name!r}, n_ctx={self.n_ctx}, architecture={self.config.architecture!r})"

    # -- vision ------------------------------------------------------------------------------------------
    def attach_vision(self, encoder) -> None:
        """Let chats hold images: ``encoder`` (a ``vision.VisionEncoder``) turns each into soft tokens."""
        from .vision.loading import VisionModelError
        from .vision.prompt import WRAPPING, ImageEmbedder
        if encoder.n_embd_text != self.config.dim:
            raise VisionModelError(f"the vision projector {encoder.source or ''} makes embeddings of width "
                                   f"{encoder.n_embd_text}, but model '{self.name}' is {self.config.dim} wide: "
                                   "they do not belong together", encoder.source or self.name)
        for text in (WRAPPING[encoder.projector].before, WRAPPING[encoder.projector].after):
            special = text.strip()
            if special and len(self.tokenizer.encode(special, add_bos=False)) != 1:
                raise VisionModelError(f"model '{self.name}' has no {special} token, which {encoder.projector} "
                                       "images are wrapped in", encoder.source or self.name)
        with self._lock:
            self.vision = ImageEmbedder(encoder)
            self.network.max_image_tokens = encoder.n_image_tokens
            self.cache = None                              # its rings must hold a whole image: made anew
            self.set_context(self.n_ctx, self.n_slots)
        if "vision" not in self.capabilities:               # Ollama's order: ..., insert, vision, thinking
            rest = tuple(c for c in self.capabilities if c != "thinking")
            self.capabilities = rest + ("vision",) + (("thinking",) if "thinking" in self.capabilities else ())

    def images_in(self, messages: list[dict]) -> tuple[list[dict], dict]:
        """(messages with each image replaced by a marker text part, {digest: embeddings}) for a chat.

        Images come as content parts (``{"type": "image", "image": bytes | path | PIL image}``,
        OpenAI's ``image_url`` with a ``data:`` URI, ``input_image``) or Ollama's ``images`` list on a
        message. Pass the embeddings to ``tokenize(prompt, images=...)``. Raises ``NoVisionError`` for
        a model without a vision encoder, ``ImageInputError`` naming the message and part of a bad image.
        """
        from .vision.prompt import NoVisionError, collect_images, has_images, place_markers
        if not has_images(messages):
            return messages, {}
        if self.vision is None:
            raise NoVisionError(f"model '{self.name}' has no vision: it cannot read images (load it with a "
                                "vision projector, e.g. a Modelfile with a second FROM naming an mmproj file)")
        messages, pending = collect_images(messages)
        digests, table = self.vision.embed_all(pending)
        return place_markers(messages, digests), table

    # -- context -----------------------------------------------------------------------------------------
    def set_context(self, num_ctx: int, n_slots: int | None = None) -> None:
        """Resize the context window and/or the number of sequence slots (reallocates the KV cache)."""
        if not isinstance(num_ctx, int) or num_ctx < 1:
            raise ValueError("num_ctx must be a positive integer")
        if num_ctx > self.config.n_ctx_train:
            raise ValueError(f"num_ctx {num_ctx} is larger than the model's training context "
                             f"{self.config.n_ctx_train}")
        with self._lock:
            n_slots = n_slots or self.n_slots
            if num_ctx != self.n_ctx or n_slots != self.n_slots or self.cache is None:
                self.cache = self.network.new_cache(n_slots, num_ctx)
                self.n_ctx, self.n_slots = num_ctx, n_slots

    def _fit(self, params: GenerationParams, num_ctx: int) -> None:
        """Library calls: make the cache fit this request (context size, n choices)."""
        if num_ctx != self.n_ctx or params.n > self.n_slots:
            self.set_context(num_ctx, max(self.n_slots, params.n))

    # -- text <-> tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True,
                 images: dict | None = None) -> list[int]:
        """Token ids of ``text`` (BOS only if the model asks for it, special tokens parsed).

        A text that already starts with the BOS token (a chat template wrote it)
        gets no second one. ``images`` (from ``images_in``): the markers of those images in
        ``text`` become their positions (a ``vision.prompt.PromptTokens``).
        """
        if images:
            from .vision.prompt import tokenize_with_images
            return tokenize_with_images(text, images, self.vision.wrapping,
                                        lambda piece, first: self.tokenize(piece, add_bos if first else False,
                                                                           parse_special))
        bos = self.tokenizer.bos_token
        if add_bos is None and bos and parse_special and text.startswith(bos):
            add_bos = False
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None, **extra) -> str:
        """The prompt text the model's chat template makes of ``messages``."""
        if self.system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}] + list(messages)
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra)

    # -- settings ----------------------------------------------------------------------------------------
    def make_params(self, **settings) -> tuple[GenerationParams, int]:
        """GenerationParams from keyword settings over the model's defaults; also the context size to use."""
        merged = {OPTION_ALIASES.get(k, k): v for k, v in self.defaults.items()}
        for key, value in settings.items():
            if value is not None:
                merged[OPTION_ALIASES.get(key, key)] = value
        num_ctx = merged.pop("num_ctx", None) or self.n_ctx
        unknown = set(merged) - set(SAMPLING_KEYS) - set(GENERATION_KEYS)
        if unknown:
            raise ValueError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        sampling = SamplingParams.from_options(**{k: merged[k] for k in SAMPLING_KEYS if k in merged})
        sampling.validate(self.config.vocab_size)
        stop = merged.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        max_tokens = merged.get("max_tokens")
        if max_tokens is not None and max_tokens < 0:      # Ollama: num_predict -1 = unlimited
            max_tokens = None
        params = GenerationParams(
            sampling=sampling, max_tokens=max_tokens, stop=list(stop),
            stop_token_ids=list(merged.get("stop_token_ids") or []),
            logprobs=bool(merged.get("logprobs", False)), top_logprobs=int(merged.get("top_logprobs") or 0),
            echo=bool(merged.get("echo", False)), n=int(merged.get("n", 1)), constraint=merged.get("constraint"),
            context_shift=bool(merged.get("context_shift", False)))
        if merged.get("num_keep") is not None:
            params.num_keep = merged["num_keep"]
        params.validate()
        return params, int(num_ctx)

    def _prompt_ids(self, prompt) -> list[int]:
        """Token ids of a prompt given as text or ids (a ``PromptTokens`` from ``tokenize(..., images=)`` keeps
        its image positions, which are negative)."""
        from .vision.prompt import PromptTokens
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        ids = [int(t) for t in prompt]
        images = isinstance(prompt, PromptTokens)
        if any((t < 0 and not images) or t >= self.config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        return prompt if images else ids

    # -- generation --------------------------------------------------------------------------------------
    def stream(self, prompt, details: bool = False, **settings) -> Iterator[str] | Iterator[GenerationEvent]:
        """Yield the completion of ``prompt`` (text or token ids) as it is generated.

        Plain text pieces by default; :class:`~localllm.generate.GenerationEvent`
        objects (text, token ids, logprobs, finish_reason, usage) with ``details=True``.
        """
        params, num_ctx = self.make_params(**settings)
        ids = self._prompt_ids(prompt)
        return self._stream(ids, params, num_ctx, details)

    def _stream(self, ids, params, num_ctx, details):
        with self._lock:
            self._fit(params, num_ctx)
            for event in stream_generate(self.network, self.cache, self.tokenizer, ids, params, self.n_ctx):
                if details:
                    yield event
                elif event.text:
                    yield event.text

    def generate(self, prompt, details: bool = False, **settings) -> str | GenerationResult:
        """The completion of ``prompt`` (text or token ids): a string, or a GenerationResult with ``details=True``."""
        params, num_ctx = self.make_params(**settings)
        ids = self._prompt_ids(prompt)
        with self._lock:
            self._fit(params, num_ctx)
            result = generate(self.network, self.cache, self.tokenizer, ids, params, self.n_ctx)
        return result if details else result.text

    def chat(self, messages: list[dict], stream: bool = False, details: bool = False, tools=None,
             tool_choice=None, think=None, **settings):
        """Reply to a conversation (rendered with the model's chat template).

        Returns the reply text (or a GenerationResult with ``details=True``), or
        with ``stream=True`` an iterator of text pieces (or events).
        ``tools`` (OpenAI function tools) and ``tool_choice`` ("auto", "none",
        "required" or a function name; forced calls go through a grammar):
        with ``details=True`` each choice's ``tool_calls`` holds the parsed calls
        and its ``text`` the content outside them.
        ``think`` (reasoning models, see :mod:`localllm.reasoning`): None for the model's
        default, True/False, or an effort "low"/"medium"/"high" ("none" = False). The thought
        is kept out of the reply text: it is in ``result.thinking`` / each choice's
        ``thinking`` (``details=True``) and in the events' ``thinking`` when streaming; a
        ``constraint`` or forced tool call applies to the answer after the thought.
        """
        thinking = reasoning.thinking_request(self.template, think)
        constraint = settings.pop("constraint", None)
        messages, images = self.images_in(messages)
        plan = None
        if tools:
            from .tools import prepare_chat
            plan = prepare_chat(self, messages, tools=tools, tool_choice=tool_choice, constraint=constraint,
                                **thinking.template_extra)
            prompt, constraint = plan.prompt, plan.constraint
        else:
            prompt = self.render_chat(messages, add_generation_prompt=True, **thinking.template_extra)
        prompt, params_reasoning = thinking.finish(prompt)
        params, num_ctx = self.make_params(constraint=constraint, **settings)
        params.reasoning = params_reasoning
        ids = self.tokenize(prompt, images=images)
        if stream:
            return self._stream(ids, params, num_ctx, details)
        with self._lock:
            self._fit(params, num_ctx)
            result = generate(self.network, self.cache, self.tokenizer, ids, params, self.n_ctx)
        if plan is not None and plan.parses_tool_calls:
            for choice in result.choices:
                choice.text, choice.tool_calls = plan.parse(choice.text)
                choice.finish_reason = plan.finish_reason(choice.finish_reason, choice.tool_calls)
        return result if details else result.text

    def logits(self, ids) -> np.ndarray:
        """Raw next-token logits at every position of ``ids`` (vocab_size columns); uses a scratch cache."""
        from .vision.prompt import image_rows
        ids = self._prompt_ids(ids)
        images = image_rows(ids)                          # a prompt with images (tokenize(..., images=))
        cache = self.network.new_cache(1, len(ids))
        return self.network.forward(np.array(ids), np.arange(len(ids)), np.zeros(len(ids), dtype=np.int64), cache,
                                    images=images)

    def embed(self, texts, **_):
        raise TypeError(f"model '{self.name}' is a text-generation model and cannot embed; "
                        "load an embedding model such as 'all-minilm'")
