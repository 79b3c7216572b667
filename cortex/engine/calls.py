"""The leader's calls to its workers: one message fanned out to a model's ranks, complete when
every rank has replied, failed by the first error, death or timeout.

The loop never waits on a worker: it sends, and replies arrive as socket events that ``on_reply``
matches to their call by message id. ``WorkerCalls`` owns the calls in flight; nothing else keeps
or reads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cortex.supervisor import WorkerHandle
from rpc.messages import Error


class CallErrorKind(StrEnum):
    ERROR = "error"  # a worker answered Error
    DIED = "died"  # a worker of the call died, or was not running
    TIMEOUT = "timeout"  # no complete answer before the call's deadline


@dataclass
class CallError:
    kind: CallErrorKind
    message: str


OnDone = Callable[[dict[int, object] | None, CallError | None], None]  # (replies by rank, error)


@dataclass
class Call:
    """A request fanned out to one or more workers, complete when every rank has replied."""

    ranks: list[int]
    deadline: float
    on_done: OnDone
    ids: dict[int, int] = field(default_factory=dict)  # rank -> message id
    replies: dict[int, object] = field(default_factory=dict)


def ignore(_replies: object, _error: object) -> None:
    """An ``on_done`` for calls whose outcome changes nothing (best-effort cleanup)."""


class WorkerCalls:
    def __init__(self, workers: Sequence[WorkerHandle]):
        self.workers = workers
        self._calls: list[Call] = []

    def call(self, ranks: list[int], msg_for_rank: Callable[[int], object], timeout_s: float, on_done: OnDone) -> None:
        """Send one message to each rank (``msg_for_rank(i)`` for the i-th); ``on_done`` runs once,
        with every reply, or with the first error, death or timeout."""
        call = Call(ranks, time.monotonic() + timeout_s, on_done)
        for i, r in enumerate(ranks):
            w = self.workers[r]
            if not w.client or not w.alive():
                on_done(None, CallError(CallErrorKind.DIED, f"worker {r} ({w.device}) is not running"))
                return
            call.ids[r] = w.client.send(msg_for_rank(i))
        self._calls.append(call)

    def on_replies(self, w: WorkerHandle) -> None:
        """Take every reply waiting on ``w``'s socket; a reply no call waits for (its call timed
        out or failed) is stale and dropped."""
        while True:
            got = w.client.recv(0)
            if got is None:
                return
            msg_id, reply = got
            call = next((c for c in self._calls if c.ids.get(w.rank) == msg_id), None)
            if call is None:
                continue
            if isinstance(reply, Error):
                self._finish(call, None, CallError(CallErrorKind.ERROR, f"worker {w.rank}: {reply.message}"))
                continue
            call.replies[w.rank] = reply
            if len(call.replies) == len(call.ranks):
                self._finish(call, call.replies, None)

    def fail_rank(self, rank: int, kind: CallErrorKind, message: str) -> None:
        """Every call waiting on ``rank`` fails now (its worker died or is being restarted)."""
        for call in [c for c in self._calls if rank in c.ranks]:
            self._finish(call, None, CallError(kind, message))

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for call in [c for c in self._calls if c.deadline < now]:
            self._finish(call, None, CallError(CallErrorKind.TIMEOUT, f"no reply from worker(s) {call.ranks} in time"))

    def _finish(self, call: Call, replies: dict | None, error: CallError | None) -> None:
        if call in self._calls:
            self._calls.remove(call)
            call.on_done(replies, error)
