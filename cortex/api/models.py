"""GET /v1/models: every model the fleet can serve (and every alias), in the OpenAI list shape, with
where each is resident and where it could be loaded; GET /fleet: the nodes behind it.

The same on every leader once its peers are polled (cortex/fleet/catalogue.py): on a single node
it is that node's catalogue."""

from __future__ import annotations

import falcon

from cortex.api.engine_client import EngineClient
from cortex.api.errors import ApiError
from cortex.fleet import catalogue


class Models:
    def __init__(self, engine: EngineClient):
        self.engine = engine

    def _listing(self) -> list[dict]:
        return catalogue.merged(catalogue.nodes(self.engine.query("fleet")))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": self._listing()}

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        for m in self._listing():
            if m["id"] == model_id:
                resp.media = m
                return
        raise ApiError(
            404, f"The model '{model_id}' does not exist", "invalid_request_error", "model_not_found", param="model"
        )


class Fleet:
    def __init__(self, engine: EngineClient):
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = catalogue.table(self.engine.query("fleet"))
