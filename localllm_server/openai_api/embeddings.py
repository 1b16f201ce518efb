"""POST /v1/embeddings."""
from __future__ import annotations

import falcon

from .. import formatting, schemas
from ..body import Resource
from ..errors import APIError
from . import common


class Embeddings(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = schemas.parse_embeddings(self.body(req))
        entry, model = common.load_model(self.engine, request.model)
        if "embedding" not in model.capabilities:
            raise APIError(400, f"model '{request.model}' does not support embeddings", param="model",
                           code="model_not_supported")
        vectors = self.engine.embed(entry, request.input, dimensions=request.dimensions,
                                    truncate=request.truncate)
        counts = model.count_tokens(request.input)
        if request.truncate:
            counts = [min(c, model.max_seq_length) for c in counts]
        self.count_tokens(req, "embeddings", sum(counts), 0)
        resp.media = formatting.embeddings_response(request.model, vectors.tolist(), request.encoding_format,
                                                    sum(counts))
