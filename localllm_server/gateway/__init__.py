"""The gateway: local models, OpenAI- and Anthropic-compatible upstreams and fallback routes behind the one /v1 API.

``config`` reads the TOML file (``LOCALLLM_GATEWAY`` or ``localllm serve --gateway FILE``), ``upstream`` calls
providers with the standard library, ``routing`` resolves a request's model and runs its fallback chain
(Anthropic-format upstreams through ``anthropic_api.openai_bridge``), ``cache`` keeps answers to deterministic
requests, ``budgets`` limits what each API key may spend, ``resource`` is the one Falcon hook in front of the
local /v1 resources. Without a config none of it is in the request path. ``Gateway.metrics_text()`` is the
gateway's own part of ``/metrics`` (the budgets' spend).
"""
from __future__ import annotations

from .config import GatewayConfig, GatewayConfigError, load, load_from_env
from .routing import Gateway

_NOT_LOADED = object()


def gateway_for(settings) -> Gateway | None:
    """The gateway of ``settings``: its ``gateway`` attribute (a file path or a GatewayConfig) when set, else
    the file named by ``LOCALLLM_GATEWAY``; None without either. Loaded once per settings object."""
    loaded = getattr(settings, "_gateway", _NOT_LOADED) if settings is not None else None
    if loaded is not _NOT_LOADED:
        return loaded
    source = getattr(settings, "gateway", None)
    config = source if isinstance(source, GatewayConfig) else load(source) if source else load_from_env()
    gateway = Gateway(config) if config is not None else None
    settings._gateway = gateway
    return gateway


__all__ = ["Gateway", "GatewayConfig", "GatewayConfigError", "gateway_for", "load", "load_from_env"]
