"""GET /v1/models and GET /v1/models/{model}."""
from __future__ import annotations

import falcon

from .. import formatting
from ..body import Resource


class Models(Resource):
    """Local models, then (with a gateway) the upstream models of its mappings and its routes."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        from ..gateway import gateway_for

        listing = formatting.models_list(self.engine.store.list())
        gateway = gateway_for(self.settings)
        if gateway is not None:
            listing["data"] += [{"id": name, "object": "model", "created": 0, "owned_by": owner}
                                for name, owner in gateway.listing()]
        resp.media = listing


class Model(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        from ..gateway import gateway_for

        gateway = gateway_for(self.settings)
        owner = dict(gateway.listing()).get(model) if gateway is not None else None
        if owner is not None:                   # an upstream model of the gateway's mappings, or a route
            resp.media = {"id": model, "object": "model", "created": 0, "owned_by": owner}
            return
        resp.media = formatting.model_object(self.engine.store.get(model))
