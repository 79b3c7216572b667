"""GET /v1/models: every catalogue model (and alias) with its status, in the OpenAI list shape."""

from __future__ import annotations

import falcon

from cortex.api.engine_client import EngineClient
from cortex.api.errors import ApiError


def _entry(m: dict, created: int, owned_by: str, alias_of: str | None = None) -> dict:
    return {
        "id": m["id"] if alias_of is None else alias_of,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "status": m["status"],
        "devices": m["devices"],
        "context_length": m["context_length"],
        **({"alias_for": m["id"]} if alias_of else {}),
    }


class Models:
    def __init__(self, engine: EngineClient, started: int, node: str):
        self.engine, self.started, self.node = engine, started, node

    def _listing(self) -> list[dict]:
        data = self.engine.query("models")
        by_id = {m["id"]: m for m in data["models"]}
        out = [_entry(m, self.started, self.node) for m in data["models"]]
        out += [_entry(by_id[t], self.started, self.node, alias) for alias, t in data["aliases"].items() if t in by_id]
        return out

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
