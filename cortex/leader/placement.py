"""Placement and memory: which ranks hold a model, what it costs there, and what must go for it.

It owns the memory budget of each rank (learnt from the worker's first answer). Everything
else it reads: model state from the registry, readiness from the worker handles, and whether a
resident model is busy from the stepper (a busy model is never evicted). The arithmetic of
eviction lives in ``cortex/models/memory.py``; this room feeds it the node's facts.
"""

from __future__ import annotations

import logging

from cortex.leader.shared import Shared
from cortex.leader.stepper import Stepper
from cortex.models import memory
from cortex.models.registry import ModelState, ModelStatus
from workers.sharding import kv_block_bytes

log = logging.getLogger("cortex.leader")

NO_BUDGET = 2**62  # a device whose memory cannot be measured is not accounted
MB = 2**20


class Placement:
    def __init__(self, shared: Shared, stepper: Stepper) -> None:
        self.shared = shared
        self.stepper = stepper
        self.budgets: dict[int, int] = {}  # rank -> bytes models may use (budget - headroom), once known

    def learn_budget(self, rank: int, measured_free: int) -> None:
        """Bytes models may use on this rank's device: the configured budget, else what its worker
        measured free at start-up (shared evenly by workers on the same device), less the headroom.
        Learnt once per rank: a restarted worker measures memory its predecessor's models freed."""
        if rank in self.budgets:
            return
        node, devices = self.shared.cfg.node, self.shared.devices
        budget = node.memory_budget_mb * MB
        if not budget:
            if not measured_free:
                self.budgets[rank] = NO_BUDGET
                return
            budget = measured_free // sum(d == devices[rank] for d in devices)
        budget = max(0, budget - node.memory_headroom_mb * MB)
        log.info("device %s (rank %d): %.0f MiB for models", devices[rank], rank, budget / MB)
        self.budgets[rank] = budget

    # -- where ----------------------------------------------------------------------------------------

    def place(self, state: ModelState) -> list[int] | None:
        """Ranks of the workers that will hold the model, or None while they are not all up: its
        configured devices, else the ready workers where it fits best (free without eviction, then
        most free), fewest models among equals. Devices may repeat (["cpu", "cpu"]): each entry
        takes a distinct worker. Raises ValueError when the node cannot hold it as configured."""
        devices, workers = self.shared.devices, self.shared.workers
        n = state.entry.tensor_parallel
        if n > len(devices):
            raise ValueError(f"{state.id}: tensor_parallel={n} needs {n} devices; this node has {devices}")
        if state.entry.devices:
            free = list(range(len(devices)))
            ranks = []
            for d in state.entry.devices:
                match = next((r for r in free if devices[r] == d), None)
                if match is None:
                    raise ValueError(f"{state.id}: device {d} is not among this node's devices {devices}")
                free.remove(match)
                ranks.append(match)
            return ranks if all(workers[r].ready for r in ranks) else None
        ready = [r for r in range(len(devices)) if workers[r].ready]
        if len(ready) < n:
            return None
        need = self.estimate(state, devices[ready[0]], n)
        residents = [s for s in self.shared.registry.models.values() if s is not state and s.resident]

        def rank_key(r: int) -> tuple:
            free = self.free(r, state)
            return (free < need, -free, sum(r in s.ranks for s in residents), r)

        return sorted(sorted(ready, key=rank_key)[:n])

    # -- what it costs --------------------------------------------------------------------------------

    def dtype(self, state: ModelState, device: str) -> str:
        dtype = state.entry.dtype
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        return dtype

    def kv_dtype(self, state: ModelState, device: str) -> str:
        """The KV pool's dtype. auto: float16 for a float32 model on the CPU (half the bytes per
        token, read by the native kernels; greedy text unchanged on the default model), else the
        model's own dtype."""
        kv, dtype = self.shared.cfg.engine.kv_cache_dtype, self.dtype(state, device)
        if kv == "auto":
            kv = "float16" if device == "cpu" and dtype == "float32" else dtype
        return kv

    def kv_blocks(self, state: ModelState, n: int, kv_dtype: str) -> int:
        block = kv_block_bytes(state.files.config, n, kv_dtype)
        return max(1, self.shared.cfg.engine.kv_cache_mb * MB // block)

    def state_slots(self, state: ModelState) -> int:
        """Recurrent state slots of a hybrid model (one per sequence it may run at once); 0 for others."""
        return self.shared.cfg.engine.max_seqs if state.files.config.linear_layers else 0

    def state_checkpoints(self, state: ModelState) -> int:
        """Slots for a hybrid model's saved prefix states (its prefix cache), after the running ones."""
        return self.shared.cfg.engine.state_checkpoints if state.files.config.linear_layers else 0

    def estimate(self, state: ModelState, device: str, n: int) -> int:
        """Bytes per rank: estimated weights (measured ones once it has loaded) plus its KV pool (and
        a hybrid model's recurrent state pool)."""
        files, dtype, kv_dtype = state.files, self.dtype(state, device), self.kv_dtype(state, device)
        kv = self.kv_blocks(state, n, kv_dtype) * kv_block_bytes(files.config, n, kv_dtype)
        slots = self.state_slots(state) + self.state_checkpoints(state)
        kv += slots * files.config.state_slot_bytes(n, dtype)
        if state.measured_bytes:  # its weights as measured at its last load
            return state.measured_bytes + kv
        pack = memory.packing(state.entry.quantize, files.format, device.split(":")[0])
        return memory.weight_bytes(files.config, n, dtype, pack) + kv

    # -- what is there ----------------------------------------------------------------------------------

    def used(self, rank: int, exclude: ModelState | None = None) -> int:
        models = self.shared.registry.models.values()
        return sum(s.bytes_per_rank for s in models if s is not exclude and s.resident and rank in s.ranks)

    def free(self, rank: int, exclude: ModelState | None = None) -> int:
        return self.budgets.get(rank, NO_BUDGET) - self.used(rank, exclude)

    def kept(self, state: ModelState) -> str | None:
        """Why this resident model may not be evicted now; None when it may."""
        if state.pinned:
            return "pinned"
        if state.status != ModelStatus.LOADED:
            return state.status
        busy = self.stepper.busy(state)
        if busy or self.stepper.stepping(state.id):
            return f"{busy} request(s) in flight or queued"
        return None

    def make_room(self, state: ModelState) -> memory.Room:
        """Which resident models must go for ``state`` to fit on its ranks, or why it cannot."""
        residents = [
            memory.Resident(
                s.id, tuple(s.ranks), s.bytes_per_rank, self.kept(s), s.entry.residency_priority, s.last_used
            )
            for s in self.shared.registry.models.values()
            if s is not state and s.resident
        ]
        return memory.make_room(
            state.bytes_per_rank,
            state.ranks,
            {r: self.free(r, state) for r in state.ranks},
            {r: self.budgets.get(r, NO_BUDGET) for r in state.ranks},
            residents,
            self.shared.cfg.eviction.strategy,
            state.entry.residency_priority,
        )

    def device_memory(self) -> list[dict]:
        """Per device: rank, device, budget/used/free/evictable bytes (as in /health)."""
        out = []
        models = self.shared.registry.models.values()
        for r, device in enumerate(self.shared.devices):
            budget, used = self.budgets.get(r), self.used(r)
            evictable = sum(s.bytes_per_rank for s in models if s.resident and r in s.ranks and not self.kept(s))
            known = budget is not None and budget != NO_BUDGET
            out.append(
                {
                    "rank": r,
                    "device": device,
                    "budget_bytes": budget if known else None,
                    "used_bytes": used,
                    "free_bytes": budget - used if known else None,
                    "evictable_bytes": evictable,
                }
            )
        return out
