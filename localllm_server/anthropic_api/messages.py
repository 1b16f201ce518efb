"""POST /v1/messages (a message, or its server-sent events) and POST /v1/messages/count_tokens.

Parse (``request``) -> resolve the model (:func:`resolve_model`) -> the chat route's ``prepare``
(template, tools, forced calls, thinking) -> the engine -> Anthropic's shapes (``formatting``).
Streamed, every event is framed ``event: <type>\\ndata: <json>\\n\\n``; an error after the stream
began is an ``error`` event carrying the Anthropic error envelope. An error before it began
keeps its HTTP status (the first engine event is awaited before the answer starts).

With a gateway, a ``model`` naming a route or ``<upstream>/<model>`` goes through it instead
(:class:`GatewayMessages`): translated to a chat completion and back by ``openai_bridge``, except for an
Anthropic-format upstream, which gets the body as it is and whose answer is passed back as it is (model
renamed). The gateway's budgets apply to local models here too.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

import falcon

from .. import formatting as openai_formatting
from .. import schemas, streaming
from ..body import Resource
from ..errors import APIError, anthropic_body, bad_request, to_api_error
from ..gateway import upstream as upstream_calls
from ..gateway.resource import Charge, GatewayDispatch, recorder
from ..gateway.routing import AnthropicUsage
from ..openai_api import chat, common
from . import formatting, openai_bridge
from .request import parse_messages_request


COUNT_TOKENS_PATH = "/v1/messages/count_tokens"      # below an Anthropic-format upstream's base_url


def resolve_model(engine, name: str):
    """(store entry, loaded text model) for a request's ``model``: the one place the Anthropic routes turn a
    name into a model (404 not_found_error if unknown, 400 if it only embeds)."""
    return common.text_model(engine, name)


def fit_max_tokens(params, prompt_tokens: int, num_ctx: int) -> None:
    """Cap ``max_tokens`` at the room the context window leaves after the prompt.

    Anthropic clients must send ``max_tokens`` and size it for Claude (Claude Code asks for 32000), past the
    window of a small local model; as in Ollama's Anthropic layer, the answer then stops where the window ends
    (``stop_reason`` max_tokens) instead of the request being refused as the OpenAI routes refuse it. A prompt
    that does not fit the window alone is still a 400 (never truncated), which then names the prompt alone.
    """
    room = num_ctx - prompt_tokens
    if params.max_tokens is not None:
        params.max_tokens = min(params.max_tokens, room) if room > 0 else None


def sse_event(event: dict) -> bytes:
    """``event: <type>\\ndata: <json>\\n\\n``."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode("utf-8")


def sse_body(events: Iterable[dict]) -> Iterator[bytes]:
    """Frame ``events``; an exception after the first one becomes an ``error`` event (the status is sent)."""
    try:
        for event in events:
            yield sse_event(event)
    except Exception as exc:                  # the status line is gone: report the error in the stream
        yield sse_event(anthropic_body(to_api_error(exc)))


