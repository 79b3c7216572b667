"""What every room of the leader reads: settings, devices, models, workers and the two channels.

One ``Shared`` per leader, built by ``Leader`` and handed to each room. Its fields are
references, not state of their own: the registry owns model state, the supervisor's handles own
worker processes, ``calls`` owns messages in flight to workers, ``frontend`` is the socket the
front talks to. A reload replaces ``cfg`` here, once, and every room sees the new settings.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from cortex.config import Config
from cortex.engine.calls import WorkerCalls
from cortex.models.registry import Registry
from cortex.ops.engine_metrics import EngineMetrics
from cortex.supervisor import WorkerHandle
from rpc.engine import ContextOverflow, Failure, FailureKind
from rpc.transport import RpcServer

RETRY_AFTER_LOADING_S = 5
RETRY_AFTER_NO_MEMORY_S = 10
RETRY_AFTER_DRAINING_S = 30
RETRY_AFTER_SHUTDOWN_S = 15


@dataclass
class Shared:
    cfg: Config
    devices: list[str]
    registry: Registry
    workers: list[WorkerHandle]
    calls: WorkerCalls
    stats: EngineMetrics = field(default_factory=EngineMetrics)
    stopping: threading.Event = field(default_factory=threading.Event)
    frontend: RpcServer | None = None  # bound by Leader.start

    def reply(self, peer: bytes, msg: object) -> None:
        """Answer the front's request from ``peer`` (a Started, Delta, Answer, Failure ...)."""
        self.frontend.reply(peer, 0, msg)

    def refuse(
        self,
        peer: bytes,
        request_id: str,
        kind: FailureKind,
        message: str,
        retry_after: int | None = None,
        overflow: ContextOverflow | None = None,
    ) -> None:
        """The one way a request is refused or failed: a ``Failure`` the front turns into the caller's dialect."""
        self.frontend.reply(peer, 0, Failure(request_id, kind, message, retry_after, overflow))
