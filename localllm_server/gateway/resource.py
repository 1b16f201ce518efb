"""The one Falcon hook: POST /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/responses go
through the gateway when one is configured.

:class:`GatewayDispatch` stands in front of the route's local resource. It reads the body once (the local
resource finds it on ``req.context``), lets :meth:`Gateway.run` pick and try the members, and calls the local
resource for a local member. It only translates: the answer's ``model`` is the member that gave it, also in
the ``X-Localllm-Model`` header (set before a stream's first event); ``X-Localllm-Cache: hit|miss`` when the
request could be cached; tokens and cost per route and model, and cache hits, go to ``/metrics``.
With budgets in the config, the request's key (:func:`api_key_of`) is checked against its budget before
anything is answered (:meth:`GatewayDispatch.admit`: 429 ``insufficient_quota`` with ``Retry-After`` when it is
spent) and every answer's tokens and cost are charged to it.
``anthropic_api.messages.GatewayMessages`` reuses it for /v1/messages (translating around :meth:`Gateway.run`).
"""
from __future__ import annotations

from typing import Callable

import falcon

from ..streaming import respond_stream
from .budgets import BudgetSpent
from .routing import Answer, Gateway, LocalAnswer

# charge(tokens, cost): one answer's prompt + completion tokens and cost, to the request's budget
Charge = Callable[[int, float], None]

MODEL_HEADER = "X-Localllm-Model"
CACHE_HEADER = "X-Localllm-Cache"


class GatewayDispatch:
    """POST ``/v1<path>`` through ``gateway``, with ``local`` (the route's own resource) for local members."""

    def __init__(self, local, gateway: Gateway, path: str):
        self.local = local
        self.gateway = gateway
        self.path = path                  # "/chat/completions", as appended to an upstream's base_url

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = self.local.body(req)
        if not isinstance(body.get("model"), str):              # the local schema names the mistake
            req.context.json_body = body
            self.local.on_post(req, resp)
            return
        charge = self.admit(req, resp)
        answer = self.gateway.run(self.path, body, self.local_caller(req, resp), record=recorder(req, charge))
        self.respond(req, resp, body["model"], answer)

    def admit(self, req: falcon.Request, resp: falcon.Response) -> Charge | None:
        """Check the budget of the request's key: a :class:`~.budgets.BudgetSpent` (429, with ``Retry-After``)
        when it is spent, else its ``charge`` (None when the key has no budget)."""
        budgets = self.gateway.budgets
        budget = budgets.match(api_key_of(req)) if budgets else None
        if budget is None:
            return None
        try:
            budgets.check(budget)
        except BudgetSpent as exc:
            resp.set_header("Retry-After", str(exc.retry_after))
            raise
        return lambda tokens, cost: budgets.charge(budget, tokens, cost)

    def local_caller(self, req: falcon.Request, resp: falcon.Response):
        """``call_local(model, sent)``: the local resource on ``sent``, its answer taken off ``resp``."""
        def call_local(model: str, sent: dict) -> LocalAnswer:
            req.context.json_body = sent
            self.local.on_post(req, resp)
            if resp.stream is not None:
                chunks, resp.stream = resp.stream, None
                return LocalAnswer(chunks=chunks, close=getattr(chunks, "close", None))
            media, resp.media = resp.media, None
            return LocalAnswer(body=media)
        return call_local

    @staticmethod
    def respond(req: falcon.Request, resp: falcon.Response, asked: str, answer: Answer) -> None:
        """``answer`` onto ``resp``: who answered (header), cache hit or miss, the body or the stream."""
        metrics = getattr(req.context, "metrics", None)
        if answer.cache == "hit" and hasattr(metrics, "add_cache_hit"):
            metrics.add_cache_hit(asked, answer.model)
        resp.set_header(MODEL_HEADER, answer.model)
        if answer.cache is not None:
            resp.set_header(CACHE_HEADER, answer.cache)
        resp.status = answer.status
        if answer.stream is not None:
            respond_stream(resp, answer.stream, answer.close, answer.content_type)
        else:
            resp.content_type = answer.content_type
            resp.data = answer.body


def api_key_of(req: falcon.Request) -> str | None:
    """The API key a request sends: its ``Authorization: Bearer`` token, else its ``x-api-key`` (what the
    Anthropic SDK sends), as the server's own key check reads them; None without either."""
    scheme, _, token = (req.get_header("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return req.get_header("X-Api-Key") or None


def recorder(req: falcon.Request, charge: Charge | None = None):
    """``record(route, model, prompt_tokens, completion_tokens, cost)`` into the app's metrics (if kept) and
    the request's budget (``charge``, if it has one)."""
    add_usage = getattr(getattr(req.context, "metrics", None), "add_usage", None)
    if add_usage is None and charge is None:
        return None

    def record(route: str, model: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        if add_usage is not None:
            add_usage(route, model, prompt_tokens, completion_tokens, cost)
        if charge is not None:
            charge(prompt_tokens + completion_tokens, cost)
    return record
