"""Routes outside /v1 and /api: GET and HEAD /, /health, /tokenize, /detokenize, /openapi.json, /metrics."""
from __future__ import annotations

import falcon

from . import openapi, schemas
from .body import Resource
from .errors import APIError
from .openai_api.common import load_model


class Root:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "localllm is running"

    on_head = on_get


class Health(Resource):
    """``{"status": "ok"}``, or ``{"status": "warming up", "steps": [...]}`` while a model's kernels are being
    compiled on their first use (a fresh install: tens of seconds)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        steps = self.engine.warming_up()
        resp.media = {"status": "warming up", "steps": steps} if steps else {"status": "ok"}


class Tokenize(Resource):
    """``{model, prompt | messages}`` -> ``{tokens, count, max_model_len}``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = schemas.parse_tokenize(self.body(req))
        _, model = load_model(self.engine, request.model)
        if hasattr(model, "render_chat"):
            if request.messages is not None:
                text = model.render_chat(request.messages, add_generation_prompt=request.add_generation_prompt)
                tokens = model.tokenize(text)
            else:
                tokens = model.tokenize(request.prompt, add_bos=None if request.add_special_tokens else False)
            limit = model.n_ctx
        else:                                                 # an embedding model
            if request.messages is not None:
                raise APIError(400, f"model '{request.model}' has no chat template: send `prompt`",
                               param="messages")
            tokens = model.tokenizer.content_ids([request.prompt])[0]
            if request.add_special_tokens:
                tokens = model.tokenizer.with_specials(tokens)
            limit = model.max_seq_length
        resp.media = {"tokens": tokens, "count": len(tokens), "max_model_len": limit}


class Detokenize(Resource):
    """``{model, tokens}`` -> ``{prompt}``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        name, tokens = schemas.parse_detokenize(self.body(req))
        _, model = load_model(self.engine, name)
        vocab_size = model.tokenizer.vocab_size
        if any(t >= vocab_size for t in tokens):
            raise APIError(400, f"tokens must be below the vocabulary size {vocab_size}", param="tokens")
        if hasattr(model, "detokenize"):
            text = model.detokenize(tokens)
        else:
            text = model.tokenizer.tokenizer.decode(tokens)
        resp.media = {"prompt": text}


class OpenAPI:
    def __init__(self, app):
        self.app = app

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        from localllm import __version__
        resp.media = openapi.document(self.app, __version__)


class Metrics(Resource):
    """Prometheus text format: HTTP counters from the middleware, token counters, engine gauges."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        from .gateway import gateway_for
        gateway = gateway_for(self.settings)
        resp.text = render_metrics(req.context.metrics, self.engine) + (gateway.metrics_text() if gateway else "")


def _labels(**labels) -> str:
    def escape(value):
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def render_metrics(metrics, engine) -> str:
    lines = []

    def family(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    snapshot = metrics.snapshot()
    requests = sorted(snapshot["requests"].items())
    seconds = sorted(snapshot["response_seconds"].items())
    counts = snapshot["response_count"]
    prompt_tokens = sorted(snapshot["prompt_tokens"].items())
    completion_tokens = sorted(snapshot["completion_tokens"].items())
    in_flight = snapshot["in_flight"]
    family("localllm_http_requests_total", "counter", "HTTP requests answered",
           [(_labels(method=m, route=r, status=s), n) for (m, r, s), n in requests])
    lines.append("# HELP localllm_http_response_start_seconds time from request to response start")
    lines.append("# TYPE localllm_http_response_start_seconds summary")
    for (m, r), total in seconds:
        lines.append(f"localllm_http_response_start_seconds_sum{_labels(method=m, route=r)} {total:.6f}")
        lines.append(f"localllm_http_response_start_seconds_count{_labels(method=m, route=r)} {counts[(m, r)]}")
    family("localllm_http_requests_in_flight", "gauge", "requests being answered", [("", in_flight - 1)])
    family("localllm_prompt_tokens_total", "counter", "prompt tokens processed",
           [(_labels(api=k), v) for k, v in prompt_tokens])
    family("localllm_completion_tokens_total", "counter", "tokens generated",
           [(_labels(api=k), v) for k, v in completion_tokens])
    gateway = [("localllm_gateway_requests_total", "counter", "gateway answers", "gateway_requests"),
               ("localllm_gateway_prompt_tokens_total", "counter", "gateway prompt tokens", "gateway_prompt_tokens"),
               ("localllm_gateway_completion_tokens_total", "counter", "gateway completion tokens",
                "gateway_completion_tokens"),
               ("localllm_gateway_cache_hits_total", "counter", "gateway answers replayed from the cache",
                "gateway_cache_hits"),
               ("localllm_gateway_cost_total", "counter", "gateway cost from the configured prices per million tokens",
                "gateway_cost")]
    for name, kind, help_text, key in gateway:
        values = sorted(snapshot.get(key, {}).items())
        if values:
            family(name, kind, help_text + " per route (the model asked for) and model (the one that answered)",
                   [(_labels(route=r, model=m), f"{v:.6f}" if isinstance(v, float) else v) for (r, m), v in values])
    loaded = engine.loaded()
    family("localllm_models_loaded", "gauge", "models in memory", [("", len(loaded))])
    stats = sorted(engine.stats().items())
    family("localllm_requests_active", "gauge", "generation requests decoding",
           [(_labels(model=k), v["active"]) for k, v in stats])
    family("localllm_requests_pending", "gauge", "generation requests waiting for a slot",
           [(_labels(model=k), v["pending"]) for k, v in stats])
    return "\n".join(lines) + "\n"


def register(app, engine, settings) -> None:
    app.add_route("/", Root())
    app.add_route("/health", Health(engine, settings))
    app.add_route("/tokenize", Tokenize(engine, settings))
    app.add_route("/detokenize", Detokenize(engine, settings))
    app.add_route("/openapi.json", OpenAPI(app))
    app.add_route("/metrics", Metrics(engine, settings))
