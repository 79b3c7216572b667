"""Where a request for a model goes: pure functions over node views, no I/O, no clocks.

Order of preference (the issue's rules):
1. resident here -> serve here;
2. resident on peers -> the least busy routable one (busy with that model, then overall, then name);
3. resident nowhere -> place a cold load: a node already loading it, then one where it is pinned,
   then one where it fits in free memory, then one where it fits after eviction, then the most
   free memory, then the least busy, here before a peer, then by name.
Every ranked node after the first is a failover candidate; the front tries at most two.
"""

from __future__ import annotations

from dataclasses import dataclass

from cortex.fleet.view import LOADING, NodeView


@dataclass(frozen=True)
class Route:
    """``nodes`` is the ranked list (empty when ``error`` says why nothing can serve it)."""

    model: str  # the concrete model id ("" when no node knows the name)
    nodes: tuple[NodeView, ...] = ()
    reason: str = ""
    error: str = ""  # model_not_found | unavailable
    message: str = ""

    @property
    def local(self) -> bool:
        return bool(self.nodes) and self.nodes[0].local


def resolve(name: str, nodes: list[NodeView]) -> str | None:
    """The concrete model id for a name or alias: the local catalogue's answer first, then the
    peers' in name order, so every leader resolves an alias the same way once polled."""
    for n in sorted(nodes, key=lambda n: (not n.local, n.name)):
        if name in n.models:
            return name
        target = n.aliases.get(name)
        if target is not None and target in n.models:
            return target
    return None


def _resident_key(model: str):
    return lambda n: (n.models[model].busy, n.busy, n.name)


def _memory(n: NodeView, model: str) -> tuple[bool, bool, int]:
    """(fits in free memory, fits after eviction, free bytes on the devices it would take)."""
    m = n.models[model]
    tp = max(m.tensor_parallel, 1)
    free = sorted((d.free_bytes or 0 for d in n.devices), reverse=True)[:tp]
    room = sorted(((d.free_bytes or 0) + d.evictable_bytes for d in n.devices), reverse=True)[:tp]
    known = all(d.free_bytes is not None for d in n.devices)
    if not known or not m.size_bytes:  # nothing to compare: treat it as fitting, rank by what is known
        return True, True, sum(free)
    return min(free) >= m.size_bytes, min(room) >= m.size_bytes, sum(free)


def placement(model: str, nodes: list[NodeView]) -> list[NodeView]:
    """Nodes that could load ``model``, best first."""

    def key(n: NodeView):
        m = n.models[model]
        fits, fits_after_evict, free = _memory(n, model)
        return (
            m.status not in LOADING,
            not m.pinned,
            not fits,
            not fits_after_evict,
            -free,
            n.busy,
            not n.local,
            n.name,
        )

    return sorted((n for n in nodes if n.routable and n.loadable(model)), key=key)


def route(name: str, local: NodeView, peers: list[NodeView]) -> Route:
    """Rank the nodes for a request naming ``name``. ``peers`` includes unroutable ones: a model
    known only to a node that is down is a 503 (retry later), not a 404."""
    everyone = [local, *peers]
    model = resolve(name, everyone)
    if model is None:
        return Route("", error="model_not_found", message=f"The model '{name}' does not exist")
    if local.routable and local.resident(model):  # a draining node sends even its own models on
        return Route(model, (local,), "resident here")
    resident = sorted((p for p in peers if p.routable and p.resident(model)), key=_resident_key(model))
    cold = [n for n in placement(model, everyone) if n not in resident]
    ranked = tuple(resident + cold)
    if not ranked:
        down = sorted(p.name for p in peers if model in p.models and not p.routable)
        why = f"its node(s) {', '.join(down)} are unavailable" if down else "no node can load it"
        return Route(model, error="unavailable", message=f"model '{model}' cannot be served now: {why}")
    reason = f"resident on {ranked[0].name}" if resident else f"cold load placed on {ranked[0].name}"
    return Route(model, ranked, reason)
