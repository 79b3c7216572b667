"""The merged catalogue (``GET /v1/models``) and the fleet table (``GET /fleet``), from the leader's
``Query("fleet")`` answer.

Every leader must list the same bytes once it has polled the same peers, so nothing here depends
on which leader answers: no clocks, no local names, nodes and models in sorted order. Peers are read
from their own ``/health`` (their local models only), never from their merged lists, so what one
leader lists never echoes back to it through another.
"""

from __future__ import annotations

from typing import Any

from cortex.fleet.view import LOADING, RESIDENT, NodeView, node_view

OWNER = "cortex"  # owned_by: the fleet, whichever leader answers
CREATED = 0  # created: a fleet has no one creation time, and every leader must list the same bytes
_RANK = {RESIDENT: 0, **{s: 1 + i for i, s in enumerate(LOADING)}, "unloaded": 3, "failed": 4}


def nodes(fleet: dict) -> list[NodeView]:
    """This node and every peer that is up (peers never polled are left out)."""
    out = [node_view(fleet["self"], fleet.get("endpoint", ""), local=True, name=fleet.get("node", ""))]
    for p in fleet.get("peers", ()):
        if p.get("health"):
            out.append(node_view(p["health"], p["endpoint"], routable=p["up"], name=p["name"]))
    return [n for n in out if n.routable]


def _offers(n: NodeView, model: str) -> bool:
    """Listed for this node: resident there, or in its catalogue on a node with devices (a pure
    gateway's catalogue loads nowhere)."""
    return n.resident(model) or (model in n.models and bool(n.devices))


def _entry(model: str, holders: list[NodeView]) -> dict[str, Any]:
    views = [n.models[model] for n in holders]
    contexts = [v.context_length for v in views if v.context_length]
    return {
        "id": model,
        "object": "model",
        "created": CREATED,
        "owned_by": OWNER,
        "status": min((v.status for v in views), key=lambda s: _RANK.get(s, 5)),
        "context_length": min(contexts) if contexts else None,
        # what it serves (models.toml's task); nodes that disagree: the first by name decides
        "task": views[0].task,
        # the devices holding it, node by node (on a single node: that node's devices)
        "devices": [d for n in holders if n.resident(model) for d in n.models[model].devices],
        "resident_on": [n.name for n in holders if n.resident(model)],
        "loadable_on": [n.name for n in holders if n.loadable(model) and not n.resident(model)],
        "locations": [
            {"node": n.name, "status": n.models[model].status, "devices": list(n.models[model].devices)}
            for n in holders
        ],
    }


def merged(views: list[NodeView]) -> list[dict[str, Any]]:
    """Every model some up node offers, then every alias of one, sorted by id."""
    views = sorted(views, key=lambda n: n.name)
    ids = sorted({m for n in views for m in n.models if _offers(n, m)})
    entries = {m: _entry(m, [n for n in views if _offers(n, m)]) for m in ids}
    aliases: dict[str, str] = {}
    for n in views:  # the first node by name that defines an alias decides its target
        for alias, target in n.aliases.items():
            if target in entries and alias not in entries:
                aliases.setdefault(alias, target)
    out = list(entries.values())
    out += [{**entries[t], "id": a, "alias_for": t} for a, t in aliases.items()]
    return sorted(out, key=lambda e: e["id"])


def _memory(health: dict) -> list[dict[str, Any]]:
    devices = health.get("devices")
    if isinstance(devices, list):
        return [d for d in devices if isinstance(d, dict)]
    return [
        {"rank": w.get("rank"), "device": w.get("device")} for w in health.get("workers") or () if isinstance(w, dict)
    ]


def table(fleet: dict) -> dict[str, Any]:
    """``GET /fleet``: every node this leader knows (down ones too) and the merged catalogue."""
    rows = [
        {
            "name": fleet.get("node", ""),
            "endpoint": fleet.get("endpoint", ""),
            "self": True,
            "up": True,
            "cooling": False,
            "status": fleet["self"].get("status"),
            "draining": fleet["self"].get("draining", False),
            "devices": _memory(fleet["self"]),
            "requests": fleet["self"].get("requests", {}),
            "error": None,
        }
    ]
    for p in fleet.get("peers", ()):
        h = p.get("health") or {}
        rows.append(
            {
                "name": h.get("node") or p["name"],
                "endpoint": p["endpoint"],
                "self": False,
                "up": p["up"],
                "cooling": p["cooling"],
                "status": h.get("status") if p["up"] else "down",
                "draining": h.get("draining", False),
                "devices": _memory(h),
                "requests": h.get("requests", {}),
                "error": p.get("error"),
            }
        )
    up = sum(r["up"] for r in rows)
    return {
        "node": fleet.get("node", ""),
        "status": "ok" if up == len(rows) else ("degraded" if up > 1 or not rows[1:] else "isolated"),
        "nodes": rows,
        "models": merged(nodes(fleet)),
    }
