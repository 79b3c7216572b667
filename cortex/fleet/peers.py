"""The peer poller: a thread in the leader process that reads each peer's ``/health``.

Per peer it keeps the last health body, whether the peer is up (down after ``down_after``
consecutive failed polls, up again on the next success) and whether it is cooling down (too many
forwarded requests failed lately). The leader's loop reads ``snapshot()``: immutable views built
under one lock, so the loop never waits on the network.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from cortex.config import FleetConfig, PeerConfig
from cortex.fleet.http import PeerError, Pool
from cortex.ops import metrics

log = logging.getLogger("cortex.fleet")


@dataclass(frozen=True)
class PeerSnapshot:
    name: str  # as configured
    endpoint: str
    key: str  # the credential presented to it
    up: bool
    cooling: bool
    health: dict | None  # last good /health body (kept while down: its catalogue says what is missing)
    error: str  # why the last poll or request failed ("" when fine)
    polled_at: float  # time.time() of the last good poll, 0 = never

    @property
    def routable(self) -> bool:
        return self.up and not self.cooling


@dataclass
class _Peer:
    cfg: PeerConfig
    key: str
    up: bool = False  # unknown until polled once: nothing is sent to it before
    health: dict | None = None
    failed_polls: int = 0
    failures: deque = field(default_factory=deque)  # monotonic times of failed forwarded requests
    cooled_until: float = 0.0
    error: str = ""
    polled_at: float = 0.0


class Peers:
    def __init__(self, peers: list[PeerConfig], cfg: FleetConfig, own_name: str):
        self.cfg, self.own_name = cfg, own_name
        self._peers = {p.name: _Peer(p, p.api_key or cfg.peer_key) for p in peers}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = Pool(min(cfg.poll_timeout_s, cfg.connect_timeout_s), cfg.poll_timeout_s)

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._peers or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="fleet-poller", daemon=True)
        self._thread.start()

    def reconfigure(self, peers: list[PeerConfig], cfg: FleetConfig) -> None:
        """New peers and settings (a reload). A peer whose endpoint and key stay the same keeps its
        state; a new one is unknown until polled."""
        with self._lock:
            self.cfg = cfg
            self._pool = Pool(min(cfg.poll_timeout_s, cfg.connect_timeout_s), cfg.poll_timeout_s)
            old, self._peers = self._peers, {}
            for p in peers:
                kept = old.get(p.name)
                key = p.api_key or cfg.peer_key
                same = kept is not None and kept.cfg.endpoint == p.endpoint and kept.key == key
                self._peers[p.name] = kept if same else _Peer(p, key)
        self.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.cfg.poll_timeout_s + 1)

    # -- what the leader reads and reports ----------------------------------------------------------

    def snapshot(self) -> list[PeerSnapshot]:
        now = time.monotonic()
        with self._lock:
            return [
                PeerSnapshot(
                    p.cfg.name,
                    p.cfg.endpoint,
                    p.key,
                    p.up,
                    p.cooled_until > now,
                    p.health,
                    p.error,
                    p.polled_at,
                )
                for p in self._peers.values()
            ]

    def report_failure(self, endpoint: str, reason: str) -> None:
        """A forwarded request found the peer unreachable or failing: count it, and poll that peer
        now rather than at the next tick, so a dead peer is marked down within a poll round trip."""
        now = time.monotonic()
        with self._lock:
            p = next((p for p in self._peers.values() if p.cfg.endpoint == endpoint), None)
            if p is None:
                return  # this node itself (a failover to its own front), or a peer since removed
            p.error = reason
            p.failures.append(now)
            while p.failures and p.failures[0] < now - self.cfg.cooldown_s:
                p.failures.popleft()
            if len(p.failures) >= self.cfg.cooldown_after and p.cooled_until <= now:
                p.cooled_until = now + self.cfg.cooldown_s
                p.failures.clear()
                log.warning("peer %s: %s; cooling down for %gs", p.cfg.name, reason, self.cfg.cooldown_s)
        self._wake.set()

    # -- the thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        # threads start as needed: one per peer, for fleets of up to 16 peers
        with concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="fleet-poll") as pool:
            while not self._stop.is_set():
                self._wake.clear()
                with self._lock:
                    peers = list(self._peers.values())
                # in parallel: one slow peer must not delay what we learn about the others
                list(pool.map(self._poll, peers))
                self._wake.wait(self.cfg.poll_interval_s)

    def _poll(self, p: _Peer) -> None:
        headers = {"Authorization": f"Bearer {p.key}"} if p.key else {}
        try:
            status, raw = self._pool.get(p.cfg.endpoint, "/health", headers)
            body = json.loads(raw)  # a degraded or loading peer answers 503 with the same body
            if not isinstance(body, dict) or body.get("status") in (None, "down") or "models" not in body:
                raise ValueError(f"HTTP {status}: not a serving cortex leader")
            if body.get("node") == self.own_name:
                raise ValueError(f"it reports this node's own name {self.own_name!r} (a loop in [[peers]]?)")
        except (*PeerError, ValueError) as exc:
            self._poll_failed(p, f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            if not p.up:
                log.info("peer %s (%s) is up", p.cfg.name, p.cfg.endpoint)
            p.up, p.health, p.failed_polls, p.error, p.polled_at = True, body, 0, "", time.time()
        metrics.set_peer_up(p.cfg.name, True)

    def _poll_failed(self, p: _Peer, error: str) -> None:
        with self._lock:
            p.failed_polls += 1
            p.error = error
            if p.up and p.failed_polls >= self.cfg.down_after:
                p.up = False
                log.warning("peer %s is down after %d failed polls: %s", p.cfg.name, p.failed_polls, error)
            up = p.up
        metrics.set_peer_up(p.cfg.name, up)
