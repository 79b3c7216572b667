"""Model lifecycle: load, unload, evict, recover. The one room that changes a model's status.

Its steps: a model's files are read off the loop (a helper thread), it is placed and room is
made for it (placement), its ranks are sent ``LoadDenseShard`` once their workers are up, and on
success the stepper gets a scheduler for it and the requests parked on it are admitted. An
unload, eviction or recovery sends ``Unload`` to each rank; a rank that does not answer is wedged
and is killed (its death is the supervisor's). Every status change bumps ``state.load_gen``, so a
late reply from an older incarnation is recognised and dropped.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import time
from collections import Counter
from typing import TYPE_CHECKING

from cortex.engine.calls import CallError, CallErrorKind
from cortex.leader.placement import Placement
from cortex.leader.shared import RETRY_AFTER_NO_MEMORY_S, Shared
from cortex.leader.stepper import Stepper
from cortex.models import source
from cortex.models.memory import kv_headroom, pool_bytes
from cortex.models.registry import ModelState, ModelStatus
from rpc.engine import Answer, Failure, FailureKind
from rpc.messages import KV_BLOCK_SIZE, LoadDenseShard, Unload
from workers.sharding import ShardingError, check_split

if TYPE_CHECKING:
    from cortex.leader.admission import Admission
    from cortex.leader.supervision import WorkerSupervisor

log = logging.getLogger("cortex.leader")

UNLOAD_TIMEOUT_S = 10.0  # a rank slower than this to unload is wedged and gets restarted


def free_port() -> int:
    """A free loopback port for a tensor-parallel group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelLifecycle:
    def __init__(self, shared: Shared, placement: Placement, stepper: Stepper) -> None:
        self.shared = shared
        self.placement = placement
        self.stepper = stepper
        self.file_reads: dict[concurrent.futures.Future, ModelState] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-files")
        self.counters: Counter[str] = Counter()  # evictions:<reason>, defrag_restarts, loads_cancelled
        self.admission: Admission  # wired by Leader: parked requests go on once their model loads
        self.supervisor: WorkerSupervisor  # wired by Leader: worker readiness, kills, cycle counts

    # -- loading ----------------------------------------------------------------------------------------

    def load(self, state: ModelState, reason: str = "demand") -> None:
        """Start loading (no-op while a load or recovery is under way). Files are read off the loop;
        the model is placed, and room made for it, once they are known and its workers are up.
        ``reason``: demand (a request), operator, preload; a demand load nobody waits for any more
        is cancelled."""
        if state.status in (ModelStatus.LOADING, ModelStatus.RECOVERING, ModelStatus.LOADED):
            if reason != "demand":
                state.load_reason = reason  # somebody now wants it for itself
            return
        state.status, state.error, state.ranks = ModelStatus.LOADING, None, []
        state.load_gen += 1
        state.load_reason = reason
        self.shared.stats.load_begun(state)
        if state.files is None:
            self.file_reads[self.pool.submit(source.read, state.entry)] = state
        else:
            self._send_load(state)

    def check_file_reads(self) -> None:
        for fut in [f for f in self.file_reads if f.done()]:
            state = self.file_reads.pop(fut)
            try:
                state.files = fut.result()
            except Exception as exc:
                self._load_failed(state, str(exc))
                continue
            self._send_load(state)

    def send_pending_loads(self) -> None:
        """Loads that wait for workers to come up (at start-up, or after a crash), and for the
        group's previous incarnation to be torn down (no Unload still unanswered)."""
        for state in self.shared.registry.models.values():
            if (
                state.status in (ModelStatus.LOADING, ModelStatus.RECOVERING)
                and not state.load_in_flight
                and state.files is not None
                and not state.unloading
            ):
                self._send_load(state)

    def _refusal(self, state: ModelState) -> str | None:
        """Why this model cannot be loaded as configured, checked before any worker is asked."""
        n = state.entry.tensor_parallel
        if n > 1 and state.files.format == "gguf":
            return f"{state.id}: tensor parallelism is not supported for GGUF files; use safetensors or tensor_parallel = 1"
        try:
            check_split(state.files.config, n, state.id)
        except ShardingError as exc:
            return str(exc)
        return None

    def _place(self, state: ModelState) -> bool:
        """Choose the model's ranks and make room on them; False while that must wait, or failed."""
        refusal = self._refusal(state)
        if refusal:
            self._load_failed(state, refusal)
            return False
        try:
            ranks = self.placement.place(state)
        except ValueError as exc:
            self._load_failed(state, str(exc))
            return False
        if ranks is None:
            return False  # sent by send_pending_loads once enough workers answer
        state.ranks = ranks
        state.est_bytes = self.placement.estimate(state, self.shared.devices[ranks[0]], len(ranks))
        if not self._room_for(state):
            return False
        log.info(
            "loading model %s on %s (%.0f MiB per device)",
            state.id,
            [self.shared.devices[r] for r in state.ranks],
            state.est_bytes / 2**20,
        )
        return True

    def _send_load(self, state: ModelState) -> None:
        if not state.ranks and not self._place(state):  # a fresh load: placed once its workers are up
            return
        if not self.supervisor.ready(state.ranks):
            return  # sent by send_pending_loads once every rank's worker answers
        files, n, gen, device = state.files, len(state.ranks), state.load_gen, self.shared.devices[state.ranks[0]]
        dtype, kv_dtype = self.placement.dtype(state, device), self.placement.kv_dtype(state, device)
        address = f"127.0.0.1:{free_port()}" if n > 1 else ""
        kv_blocks, slots = self.placement.kv_blocks(state, n, kv_dtype), self.placement.state_slots(state)
        checkpoints = self.placement.state_checkpoints(state)
        headroom = kv_headroom(self.shared.cfg, self.shared.devices, state.ranks)  # -1: kv_blocks exactly
        engine = self.shared.cfg.engine
        state.load_in_flight = True

        def msg(i: int) -> LoadDenseShard:
            return LoadDenseShard(
                model_id=state.id,
                format=files.format,
                files=[str(f) for f in files.files],
                config=files.config.to_dict(),
                dtype=dtype,
                rank=i,
                world_size=n,
                dist_address=address,
                group_timeout_s=engine.group_timeout_s,
                vocab_limit=files.tokenizer.vocab_size,
                kv_blocks=kv_blocks,
                kv_dtype=kv_dtype,
                quantize=state.entry.quantize,
                state_slots=slots + checkpoints,
                cuda_graphs=engine.cuda_graphs,
                max_seqs=engine.max_seqs,
                kv_headroom=headroom,
            )

        def done(replies: dict, error: CallError | None) -> None:
            if gen != state.load_gen:
                return  # a newer load or recovery superseded this one
            state.load_in_flight = False
            if error:
                self.unload_ranks(state, state.ranks)  # leave no half-loaded group behind
                self._load_failed(state, error.message)
            else:
                self._loaded(state, [replies[r] for r in state.ranks], slots, checkpoints)

        self.shared.calls.call(state.ranks, msg, engine.load_timeout_s, done)

    def _loaded(self, state: ModelState, loaded: list, state_slots: int = 0, checkpoints: int = 0) -> None:
        blocks = min(r.kv_blocks for r in loaded)
        state.kv_tokens = blocks * KV_BLOCK_SIZE
        state.kv_bytes = max(pool_bytes(r) for r in loaded)  # KV, recurrent state and CUDA graphs
        state.load_seconds = max(r.load_seconds for r in loaded)
        self.stepper.start_model(state, blocks, state_slots, checkpoints)
        state.status, state.error = ModelStatus.LOADED, None
        state.rank_bytes = [r.param_bytes for r in loaded]
        state.measured_bytes = max(state.rank_bytes)
        state.loads += 1
        self.shared.stats.load_ended(state, ok=True)
        log.info(
            "model %s loaded in %.1fs (%.1f MB per rank)", state.id, state.load_seconds, state.measured_bytes / 1e6
        )
        self.answer_waiters(state)
        self.admission.admit_parked(state)
        self.admission.warm_up(state)

    def _room_for(self, state: ModelState) -> bool:
        """Evict what must go for ``state`` to fit on its ranks; False (and the load given up, its
        waiters answered) when it cannot fit."""
        room = self.placement.make_room(state)
        if room.refusal is not None:
            kind = FailureKind.MODEL_TOO_LARGE if room.never_fits else FailureKind.INSUFFICIENT_MEMORY
            log.warning("cannot load %s: %s", state.id, room.refusal)
            self._give_up_load(state, kind, f"model '{state.id}' cannot be loaded: {room.refusal}")
            return False
        strategy = self.shared.cfg.eviction.strategy
        for victim in room.victims:
            self.evict(self.shared.registry.models[victim.id], strategy, f"to make room for {state.id}")
        return True

    def _give_up_load(self, state: ModelState, kind: FailureKind, message: str) -> None:
        """The load will not happen (no room, or nobody wants it any more): back to unloaded, and
        everyone waiting for it answered."""
        state.status, state.error, state.ranks = ModelStatus.UNLOADED, message, []
        state.load_gen += 1
        state.load_in_flight = False
        retry = None if kind == FailureKind.MODEL_TOO_LARGE else RETRY_AFTER_NO_MEMORY_S
        parked, state.parked = state.parked, []
        for peer, req in parked:
            self.shared.refuse(peer, req.request_id, kind, message, retry)
        waiters, state.waiters = state.waiters, []
        for peer in waiters:
            self.shared.reply(peer, Failure("", kind, message, retry))

    def _load_failed(self, state: ModelState, error: str) -> None:
        log.error("loading %s failed: %s", state.id, error)
        state.status, state.error = ModelStatus.FAILED, error
        state.load_in_flight = False
        self.shared.stats.load_ended(state, ok=False)
        message = f"model {state.id!r} failed to load: {error}"  # final until an operator loads it again
        self.stepper.fail_model(state, FailureKind.MODEL_FAILED, message, retry_after=None)
        parked, state.parked = state.parked, []
        for peer, req in parked:
            self.shared.refuse(peer, req.request_id, FailureKind.MODEL_FAILED, message)
        self.answer_waiters(state)

    def answer_waiters(self, state: ModelState) -> None:
        """Operators waiting on a load (the management API) get the model, or why it failed."""
        waiters, state.waiters = state.waiters, []
        for peer in waiters:
            if state.status == ModelStatus.LOADED:
                self.shared.reply(peer, Answer(data=state.describe(self.shared.devices)))
            else:
                self.shared.reply(peer, Failure("", FailureKind.MODEL_FAILED, f"model {state.id!r}: {state.error}"))

    def drop_unwanted_load(self, state: ModelState) -> None:
        """Every client that caused a load has gone: stop it (the worker frees what it loaded)."""
        if state.status != ModelStatus.LOADING or state.load_reason != "demand" or state.parked or state.waiters:
            return
        log.info("cancelling the load of %s: no request waits for it any more", state.id)
        self.counters["loads_cancelled"] += 1
        self.file_reads = {f: s for f, s in self.file_reads.items() if s is not state}
        if state.load_in_flight:
            self.unload_ranks(state, state.ranks)  # after the Load on each worker: frees it
        self._give_up_load(state, FailureKind.MODEL_LOADING, "the load was cancelled")
        state.error = None

    # -- unloading ----------------------------------------------------------------------------------------

    def evict(self, state: ModelState, reason: str, why: str) -> None:
        log.info(
            "evicting %s from %s (%s, idle %.0fs) %s",
            state.id,
            [self.shared.devices[r] for r in state.ranks],
            reason,
            time.monotonic() - state.last_used if state.last_used else 0,
            why,
        )
        state.evictions += 1
        self.counters[f"evictions:{reason}"] += 1
        self.unload_model(state)

    def unload_model(self, state: ModelState) -> None:
        """Free an idle loaded model on every rank (a load/unload cycle on each)."""
        if state.status == ModelStatus.LOADED:
            self.unload_ranks(state, state.ranks)
            self.supervisor.count_cycle(state.ranks)
            log.info("model %s unloaded from %s", state.id, [self.shared.devices[r] for r in state.ranks])
        self.stepper.stop_model(state.id)
        state.status, state.error, state.rank_bytes, state.ranks = ModelStatus.UNLOADED, None, [], []
        state.load_gen += 1

    def unload_ranks(self, state: ModelState, ranks: list[int]) -> None:
        """Free the model on these ranks. A rank that does not answer is wedged (e.g. blocked in a
        collective with a dead peer) and is killed. Until every rank has answered or been killed, no
        reload is sent: a rank that took one would wait in the group's rendezvous for a peer that is
        about to be killed, miss the next Unload and be killed in turn, round after round."""
        for r in ranks:
            if not self.shared.workers[r].alive():
                continue
            state.unloading[r] = state.unloading.get(r, 0) + 1

            def done(_replies: dict, error: CallError | None, r: int = r) -> None:
                left = state.unloading.pop(r, 1) - 1
                if left:
                    state.unloading[r] = left
                if error and error.kind == CallErrorKind.TIMEOUT:
                    self.supervisor.kill(r, f"did not answer Unload({state.id})")  # its death reloads
                elif not (error and error.kind == CallErrorKind.DIED):  # it answered: the reload may go
                    self.send_pending_loads()

            self.shared.calls.call([r], lambda _: Unload(state.id), UNLOAD_TIMEOUT_S, done)

    # -- failures ------------------------------------------------------------------------------------------

    def recover(self, state: ModelState, cause: str, dead_rank: int | None = None) -> None:
        """Fail the model's requests, tear its group down and reload it once all its workers are up."""
        log.warning("model %s: %s; recovering", state.id, cause)
        state.status, state.error = ModelStatus.RECOVERING, cause
        state.load_gen += 1
        self.shared.stats.load_begun(state)  # the reload that follows is timed like any load
        state.load_in_flight = False
        self.stepper.fail_model(state, FailureKind.WORKER_FAILED, f"model {state.id!r} failed: {cause}")
        self.stepper.stop_model(state.id)
        self.unload_ranks(state, [r for r in state.ranks if r != dead_rank])
        self.send_pending_loads()

    def kill_group(self, state: ModelState, cause: str) -> None:
        """A wedged group (watchdog): kill its workers; their deaths drive the recovery."""
        log.error("model %s: %s; restarting its worker(s) %s", state.id, cause, state.ranks)
        self.recover(state, cause)  # status and requests reflect it at once, not when the deaths are reaped
        for r in state.ranks:
            self.shared.workers[r].kill()

    def worker_died(self, rank: int, cause: str) -> None:
        """A worker died: every model with a rank on it recovers (its other ranks are torn down)."""
        for state in self.shared.registry.models.values():
            if rank in state.ranks and state.status in (
                ModelStatus.LOADED,
                ModelStatus.LOADING,
                ModelStatus.RECOVERING,
            ):
                self.recover(state, cause, dead_rank=rank)

    def restart_for_defrag(self, rank: int) -> None:
        """The worker on ``rank`` is about to restart: its models' groups are torn down; pinned ones
        load again on the same ranks once it is back, others are evicted (they load on demand)."""
        models = self.shared.registry.models.values()
        for state in [s for s in models if rank in s.ranks and s.status == ModelStatus.LOADED]:
            self.unload_ranks(state, [r for r in state.ranks if r != rank])  # a TP group re-forms from scratch
            self.stepper.stop_model(state.id)
            state.load_gen += 1
            if state.pinned:
                state.status = ModelStatus.LOADING  # same ranks; sent once the new worker answers its Ping
                state.load_in_flight, state.rank_bytes = False, []
            else:
                self.evict(state, "defrag", f"while worker {rank} restarts")

    # -- operators ------------------------------------------------------------------------------------------

    def operator_load(self, state: ModelState) -> None:
        """An operator's load (the management API, cortex-admin): it also retries a failed one."""
        if state.status == ModelStatus.FAILED:
            state.status = ModelStatus.UNLOADED
        self.load(state, "operator")

    def operator_unload(self, state: ModelState) -> str | None:
        """Unload a model now (the management API, cortex-admin, reload); why it cannot be, if so."""
        busy = len(self.stepper.requests.of_model(state.id)) + self.stepper.embedder.count(state.id)
        if busy:
            return f"model '{state.id}' has {busy} request(s) in flight"
        if state.status in (ModelStatus.LOADING, ModelStatus.RECOVERING):
            return f"model '{state.id}' is {state.status}"
        self.unload_model(state)
        return None

    def operator_evict(self, state: ModelState) -> str | None:
        """An operator's eviction (reason "admin"); why it cannot be, if so."""
        if state.status != ModelStatus.LOADED:
            return f"model '{state.id}' is {state.status}, not loaded"
        kept = self.placement.kept(state)
        if kept is not None:
            return f"model '{state.id}' cannot be evicted: {kept}"
        self.evict(state, "admin", "by an operator")
        return None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