class Messages(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = parse_messages_request(self.body(req))
        entry, model = resolve_model(self.engine, request.model)
        prepared = chat.prepare(model, request.chat)
        fit_max_tokens(prepared.params, len(prepared.prompt_ids), prepared.num_ctx)
        submission = common.Submission(self.engine, entry, [prepared.prompt_ids], prepared.params,
                                       prepared.num_ctx, 1, on_finish=common.metrics_hook(req, "messages"),
                                       timeout=req.context.request_timeout)
        message_id = formatting.new_message_id()
        events = submission.events(common.client_disconnected(req))
        if request.chat.stream:
            stream = formatting.MessageStream(message_id, request.model, request.stop_sequences, model.detokenize,
                                              prepared.make_parser)
            body = sse_body(stream.events(streaming.prime(events), submission.prompt_tokens))
            streaming.respond_stream(resp, body, submission.cancel)
            return
        collector = openai_formatting.Collector(1)
        for index, event in events:
            collector.add(index, event)
        [choice] = collector.choices
        content, has_calls = formatting.content_blocks("".join(choice.text), "".join(choice.thinking),
                                                       prepared.make_parser)
        stop = formatting.matched_stop_sequence(model.detokenize(choice.token_ids), request.stop_sequences) \
            if choice.finish_reason == "stop" and request.stop_sequences else None
        resp.media = formatting.message_object(
            message_id, request.model, content, formatting.stop_reason(choice.finish_reason, has_calls, stop), stop,
            formatting.usage(submission.prompt_tokens, collector.completion_tokens, collector.cached_tokens))


class CountTokens(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = parse_messages_request(self.body(req), count_only=True)
        _, model = resolve_model(self.engine, request.model)
        resp.media = {"input_tokens": len(chat.prepare(model, request.chat).prompt_ids)}


# --------------------------------------------------------------------------- through the gateway

class GatewayMessages(GatewayDispatch):
    """POST /v1/messages with a gateway: a route or ``<upstream>/<model>`` goes through the gateway as a chat
    completion (``openai_bridge``), its answer translated back, but an Anthropic-format upstream gets the body
    itself and its answer is passed back (``Answer.format`` "anthropic"); a local model takes :class:`Messages`
    as without a gateway. ``chat_local`` is the local /v1/chat/completions resource (a route's local members).
    The request's budget is checked first and charged with every answer (local ones too)."""

    def __init__(self, local: Messages, chat_local, gateway):
        super().__init__(chat_local, gateway, "/chat/completions")
        self.messages = local

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = self.messages.body(req)
        charge = self.admit(req, resp)
        if not self.gateway.handles(body.get("model")):
            req.context.json_body = body
            self.messages.on_post(req, resp)
            if charge is not None:
                charge_local_message(resp, charge)
            return
        request = parse_messages_request(body)
        answer = self.gateway.run(self.path, openai_bridge.chat_body(body, request), self.local_caller(req, resp),
                                  record=recorder(req, charge), native=body)
        if answer.format == "anthropic":                    # an Anthropic upstream's own answer
            if answer.stream is None and answer.status < 400 and json.loads(answer.body).get("type") == "error":
                answer.status = 502                         # a 200 carrying an error
        elif answer.stream is not None:
            answer.stream = sse_body(openai_bridge.translate_stream(answer.stream, answer.model,
                                                                    request.stop_sequences))
            answer.content_type = streaming.SSE_CONTENT_TYPE
        else:
            payload = json.loads(answer.body) if answer.status < 400 else None
            if isinstance(payload, dict) and "error" not in payload:
                payload = openai_bridge.message_from_completion(payload, answer.model, request.stop_sequences)
            else:                                           # an error (an answer with an error body: a 502)
                answer.status = answer.status if answer.status >= 400 else 502
                payload = openai_bridge.error_from_openai(answer.status, answer.body)
            answer.body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.respond(req, resp, body["model"], answer)


def charge_local_message(resp: falcon.Response, charge: Charge) -> None:
    """Charge a local message's tokens to a budget: from its usage, or a stream's at its end (or close)."""
    if resp.stream is None:
        tokens = openai_bridge.chat_usage((resp.media or {}).get("usage"))
        charge(tokens["total_tokens"], 0.0)
        return
    original, usage = resp.stream, AnthropicUsage()

    def metered() -> Iterator[bytes]:
        try:
            for chunk in original:
                usage.read_chunk(chunk)
                yield chunk
        finally:
            charge(sum(usage.tokens or (0, 0)), 0.0)
    resp.stream = streaming.ClosingStream(metered(), on_close=original.close)


class FittedChatCompletions(chat.ChatCompletions):
    """The local /v1/chat/completions for a route's local members on /v1/messages: ``max_tokens`` capped at the
    room the window leaves after the prompt first (:func:`fit_max_tokens`), as the local /v1/messages does,
    so an Anthropic client's large ``max_tokens`` is not a context_length_exceeded that moves the route on."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = self.body(req)
        if isinstance(body.get("max_tokens"), int):
            _, model = resolve_model(self.engine, str(body.get("model")))
            prepared = chat.prepare(model, schemas.parse_chat(body))        # the prompt, to measure it
            room = prepared.num_ctx - len(prepared.prompt_ids)
            if 0 < room < body["max_tokens"]:
                body = dict(body, max_tokens=room)
        req.context.json_body = body
        super().on_post(req, resp)


class GatewayCountTokens(CountTokens):
    """count_tokens with a gateway: a route counts with its first member. A local one counts here; an
    Anthropic-format upstream is asked (its own /v1/messages/count_tokens, the body as sent, the model
    renamed); an OpenAI-format upstream is a 400: it has no such endpoint and its tokenizer is not known here."""

    def __init__(self, engine, settings, gateway):
        super().__init__(engine, settings)
        self.gateway = gateway

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = self.body(req)
        if self.gateway.handles(body.get("model")):
            first = self.gateway.resolve(body["model"]).members[0]
            if first.upstream is not None and first.upstream.is_anthropic:
                parse_messages_request(body, count_only=True)             # a bad body: the same 400 as locally
                self.ask_upstream(first, body, resp)
                return
            if not first.is_local:
                raise bad_request(f"count_tokens cannot count for '{first.name}': it is an OpenAI-format upstream "
                                  f"model and only local models' tokenizers are known here", "model")
            body = dict(body, model=first.model)
        req.context.json_body = body
        super().on_post(req, resp)

    def ask_upstream(self, member, body: dict, resp: falcon.Response) -> None:
        try:
            answer = upstream_calls.post(member.upstream, COUNT_TOKENS_PATH, dict(body, model=member.model), False)
            resp.media = answer.json()
        except upstream_calls.UpstreamFailure as exc:
            raise APIError(exc.status, self.gateway.scrub(exc.message), code=exc.code) from None
        except upstream_calls.UpstreamRejected as exc:                  # its own answer (key scrubbed)
            resp.status, resp.content_type, resp.data = exc.status, exc.content_type or falcon.MEDIA_JSON, exc.body
