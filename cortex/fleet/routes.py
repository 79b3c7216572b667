"""The front's short-lived copies of its leader's ``Forward`` answers, by the model name asked for.

Why: a request for a model that another leader serves cost the front a round trip to its own leader
(a ZeroMQ exchange, the leader's loop, the routing decision) only to learn what the previous request
for that model had learnt, and on a pure gateway that round trip is a large part of the hop's CPU.

The leader stays the only owner of routing state: each ``Forward`` says how long it may be reused
(``valid_s``; the leader sends 0 for a cold-load placement, whose answer changes once the load has
begun), and the front keeps nothing else. What a copy may miss, and for how long:

- a change the leader knows of (a model now resident here, a peer it no longer routes to, a drain):
  at most ``valid_s`` after the leader answered; on top of that the leader's own view of its peers
  is up to a poll interval old, cached or not;
- a target that fails or refuses (what the proxy reports to the leader): none, since the report
  drops every copy naming that target in this process, so the next request asks the leader again.

One cache per front process (gunicorn worker), shared by its threads; bounded in entries. A request
a peer forwarded (``hop``) never uses it: the leader serves those itself or fails them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rpc.engine import Forward, Target

MAX_ENTRIES = 1024  # model names (aliases included) a front process keeps answers for


@dataclass(frozen=True)
class _Entry:
    until: float  # monotonic
    targets: list[Target]
    reason: str


class RouteCache:
    def __init__(self, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self.max_entries, self.clock = max_entries, clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        # bumped by every ``forget``: an answer asked for before a target failed is not kept, since
        # the leader may have given it before it heard of the failure
        self._epoch = 0

    def epoch(self) -> int:
        """Pass to ``learn`` with the answer to a question asked now."""
        return self._epoch

    def lookup(self, model: str, request_id: str) -> Forward | None:
        """The leader's last answer for ``model`` as a Forward for this request, while still valid."""
        entry = self._entries.get(model)
        if entry is None:
            return None
        if self.clock() >= entry.until:
            with self._lock:
                if self._entries.get(model) is entry:
                    del self._entries[model]
            return None
        return Forward(request_id, entry.targets, entry.reason)

    def learn(self, model: str, forward: Forward, epoch: int) -> None:
        """Keep the leader's answer for ``model`` for as long as it said it holds."""
        if forward.valid_s <= 0:
            return
        entry = _Entry(self.clock() + forward.valid_s, forward.targets, forward.reason)
        with self._lock:
            if epoch != self._epoch:
                return
            if model not in self._entries and len(self._entries) >= self.max_entries:
                self._make_room()
            self._entries[model] = entry

    def forget(self, endpoint: str) -> None:
        """A target failed or refused: drop every answer that names it."""
        with self._lock:
            self._epoch += 1
            for model in [m for m, e in self._entries.items() if any(t.endpoint == endpoint for t in e.targets)]:
                del self._entries[model]

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """The model names it holds answers for (some may have expired)."""
        return list(self._entries)  # one C-level copy: no thread can change the dict half-way

    def _make_room(self) -> None:
        """Drop expired answers, or else the oldest one (the lock is held)."""
        now = self.clock()
        for model in [m for m, e in self._entries.items() if now >= e.until]:
            del self._entries[model]
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
