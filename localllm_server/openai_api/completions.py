"""POST /v1/completions: prompts as text, lists of text or token arrays; echo, logprobs, suffix (FIM)."""
from __future__ import annotations

import falcon

from .. import formatting, schemas, streaming
from ..body import Resource
from ..errors import APIError
from . import common

def fim_token_ids(model) -> dict[str, int] | None:
    """``{"fim_pre", "fim_suf", "fim_mid"}`` ids of ``model``, or None if it has no FIM tokens."""
    return getattr(model.tokenizer, "fim_ids", None)


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


class Completions(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = schemas.parse_completion(self.body(req))
        entry, model = common.text_model(self.engine, request.model)
        params, num_ctx = model.make_params(**request.settings)
        many = len(request.prompts) > 1
        prompts = [prompt_ids(model, p, request.suffix, f"prompt[{i}]" if many else "prompt")
                   for i, p in enumerate(request.prompts)]
        submission = common.Submission(self.engine, entry, prompts, params, num_ctx, params.n,
                                       on_finish=common.metrics_hook(req, "completions"),
                                       timeout=req.context.request_timeout)
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
