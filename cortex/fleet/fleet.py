"""The leader's fleet part: its peers, and the answer for a request it does not serve itself.

The leader asks ``decide`` only for a model that is not resident here (a resident model never pays
for a routing decision), and ``describe`` for ``Query("fleet")``.

A ``Forward`` to a node where the model is resident says how long its front may reuse it
(``valid_s``, cortex/fleet/routes.py): ``[gateway] route_cache_s`` (0 turns the front's copies
off). Short, because it is also how late a front may notice that the model became resident here. A
cold-load placement is never reused: once the load has begun, the next answer is "resident there"
(or here).
"""

from __future__ import annotations

import logging
import math

from cortex.config import Config
from cortex.fleet.peers import Peers
from cortex.fleet.router import route
from cortex.fleet.view import NodeView, node_view
from rpc.engine import Failure, FailureKind, Forward, Target

MAX_TARGETS = 2  # the first choice and one failover

log = logging.getLogger("cortex.fleet")


def self_endpoint(cfg: Config) -> str:
    """This leader's own API as a peer, or its own front failing over to it, reaches it."""
    host = cfg.gateway.listen.host
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.gateway.listen.port}"


class Fleet:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.name = cfg.node.name
        self.endpoint = self_endpoint(cfg)
        self.peers = Peers(cfg.peers, cfg.fleet, cfg.node.name)
        # how long a client should wait before retrying a model whose nodes are down: about the
        # time the poller needs to notice a change
        self.retry_after = max(1, math.ceil(cfg.fleet.poll_interval_s))
        keyless = [p.name for p in cfg.peers if not (p.api_key or cfg.fleet.peer_key)]
        if cfg.gateway.api_keys and keyless:
            log.warning(
                "API keys are on but no key is set for peer(s) %s ([fleet] peer_key or [[peers]] api_key):"
                " requests forwarded there carry no credential",
                ", ".join(keyless),
            )

    def start(self) -> None:
        self.peers.start()

    def reconfigure(self, cfg: Config) -> None:
        """A reload: new peers and [fleet] settings apply at once; peers that stay keep their state."""
        self.cfg = cfg
        self.retry_after = max(1, math.ceil(cfg.fleet.poll_interval_s))
        self.peers.reconfigure(cfg.peers, cfg.fleet)

    def peers_status(self) -> list[dict]:
        """For cortex-admin: each configured peer and what the poller last learnt of it."""
        return [
            {
                "name": s.name,
                "endpoint": s.endpoint,
                "status": ("cooling" if s.cooling else "up") if s.up else ("down" if s.polled_at else "unknown"),
                "error": s.error or None,
            }
            for s in self.peers.snapshot()
        ]

    def stop(self) -> None:
        self.peers.stop()

    def decide(self, request_id: str, name: str, local_health: dict) -> Forward | Failure | None:
        """None: serve it here (resident, or a cold load placed here). Else the front's answer."""
        local = node_view(local_health, self.endpoint, local=True, name=self.name)
        snaps = self.peers.snapshot()
        keys = {s.endpoint: s.key for s in snaps}
        peers = [node_view(s.health, s.endpoint, routable=s.routable, name=s.name) for s in snaps if s.health]
        r = route(name, local, peers)
        if r.error == "model_not_found":
            return Failure(request_id, FailureKind.MODEL_NOT_FOUND, r.message)
        if r.error:
            return Failure(request_id, FailureKind.FLEET_UNAVAILABLE, r.message, self.retry_after)
        if r.local:
            return None
        targets = [
            Target(
                n.name,
                n.endpoint,
                self.cfg.fleet.peer_key if n.local else keys.get(n.endpoint, ""),
                _rename(n, name, r.model),
            )
            for n in r.nodes[:MAX_TARGETS]
        ]
        valid_s = self.cfg.gateway.route_cache_s if r.nodes[0].resident(r.model) else 0.0
        return Forward(request_id, targets, r.reason, valid_s)

    def describe(self, local_health: dict) -> dict:
        """Everything this leader knows about the fleet: its own health and each peer's last one."""
        return {
            "node": self.name,
            "endpoint": self.endpoint,
            "self": local_health,
            "peers": [
                {
                    "name": s.name,
                    "endpoint": s.endpoint,
                    "up": s.up,
                    "cooling": s.cooling,
                    "error": s.error or None,
                    "polled_at": s.polled_at or None,
                    "health": s.health,
                }
                for s in self.peers.snapshot()
            ],
        }

    def report_failure(self, endpoint: str, reason: str) -> None:
        self.peers.report_failure(endpoint, reason)


def _rename(node: NodeView, name: str, model: str) -> str:
    """The concrete id when ``node`` would not know the name the client sent (an alias defined on
    another node); "" leaves the client's body as it is."""
    return "" if name in node.models or name in node.aliases else model
