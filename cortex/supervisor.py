"""Worker processes: spawn, watch, kill, respawn. One ``WorkerHandle`` per device.

Death is noticed at once: each worker's pidfd is in the leader's poll set, so the leader wakes the
moment a worker exits, whether or not a call is in flight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import zmq

from rpc.transport import RpcClient

log = logging.getLogger("cortex.leader")


class WorkerHandle:
    def __init__(
        self, rank: int, device: str, run_dir: Path, ctx: zmq.Context, threads: int = 0, log_level: str = "INFO"
    ):
        self.rank, self.device = rank, device
        self.endpoint = f"ipc://{run_dir}/worker-{rank}.sock"
        self.ctx, self.threads, self.log_level = ctx, threads, log_level
        self.proc: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.client: RpcClient | None = None
        self.ready = False  # answered a Ping since it was (re)started
        self.expected_exit = False  # stopped on purpose (defragmentation): restart without recovery
        self.restarts = 0
        self.last_exit: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "workers.worker",
            "--endpoint",
            self.endpoint,
            "--device",
            self.device,
            "--log-level",
            self.log_level,
        ]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=False)
        self.pidfd = os.pidfd_open(self.proc.pid)
        # A fresh socket per process: messages queued for a dead worker must not reach its successor.
        if self.client:
            self.client.close()
        self.client = RpcClient(self.endpoint, self.ctx)
        self.ready = False
        log.info("worker %d (%s) started, pid %d", self.rank, self.device, self.proc.pid)

    def reap(self) -> str:
        """Collect an exited worker; return how it ended."""
        self.ready = False
        code = self.proc.wait() if self.proc else None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        self.last_exit = how
        return how

    def stop(self, grace_s: float = 2.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.client:
            self.client.close()
            self.client = None
        # the worker removes its socket file when it exits normally; not when it had to be killed
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.endpoint[len("ipc://") :])

    def terminate(self) -> None:
        """SIGTERM, without waiting: the leader's poll sees the exit."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        """SIGKILL; the leader's poll sees the exit and handles it like any other death."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def resolve_devices(devices: list[str] | str) -> list[str]:
    """ "auto": every CUDA device, else one CPU device."""
    if devices != "auto":
        return list(devices)
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # no torch CUDA runtime: a CPU host
        n = 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]
