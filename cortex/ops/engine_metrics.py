"""The leader's measurements: one-line calls from the rooms of ``cortex/leader/`` land here.

Everything runs on the leader's loop thread; only the metric objects are read by the exporter
thread. Gauges are refreshed from leader state a few times a second rather than on every change,
so the loop does not pay per event for what a 15 s scrape reads; and at the turn after a scrape
asks (``metrics.SCRAPES``), so a scrape reads the state of that moment.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cortex.models.registry import ModelStatus
from cortex.ops import metrics as m

if TYPE_CHECKING:
    from cortex.engine.scheduler import Work
    from cortex.engine.sequence import Sequence
    from cortex.models.registry import ModelState
    from cortex.ops.control import NodeControl

REFRESH_S = 0.25


class EngineMetrics:
    def __init__(self) -> None:
        self.load_started: dict[str, float] = {}  # model id -> when its load began
        self.last_refresh = 0.0
        self.counted: dict[str, int] = {}  # the leader's counters as last added to the metrics
        self.scrapes_answered = 0  # metrics.SCRAPES.asked when the gauges were last set for scrapes

    # -- requests -----------------------------------------------------------------------------------

    def step_started(self, model: str, work: list[Work], overlapped: bool = False) -> None:
        if overlapped:
            m.OVERLAPPED_STEPS.labels(model).inc()
        now = time.monotonic()
        for w in work:
            if w.seq.admitted_at is None:
                w.seq.admitted_at = now
                m.QUEUE_TIME.labels(model).observe(now - w.seq.arrived)

    def tokens(self, seq: Sequence, n: int = 1) -> None:
        """``n`` tokens of ``seq`` arrived together (a multi-step returns several): each after the
        last counts an equal share of the time since the one before them."""
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = seq.last_token_at = now
            m.TTFT.labels(seq.model_id).observe(now - seq.arrived)
            n -= 1
        if n > 0:
            inter, share = m.INTER_TOKEN.labels(seq.model_id), (now - seq.last_token_at) / n
            for _ in range(n):
                inter.observe(share)
        seq.last_token_at = now

    def sequence_ended(self, seq: Sequence, outcome: str) -> None:
        """Once per sequence (finished, cancelled or failed). Prompt and cached tokens count once
        per request (its first choice), as the API's usage does; generated tokens of every choice."""
        model = seq.model_id
        if seq.index == 0 and seq.admitted_at is not None:
            m.PROMPT_TOKENS.labels(model).inc(seq.prompt_len)
            m.CACHED_TOKENS.labels(model).inc(seq.cached_tokens)
        if seq.output_len:
            m.GENERATION_TOKENS.labels(model).inc(seq.output_len)
        if seq.output_len > 1 and seq.first_token_at is not None and seq.last_token_at > seq.first_token_at:
            m.TOKENS_PER_SECOND.labels(model).observe((seq.output_len - 1) / (seq.last_token_at - seq.first_token_at))
        if seq.index == 0:
            m.E2E_ENGINE.labels(model, outcome).observe(time.monotonic() - seq.arrived)

    @staticmethod
    def embedded(model: str, tokens: int) -> None:
        """An embedding request answered: its inputs' tokens are prompt tokens, as its usage says."""
        m.PROMPT_TOKENS.labels(model).inc(tokens)

    @staticmethod
    def cancelled(model: str, stage: str) -> None:
        m.CANCELLATIONS.labels(model, stage).inc()

    # -- models and workers ---------------------------------------------------------------------------

    def load_begun(self, state: ModelState) -> None:
        self.load_started[state.id] = time.monotonic()

    def load_ended(self, state: ModelState, ok: bool) -> None:
        m.MODEL_LOADS.labels(state.id, "ok" if ok else "failed").inc()
        t0 = self.load_started.pop(state.id, None)
        if ok and t0 is not None:
            m.MODEL_LOAD_DURATION.labels(state.id).observe(time.monotonic() - t0)

    @staticmethod
    def worker_restarted(rank: int, device: str) -> None:
        m.WORKER_RESTARTS.labels(str(rank), device).inc()

    def _sync_counters(self, counters: dict[str, int]) -> None:
        """The leader counts evictions (``evictions:<reason>``) and defragmentation restarts in
        the leader's ``counters`` (also shown by /health); the metrics follow them by difference."""
        for key, count in counters.items():
            new = count - self.counted.get(key, 0)
            if new <= 0:
                continue
            self.counted[key] = count
            kind, _, detail = key.partition(":")
            if kind == "evictions":
                m.EVICTIONS.labels(detail).inc(new)
            elif kind == "defrag_restarts":
                m.DEFRAG_RESTARTS.inc(new)
            elif kind == "loads_cancelled":
                m.LOADS_CANCELLED.inc(new)

    # -- gauges ------------------------------------------------------------------------------------------

    def refresh(self, leader: NodeControl, force: bool = False) -> None:
        """Once per turn of the loop: set the gauges if a scrape waits for them, or every REFRESH_S."""
        now = time.monotonic()
        scrapes = m.SCRAPES
        scrapes.turned_at = now
        asked = scrapes.asked
        if not force and asked == self.scrapes_answered and now - self.last_refresh < REFRESH_S:
            return
        self.last_refresh = now
        self._set_gauges(leader)
        if asked != self.scrapes_answered:
            self.scrapes_answered = asked
            scrapes.answered(asked)

    def _set_gauges(self, leader: NodeControl) -> None:
        for model_id, state in leader.registry.models.items():
            sched = leader.schedulers.get(model_id)
            running = len(sched.running) if sched else 0
            waiting = (len(sched.waiting) if sched else 0) + len(state.parked)
            m.RUNNING.labels(model_id).set(running)
            m.WAITING.labels(model_id).set(waiting)
            m.MODEL_LOADED.labels(model_id).set(1 if state.status == ModelStatus.LOADED else 0)
            blocks = sched.blocks if sched else None
            total, used = (blocks.num_blocks, blocks.used) if blocks else (0, 0)
            m.KV_BLOCKS.labels(model_id, "total").set(total)
            m.KV_BLOCKS.labels(model_id, "used").set(used)
            m.KV_BLOCKS.labels(model_id, "cached").set(blocks.num_cached if blocks else 0)
            m.KV_USAGE.labels(model_id).set(used / total if total else 0.0)
        for w in leader.workers:
            m.WORKER_UP.labels(str(w.rank), w.device).set(1 if w.alive() and w.ready else 0)
        m.DRAINING.set(1 if leader.draining else 0)
        self._sync_counters(leader.counters)
        for d in leader.device_memory():  # budget and free are None where the device is not measured
            for kind in ("budget", "used", "free", "evictable"):
                if d.get(f"{kind}_bytes") is not None:
                    m.DEVICE_MEMORY.labels(str(d["rank"]), d["device"], kind).set(d[f"{kind}_bytes"])
