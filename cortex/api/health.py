"""GET /health: the leader's view of workers and models. 200 when serving, 503 otherwise, so a load
balancer or systemd check can use the status code alone."""

from __future__ import annotations

import falcon

from cortex.api.engine_client import EngineClient
from cortex.api.errors import ApiError


class Health:
    def __init__(self, engine: EngineClient):
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            data = self.engine.query("health")
        except ApiError:
            resp.status = 503
            resp.media = {"status": "down", "error": "the engine (leader process) is not answering"}
            return
        resp.status = 200 if data["status"] == "ok" else 503
        if resp.status != 200:
            resp.set_header("Retry-After", "5")
        resp.media = data
