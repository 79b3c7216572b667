"""The admin socket: ``cortex-admin`` steers the leader without HTTP.

``ipc://{run_dir}/admin.sock``, mode 0600 in a 0700 directory: only the daemon's user (and root)
can connect, which is the whole of its access control. The leader polls the socket in its loop and
runs each command to completion there, so commands see and change state like any other event,
with no locks. Commands answer at once; a load is started and ``cortex-admin`` polls ``models``
until it ends, so the loop never waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from cortex.ops import metrics
from rpc.admin import AdminCommand
from rpc.engine import Answer, Failure, FailureKind
from rpc.messages import Error, ErrorKind
from rpc.transport import RpcServer

if TYPE_CHECKING:
    from cortex.models.registry import ModelState
    from cortex.ops.control import NodeControl

log = logging.getLogger("cortex.admin")

SOCKET_NAME = "admin.sock"


def endpoint(run_dir: Path) -> str:
    return f"ipc://{run_dir}/{SOCKET_NAME}"


@dataclass
class AdminError(Exception):
    kind: FailureKind
    message: str


def _model(leader: NodeControl, args: dict[str, Any]) -> ModelState:
    name = args.get("model")
    if not isinstance(name, str) or not name:
        raise AdminError(FailureKind.INVALID_REQUEST, "this command needs a model id")
    state = leader.registry.resolve(name)
    if state is None:
        raise AdminError(FailureKind.MODEL_NOT_FOUND, f"no model {name!r} in the catalogue")
    return state


def _load(leader: NodeControl, args: dict) -> dict:
    state = _model(leader, args)
    leader.operator_load(state)
    return leader.describe_model(state)


def _refusable(op: Callable[[NodeControl, ModelState], str | None]) -> Callable[[NodeControl, dict], dict]:
    """An operation the leader may refuse (it returns why): the refusal is a conflict."""

    def run(leader: NodeControl, args: dict) -> dict:
        state = _model(leader, args)
        refusal = op(leader, state)
        if refusal:
            raise AdminError(FailureKind.CONFLICT, refusal)
        return leader.describe_model(state)

    return run


def _pin(pinned: bool) -> Callable[[NodeControl, dict], dict]:
    def run(leader: NodeControl, args: dict) -> dict:
        state = _model(leader, args)
        leader.set_pinned(state, pinned)
        return leader.describe_model(state)

    return run


def _drain(draining: bool) -> Callable[[NodeControl, dict], dict]:
    def run(leader: NodeControl, _args: dict) -> dict:
        leader.set_draining(draining)
        return {"draining": leader.draining, "in_flight": leader.in_flight_count()}

    return run


def _reload(leader: NodeControl, _args: dict) -> dict:
    result = leader.reload()
    if not result["ok"]:
        raise AdminError(FailureKind.REJECTED, result["error"])
    return result


COMMANDS: dict[str, Callable[[NodeControl, dict], dict]] = {
    "status": lambda leader, _a: leader.health(),
    "models": lambda leader, _a: leader.query("models"),
    "workers": lambda leader, _a: {"workers": leader.health()["workers"]},
    "peers": lambda leader, _a: {"peers": leader.peers_status()},
    "load": _load,
    "unload": _refusable(lambda leader, state: leader.unload(state)),
    "evict": _refusable(lambda leader, state: leader.evict(state)),
    "clear-cache": _refusable(lambda leader, state: leader.clear_prefix_cache(state)),
    "pin": _pin(True),
    "unpin": _pin(False),
    "drain": _drain(True),
    "undrain": _drain(False),
    "reload": _reload,
}


class AdminServer:
    def __init__(self, run_dir: Path, ctx: zmq.Context):
        self.server = RpcServer(endpoint(run_dir), ctx, mode=0o600)

    @property
    def socket(self) -> zmq.Socket:
        return self.server.socket

    def serve_ready(self, leader: NodeControl) -> None:
        """Answer every command waiting on the socket."""
        for _ in range(16):
            got = self.server.recv(0)
            if got is None:
                return
            peer, msg_id, msg = got
            if msg is not None:
                self.server.reply(peer, msg_id, self._run(leader, msg))

    def _run(self, leader: NodeControl, msg: object) -> object:
        if not isinstance(msg, AdminCommand):
            return Error(kind=ErrorKind.BAD_FRAME, message=f"{type(msg).__name__} is not an admin command")
        handler = COMMANDS.get(msg.command)
        if handler is None:
            return Failure(
                "", FailureKind.INVALID_REQUEST, f"unknown command {msg.command!r}; known: {', '.join(COMMANDS)}"
            )
        try:
            data = handler(leader, msg.args)
        except AdminError as exc:
            metrics.ADMIN_COMMANDS.labels(msg.command, "error").inc()
            return Failure("", exc.kind, exc.message)
        except Exception as exc:  # a bug in one command must not take the loop down
            log.exception("admin command %s failed", msg.command)
            metrics.ADMIN_COMMANDS.labels(msg.command, "error").inc()
            return Failure("", FailureKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        metrics.ADMIN_COMMANDS.labels(msg.command, "ok").inc()
        return Answer(data=data)

    def close(self) -> None:
        self.server.close()
