"""What one leader knows about a node: its ``/health`` body, read into typed, immutable views.

The local node's view comes from ``Leader.health()``, a peer's from its last polled ``/health``: the
same shape, so routing and the merged catalogue treat every node alike. A peer's body is untrusted
input: missing or odd fields take neutral defaults rather than failing the whole view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RESIDENT = "loaded"
LOADING = ("loading", "recovering")
TASKS = ("generate", "embed")  # cortex.config.TASKS (the fleet reads peers, not the config)


@dataclass(frozen=True)
class ModelView:
    id: str
    status: str
    tensor_parallel: int = 1
    size_bytes: int = 0  # per-rank footprint estimate (weights + KV); 0 = unknown
    pinned: bool = False
    priority: int = 100
    busy: int = 0  # requests in flight + queued for this model
    context_length: int | None = None
    devices: tuple[str, ...] = ()
    task: str = "generate"  # its catalogue entry's task: generate or embed


@dataclass(frozen=True)
class DeviceView:
    device: str
    free_bytes: int | None = None  # None = the node does not account memory
    evictable_bytes: int = 0


@dataclass(frozen=True)
class NodeView:
    name: str
    endpoint: str  # base URL; "" for a node that cannot be reached by URL
    local: bool = False
    routable: bool = True  # up, not draining, not cooling down
    status: str = "ok"
    devices: tuple[DeviceView, ...] = ()
    models: dict[str, ModelView] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    busy: int = 0  # all its requests, running + waiting

    def resident(self, model: str) -> bool:
        m = self.models.get(model)
        return m is not None and m.status == RESIDENT

    def loadable(self, model: str) -> bool:
        """In its catalogue, with enough devices for its tensor parallelism, and not failed there."""
        m = self.models.get(model)
        return m is not None and m.status != "failed" and 0 < m.tensor_parallel <= len(self.devices)


def _int(v: Any, default: int = 0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _model(m: dict) -> ModelView | None:
    if not isinstance(m, dict) or not isinstance(m.get("id"), str):
        return None
    engine = m.get("engine") if isinstance(m.get("engine"), dict) else {}
    busy = _int(m.get("in_flight"), _int(engine.get("running"))) + _int(m.get("queued"), _int(engine.get("waiting")))
    devices = m.get("devices") if isinstance(m.get("devices"), list) else []
    ctx = m.get("context_length")
    return ModelView(
        id=m["id"],
        status=m.get("status") if isinstance(m.get("status"), str) else "unloaded",
        tensor_parallel=_int(m.get("tensor_parallel"), 1),
        size_bytes=_int(m.get("size_bytes")),
        pinned=m.get("pinned") is True,
        priority=_int(m.get("residency_priority"), 100),
        busy=busy,
        context_length=ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None,
        devices=tuple(d for d in devices if isinstance(d, str)),
        task=m["task"] if m.get("task") in TASKS else "generate",  # a node before the flag: generate
    )


def _devices(health: dict) -> tuple[DeviceView, ...]:
    """Devices with their memory when the node accounts it (``devices``), else just its workers."""
    devices = health.get("devices")
    if isinstance(devices, list):
        out = []
        for d in devices:
            if isinstance(d, dict) and isinstance(d.get("device"), str):
                free = d.get("free_bytes")
                out.append(
                    DeviceView(d["device"], _int(free) if free is not None else None, _int(d.get("evictable_bytes")))
                )
        return tuple(out)
    workers = health.get("workers") if isinstance(health.get("workers"), list) else []
    return tuple(DeviceView(w["device"]) for w in workers if isinstance(w, dict) and isinstance(w.get("device"), str))


def node_view(health: dict, endpoint: str, local: bool = False, routable: bool = True, name: str = "") -> NodeView:
    """A node's view from its ``/health`` body. A draining node takes no new requests."""
    models = {}
    for m in health.get("models") or ():
        view = _model(m)
        if view is not None:
            models[view.id] = view
    aliases = health.get("aliases") if isinstance(health.get("aliases"), dict) else {}
    requests = health.get("requests") if isinstance(health.get("requests"), dict) else {}
    return NodeView(
        name=health.get("node") if isinstance(health.get("node"), str) and health["node"] else name,
        endpoint=endpoint,
        local=local,
        routable=routable and health.get("draining") is not True,
        status=health.get("status") if isinstance(health.get("status"), str) else "unknown",
        devices=_devices(health),
        models=models,
        aliases={k: v for k, v in aliases.items() if isinstance(k, str) and isinstance(v, str)},
        busy=_int(requests.get("running")) + _int(requests.get("waiting")),
    )
