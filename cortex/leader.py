"""The leader: the one owner of state on a host.

A single-threaded event loop (`poll_once`, driven by `cortex serve`) over ZeroMQ sockets and worker pidfds:
- the front's requests (Submit / Cancel / Query) arrive on the engine socket;
- worker replies complete calls (loads, steps) that were sent without blocking;
- a worker that exits wakes the loop through its pidfd, fails its requests and is respawned.
Nothing here blocks on a worker, so the front is answered (e.g. 503 while loading) at all times.
Reading model files (tokenizer, GGUF metadata) runs on a helper thread for the same reason.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
import time
from collections import Counter

import zmq

from cortex.api.auth import write_auth_file
from cortex.chat.detokenizer import IncrementalDecoder
from cortex.chat.prompt import opens_in_reasoning
from cortex.chat.tokenizer import token_bytes
from cortex.config import Config, ModelEntry
from cortex.engine.blocks import BlockManager
from cortex.engine.calls import WorkerCalls, ignore
from cortex.engine.constraint import Grammars, Rules
from cortex.engine.prepare import Prepared, Preparer, Refused, prepare
from cortex.engine.requests import RequestTable
from cortex.engine.scheduler import Scheduler, Work
from cortex.engine.sequence import Sequence
from cortex.fleet.fleet import Fleet
from cortex.models import memory, source
from cortex.models.registry import ModelState, ModelStatus, Registry
from cortex.ops import reload as ops_reload
from cortex.ops.admin import AdminServer
from cortex.ops.engine_metrics import EngineMetrics
from cortex.supervisor import WorkerHandle, resolve_devices
from rpc.codec import replace
from rpc.engine import Answer, Cancel, Delta, Failure, Finished, ModelOp, PeerFailed, Query, Started, Submit, Waiting
from rpc.messages import (
    KV_BLOCK_SIZE,
    ClearKvCache,
    Error,
    GenerateStep,
    LoadDenseShard,
    Ping,
    ReleaseSequences,
    SeqInput,
    Unload,
)
from rpc.transport import RpcServer
from workers.sharding import ShardingError, check_split, kv_block_bytes

log = logging.getLogger("cortex.leader")

PING_TIMEOUT_S = 120.0  # a fresh worker imports torch before it answers
RETRY_AFTER_LOADING_S = 5
RETRY_AFTER_NO_MEMORY_S = 10
NO_BUDGET = 2**62  # a device whose memory cannot be measured is not accounted
RETRY_AFTER_DRAINING_S = 30
UNLOAD_TIMEOUT_S = 10.0  # a rank slower than this to unload is wedged and gets restarted


def free_port() -> int:
    """A free loopback port for a tensor-parallel group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Leader:
    def __init__(self, cfg: Config, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        run_dir = cfg.node.run_dir
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.engine_endpoint = f"ipc://{run_dir}/engine.sock"
        self.devices = resolve_devices(cfg.node.devices)
        self.registry = Registry(cfg.catalogue)
        self.workers = [
            WorkerHandle(r, d, run_dir, self.ctx, cfg.node.threads, cfg.log_level) for r, d in enumerate(self.devices)
        ]
        self.frontend: RpcServer | None = None
        self.calls = WorkerCalls(self.workers)  # messages to workers awaiting their replies
        self.schedulers: dict[str, Scheduler] = {}  # model id -> its batcher, while loaded
        self.in_flight: dict[str, list[Work]] = {}  # model id -> the work of its step in flight
        self.requests = RequestTable()  # live sequences (waiting or running), indexed by request, model, client
        self.grammars: dict[str, Grammars] = {}  # model id -> its grammar compiler (built on first use)
        self.preparer = Preparer()  # prompts and grammars of new requests, off this loop
        self.file_reads: dict[concurrent.futures.Future, ModelState] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-files")
        self.stopping = threading.Event()
        self.started = time.time()
        self.budgets: dict[int, int] = {}  # rank -> bytes models may use (budget - headroom), once known
        self.cycles = [0] * len(self.workers)  # load/unload cycles per rank since its worker started
        self.counters: Counter[str] = Counter()  # evictions:<reason>, defrag_restarts, loads_cancelled
        self.stats = EngineMetrics()
        self.admin: AdminServer | None = None
        self.auth_file = run_dir / "front-auth.json"  # API key digests for the front; rewritten by reload
        self.draining = False  # refuse new requests; in-flight ones finish (cortex-admin drain, SIGTERM)
        self.stop_at: float | None = None  # SIGTERM: stop once idle, or at this monotonic time at the latest
        self.pending_models: dict[str, ModelEntry | None] = {}  # reload: replace (entry) or remove (None) once idle
        # peers to route to; a node with no devices is a pure gateway and always routes
        self.fleet = Fleet(cfg) if cfg.peers or not self.devices else None

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.frontend = RpcServer(self.engine_endpoint, self.ctx, mode=0o600)
        self.admin = AdminServer(self.cfg.node.run_dir, self.ctx)
        self._publish_keys()
        for w in self.workers:
            self._start_worker(w)
        for state in self.registry.models.values():
            if state.entry.preload and self.devices:
                self.load(state, "preload")
        if self.fleet:
            self.fleet.start()

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        for seq in self.requests:
            self._fail(seq, "shutting_down", "the server is shutting down", retry_after=15)
        for state in self.registry.models.values():
            parked, state.parked = state.parked, []
            for peer, req in parked:
                self._reject(peer, req.request_id, "shutting_down", "the server is shutting down", 15)
        for peer, req, _ in self.preparer.abandon():
            self._reject(peer, req.request_id, "shutting_down", "the server is shutting down", 15)
        if self.fleet:
            self.fleet.stop()
        for w in self.workers:
            w.stop()
        if self.frontend:
            self.frontend.close()
        if self.admin:
            self.admin.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop -----------------------------------------------------------------------------------

    def poll_once(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend.socket, zmq.POLLIN)
        poller.register(self.admin.socket, zmq.POLLIN)
        by_socket, by_fd = {}, {}
        for w in self.workers:
            if w.client:
                poller.register(w.client.socket, zmq.POLLIN)
                by_socket[w.client.socket] = w
            if w.pidfd is not None:
                poller.register(w.pidfd, zmq.POLLIN)
                by_fd[w.pidfd] = w
        poller.register(self.preparer.wake_fd, zmq.POLLIN)
        ready = dict(poller.poll(self._poll_timeout_ms()))
        for w in list(by_fd.values()):
            if w.pidfd in ready:
                self._on_worker_exit(w)
        for sock, w in by_socket.items():
            if sock in ready and w.client and w.client.socket is sock:
                self.calls.on_replies(w)
        if self.frontend.socket in ready:
            for _ in range(64):  # bounded, so a flood of requests cannot starve the workers
                got = self.frontend.recv(0)
                if got is None:
                    break
                peer, _, msg = got
                if msg is not None:
                    self._on_front_safely(peer, msg)
        if self.admin.socket in ready:
            self.admin.serve_ready(self)
        if self.preparer.wake_fd in ready:
            self._take_prepared()
        self._check_file_reads()
        self.calls.check_deadlines()
        self._check_queue_deadlines()
        self._maybe_defrag()
        if self.pending_models:
            ops_reload.settle(self)
        self._schedule()
        self._check_stop()
        self.stats.refresh(self)

    def _poll_timeout_ms(self) -> int:
        if self.file_reads:
            return 20
        return 100  # wake regularly for deadlines and stop requests

    # -- workers --------------------------------------------------------------------------------------

    def _start_worker(self, w: WorkerHandle) -> None:
        w.start()
        self.cycles[w.rank] = 0  # a fresh process: nothing fragmented yet

        def on_pong(replies, error):
            if error:
                log.error("worker %d did not come up: %s", w.rank, error.message)
                w.kill()  # its exit is handled like any death: restarted
                return
            pong = replies[w.rank]
            w.ready = True
            log.info("worker %d ready (pid %d, %s)", w.rank, pong.pid, pong.device)
            if w.rank not in self.budgets:
                self.budgets[w.rank] = self._budget(w.rank, pong.memory_free)
            self._send_pending_loads()

        self.calls.call([w.rank], lambda _: Ping(), PING_TIMEOUT_S, on_pong)

    def _budget(self, rank: int, measured_free: int) -> int:
        """Bytes models may use on this rank's device: the configured budget, else what its worker
        measured free at start-up (shared evenly by workers on the same device), less the headroom."""
        mb = 2**20
        budget = self.cfg.node.memory_budget_mb * mb
        if not budget:
            if not measured_free:
                return NO_BUDGET
            budget = measured_free // sum(d == self.devices[rank] for d in self.devices)
        budget = max(0, budget - self.cfg.node.memory_headroom_mb * mb)
        log.info("device %s (rank %d): %.0f MiB for models", self.devices[rank], rank, budget / mb)
        return budget

    def _on_worker_exit(self, w: WorkerHandle) -> None:
        how = w.reap()
        if w.expected_exit:  # a defragmentation restart
            w.expected_exit = False
            log.info("worker %d (%s) stopped for defragmentation; restarting it", w.rank, w.device)
            self.calls.fail_rank(w.rank, "died", "restarted for defragmentation")
            self._start_worker(w)
            return
        cause = f"worker {w.rank} ({w.device}) died: {how}"
        log.error("%s", cause)
        if self.stopping.is_set():
            return
        for state in self.registry.models.values():
            if w.rank in state.ranks and state.status in (
                ModelStatus.LOADED,
                ModelStatus.LOADING,
                ModelStatus.RECOVERING,
            ):
                self._recover(state, cause, dead_rank=w.rank)
        self.calls.fail_rank(w.rank, "died", cause)
        w.restarts += 1
        self.stats.worker_restarted(w.rank, w.device)
        self._start_worker(w)

    def _kill_group(self, state: ModelState, cause: str) -> None:
        """A wedged group (watchdog): kill its workers; their deaths drive the recovery."""
        log.error("model %s: %s; restarting its worker(s) %s", state.id, cause, state.ranks)
        self._recover(state, cause)  # status and requests reflect it at once, not when the deaths are reaped
        for r in state.ranks:
            self.workers[r].kill()

    # -- model loading ----------------------------------------------------------------------------------

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
        self.stats.load_begun(state)
        if state.files is None:
            self.file_reads[self.pool.submit(source.read, state.entry)] = state
        else:
            self._send_load(state)

    def _place(self, state: ModelState) -> list[int] | None:
        """Ranks of the workers that will hold the model, or None while they are not all up: its
        configured devices, else the ready workers where it fits best (free without eviction, then
        most free), fewest models among equals. Devices may repeat (["cpu", "cpu"]): each entry
        takes a distinct worker."""
        n = state.entry.tensor_parallel
        if n > len(self.devices):
            raise ValueError(f"{state.id}: tensor_parallel={n} needs {n} devices; this node has {self.devices}")
        if state.entry.devices:
            free = list(range(len(self.devices)))
            ranks = []
            for d in state.entry.devices:
                match = next((r for r in free if self.devices[r] == d), None)
                if match is None:
                    raise ValueError(f"{state.id}: device {d} is not among this node's devices {self.devices}")
                free.remove(match)
                ranks.append(match)
            return ranks if all(self.workers[r].ready for r in ranks) else None
        ready = [r for r in range(len(self.devices)) if self.workers[r].ready]
        if len(ready) < n:
            return None
        need = self._estimate(state, self.devices[ready[0]], n)

        def rank_key(r: int) -> tuple:
            free = self._free(r, state)
            models = sum(r in s.ranks for s in self.registry.models.values() if s is not state and s.resident)
            return (free < need, -free, models, r)

        return sorted(sorted(ready, key=rank_key)[:n])

    def _dtype(self, state: ModelState, device: str) -> str:
        dtype = state.entry.dtype
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        return dtype

    def _kv_dtype(self, state: ModelState, device: str) -> str:
        """The KV pool's dtype. auto: float16 for a float32 model on the CPU (half the bytes per
        token, read by the native kernels; greedy text unchanged on the default model), else the
        model's own dtype."""
        kv, dtype = self.cfg.engine.kv_cache_dtype, self._dtype(state, device)
        if kv == "auto":
            kv = "float16" if device == "cpu" and dtype == "float32" else dtype
        return kv

    def _kv_blocks(self, state: ModelState, n: int, kv_dtype: str) -> int:
        return max(1, self.cfg.engine.kv_cache_mb * 2**20 // kv_block_bytes(state.files.config, n, kv_dtype))

    def _estimate(self, state: ModelState, device: str, n: int) -> int:
        """Bytes per rank: estimated weights (measured ones once it has loaded) plus its KV pool."""
        files, dtype, kv_dtype = state.files, self._dtype(state, device), self._kv_dtype(state, device)
        kv = self._kv_blocks(state, n, kv_dtype) * kv_block_bytes(files.config, n, kv_dtype)
        if state.measured_bytes:  # its weights as measured at its last load
            return state.measured_bytes + kv
        pack = memory.packing(state.entry.quantize, files.format, device.split(":")[0])
        return memory.weight_bytes(files.config, n, dtype, pack) + kv

    def _used(self, rank: int, exclude: ModelState | None = None) -> int:
        return sum(
            s.bytes_per_rank
            for s in self.registry.models.values()
            if s is not exclude and s.resident and rank in s.ranks
        )

    def _free(self, rank: int, exclude: ModelState | None = None) -> int:
        return self.budgets.get(rank, NO_BUDGET) - self._used(rank, exclude)

    def _busy(self, state: ModelState) -> int:
        """Requests in flight, queued or waiting for it (a model with any is never evicted)."""
        return len(self.requests.of_model(state.id)) + len(state.parked) + len(state.waiters)

    def _make_room(self, state: ModelState) -> memory.Room:
        residents = [
            memory.Resident(
                s.id, tuple(s.ranks), s.bytes_per_rank, self._kept(s), s.entry.residency_priority, s.last_used
            )
            for s in self.registry.models.values()
            if s is not state and s.resident
        ]
        return memory.make_room(
            state.bytes_per_rank,
            state.ranks,
            {r: self._free(r, state) for r in state.ranks},
            {r: self.budgets.get(r, NO_BUDGET) for r in state.ranks},
            residents,
            self.cfg.eviction.strategy,
            state.entry.residency_priority,
        )

    def _kept(self, state: ModelState) -> str | None:
        """Why this resident model may not be evicted now; None when it may."""
        if state.pinned:
            return "pinned"
        if state.status != ModelStatus.LOADED:
            return state.status
        busy = self._busy(state)
        if busy or state.id in self.in_flight:
            return f"{busy} request(s) in flight or queued"
        return None

    def _check_file_reads(self) -> None:
        for fut in [f for f in self.file_reads if f.done()]:
            state = self.file_reads.pop(fut)
            try:
                state.files = fut.result()
            except Exception as exc:
                self._load_failed(state, str(exc))
                continue
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

    def _send_load(self, state: ModelState) -> None:
        if not state.ranks:  # a fresh load: placed, and room made, once its workers are up
            refusal = self._refusal(state)
            if refusal:
                self._load_failed(state, refusal)
                return
            try:
                ranks = self._place(state)
            except ValueError as exc:
                self._load_failed(state, str(exc))
                return
            if ranks is None:
                return  # sent by _send_pending_loads once enough workers answer
            state.ranks = ranks
            state.est_bytes = self._estimate(state, self.devices[ranks[0]], len(ranks))
            if not self._room_for(state):
                return
            log.info(
                "loading model %s on %s (%.0f MiB per device)",
                state.id,
                [self.devices[r] for r in state.ranks],
                state.est_bytes / 2**20,
            )
        if not all(self.workers[r].ready and not self.workers[r].expected_exit for r in state.ranks):
            return  # sent by _send_pending_loads once every rank's worker answers
        files, n, gen = state.files, len(state.ranks), state.load_gen
        dtype = self._dtype(state, self.devices[state.ranks[0]])
        kv_dtype = self._kv_dtype(state, self.devices[state.ranks[0]])
        address = f"127.0.0.1:{free_port()}" if n > 1 else ""
        kv_blocks = self._kv_blocks(state, n, kv_dtype)
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
                group_timeout_s=self.cfg.engine.group_timeout_s,
                vocab_limit=files.tokenizer.vocab_size,
                kv_blocks=kv_blocks,
                kv_dtype=kv_dtype,
                quantize=state.entry.quantize,
            )

        def done(replies, error):
            if gen != state.load_gen:
                return  # a newer load or recovery superseded this one
            state.load_in_flight = False
            if error:
                self._unload_ranks(state, state.ranks)  # leave no half-loaded group behind
                self._load_failed(state, error.message)
                return
            loaded = [replies[r] for r in state.ranks]
            blocks = min(r.kv_blocks for r in loaded)
            state.kv_tokens = blocks * KV_BLOCK_SIZE
            state.kv_bytes = max(r.kv_bytes for r in loaded)
            state.load_seconds = max(r.load_seconds for r in loaded)
            self.schedulers[state.id] = Scheduler(
                BlockManager(blocks, KV_BLOCK_SIZE, namespace=state.id),
                self.cfg.engine.max_batch_tokens,
                self.cfg.engine.prefill_chunk,
                self.cfg.engine.max_seqs,
            )
            state.status, state.error = ModelStatus.LOADED, None
            state.rank_bytes = [r.param_bytes for r in loaded]
            state.measured_bytes = max(state.rank_bytes)
            state.loads += 1
            self.stats.load_ended(state, ok=True)
            log.info(
                "model %s loaded in %.1fs (%.1f MB per rank)",
                state.id,
                max(r.load_seconds for r in loaded),
                max(state.rank_bytes) / 1e6,
            )
            self._answer_waiters(state)
            self._admit_parked(state)
            # the grammar compiler reads the whole vocabulary (holding the GIL): once now, not
            # in the middle of streams when the first JSON-mode request arrives
            grammars = self._grammars(state)
            self.preparer.run(lambda: grammars.tokenizer)

        self.calls.call(state.ranks, msg, self.cfg.engine.load_timeout_s, done)

    def _room_for(self, state: ModelState) -> bool:
        """Evict what must go for ``state`` to fit on its ranks; False (and the load given up, its
        waiters answered) when it cannot fit."""
        room = self._make_room(state)
        if room.refusal is not None:
            kind = "model_too_large" if room.never_fits else "insufficient_memory"
            log.warning("cannot load %s: %s", state.id, room.refusal)
            self._give_up_load(state, kind, f"model '{state.id}' cannot be loaded: {room.refusal}")
            return False
        for victim in room.victims:
            self._evict(self.registry.models[victim.id], self.cfg.eviction.strategy, f"to make room for {state.id}")
        return True

    def _give_up_load(self, state: ModelState, kind: str, message: str) -> None:
        """The load will not happen (no room, or nobody wants it any more): back to unloaded, and
        everyone waiting for it answered."""
        state.status, state.error, state.ranks = ModelStatus.UNLOADED, message, []
        state.load_gen += 1
        state.load_in_flight = False
        retry = None if kind == "model_too_large" else RETRY_AFTER_NO_MEMORY_S
        parked, state.parked = state.parked, []
        for peer, req in parked:
            self._reject(peer, req.request_id, kind, message, retry)
        waiters, state.waiters = state.waiters, []
        for peer in waiters:
            self.frontend.reply(peer, 0, Failure("", kind, message, retry))

    def _evict(self, state: ModelState, reason: str, why: str) -> None:
        log.info(
            "evicting %s from %s (%s, idle %.0fs) %s",
            state.id,
            [self.devices[r] for r in state.ranks],
            reason,
            time.monotonic() - state.last_used if state.last_used else 0,
            why,
        )
        state.evictions += 1
        self.counters[f"evictions:{reason}"] += 1
        self._unload_model(state)

    def _unload_model(self, state: ModelState) -> None:
        """Free an idle loaded model on every rank (a load/unload cycle on each)."""
        if state.status == ModelStatus.LOADED:
            self._unload_ranks(state, state.ranks)
            for r in state.ranks:
                self.cycles[r] += 1
            log.info("model %s unloaded from %s", state.id, [self.devices[r] for r in state.ranks])
        self.schedulers.pop(state.id, None)
        state.status, state.error, state.rank_bytes, state.ranks = ModelStatus.UNLOADED, None, [], []
        state.load_gen += 1

    def _load_failed(self, state: ModelState, error: str) -> None:
        log.error("loading %s failed: %s", state.id, error)
        state.status, state.error = ModelStatus.FAILED, error
        state.load_in_flight = False
        self.stats.load_ended(state, ok=False)
        self._fail_model_requests(state, "model_failed", f"model {state.id!r} failed to load: {error}")
        self._answer_waiters(state)

    def _recover(self, state: ModelState, cause: str, dead_rank: int | None = None) -> None:
        """Fail the model's requests, tear its group down and reload it once all its workers are up."""
        log.warning("model %s: %s; recovering", state.id, cause)
        state.status, state.error = ModelStatus.RECOVERING, cause
        state.load_gen += 1
        self.stats.load_begun(state)  # the reload that follows is timed like any load
        state.load_in_flight = False
        self._fail_model_requests(state, "worker_failed", f"model {state.id!r} failed: {cause}")
        self.schedulers.pop(state.id, None)
        self._unload_ranks(state, [r for r in state.ranks if r != dead_rank])
        self._send_pending_loads()

    def _send_pending_loads(self) -> None:
        """Loads that wait for workers to come up (at start-up, or after a crash), and for the
        group's previous incarnation to be torn down (no Unload still unanswered)."""
        for state in self.registry.models.values():
            if (
                state.status in (ModelStatus.LOADING, ModelStatus.RECOVERING)
                and not state.load_in_flight
                and state.files is not None
                and not state.unloading
            ):
                self._send_load(state)

    def _unload_ranks(self, state: ModelState, ranks: list[int]) -> None:
        """Free the model on these ranks. A rank that does not answer is wedged (e.g. blocked in a
        collective with a dead peer) and is killed. Until every rank has answered or been killed, no
        reload is sent: a rank that took one would wait in the group's rendezvous for a peer that is
        about to be killed, miss the next Unload and be killed in turn, round after round."""
        for r in ranks:
            if not self.workers[r].alive():
                continue
            state.unloading[r] = state.unloading.get(r, 0) + 1

            def done(_replies, error, r=r):
                left = state.unloading.pop(r, 1) - 1
                if left:
                    state.unloading[r] = left
                if error and error.kind == "timeout":
                    self._kill_group_rank(r, f"did not answer Unload({state.id})")  # its death reloads
                elif not (error and error.kind == "died"):  # it answered: the reload may go
                    self._send_pending_loads()

            self.calls.call([r], lambda _: Unload(state.id), UNLOAD_TIMEOUT_S, done)

    def _kill_group_rank(self, rank: int, why: str) -> None:
        log.error("worker %d %s; restarting it", rank, why)
        self.workers[rank].kill()

    def _answer_waiters(self, state: ModelState) -> None:
        waiters, state.waiters = state.waiters, []
        for peer in waiters:
            if state.status == ModelStatus.LOADED:
                self.frontend.reply(peer, 0, Answer(data=state.describe(self.devices)))
            else:
                self.frontend.reply(peer, 0, Failure("", "model_failed", f"model {state.id!r}: {state.error}"))

    def _model_op(self, peer: bytes, op: ModelOp) -> None:
        state = self.registry.resolve(op.model)
        if state is None:
            return self._reject(peer, "", "model_not_found", f"The model '{op.model}' does not exist")
        if op.op == "load":
            if state.status == ModelStatus.LOADED:
                return self.frontend.reply(peer, 0, Answer(data=state.describe(self.devices)))
            state.waiters.append(peer)  # single flight: every caller waits for the one load
            self.operator_load(state)
        elif op.op == "unload":
            refusal = self.unload(state)
            if refusal:
                return self._reject(peer, "", "conflict", refusal)
            self.frontend.reply(peer, 0, Answer(data=state.describe(self.devices)))
        elif op.op in ("pin", "unpin"):
            self.set_pinned(state, op.op == "pin")
            self.frontend.reply(peer, 0, Answer(data=state.describe(self.devices)))
        elif op.op == "evict":
            refusal = self.evict(state)
            if refusal:
                return self._reject(peer, "", "conflict", refusal)
            self.frontend.reply(peer, 0, Answer(data=state.describe(self.devices)))
        else:
            self._reject(peer, "", "invalid_request", f"unknown model operation {op.op!r}")

    # -- front requests ------------------------------------------------------------------------------

    def _on_front_safely(self, peer: bytes, msg: object) -> None:
        """One request's bug must never take the loop (and every other request) down."""
        try:
            self._on_front(peer, msg)
        except Exception as exc:
            log.exception("handling %s failed", type(msg).__name__)
            rid = getattr(msg, "request_id", "")
            seq = self.requests.first(rid)
            if seq is not None:
                self._fail(seq, "internal", f"internal error: {type(exc).__name__}")
            else:
                self._reject(peer, rid, "internal", f"internal error: {type(exc).__name__}")

    def _on_front(self, peer: bytes, msg: object) -> None:
        if isinstance(msg, Submit):
            self._submit(peer, msg)
        elif isinstance(msg, Cancel):
            self._cancel(msg.request_id)
        elif isinstance(msg, Query):
            self.frontend.reply(peer, 0, Answer(data=self.query(msg.what)))
        elif isinstance(msg, ModelOp):
            self._model_op(peer, msg)
        elif isinstance(msg, PeerFailed):
            if self.fleet:
                self.fleet.report_failure(msg.endpoint, msg.reason)
        else:
            self.frontend.reply(
                peer, 0, Error(kind="bad_frame", message=f"{type(msg).__name__} is not a front request")
            )

    def _reject(self, peer: bytes, request_id: str, kind: str, message: str, retry_after: int | None = None) -> None:
        self.frontend.reply(peer, 0, Failure(request_id, kind, message, retry_after))

    def _submit(self, peer: bytes, req: Submit) -> None:
        rid = req.request_id
        if self.stopping.is_set():
            return self._reject(peer, rid, "shutting_down", "the server is shutting down", 15)
        state = self.registry.resolve(req.model)
        # route: a model not resident here, or any model while draining (a draining node is not
        # routable in its own view either, so its new requests go to peers that can serve them)
        if self.fleet and not req.hop and (self.draining or state is None or state.status != ModelStatus.LOADED):
            answer = self.fleet.decide(rid, req.model, self.health())
            if answer is not None:  # another node serves it, or no node can
                return self.frontend.reply(peer, 0, answer)
        if self.draining:
            return self._reject(peer, rid, "draining", f"node {self.cfg.node.name} is draining", RETRY_AFTER_DRAINING_S)
        if state is None:
            return self._reject(peer, rid, "model_not_found", f"The model '{req.model}' does not exist")
        if state.status != ModelStatus.LOADED:
            if state.status == ModelStatus.FAILED:
                return self._reject(peer, rid, "model_failed", f"model '{state.id}' failed to load: {state.error}")
            if len(state.parked) >= self.cfg.engine.max_waiting:
                return self._reject(
                    peer,
                    rid,
                    "model_loading",
                    f"model '{state.id}' is {state.status} and {len(state.parked)} requests wait for it; retry shortly",
                    RETRY_AFTER_LOADING_S,
                )
            # wait for the load: the front keeps the client's connection alive meanwhile (pings)
            state.parked.append((peer, req))
            self.frontend.reply(peer, 0, Waiting(rid, f"model '{state.id}' is {state.status}"))
            if state.status == ModelStatus.UNLOADED:
                self.load(state)  # may answer the parked request at once (no room for it)
            return
        rules = Rules(
            json_schema=req.json_schema,
            tools=[t for t in req.tools or () if req.tool_name in (None, t["name"])] or None,
            tool_mode=req.tool_choice if req.tools else "none",
            parallel=req.parallel_tool_calls,
        )
        if req.tool_name is not None and not rules.tools:
            return self._reject(
                peer, rid, "invalid_request", f"tool_choice names {req.tool_name!r}, not among the tools"
            )
        if self.requests.has_request(rid) or rid in self.preparer:
            return self._reject(peer, rid, "invalid_request", f"request id {rid!r} is already in use")
        files, grammars = state.files, self._grammars(state)
        self.preparer.submit(rid, (peer, req, state.id), lambda: prepare(files, req, rules, grammars))

    def _take_prepared(self) -> None:
        """Admit the requests whose prompt and grammar are ready (one failure fails one request)."""
        for rid, (peer, req, model_id), result in self.preparer.finished():
            try:
                if isinstance(result, BaseException):
                    raise result
                self._admit(peer, req, model_id, result)
            except Exception as exc:
                log.exception("admitting request %s failed", rid)
                seq = self.requests.first(rid)
                if seq is not None:
                    self._fail(seq, "internal", f"internal error: {type(exc).__name__}")
                else:
                    self._reject(peer, rid, "internal", f"internal error: {type(exc).__name__}")

    def _admit(self, peer: bytes, req: Submit, model_id: str, prepared: Prepared | Refused) -> None:
        """A prepared request joins its model's queue, or is refused (context, limits, queue)."""
        rid = req.request_id
        state = self.registry.models.get(model_id)
        if state is None or state.status != ModelStatus.LOADED or state.id not in self.schedulers:
            return self._submit(peer, req)  # the model went away meanwhile: park, route or fail it anew
        if isinstance(prepared, Refused):
            return self._reject(peer, rid, prepared.kind, prepared.message)
        prompt, prompt_text, constraints = prepared.prompt, prepared.prompt_text, prepared.constraints
        if req.count_only:
            return self.frontend.reply(peer, 0, Answer(data={"input_tokens": len(prompt)}))
        files, sched = state.files, self.schedulers[state.id]
        ctx = state.context_length
        if len(prompt) >= ctx:
            return self._reject(
                peer,
                rid,
                "context_length_exceeded",
                f"This model's maximum context length is {ctx} tokens. However, your messages "
                f"resulted in {len(prompt)} tokens. Please reduce the length of the messages.",
            )
        room = ctx - len(prompt)
        if req.max_tokens is not None and req.max_tokens > room:
            return self._reject(
                peer,
                rid,
                "context_length_exceeded",
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(prompt) + req.max_tokens} tokens ({len(prompt)} in the messages, "
                f"{req.max_tokens} in the completion). Please reduce the length of the messages "
                "or completion.",
            )
        out_limit = state.entry.max_output_tokens
        if out_limit and req.max_tokens is not None and req.max_tokens > out_limit:
            return self._reject(
                peer,
                rid,
                "invalid_request",
                f"max_tokens is {req.max_tokens}; model '{state.id}' generates at most {out_limit} tokens per request",
            )
        limit = self.cfg.engine.max_requests_per_client
        if limit and req.client and self.requests.requests_of(req.client) >= limit:
            return self._reject(
                peer,
                rid,
                "rate_limited",
                f"this client already has {limit} requests in flight; retry when one finishes",
                1,
            )
        if len(sched.waiting) >= self.cfg.engine.max_waiting:
            return self._reject(
                peer,
                rid,
                "overloaded",
                f"model '{state.id}' has {len(sched.waiting)} requests waiting; retry shortly",
                self._retry_after(sched),
            )
        eos = self._eos_ids(files)
        eos_ids = frozenset(req.stop_token_ids or ()) | (frozenset() if req.ignore_eos else frozenset(eos))
        self.registry.touch(state)
        for i in range(req.n):  # n choices: n sequences; seeded ones get seed + i so they differ
            sampling = req.sampling
            if i and sampling.seed is not None:
                sampling = replace(sampling, seed=sampling.seed + i)
            seq = Sequence(
                request_id=rid,
                peer=peer,
                model_id=state.id,
                prompt_len=len(prompt),
                tokens=list(prompt),
                sampling=sampling,
                max_tokens=req.max_tokens or min(room, out_limit or room),
                decoder=IncrementalDecoder(files.tokenizer.tokenizer, req.stop),
                eos_ids=eos_ids,
                client=req.client,
                index=i,
                constraint=constraints[i],
            )
            self.requests.add(seq)
            sched.add(seq)
        self.frontend.reply(
            peer, 0, Started(rid, len(prompt), prompt_text is not None and opens_in_reasoning(prompt_text))
        )

    def _grammars(self, state: ModelState) -> Grammars:
        grammars = self.grammars.get(state.id)
        if grammars is None:
            tok = state.files.tokenizer
            grammars = Grammars(tok.tokenizer, state.files.config.vocab_size, sorted(self._eos_ids(state.files)))
            self.grammars[state.id] = grammars
        return grammars

    @staticmethod
    def _eos_ids(files: source.ModelFiles) -> set[int]:
        eos = set(files.config.eos_token_ids)
        if files.tokenizer.eos_token is not None:
            eos_id = files.tokenizer.tokenizer.token_to_id(files.tokenizer.eos_token)
            if eos_id is not None:
                eos.add(eos_id)
        return eos

    def _retry_after(self, sched: Scheduler) -> int:
        return max(1, min(60, len(sched.waiting) // max(len(sched.running), 1)))

    def _cancel(self, request_id: str) -> None:
        if self.preparer.discard(request_id) is not None:
            return  # gone before its prompt was ready: nothing was queued
        for state in self.registry.models.values():
            before = len(state.parked)
            state.parked = [(p, r) for p, r in state.parked if r.request_id != request_id]
            if len(state.parked) < before:
                self.stats.cancelled(state.id, "load")
                self._drop_unwanted_load(state)
        choices = self.requests.choices(request_id)
        if choices:
            self.stats.cancelled(choices[0].model_id, _stage(choices[0]))
        for seq in choices:
            seq.cancelled = True
            if not self._in_step(seq):
                self._retire(seq)  # else retired when its step returns: the worker is writing its blocks

    def _drop_unwanted_load(self, state: ModelState) -> None:
        """Every client that caused a load has gone: stop it (the worker frees what it loaded)."""
        if state.status != ModelStatus.LOADING or state.load_reason != "demand" or state.parked or state.waiters:
            return
        log.info("cancelling the load of %s: no request waits for it any more", state.id)
        self.counters["loads_cancelled"] += 1
        self.file_reads = {f: s for f, s in self.file_reads.items() if s is not state}
        if state.load_in_flight:
            self._unload_ranks(state, state.ranks)  # after the Load on each worker: frees it
        self._give_up_load(state, "model_loading", "the load was cancelled")
        state.error = None

    def _in_step(self, seq: Sequence) -> bool:
        return any(w.seq is seq for w in self.in_flight.get(seq.model_id, ()))

    def _check_queue_deadlines(self) -> None:
        limit = self.cfg.engine.queue_timeout_s
        now = time.monotonic()
        for sched in self.schedulers.values():
            for seq in [s for s in sched.waiting if not s.admitted and now - s.arrived > limit]:
                self._fail(
                    seq,
                    "overloaded",
                    f"waited {limit:g}s in the queue without starting; retry later",
                    self._retry_after(sched),
                )

    # -- scheduling ---------------------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Start the next step of every loaded model that has work and no step in flight."""
        for model_id, sched in self.schedulers.items():
            if model_id in self.in_flight or not sched.has_work():
                continue
            state = self.registry.models[model_id]
            if state.status != ModelStatus.LOADED:
                continue
            work = sched.plan()
            if work:
                self._step(state, work)

    def _step(self, state: ModelState, work: list[Work]) -> None:
        step = GenerateStep(
            state.id,
            [
                SeqInput(
                    w.seq.seq_id,
                    w.tokens,
                    w.start,
                    w.seq.sampling,
                    list(w.seq.block_table),
                    w.samples,
                    prompt=w.seq.tokens[: w.seq.prompt_len] if w.first and w.seq.sampling.needs_history else None,
                    allowed=w.seq.constraint.mask() if w.samples and w.seq.constraint else None,
                )
                for w in work
            ],
        )
        self.in_flight[state.id] = work
        self.stats.step_started(state.id, work)
        gen = state.load_gen

        def done(replies, error):
            self.in_flight.pop(state.id, None)
            if gen != state.load_gen:
                return  # the model was torn down meanwhile; its requests were already failed
            if error:
                for w in work:
                    self._fail(w.seq, "worker_failed", f"generation failed: {error.message}", RETRY_AFTER_LOADING_S)
                if error.kind == "timeout":
                    self._kill_group(state, f"a step took longer than {self.cfg.engine.step_timeout_s:g}s")
                elif len(state.ranks) > 1 or error.kind == "died":
                    self._recover(state, f"a step failed: {error.message}")  # ranks may disagree now
                return
            result = replies[state.ranks[0]]
            self.schedulers[state.id].done(work)
            logprobs = result.logprobs or [None] * len(work)
            errors = result.errors or [""] * len(work)
            for w, token, lp, err in zip(work, result.tokens, logprobs, errors, strict=True):
                if w.seq.cancelled:
                    self._retire(w.seq)
                elif err:
                    self._fail_sampling(state, w.seq, err)
                elif w.samples:
                    self._on_token(w.seq, token, lp)

        self.calls.call(state.ranks, lambda _: step, self.cfg.engine.step_timeout_s, done)

    def _on_token(self, seq: Sequence, token: int, logprobs: list | None = None) -> None:
        if seq.constraint is not None:
            tok = self.registry.models[seq.model_id].files.tokenizer.tokenizer
            seq.constraint.advance(token, token_bytes(tok, token))
        self.stats.token(seq)
        text, finish = seq.append(token)
        entry = self._logprob_entry(seq, token, logprobs) if logprobs is not None else None
        if entry is not None and (finish != "stop" or token not in seq.eos_ids):
            seq.pending_logprobs.append(entry)
        if text or seq.pending_logprobs:
            delta = Delta(seq.request_id, text, seq.output_len, seq.pending_logprobs or None, seq.index)
            self.frontend.reply(seq.peer, 0, delta)
            seq.pending_logprobs = []
        if finish:
            self.frontend.reply(
                seq.peer,
                0,
                Finished(
                    seq.request_id,
                    finish,
                    seq.prompt_len,
                    seq.output_len,
                    seq.cached_tokens,
                    seq.index,
                    seq.decoder.matched,
                ),
            )
            self._retire(seq)

    def _logprob_entry(self, seq: Sequence, token: int, logprobs: list) -> dict:
        tok = self.registry.models[seq.model_id].files.tokenizer.tokenizer

        def one(tid: int, lp: float) -> dict:
            raw = token_bytes(tok, tid)
            return {"token": raw.decode(errors="replace"), "logprob": lp, "bytes": list(raw)}

        chosen, top = logprobs
        return {**one(token, chosen), "top_logprobs": [one(t, lp) for t, lp in top]}

    def _retire(self, seq: Sequence) -> None:
        """Forget a sequence: its blocks go back to the pool (kept for the prefix cache), and the
        workers drop its sampling state."""
        if self.requests.remove(seq):
            self.stats.sequence_ended(seq, "cancelled" if seq.cancelled else "finished")
        sched = self.schedulers.get(seq.model_id)
        if sched is not None:
            sched.remove(seq)
        state = self.registry.models[seq.model_id]
        self.registry.touch(state)  # recency counts from a request's end too: long streams stay warm
        if state.status == ModelStatus.LOADED and seq.admitted:
            self.calls.call(state.ranks, lambda _: ReleaseSequences(state.id, [seq.seq_id]), 30.0, ignore)

    def _fail(self, seq: Sequence, kind: str, message: str, retry_after: int | None = None) -> None:
        """Fail the request ``seq`` belongs to: one Failure, and its other choices stop too."""
        if seq not in self.requests:
            return  # already failed with a sibling choice
        self.frontend.reply(seq.peer, 0, Failure(seq.request_id, kind, message, retry_after))
        for s in [seq, *[c for c in self.requests.choices(seq.request_id) if c is not seq]]:
            if self.requests.remove(s):
                self.stats.sequence_ended(s, "failed")
            sched = self.schedulers.get(s.model_id)
            if sched is not None:
                sched.remove(s)

    def _fail_sampling(self, state: ModelState, seq: Sequence, error: str) -> None:
        """A worker could not sample seq's token: its request fails (500) while the model and the
        step's other sequences go on, and the workers drop the sampling state of its choices."""
        if seq not in self.requests:
            return  # a sibling choice failed in the same step
        ids = [c.seq_id for c in self.requests.choices(seq.request_id)]
        self._fail(seq, "internal", f"sampling failed: {error}")
        self.calls.call(state.ranks, lambda _: ReleaseSequences(state.id, ids), 30.0, ignore)

    def _fail_model_requests(self, state: ModelState, kind: str, message: str) -> None:
        for seq in self.requests.of_model(state.id):
            self._fail(seq, kind, message, retry_after=RETRY_AFTER_LOADING_S)
        self.in_flight.pop(state.id, None)
        if state.status == ModelStatus.FAILED:  # a recovery reloads, and parked requests go on waiting for it
            parked, state.parked = state.parked, []
            for peer, req in parked:
                self._reject(peer, req.request_id, kind, message, RETRY_AFTER_LOADING_S)

    def _admit_parked(self, state: ModelState) -> None:
        """The model is loaded: the requests that waited for it start now, in arrival order."""
        parked, state.parked = state.parked, []
        for peer, req in parked:
            self._on_front_safely(peer, req)

    # -- defragmentation -------------------------------------------------------------------------------

    def _maybe_defrag(self) -> None:
        """A worker that has been through ``defrag_after_cycles`` load/unload cycles is restarted
        once nothing runs on it (a fresh process returns fragmented memory); pinned models on it
        are reloaded, others unloaded (they load again on demand)."""
        limit = self.cfg.eviction.defrag_after_cycles
        if not limit or self.stopping.is_set():
            return
        for w in self.workers:
            if self.cycles[w.rank] >= limit and w.ready and not w.expected_exit and self._quiet(w.rank):
                self._defrag(w)

    def _quiet(self, rank: int) -> bool:
        on_rank = [s for s in self.registry.models.values() if rank in s.ranks and s.status != ModelStatus.UNLOADED]
        return all(s.status == ModelStatus.LOADED and not self._busy(s) and s.id not in self.in_flight for s in on_rank)

    def _defrag(self, w: WorkerHandle) -> None:
        log.info(
            "worker %d (%s): %d load/unload cycles; restarting it to defragment", w.rank, w.device, self.cycles[w.rank]
        )
        self.counters["defrag_restarts"] += 1
        for state in [s for s in self.registry.models.values() if w.rank in s.ranks and s.status == ModelStatus.LOADED]:
            others = [r for r in state.ranks if r != w.rank]
            self._unload_ranks(state, others)  # a tensor-parallel group re-forms from scratch
            self.schedulers.pop(state.id, None)
            state.load_gen += 1
            if state.pinned:
                state.status = ModelStatus.LOADING  # same ranks; sent once the new worker answers its Ping
                state.load_in_flight, state.rank_bytes = False, []
            else:
                self._evict(state, "defrag", f"while worker {w.rank} restarts")
        w.expected_exit = True
        w.terminate()

    # -- queries ----------------------------------------------------------------------------------------

    def query(self, what: str) -> dict:
        if what == "models":
            return {
                "models": [self._describe(s) for s in self.registry.models.values()],
                "aliases": self.registry.catalogue.aliases,
            }
        if what == "health":
            return self.health()
        if what == "fleet":
            return (
                self.fleet.describe(self.health())
                if self.fleet
                else {"node": self.cfg.node.name, "self": self.health(), "peers": []}
            )
        return {"error": f"unknown query {what!r}"}

    def _describe(self, state: ModelState) -> dict:
        out = state.describe(self.devices)
        live = self.requests.of_model(state.id)
        out["in_flight"] = sum(s.admitted for s in live)
        out["queued"] = sum(not s.admitted for s in live) + len(state.parked)
        sched = self.schedulers.get(state.id)
        if sched is not None:
            b = sched.blocks
            out["engine"] = {
                "running": len(sched.running),
                "waiting": len(sched.waiting),
                "preemptions": sched.preemptions,
                "kv_blocks_total": b.num_blocks,
                "kv_blocks_used": b.used,
                "kv_block_size": b.block_size,
                "kv_blocks_cached": b.num_cached,
                "kv_dtype": self._kv_dtype(state, self.devices[state.ranks[0]]) if state.ranks else None,
            }
        return out

    def _device_memory(self) -> list[dict]:
        out = []
        for r, device in enumerate(self.devices):
            budget = self.budgets.get(r)
            used = self._used(r)
            evictable = sum(
                s.bytes_per_rank
                for s in self.registry.models.values()
                if s.resident and r in s.ranks and not self._kept(s)
            )
            known = budget is not None and budget != NO_BUDGET
            out.append(
                {
                    "rank": r,
                    "device": device,
                    "budget_bytes": budget if known else None,
                    "used_bytes": used,
                    "free_bytes": budget - used if known else None,
                    "evictable_bytes": evictable,
                    "load_unload_cycles": self.cycles[r],
                }
            )
        return out

    def _counts(self) -> dict:
        return {
            "evictions": {k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("evictions:")},
            "defrag_restarts": self.counters["defrag_restarts"],
            "loads_cancelled": self.counters["loads_cancelled"],
            "loads": sum(s.loads for s in self.registry.models.values()),
        }

    def health(self) -> dict:
        workers = [
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
        models = [self._describe(s) for s in self.registry.models.values()]
        wanted = [m for m in models if m["status"] != "unloaded" or self.registry.models[m["id"]].entry.preload]
        if not all(w["alive"] for w in workers) or any(m["status"] in ("recovering", "failed") for m in wanted):
            status = "degraded"
        elif any(m["status"] == "loading" for m in wanted) or not all(w["ready"] for w in workers):
            status = "loading"
        else:
            status = "ok"
        if self.draining:
            status = "draining"  # 503: load balancers and peers route around this node
        return {
            "status": status,
            "draining": self.draining,
            "node": self.cfg.node.name,
            "devices": self._device_memory(),
            "eviction": {"strategy": self.cfg.eviction.strategy, **self._counts()},
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),
            "workers": workers,
            "models": models,
            "aliases": self.registry.catalogue.aliases,  # peers resolve names routed to this node
            "requests": {
                "running": sum(len(s.running) for s in self.schedulers.values()),
                "waiting": sum(len(s.waiting) for s in self.schedulers.values()),
            },
        }

    # -- operations (cortex-admin, reload, drain) ------------------------------------------------------

    def describe_model(self, state: ModelState) -> dict:
        return self._describe(state)

    def operator_load(self, state: ModelState) -> None:
        """An operator's load (the management API, cortex-admin): it also retries a failed one."""
        if state.status == ModelStatus.FAILED:
            state.status = ModelStatus.UNLOADED
        self.load(state, "operator")

    def unload(self, state: ModelState) -> str | None:
        """Unload a model now (the management API, cortex-admin, reload); why it cannot be, if so."""
        busy = self.requests.of_model(state.id)
        if busy:
            return f"model '{state.id}' has {len(busy)} request(s) in flight"
        if state.status in (ModelStatus.LOADING, ModelStatus.RECOVERING):
            return f"model '{state.id}' is {state.status}"
        self._unload_model(state)
        return None

    def evict(self, state: ModelState) -> str | None:
        """An operator's eviction (reason "admin"); why it cannot be, if so."""
        if state.status != ModelStatus.LOADED:
            return f"model '{state.id}' is {state.status}, not loaded"
        kept = self._kept(state)
        if kept is not None:
            return f"model '{state.id}' cannot be evicted: {kept}"
        self._evict(state, "admin", "by an operator")
        return None

    def clear_prefix_cache(self, state: ModelState) -> str | None:
        """Drop every cached prompt of a loaded model that no request holds: their names go, and
        the workers zero their blocks. Why it cannot be done, if so."""
        sched = self.schedulers.get(state.id)
        if state.status != ModelStatus.LOADED or sched is None:
            return f"model '{state.id}' is {state.status}, not loaded"
        blocks = sched.blocks.forget_free()
        log.info("prefix cache of %s cleared by an operator: %d block(s) zeroed", state.id, len(blocks))
        if blocks:
            self.calls.call(state.ranks, lambda _: ClearKvCache(state.id, blocks), 30.0, ignore)
        return None

    def set_pinned(self, state: ModelState, pinned: bool) -> None:
        state.pinned = pinned  # runtime only: models.toml `pinned` applies again on restart
        log.info("model %s %s by an operator", state.id, "pinned" if pinned else "unpinned")

    def idle(self, state: ModelState) -> bool:
        """Nothing in flight, queued, parked or loading for this model."""
        return (
            not state.parked
            and state.status not in (ModelStatus.LOADING, ModelStatus.RECOVERING)
            and not self.requests.has_model(state.id)
        )

    def in_flight_count(self) -> int:
        running = self.requests.request_count
        return running + len(self.preparer) + sum(len(s.parked) for s in self.registry.models.values())

    def set_draining(self, draining: bool) -> None:
        if draining != self.draining:
            log.warning(
                "node %s %s",
                self.cfg.node.name,
                "draining: new requests are refused" if draining else "accepting requests again",
            )
        self.draining = draining

    def begin_shutdown(self) -> None:
        """SIGTERM: drain, and stop once in-flight requests are done or the drain deadline passes."""
        if self.stop_at is None:
            self.stop_at = time.monotonic() + self.cfg.node.drain_timeout_s
            self.set_draining(True)

    def _check_stop(self) -> None:
        if self.stop_at is None or self.stopping.is_set():
            return
        left = self.in_flight_count()
        if left == 0 or time.monotonic() >= self.stop_at:
            if left:
                log.warning(
                    "drain deadline (%gs) passed with %d request(s) in flight", self.cfg.node.drain_timeout_s, left
                )
            self.stop()

    def reload(self) -> dict:
        return ops_reload.reload(self)

    def apply_config(self, cfg: Config) -> None:
        """Settings a reload may change: engine, eviction, peers, keys, log level, catalogue aliases."""
        self.cfg = cfg
        self.registry.catalogue = cfg.catalogue
        self._publish_keys()
        if self.fleet:
            self.fleet.reconfigure(cfg)
        elif cfg.peers:
            self.fleet = Fleet(cfg)
            self.fleet.start()
        logging.getLogger().setLevel(cfg.log_level)

    def _publish_keys(self) -> None:
        gw = self.cfg.gateway
        write_auth_file(self.auth_file, gw.api_keys, gw.admin_keys, gw.open_paths, self.cfg.fleet.peer_key)

    def add_model(self, entry: ModelEntry) -> None:
        state = ModelState(entry)
        self.registry.models[entry.id] = state
        if entry.preload:
            self.load(state, "preload")

    def remove_model(self, model_id: str) -> None:
        self.registry.models.pop(model_id, None)
        self.grammars.pop(model_id, None)
        self.schedulers.pop(model_id, None)

    def peers_status(self) -> list[dict]:
        """Configured peers and what the poller last learnt of them."""
        return self.fleet.peers_status() if self.fleet else []

    def device_memory(self) -> list[dict]:
        """Per device: rank, device, budget/used/free/evictable bytes (as in /health)."""
        return self._device_memory()


def _stage(seq: Sequence) -> str:
    """Where a cancelled request was: queued, prefilling its prompt, or decoding."""
    if seq.output_len:
        return "decode"
    return "queue" if seq.admitted_at is None else "prefill"
