"""Reload (SIGHUP or ``cortex-admin reload``): read both files again and apply what changed.

The new files go through the one loader (``cortex.config.load``); a file it refuses changes
nothing. What can change while serving is applied at once: peers, eviction and engine settings,
API keys, the log level, and catalogue entries. A catalogue entry that did not change keeps its
``ModelState`` (same object: it serves on untouched). A new entry is added unloaded (loaded now
if it says ``preload``); a removed one stops resolving at once and is unloaded once idle; a
changed one is unloaded once idle and replaced. Settings only a restart can apply (addresses,
devices, process counts) keep their running values and are listed in the answer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cortex.config import Catalogue, Config, ConfigError, ModelEntry, load
from cortex.ops import metrics

if TYPE_CHECKING:
    from cortex.ops.control import NodeControl

log = logging.getLogger("cortex.reload")

# applied only by a restart: the processes, sockets and devices they describe already exist
RESTART_ONLY = {
    # device budgets are fixed when each worker first answers
    "node": ("name", "devices", "run_dir", "threads", "memory_budget_mb", "memory_headroom_mb"),
    "gateway": (
        "listen",
        "metrics_listen",
        "workers",
        "threads",
        "max_body_mb",
        "keepalive_s",
        "responses_store_max",  # the front reads these two once, when gunicorn starts it
        "responses_store_ttl_s",
    ),
}
# the front reads these once, when gunicorn starts it
RESTART_ONLY_TOP = {"log_format": "[logging] format", "log_content": "[logging] log_content"}


@dataclass
class CatalogueDiff:
    added: list[ModelEntry] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[ModelEntry] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def diff_catalogue(old: Catalogue, new: Catalogue) -> CatalogueDiff:
    before = {m.id: m for m in old.models}
    after = {m.id: m for m in new.models}
    d = CatalogueDiff()
    for mid, entry in after.items():
        if mid not in before:
            d.added.append(entry)
        elif before[mid] != entry:
            d.changed.append(entry)
        else:
            d.unchanged.append(mid)
    d.removed = [mid for mid in before if mid not in after]
    return d


def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the restart-only settings of ``old``, and the names of those that differ."""
    ignored, sections = [], {}
    for section, keys in RESTART_ONLY.items():
        was, now = getattr(old, section), getattr(new, section)
        kept = {k: getattr(was, k) for k in keys if getattr(was, k) != getattr(now, k)}
        ignored += [f"[{section}] {k}" for k in kept]
        sections[section] = dataclasses.replace(now, **kept)
    for key, name in RESTART_ONLY_TOP.items():
        if getattr(old, key) != getattr(new, key):
            sections[key] = getattr(old, key)
            ignored.append(name)
    return dataclasses.replace(new, **sections), ignored


def reload(leader: NodeControl) -> dict:
    """Read the files again and apply them; on any error nothing changes."""
    try:
        new = load(leader.cfg.file)
    except ConfigError as exc:
        log.error("reload rejected, the running configuration stays in force: %s", exc)
        metrics.RELOADS.labels("rejected").inc()
        return {"ok": False, "error": str(exc)}
    new, ignored = keep_restart_only(leader.cfg, new)
    diff = diff_catalogue(leader.cfg.catalogue, new.catalogue)
    old_peers = {p.name for p in leader.cfg.peers}
    leader.apply_config(new)
    for name in old_peers - {p.name for p in new.peers}:
        metrics.forget_peer(name)
    for entry in diff.added:
        leader.add_model(entry)
    for entry in diff.changed:
        leader.pending_models[entry.id] = entry
    for mid in diff.removed:
        leader.pending_models[mid] = None
    settle(leader)
    metrics.RELOADS.labels("ok").inc()
    result = {
        "ok": True,
        "added": [e.id for e in diff.added],
        "changed": [e.id for e in diff.changed],
        "removed": diff.removed,
        "unchanged": diff.unchanged,
        "pending": sorted(leader.pending_models),
        "restart_required": ignored,
    }
    log.info(
        "configuration reloaded: added %s, changed %s, removed %s; unchanged %d%s",
        result["added"],
        result["changed"],
        result["removed"],
        len(diff.unchanged),
        f"; needs a restart: {', '.join(ignored)}" if ignored else "",
    )
    return result


def settle(leader: NodeControl) -> None:
    """Replace or remove the changed and removed models that are idle now (called every loop)."""
    for mid, entry in list(leader.pending_models.items()):
        state = leader.registry.models.get(mid)
        if state is not None and not leader.idle(state):
            continue
        del leader.pending_models[mid]
        if state is not None:
            leader.unload(state)
        leader.remove_model(mid)
        if entry is not None:
            leader.add_model(entry)
        else:
            metrics.forget_model(mid)
        log.info("model %s %s", mid, "replaced by its new entry" if entry is not None else "removed")
