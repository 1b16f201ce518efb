"""GET /v1/models and GET /v1/models/{model}."""
from __future__ import annotations

import falcon

from .. import formatting
from ..body import Resource


class Models(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = formatting.models_list(self.engine.store.list())


class Model(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        resp.media = formatting.model_object(self.engine.store.get(model))
