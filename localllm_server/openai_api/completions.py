"""POST /v1/completions: prompts as text, lists of text or token arrays; echo, logprobs, suffix (FIM)."""
from __future__ import annotations

import weakref

import falcon

from .. import formatting, schemas, streaming
from ..errors import APIError
from . import common

# Token texts of fill-in-the-middle markers, when the GGUF does not give their ids (llama.cpp's list).
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
}
_fim_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fim_token_ids(model) -> dict[str, int] | None:
    """``{"fim_pre", "fim_suf", "fim_mid"}`` ids of ``model``, or None if it has no FIM tokens.

    From ``tokenizer.ggml.fim_*_token_id`` (or the older ``prefix/suffix/middle_token_id``),
    else by the token texts llama.cpp recognises.
    """
    if model in _fim_cache:
        return _fim_cache[model]
    metadata = getattr(model, "metadata", None) or {}
    ids = {}
    for name, old in (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle")):
        value = metadata.get(f"tokenizer.ggml.{name}_token_id", metadata.get(f"tokenizer.ggml.{old}_token_id"))
        if value is not None:
            ids[name] = int(value)
    if len(ids) < 3:
        index = {text: i for i, text in enumerate(metadata.get("tokenizer.ggml.tokens") or [])}
        for name, texts in FIM_TEXTS.items():
            found = next((index[t] for t in texts if t in index), None)
            if name not in ids and found is not None:
                ids[name] = found
    result = ids if len(ids) == 3 else None
    _fim_cache[model] = result
    return result


def prompt_ids(model, prompt, suffix: str | None, param: str = "prompt") -> list[int]:
    """Token ids of one prompt; with ``suffix``, llama.cpp's fill-in-the-middle layout
    ``[BOS] <fim_pre> prefix <fim_suf> suffix <fim_mid>``."""
    vocab_size = model.config.vocab_size
    if suffix is None:
        ids = model.tokenize(prompt) if isinstance(prompt, str) else common.check_token_ids(prompt, vocab_size, param)
        if not ids:
            raise APIError(400, f"{param} is empty: there is nothing to continue", param=param)
        return ids
    fim = fim_token_ids(model)
    if fim is None:
        raise APIError(400, f"model '{model.name}' has no fill-in-the-middle tokens: `suffix` is not supported",
                       param="suffix")
    prefix = model.tokenize(prompt, add_bos=False) if isinstance(prompt, str) else \
        common.check_token_ids(prompt, vocab_size, param)
    ids = [fim["fim_pre"], *prefix, fim["fim_suf"], *model.tokenize(suffix, add_bos=False), fim["fim_mid"]]
    bos = model.tokenizer.bos_id
    return [bos, *ids] if model.tokenizer.add_bos and bos is not None else ids


class Completions:
    def __init__(self, engine, settings):
        self.engine = engine
        self.settings = settings

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = schemas.parse_completion(schemas.read_json(req, self.settings.max_body_bytes))
        entry, model = common.text_model(self.engine, request.model)
        params, num_ctx = model.make_params(**request.settings)
        many = len(request.prompts) > 1
        prompts = [prompt_ids(model, p, request.suffix, f"prompt[{i}]" if many else "prompt")
                   for i, p in enumerate(request.prompts)]
        submission = common.Submission(self.engine, entry, prompts, params, num_ctx, params.n,
                                       on_finish=common.metrics_hook(req, "completions"))
        header = formatting.ResponseHeader.new("cmpl", request.model)
        n_choices = len(prompts) * params.n
        events = submission.events(common.client_disconnected(req))
        if request.stream:
            chunks = formatting.completion_stream(header, streaming.prime(events), n_choices,
                                                  submission.prompt_tokens, request.include_usage, params.logprobs)
            common.respond_sse(resp, chunks, submission.cancel)
            return
        collector = formatting.Collector(n_choices)
        for index, event in events:
            collector.add(index, event)
        resp.media = formatting.text_completion(header, collector, submission.prompt_tokens, params.logprobs)
