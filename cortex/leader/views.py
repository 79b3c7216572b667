"""Read-only views of the node: one model's state, device memory, and ``/health``.

Built from the rooms' state on the leader's loop when the front or an operator asks; nothing here
changes anything. ``/health`` is what load balancers, peers (routing) and ``cortex status`` read.
"""

from __future__ import annotations

import os
import time

from cortex.leader.admission import Admission
from cortex.leader.lifecycle import ModelLifecycle
from cortex.leader.placement import Placement
from cortex.leader.shared import Shared
from cortex.leader.stepper import Stepper
from cortex.leader.supervision import WorkerSupervisor
from cortex.models.registry import ModelState, ModelStatus
from rpc.engine import NodeStatus


class Views:
    def __init__(
        self,
        shared: Shared,
        placement: Placement,
        stepper: Stepper,
        lifecycle: ModelLifecycle,
        supervisor: WorkerSupervisor,
        admission: Admission,
    ) -> None:
        self.shared = shared
        self.placement = placement
        self.stepper = stepper
        self.lifecycle = lifecycle
        self.supervisor = supervisor
        self.admission = admission
        self.started = time.time()

    def model(self, state: ModelState) -> dict:
        out = state.describe(self.shared.devices)
        live = self.stepper.requests.of_model(state.id)
        out["in_flight"] = sum(s.admitted for s in live) + self.stepper.embedder.count(state.id)  # embeddings too
        out["queued"] = sum(not s.admitted for s in live) + len(state.parked)
        sched = self.stepper.schedulers.get(state.id)
        if sched is not None:
            b = sched.blocks
            kv_dtype = self.placement.kv_dtype(state, self.shared.devices[state.ranks[0]]) if state.ranks else None
            out["engine"] = {
                "running": len(sched.running),
                "waiting": len(sched.waiting),
                "preemptions": sched.preemptions,
                "kv_blocks_total": b.num_blocks,
                "kv_blocks_used": b.used,
                "kv_block_size": b.block_size,
                "kv_blocks_cached": b.num_cached,
                "kv_dtype": kv_dtype,
            }
            if sched.recurrent:  # a hybrid model's recurrent state slots (one per running sequence)
                out["engine"]["state_slots_total"] = sched.state_slots
                out["engine"]["state_slots_used"] = sched.state_slots - len(sched.free_slots)
                saved = sched.checkpoints
                out["engine"]["state_checkpoints_total"] = saved.capacity if saved else 0
                out["engine"]["state_checkpoints_used"] = len(saved.saved) if saved else 0
        return out

    def models(self) -> dict:
        registry = self.shared.registry
        return {"models": [self.model(s) for s in registry.models.values()], "aliases": registry.catalogue.aliases}

    def device_memory(self) -> list[dict]:
        """Per device: rank, device, budget/used/free/evictable bytes and load/unload cycles."""
        cycles = self.supervisor.cycles
        return [{**d, "load_unload_cycles": cycles[d["rank"]]} for d in self.placement.device_memory()]

    def _counts(self) -> dict:
        counters = self.lifecycle.counters
        return {
            "evictions": {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("evictions:")},
            "defrag_restarts": counters["defrag_restarts"],
            "loads_cancelled": counters["loads_cancelled"],
            "loads": sum(s.loads for s in self.shared.registry.models.values()),
        }

    def health(self) -> dict:
        shared, registry = self.shared, self.shared.registry
        workers = self.supervisor.describe()
        models = [self.model(s) for s in registry.models.values()]
        wanted = [m for m in models if m["status"] != ModelStatus.UNLOADED or registry.models[m["id"]].entry.preload]
        status = NodeStatus.OK
        if self.admission.draining:
            status = NodeStatus.DRAINING  # 503: load balancers and peers route around this node
        elif not all(w["alive"] for w in workers) or any(
            m["status"] in (ModelStatus.RECOVERING, ModelStatus.FAILED) for m in wanted
        ):
            status = NodeStatus.DEGRADED  # still serving what is not broken (200)
        elif any(m["status"] == ModelStatus.LOADING for m in wanted) or not all(w["ready"] for w in workers):
            status = NodeStatus.LOADING
        schedulers = self.stepper.schedulers.values()
        return {
            "status": status,
            "draining": self.admission.draining,
            "node": shared.cfg.node.name,
            "devices": self.device_memory(),
            "eviction": {"strategy": shared.cfg.eviction.strategy, **self._counts()},
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),
            "workers": workers,
            "models": models,
            "aliases": registry.catalogue.aliases,  # peers resolve names routed to this node
            "requests": {
                "running": sum(len(s.running) for s in schedulers),
                "waiting": sum(len(s.waiting) for s in schedulers),
            },
        }
