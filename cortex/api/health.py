"""Health for load balancers, systemd and peers.

- ``GET /health`` (readiness): the leader's view of workers and models. 200 while the node serves
  (``ok``, or ``degraded``: something is broken, e.g. one model's file, but the rest serves), 503
  while it cannot (``loading``, ``draining``, or the leader not answering), so a load balancer can
  use the status code alone; the body says which model is in which state.
- ``GET /health/live`` (liveness): this front process answers. It asks the leader nothing, so a
  busy or restarting engine never gets the front killed by a liveness probe.
"""

from __future__ import annotations

import falcon

from cortex.api.engine_client import EngineClient
from cortex.api.errors import ApiError
from rpc.engine import NodeStatus


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
        resp.status = 200 if NodeStatus(data["status"]).serving else 503
        if resp.status != 200:
            resp.set_header("Retry-After", "5")
        resp.media = data

    def on_get_live(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "live"}
