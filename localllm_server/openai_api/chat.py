"""POST /v1/chat/completions: a conversation, tools and output formats -> a chat completion.

Tools (``localllm.tools``): the functions are rendered into the prompt by the model's
chat template when it knows ``tools``, else in the default Hermes block; earlier
assistant ``tool_calls`` and ``tool`` results are rendered the same way. ``tool_choice``:

* ``none``: no tools in the prompt, no parsing (earlier calls and results still render);
* ``auto`` (the default with tools): the calls the model writes are parsed out of its text;
* ``required``: one call to one of the tools is forced by a grammar (several with
  ``parallel_tool_calls: true``), its arguments constrained by that tool's parameters schema;
* a named function: a call to that function is forced the same way.

Calls come back as ``message.tool_calls`` (``arguments`` a JSON string) with
``finish_reason: "tool_calls"``; streamed, as ``delta.tool_calls`` fragments (name first,
then the argument text). ``response_format`` json_object / json_schema constrain the
answer to JSON; combined with tools they are refused (400) unless tool_choice is "none".
:func:`prepare` is shared with /v1/responses.

Reasoning models (``localllm.reasoning``): ``reasoning_effort`` "none" turns thinking off (the
template's ``enable_thinking`` switch, or a closed empty thought in the prompt), other values
turn it on; absent, the model's default (it thinks). The thought comes back apart from the
answer as ``message.reasoning_content`` and ``message.reasoning`` (streamed: the same fields
of ``delta``), counted in ``usage.completion_tokens_details.reasoning_tokens``; JSON formats
and forced calls constrain the answer after the thought. ``reasoning_effort`` on a model that
does not think is accepted and has no effect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import falcon

from .. import formatting, schemas, streaming
from ..body import Resource
from ..errors import APIError
from ..images import chat_images, tokenize
from . import common


def response_constraint(response_format: dict | None):
    """The grammar constraint for ``response_format`` json_object / json_schema (None for text)."""
    if not response_format or response_format["type"] == "text":
        return None
    from localllm import constrain
    return constrain.from_response_format(response_format)


def uses_tools(request: schemas.ChatRequest) -> bool:
    """Does rendering need the tools machinery (tools offered, or earlier calls and results)?"""
    return bool(request.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in request.messages)


@dataclass
class Prepared:
    """A chat request made ready for the engine on one model."""

    prompt_ids: list[int]
    params: object                       # localllm.generate.GenerationParams (``reasoning``: the thought is parsed)
    num_ctx: int
    make_parser: Callable | None         # a fresh tool-call parser per choice (None: the text goes out as it is)


def thinking(model, effort: str | None):
    """The request's ``localllm.reasoning.ThinkingRequest`` (a model that does not think ignores the effort)."""
    from localllm import reasoning

    try:
        return reasoning.thinking_request(getattr(model, "template", None), effort, param="reasoning_effort")
    except reasoning.ThinkingNotSupported:
        return reasoning.ThinkingRequest(None, None)


def prepare(model, request: schemas.ChatRequest, settings=None, param: str = "messages") -> Prepared:
    """Prompt, generation parameters and tool-call parsing of ``request`` on ``model``.

    With tools (or earlier calls and results) the library's ``tools.prepare_chat`` renders the
    prompt and builds the forced-call grammar; otherwise the plain chat template is used.
    Images (``image_url`` parts: data: URIs, or http(s) URLs fetched under the server's limits,
    ``settings``) go in as the model's soft tokens (``localllm_server.images``); ``param`` names the
    request's field in errors.
    """
    messages, images = chat_images(model, request.model, request.messages, settings, param)
    think = thinking(model, request.reasoning_effort)
    if not uses_tools(request):
        params, num_ctx = model.make_params(**request.settings,
                                            constraint=response_constraint(request.response_format))
        prompt, params.reasoning = think.finish(
            model.render_chat(messages, add_generation_prompt=True, **think.template_extra))
        return Prepared(tokenize(model, prompt, images), params, num_ctx, None)
    from localllm import constrain, tools as tooling
    choice = request.tool_choice
    if choice not in tooling.TOOL_CHOICES:                   # a function name
        choice = {"type": "function", "function": {"name": choice}}
    answer_format = response_constraint(request.response_format)     # tool_choice "none" only (schemas)
    try:
        plan = tooling.prepare_chat(model, messages, tools=request.tools, tool_choice=choice,
                                    parallel_tool_calls=request.parallel_tool_calls, constraint=answer_format,
                                    **think.template_extra)
    except constrain.UnsupportedSchema as exc:               # a tool's parameters: the field is `tools`
        raise APIError(400, str(exc), param="tools") from None
    params, num_ctx = model.make_params(**request.settings, constraint=plan.constraint)
    prompt, params.reasoning = think.finish(plan.prompt)
    return Prepared(tokenize(model, prompt, images), params, num_ctx,
                    plan.stream_parser if plan.parses_tool_calls else None)


class ChatCompletions(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = schemas.parse_chat(self.body(req))
        entry, model = common.text_model(self.engine, request.model)
        prepared = prepare(model, request, self.settings)
        params = prepared.params
        submission = common.Submission(self.engine, entry, [prepared.prompt_ids], params, prepared.num_ctx,
                                       params.n, on_finish=common.metrics_hook(req, "chat"),
                                       timeout=req.context.request_timeout)
        header = formatting.ResponseHeader.new("chatcmpl", request.model)
        events = submission.events(common.client_disconnected(req))
        if request.stream:
            chunks = formatting.chat_stream(header, streaming.prime(events), params.n, submission.prompt_tokens,
                                            request.include_usage, prepared.make_parser)
            common.respond_sse(resp, chunks, submission.cancel)
            return
        collector = formatting.Collector(params.n)
        for index, event in events:
            collector.add(index, event)
        resp.media = formatting.chat_completion(header, collector, submission.prompt_tokens, params.logprobs,
                                                prepared.make_parser)
