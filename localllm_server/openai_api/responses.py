"""POST /v1/responses: the OpenAI Responses API, served statelessly as a chat completion.

``schemas_responses`` turns the body into the chat request it means (instructions,
input items, function tools, tool_choice, text.format); generation is the chat route's
(:func:`chat.prepare`: tools rendered, calls forced or parsed, JSON constrained, ``reasoning.effort``
as the chat's ``reasoning_effort``); the thought of a reasoning model is a ``reasoning`` output item;
``formatting`` shapes the ``response`` object and, streamed, the named SSE events
(``event: response.created`` ... ``event: response.completed``; no ``[DONE]``).
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

import falcon

from .. import formatting, schemas, schemas_responses, streaming
from ..body import Resource
from ..errors import to_api_error
from . import chat, common


def named_sse_body(events: Iterable[dict]) -> Iterator[bytes]:
    """Responses API framing: ``event: <type>\\ndata: <json>\\n\\n`` per event.

    An error after the first event becomes an ``error`` event (``code``, ``message``,
    ``param``), the Responses API's in-band error.
    """
    sequence = 0
    try:
        for event in events:
            sequence = event["sequence_number"] + 1
            yield _named_event(event)
    except Exception as exc:                  # the status line is gone: report the error in the stream
        error = to_api_error(exc, prompt_param="input")
        yield _named_event({"type": "error", "sequence_number": sequence, "code": error.code,
                            "message": error.message, "param": error.param})


def _named_event(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode("utf-8")


class Responses(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = schemas_responses.parse_responses(self.body(req))
        entry, model = common.text_model(self.engine, request.model)
        prepared = chat.prepare(model, request.chat, self.settings, param="input")
        submission = common.Submission(self.engine, entry, [prepared.prompt_ids], prepared.params,
                                       prepared.num_ctx, 1, on_finish=common.metrics_hook(req, "responses"),
                                       timeout=req.context.request_timeout)
        header = formatting.ResponseHeader.new("resp", request.model)
        fields = formatting.response_fields(request, prepared.params)
        events = submission.events(common.client_disconnected(req))
        if request.chat.stream:
            stream = formatting.ResponseStream(header, fields, prepared.make_parser)
            body = named_sse_body(stream.events(streaming.prime(events), submission.prompt_tokens))
            streaming.respond_stream(resp, body, submission.cancel)
            return
        collector = formatting.Collector(1)
        for index, event in events:
            collector.add(index, event)
        [choice] = collector.choices
        output = formatting.response_output("".join(choice.text), choice.finish_reason, prepared.make_parser,
                                            thinking="".join(choice.thinking))
        resp.media = formatting.response_object(
            header, fields, formatting.item_status(choice.finish_reason), output,
            formatting.response_usage(submission.prompt_tokens, collector.completion_tokens, collector.cached_tokens,
                                      collector.reasoning_tokens))
