"""Model management: POST /models/load, POST /models/unload, GET /models.

Loads are single-flight: every caller of a load in progress waits for the same one and gets its
outcome. An unload is refused (409) while the model has requests in flight.
"""

from __future__ import annotations

import falcon

from cortex.api.bodies import ModelName
from cortex.api.engine_client import EngineClient
from cortex.api.validation import decode


class ModelLoad:
    def __init__(self, engine: EngineClient, max_body_bytes: int, timeout_s: float, op: str):
        self.engine, self.max_body_bytes, self.timeout_s, self.op = engine, max_body_bytes, timeout_s, op

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        model = decode(req, ModelName, self.max_body_bytes).model
        resp.media = {"model": self.engine.model_op(self.op, model, self.timeout_s)}


class ModelTable:
    def __init__(self, engine: EngineClient):
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.engine.query("models")
