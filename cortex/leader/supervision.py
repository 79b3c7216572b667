"""Worker supervision: start each rank's worker, notice its death, restart it, defragment.

It owns the worker processes (their ``WorkerHandle``s, shared read-only with the other rooms)
and the count of load/unload cycles each has been through. A worker is ready once it answers
``Ping`` (its first answer also tells placement how much memory the device has). A death is seen
through the worker's pidfd in the leader's poll set: the models on it recover (lifecycle) and the
worker starts again. After ``defrag_after_cycles`` cycles an idle worker is restarted on purpose,
since a fresh process returns fragmented device memory.
"""

from __future__ import annotations

import logging

from cortex.engine.calls import CallError, CallErrorKind
from cortex.leader.lifecycle import ModelLifecycle
from cortex.leader.placement import Placement
from cortex.leader.shared import Shared
from cortex.leader.stepper import Stepper
from cortex.models.registry import ModelStatus
from cortex.supervisor import WorkerHandle
from rpc.messages import Ping

log = logging.getLogger("cortex.leader")

PING_TIMEOUT_S = 120.0  # a fresh worker imports torch before it answers


class WorkerSupervisor:
    def __init__(self, shared: Shared, placement: Placement, lifecycle: ModelLifecycle, stepper: Stepper) -> None:
        self.shared = shared
        self.placement = placement
        self.lifecycle = lifecycle
        self.stepper = stepper
        self.cycles = [0] * len(shared.workers)  # load/unload cycles per rank since its worker started

    @property
    def workers(self) -> list[WorkerHandle]:
        return self.shared.workers

    def start(self, w: WorkerHandle) -> None:
        w.start()
        self.cycles[w.rank] = 0  # a fresh process: nothing fragmented yet

        def on_pong(replies: dict, error: CallError | None) -> None:
            if error:
                log.error("worker %d did not come up: %s", w.rank, error.message)
                w.kill()  # its exit is handled like any death: restarted
                return
            pong = replies[w.rank]
            w.ready = True
            log.info("worker %d ready (pid %d, %s)", w.rank, pong.pid, pong.device)
            self.placement.learn_budget(w.rank, pong.memory_free)
            self.lifecycle.send_pending_loads()
            w.start_spare()  # ready for the next restart of this rank

        self.shared.calls.call([w.rank], lambda _: Ping(), PING_TIMEOUT_S, on_pong)

    def ready(self, ranks: list[int]) -> bool:
        """Every worker of ``ranks`` answers and none is about to restart."""
        return all(self.workers[r].ready and not self.workers[r].expected_exit for r in ranks)

    def count_cycle(self, ranks: list[int]) -> None:
        for r in ranks:
            self.cycles[r] += 1

    def kill(self, rank: int, why: str) -> None:
        log.error("worker %d %s; restarting it", rank, why)
        self.workers[rank].kill()

    def on_exit(self, w: WorkerHandle) -> None:
        """A worker's pidfd became readable: reap it, recover its models, start it again."""
        how = w.reap()
        if w.expected_exit:  # a defragmentation restart
            w.expected_exit = False
            log.info("worker %d (%s) stopped for defragmentation; restarting it", w.rank, w.device)
            self.shared.calls.fail_rank(w.rank, CallErrorKind.DIED, "restarted for defragmentation")
            self.start(w)
            return
        cause = f"worker {w.rank} ({w.device}) died: {how}"
        log.error("%s", cause)
        if self.shared.stopping.is_set():
            return
        self.lifecycle.worker_died(w.rank, cause)
        self.shared.calls.fail_rank(w.rank, CallErrorKind.DIED, cause)
        w.restarts += 1
        self.shared.stats.worker_restarted(w.rank, w.device)
        self.start(w)

    # -- defragmentation -------------------------------------------------------------------------------

    def maybe_defrag(self) -> None:
        """A worker that has been through ``defrag_after_cycles`` load/unload cycles is restarted
        once nothing runs on it (a fresh process returns fragmented memory); pinned models on it
        are reloaded, others unloaded (they load again on demand)."""
        limit = self.shared.cfg.eviction.defrag_after_cycles
        if not limit or self.shared.stopping.is_set():
            return
        for w in self.workers:
            if self.cycles[w.rank] >= limit and w.ready and not w.expected_exit and self._quiet(w.rank):
                self._defrag(w)

    def _quiet(self, rank: int) -> bool:
        models = self.shared.registry.models.values()
        on_rank = [s for s in models if rank in s.ranks and s.status != ModelStatus.UNLOADED]
        return all(
            s.status == ModelStatus.LOADED and not self.stepper.busy(s) and not self.stepper.stepping(s.id)
            for s in on_rank
        )

    def _defrag(self, w: WorkerHandle) -> None:
        log.info(
            "worker %d (%s): %d load/unload cycles; restarting it to defragment", w.rank, w.device, self.cycles[w.rank]
        )
        self.lifecycle.counters["defrag_restarts"] += 1
        self.lifecycle.restart_for_defrag(w.rank)
        w.expected_exit = True
        w.terminate()

    def describe(self) -> list[dict]:
        return [
            {
                "rank": w.rank,
                "device": w.device,
                "pid": w.pid,
                "alive": w.alive(),
                "ready": w.ready,
                "restarts": w.restarts,
                "last_exit": w.last_exit,
            }
            for w in self.workers
        ]

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
