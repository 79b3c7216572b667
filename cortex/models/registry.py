"""What the leader knows about each catalogue model: its status, files and where it lives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from cortex.config import Catalogue, ModelEntry
from cortex.models.source import ModelFiles


class ModelStatus(StrEnum):
    """Where a catalogue model is in its life on this node (a str: JSON and logs show the value)."""

    UNLOADED = "unloaded"  # nothing resident; a request or an operator loads it
    LOADING = "loading"  # its workers are reading it; requests for it wait (parked)
    LOADED = "loaded"  # serving
    RECOVERING = "recovering"  # a rank died or wedged: the group is torn down and reloaded
    FAILED = "failed"  # its load failed; requests are refused with the reason until it is retried


@dataclass
class ModelState:
    entry: ModelEntry
    status: ModelStatus = ModelStatus.UNLOADED
    files: ModelFiles | None = None
    ranks: list[int] = field(default_factory=list)  # worker ranks holding its shards, rank order
    error: str | None = None
    rank_bytes: list[int] = field(default_factory=list)  # resident parameter bytes on each rank
    loads: int = 0
    last_used: float = 0.0
    load_gen: int = 0  # bumped by every load, unload and recovery: replies to older ones are ignored
    load_in_flight: bool = False
    waiters: list[bytes] = field(default_factory=list)  # operators waiting on a load
    kv_tokens: int = 0  # tokens the KV pool holds once loaded
    parked: list = field(default_factory=list)  # (front peer, Submit) waiting for the model to load
    est_bytes: int = 0  # estimated bytes per rank (weights + KV pool), set when placed
    measured_bytes: int = 0  # weights per rank as measured by its last load (better than an estimate)
    kv_bytes: int = 0  # the KV pool's bytes per rank (and a hybrid's state pool), once loaded
    pinned: bool = False  # never evicted; starts as the entry's `pinned`, operators may change it
    load_reason: str = ""  # demand | operator | preload: a demand load nobody waits for is cancelled
    evictions: int = 0
    load_seconds: float = 0.0  # how long its last load took
    unloading: dict[int, int] = field(default_factory=dict)  # rank -> Unloads sent, not yet answered

    def __post_init__(self) -> None:
        self.pinned = self.entry.pinned

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def context_length(self) -> int:
        native = self.files.config.max_position_embeddings if self.files else 0
        ctx = min(self.entry.max_context or native, native) if native else self.entry.max_context
        # a prompt and its completion must fit the KV pool too (one block stays free for decoding)
        return min(ctx, self.kv_tokens - 16) if self.kv_tokens else ctx

    @property
    def resident(self) -> bool:
        """Holds (or is about to hold) memory on its ranks."""
        return self.status in (ModelStatus.LOADING, ModelStatus.LOADED, ModelStatus.RECOVERING) and bool(self.ranks)

    @property
    def bytes_per_rank(self) -> int:
        """Its footprint on each of its ranks: measured once loaded, estimated before."""
        if self.rank_bytes:
            return max(self.rank_bytes) + self.kv_bytes
        return self.est_bytes

    def describe(self, devices: list[str]) -> dict:
        return {
            "id": self.id,
            "status": self.status,
            "devices": [devices[r] for r in self.ranks]
            if self.status in (ModelStatus.LOADED, ModelStatus.RECOVERING)
            else [],
            "tensor_parallel": self.entry.tensor_parallel,
            "task": self.entry.task,
            "context_length": self.context_length or None,
            "param_bytes": sum(self.rank_bytes),
            "rank_bytes": self.rank_bytes,
            "size_bytes": self.bytes_per_rank,
            "pinned": self.pinned,
            "residency_priority": self.entry.residency_priority,
            "loads": self.loads,
            "load_seconds": round(self.load_seconds, 3),
            "evictions": self.evictions,
            "idle_s": round(time.monotonic() - self.last_used, 1) if self.last_used else None,
            "error": self.error,
        }


class Registry:
    def __init__(self, catalogue: Catalogue):
        self.catalogue = catalogue
        self.models = {m.id: ModelState(m) for m in catalogue.models}

    def resolve(self, name: str) -> ModelState | None:
        entry = self.catalogue.resolve(name)
        return self.models.get(entry.id) if entry else None

    def touch(self, state: ModelState) -> None:
        state.last_used = time.monotonic()
