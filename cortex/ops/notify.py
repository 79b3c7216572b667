"""systemd's notify protocol (sd_notify), without libsystemd: one datagram per message.

``NOTIFY_SOCKET`` is a unix datagram socket path, or ``@name`` for the abstract namespace. With no
``NOTIFY_SOCKET`` (not started by systemd with ``Type=notify``) every call does nothing. The
watchdog, when ``WatchdogSec`` sets ``WATCHDOG_USEC`` (for our pid), is pinged from the leader's
loop at half the interval: a wedged loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from cortex.models.registry import ModelStatus

if TYPE_CHECKING:
    from cortex.ops.control import NodeControl

log = logging.getLogger("cortex.notify")


def _address(raw: str) -> str | bytes:
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.address = _address(env["NOTIFY_SOCKET"]) if env.get("NOTIFY_SOCKET") else None
        self.watchdog_s = self._watchdog_interval(env)
        self.next_ping = 0.0
        self.ready = False
        self.stopping_sent = False
        self.last_status = ""
        self.next_status = 0.0

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # systemd gone or a wrong path: worth a warning, never a crash
            log.warning("sd_notify %s failed: %s", lines, exc)

    def status(self, text: str) -> None:
        """STATUS= for `systemctl status`, sent when it changes (at most once a second)."""
        now = time.monotonic()
        if text != self.last_status and now >= self.next_status:
            self.last_status, self.next_status = text, now + 1.0
            self.send(f"STATUS={text}")

    def announce_ready(self, status: str) -> None:
        if not self.ready:
            self.ready, self.last_status = True, status
            self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd 253+ pairs it with RELOADING=1; older ones ignore it
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def reloaded(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.stopping_sent = True
        self.send("STOPPING=1", f"STATUS={status}")

    def tick(self) -> None:
        """Called every loop: a watchdog ping when one is due."""
        if self.watchdog_s is None or self.address is None:
            return
        now = time.monotonic()
        if now >= self.next_ping:
            self.next_ping = now + self.watchdog_s
            self.send("WATCHDOG=1")


def status_line(leader: NodeControl) -> str:
    """One line for `systemctl status`: preload progress, then what is served."""
    states = list(leader.registry.models.values())
    loading = [s.id for s in states if s.status in (ModelStatus.LOADING, ModelStatus.RECOVERING)]
    loaded = sum(s.status == ModelStatus.LOADED for s in states)
    if leader.draining:
        return f"draining: {leader.in_flight_count()} request(s) in flight"
    if loading:
        return f"loading {', '.join(loading)}; {loaded} model(s) loaded"
    return f"serving: {loaded} model(s) loaded, {leader.in_flight_count()} request(s) in flight"
