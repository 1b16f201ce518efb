"""POST /v1/chat/completions."""
from __future__ import annotations

import falcon

from .. import formatting, schemas, streaming
from ..errors import APIError
from . import common


def response_constraint(response_format: dict | None):
    """The grammar constraint for ``response_format`` json_object / json_schema (None for text)."""
    if not response_format or response_format["type"] == "text":
        return None
    from localllm import constrain
    return constrain.from_response_format(response_format)


def check_supported(request: schemas.ChatRequest, model) -> None:
    """400 for features this server or this model cannot serve yet (never silently ignored)."""
    if request.tools:
        raise APIError(400, "tool calling is not supported yet: remove `tools`", param="tools")
    if request.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice needs `tools`, which are not supported yet", param="tool_choice")
    if request.n_images and "vision" not in getattr(model, "capabilities", ()):
        raise APIError(400, f"model '{request.model}' does not support images", param="messages")


class ChatCompletions:
    def __init__(self, engine, settings):
        self.engine = engine
        self.settings = settings

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = schemas.parse_chat(schemas.read_json(req, self.settings.max_body_bytes))
        entry, model = common.text_model(self.engine, request.model)
        check_supported(request, model)
        params, num_ctx = model.make_params(**request.settings,
                                            constraint=response_constraint(request.response_format))
        prompt_ids = model.tokenize(model.render_chat(request.messages, add_generation_prompt=True))
        submission = common.Submission(self.engine, entry, [prompt_ids], params, num_ctx, params.n,
                                       on_finish=common.metrics_hook(req, "chat"))
        header = formatting.ResponseHeader.new("chatcmpl", request.model)
        events = submission.events(common.client_disconnected(req))
        if request.stream:
            chunks = formatting.chat_stream(header, streaming.prime(events), params.n, submission.prompt_tokens,
                                            request.include_usage)
            common.respond_sse(resp, chunks, submission.cancel)
            return
        collector = formatting.Collector(params.n)
        for index, event in events:
            collector.add(index, event)
        resp.media = formatting.chat_completion(header, collector, submission.prompt_tokens, params.logprobs)
