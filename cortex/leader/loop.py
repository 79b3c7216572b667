"""The leader: one event loop that owns the node's state, built from rooms with one job each.

A single thread (``poll_once``, driven by ``cortex serve``) waits on ZeroMQ sockets and worker
pidfds and hands each event to the room that owns it:
- the front's requests (Submit / Cancel / Query / ModelOp) on the engine socket → admission,
  the views, or the lifecycle;
- worker replies complete calls sent without blocking (``WorkerCalls``) → whichever room sent them;
- a worker that exits wakes the loop through its pidfd → supervision;
- prepared prompts (off-loop threads) wake it through a pipe → admission.
Then every turn: deadlines, defragmentation, pending reloads, and the stepper's next steps.
Nothing here blocks on a worker, so the front is answered (e.g. 503 while loading) at all times.

``Leader`` is also the ``NodeControl`` that cortex/ops (admin socket, reload, metrics) steers.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping

import zmq

from cortex.api.auth import write_auth_file
from cortex.config import Config, ModelEntry
from cortex.engine.calls import WorkerCalls
from cortex.engine.scheduler import Scheduler
from cortex.fleet.fleet import Fleet
from cortex.leader.admission import Admission
from cortex.leader.embedding import Embedder
from cortex.leader.lifecycle import ModelLifecycle
from cortex.leader.placement import Placement
from cortex.leader.shared import Shared
from cortex.leader.stepper import Stepper
from cortex.leader.supervision import WorkerSupervisor
from cortex.leader.views import Views
from cortex.models.registry import ModelState, ModelStatus, Registry
from cortex.ops import reload as ops_reload
from cortex.ops.admin import AdminServer
from cortex.supervisor import WorkerHandle, resolve_devices
from rpc.engine import Answer, Cancel, Embed, FailureKind, ModelOp, PeerFailed, Query, Submit
from rpc.messages import Error, ErrorKind
from rpc.transport import RpcServer

log = logging.getLogger("cortex.leader")

FRONT_BATCH = 64  # front messages taken per turn, so a flood of requests cannot starve the workers


class Leader:
    def __init__(self, cfg: Config, ctx: zmq.Context | None = None):
        self.ctx = ctx or zmq.Context.instance()
        run_dir = cfg.node.run_dir
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.engine_endpoint = f"ipc://{run_dir}/engine.sock"
        self.devices = resolve_devices(cfg.node.devices)
        self.registry = Registry(cfg.catalogue)
        self.workers = [
            WorkerHandle(r, d, run_dir, self.ctx, cfg.node.threads, cfg.log_level, cfg.node.spare_workers)
            for r, d in enumerate(self.devices)
        ]
        self.shared = Shared(cfg, self.devices, self.registry, self.workers, WorkerCalls(self.workers))
        # the rooms; each owns its state, and references to the others are wired once, here
        self.stepper = Stepper(self.shared)
        self.placement = Placement(self.shared, self.stepper)
        self.lifecycle = ModelLifecycle(self.shared, self.placement, self.stepper)
        self.supervisor = WorkerSupervisor(self.shared, self.placement, self.lifecycle, self.stepper)
        self.admission = Admission(self.shared, self.lifecycle, self.stepper, self._route)
        self.embedder = Embedder(self.shared, self.stepper)
        self.views = Views(self.shared, self.placement, self.stepper, self.lifecycle, self.supervisor, self.admission)
        self.stepper.lifecycle = self.lifecycle
        self.stepper.embedder = self.admission.embedder = self.embedder
        self.embedder.lifecycle, self.embedder.admission = self.lifecycle, self.admission
        self.stepper.limits = self.admission.limits
        self.lifecycle.admission, self.lifecycle.supervisor = self.admission, self.supervisor
        # what operations read (cortex.ops.control.NodeControl): the rooms' own objects, not copies
        self.schedulers: Mapping[str, Scheduler] = self.stepper.schedulers
        self.counters: Counter[str] = self.lifecycle.counters
        self.pending_models: dict[str, ModelEntry | None] = {}  # reload: replace (entry) or remove (None) once idle
        self.stopping = self.shared.stopping
        self.admin: AdminServer | None = None
        self.auth_file = run_dir / "front-auth.json"  # API key digests for the front; rewritten by reload
        self._polling: tuple | None = None  # (workers' sockets and pidfds, poller, by socket, by pidfd)
        self.stop_at: float | None = None  # SIGTERM: stop once idle, or at this monotonic time at the latest
        # peers to route to; a node with no devices is a pure gateway and always routes
        self.fleet = Fleet(cfg) if cfg.peers or not self.devices else None

    @property
    def cfg(self) -> Config:
        return self.shared.cfg

    @property
    def draining(self) -> bool:
        return self.admission.draining

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.shared.frontend = RpcServer(self.engine_endpoint, self.ctx, mode=0o600)
        self.admin = AdminServer(self.cfg.node.run_dir, self.ctx)
        self._publish_keys()
        for w in self.workers:
            self.supervisor.start(w)
        for state in self.registry.models.values():
            if state.entry.preload and self.devices:
                self.lifecycle.load(state, "preload")
        if self.fleet:
            self.fleet.start()

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        self.admission.shutdown()
        if self.fleet:
            self.fleet.stop()
        self.supervisor.stop()
        if self.shared.frontend:
            self.shared.frontend.close()
        if self.admin:
            self.admin.close()
        self.lifecycle.shutdown()

    # -- the loop -----------------------------------------------------------------------------------

    def poll_once(self) -> None:
        frontend = self.shared.frontend
        poller, by_socket, by_fd = self._poll_set()
        ready = dict(poller.poll(20 if self.lifecycle.file_reads else 100))  # wake for deadlines and stops
        for w in list(by_fd.values()):
            if w.pidfd in ready:
                self.supervisor.on_exit(w)
        for sock, w in by_socket.items():
            if sock in ready and w.client and w.client.socket is sock:
                self.shared.calls.on_replies(w)
        if frontend.socket in ready:
            self._take_front_messages()
        if self.admin.socket in ready:
            self.admin.serve_ready(self)
        if self.admission.preparer.wake_fd in ready:
            self.admission.take_prepared()
        self._every_turn()

    def _poll_set(self) -> tuple[zmq.Poller, dict, dict]:
        """The poller over the front, admin and preparation sockets and each worker's socket and
        pidfd, with the workers by socket and by pidfd. Built again only when a worker's socket or
        pidfd changed (a start or a restart), not on every turn: at one stream a turn is a token."""
        key = tuple((w.client.socket if w.client else None, w.pidfd) for w in self.workers)
        if self._polling is None or self._polling[0] != key:
            poller = zmq.Poller()
            for sock in (self.shared.frontend.socket, self.admin.socket):
                poller.register(sock, zmq.POLLIN)
            by_socket, by_fd = {}, {}
            for w in self.workers:
                if w.client:
                    poller.register(w.client.socket, zmq.POLLIN)
                    by_socket[w.client.socket] = w
                if w.pidfd is not None:
                    poller.register(w.pidfd, zmq.POLLIN)
                    by_fd[w.pidfd] = w
            poller.register(self.admission.preparer.wake_fd, zmq.POLLIN)
            self._polling = (key, poller, by_socket, by_fd)
        return self._polling[1:]

    def _every_turn(self) -> None:
        self.lifecycle.check_file_reads()
        self.shared.calls.check_deadlines()
        self.admission.check_queue_deadlines()
        self.supervisor.maybe_defrag()
        if self.pending_models:
            ops_reload.settle(self)
        self.stepper.schedule()
        self._check_stop()
        self.shared.stats.refresh(self)

    def _take_front_messages(self) -> None:
        for _ in range(FRONT_BATCH):
            got = self.shared.frontend.recv(0)
            if got is None:
                break
            peer, _, msg = got
            if msg is not None:
                self._on_front_safely(peer, msg)

    # -- front requests ------------------------------------------------------------------------------

    def _on_front_safely(self, peer: bytes, msg: object) -> None:
        """One request's bug must never take the loop (and every other request) down."""
        try:
            self._on_front(peer, msg)
        except Exception as exc:
            log.exception("handling %s failed", type(msg).__name__)
            self.admission.fail_internal(peer, getattr(msg, "request_id", ""), exc)

    def _on_front(self, peer: bytes, msg: object) -> None:
        if isinstance(msg, (Submit, Embed)):
            self.admission.submit(peer, msg)
        elif isinstance(msg, Cancel):
            self.admission.cancel(msg.request_id)
        elif isinstance(msg, Query):
            self.shared.reply(peer, Answer(data=self.query(msg.what)))
        elif isinstance(msg, ModelOp):
            self._model_op(peer, msg)
        elif isinstance(msg, PeerFailed):
            if self.fleet:
                self.fleet.report_failure(msg.endpoint, msg.reason)
        else:
            self.shared.reply(
                peer, Error(kind=ErrorKind.BAD_FRAME, message=f"{type(msg).__name__} is not a front request")
            )

    def _route(self, req: Submit | Embed, state: ModelState | None) -> object | None:
        """The fleet's answer for a model not resident here, or any model while draining (a draining
        node is not routable in its own view either, so its new requests go to peers that can serve
        them); None to serve it here. A forwarded request (``hop``) is never routed again."""
        if not self.fleet or req.hop:
            return None
        if not (self.draining or state is None or state.status != ModelStatus.LOADED):
            return None
        return self.fleet.decide(req.request_id, req.model, self.health())

    def _model_op(self, peer: bytes, op: ModelOp) -> None:
        state = self.registry.resolve(op.model)
        if state is None:
            return self.shared.refuse(peer, "", FailureKind.MODEL_NOT_FOUND, f"The model '{op.model}' does not exist")
        if op.op == "load":
            if state.status == ModelStatus.LOADED:
                return self.shared.reply(peer, Answer(data=state.describe(self.devices)))
            state.waiters.append(peer)  # single flight: every caller waits for the one load
            return self.operator_load(state)
        if op.op in ("pin", "unpin"):
            self.set_pinned(state, op.op == "pin")
            refusal = None
        elif op.op == "unload":
            refusal = self.unload(state)
        elif op.op == "evict":
            refusal = self.evict(state)
        else:
            return self.shared.refuse(peer, "", FailureKind.INVALID_REQUEST, f"unknown model operation {op.op!r}")
        if refusal:
            return self.shared.refuse(peer, "", FailureKind.CONFLICT, refusal)
        self.shared.reply(peer, Answer(data=state.describe(self.devices)))

    # -- views ------------------------------------------------------------------------------------------

    def query(self, what: str) -> dict:
        if what == "models":
            return self.views.models()
        if what == "health":
            return self.health()
        if what == "fleet":
            if self.fleet:
                return self.fleet.describe(self.health())
            return {"node": self.cfg.node.name, "self": self.health(), "peers": []}
        return {"error": f"unknown query {what!r}"}

    def health(self) -> dict:
        return self.views.health()

    def describe_model(self, state: ModelState) -> dict:
        return self.views.model(state)

    def device_memory(self) -> list[dict]:
        """Per device: rank, device, budget/used/free/evictable bytes (as in /health)."""
        return self.views.device_memory()

    def peers_status(self) -> list[dict]:
        """Configured peers and what the poller last learnt of them."""
        return self.fleet.peers_status() if self.fleet else []

    def in_flight_count(self) -> int:
        return self.admission.in_flight()

    def idle(self, state: ModelState) -> bool:
        """Nothing in flight, queued, parked or loading for this model."""
        return (
            not state.parked
            and state.status not in (ModelStatus.LOADING, ModelStatus.RECOVERING)
            and not self.stepper.requests.has_model(state.id)
            and not self.embedder.count(state.id)
        )

    # -- operations (cortex-admin, the management API, reload, drain) -----------------------------------

    def operator_load(self, state: ModelState) -> None:
        self.lifecycle.operator_load(state)

    def unload(self, state: ModelState) -> str | None:
        return self.lifecycle.operator_unload(state)

    def evict(self, state: ModelState) -> str | None:
        return self.lifecycle.operator_evict(state)

    def clear_prefix_cache(self, state: ModelState) -> str | None:
        return self.stepper.clear_prefix_cache(state)

    def set_pinned(self, state: ModelState, pinned: bool) -> None:
        state.pinned = pinned  # runtime only: models.toml `pinned` applies again on restart
        log.info("model %s %s by an operator", state.id, "pinned" if pinned else "unpinned")

    def set_draining(self, draining: bool) -> None:
        if draining != self.admission.draining:
            log.warning(
                "node %s %s",
                self.cfg.node.name,
                "draining: new requests are refused" if draining else "accepting requests again",
            )
        self.admission.draining = draining

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
        self.shared.cfg = cfg
        self.admission.limits.configure(cfg)
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
            self.lifecycle.load(state, "preload")

    def remove_model(self, model_id: str) -> None:
        self.registry.models.pop(model_id, None)
        self.admission.grammars.pop(model_id, None)
        self.stepper.stop_model(model_id)
