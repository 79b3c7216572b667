"""GET /v1/models: every model the fleet can serve (and every alias), in the OpenAI list shape, with
where each is resident and where it could be loaded; GET /fleet: the nodes behind it.

The same on every leader once its peers are polled (cortex/fleet/catalogue.py): on a single node
it is that node's catalogue."""

from __future__ import annotations

from datetime import UTC, datetime

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
        if _anthropic(req):  # Anthropic's model list: what its SDK and Claude Code read
            data = [_anthropic_model(m) for m in self._listing()]
            first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
            resp.media = {"data": data, "has_more": False, "first_id": first, "last_id": last}
            return
        resp.media = {"object": "list", "data": self._listing()}

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        for m in self._listing():
            if m["id"] == model_id:
                resp.media = _anthropic_model(m) if _anthropic(req) else m
                return
        raise ApiError(
            404, f"The model '{model_id}' does not exist", "invalid_request_error", "model_not_found", param="model"
        )


def _anthropic(req: falcon.Request) -> bool:
    return req.get_header("anthropic-version") is not None


def _anthropic_model(m: dict) -> dict:
    created = datetime.fromtimestamp(m.get("created") or 0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "model", "id": m["id"], "display_name": m["id"], "created_at": created}


class Fleet:
    def __init__(self, engine: EngineClient):
        self.engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = catalogue.table(self.engine.query("fleet"))
