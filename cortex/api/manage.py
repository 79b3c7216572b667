"""Model management: POST /models/load, POST /models/unload, GET /models.

Loads are single-flight: every caller of a load in progress waits for the same one and gets its
outcome. An unload is refused (409) while the model has requests in flight. The model is named by
``model`` or, as other model servers' management APIs name it, ``model_id``.
"""

from __future__ import annotations

import falcon

from cortex.api.bodies import ModelName
from cortex.api.engine_client import EngineClient
from cortex.api.errors import ApiError, bad_field
from cortex.api.validation import decode


def model_name(body: ModelName) -> str:
    """The model a management request names, by either key."""
    if body.model is None and body.model_id is None:
        raise ApiError(
            400,
            "Missing required parameter: 'model' (or 'model_id').",
            code="missing_required_parameter",
            param="model",
        )
    if body.model is not None and body.model_id is not None and body.model != body.model_id:
        raise bad_field("model_id", "'model' and 'model_id' differ; send one of them.")
    return body.model if body.model is not None else body.model_id


class ModelLoad:
    def __init__(self, engine: EngineClient, max_body_bytes: int, timeout_s: float, op: str):
        self.engine, self.max_body_bytes, self.timeout_s, self.op = engine, max_body_bytes, timeout_s, op

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        model = model_name(decode(req, ModelName, self.max_body_bytes))
        resp.media = {"model": self.engine.model_op(self.op, model, self.timeout_s)}


class ModelTable:
    def __init__(self, engine: EngineClient):
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.engine.query("models")
