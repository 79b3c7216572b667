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

# How long an idle OpenMP thread of a CPU worker spins before it sleeps (libgomp's GOMP_SPINCOUNT,
# in spin iterations). libgomp's default, 300,000, keeps the second thread of a decode step spinning
# through the Python between two steps (receiving the step, sampling, sending its tokens), on a core
# the leader, the front and ZeroMQ's I/O threads need at that very moment: they then preempt the
# thread running the step. 10,000 (tens of microseconds) still spins through the barriers inside a
# step and lets the thread sleep between steps: one-stream decode over HTTP 3-8% faster on a 2-core
# host in five alternating runs (docs/benchmarks.md). An operator's own GOMP_SPINCOUNT or
# OMP_WAIT_POLICY is kept.
OMP_SPIN_COUNT = "10000"


def worker_env(device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a worker for ``device`` starts with: ours, plus the OpenMP spin default for
    CPU workers where the operator has not set one."""
    env = dict(os.environ if base is None else base)
    if device == "cpu" and "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = OMP_SPIN_COUNT
    return env


class WorkerHandle:
    def __init__(
        self,
        rank: int,
        device: str,
        run_dir: Path,
        ctx: zmq.Context,
        threads: int = 0,
        log_level: str = "INFO",
        spare: bool = False,
    ):
        self.rank, self.device = rank, device
        self.endpoint = f"ipc://{run_dir}/worker-{rank}.sock"
        self.ctx, self.threads, self.log_level = ctx, threads, log_level
        self.proc: subprocess.Popen | None = None
        # [node] spare_workers: a process started in advance (``--standby``: Python, torch and the
        # model code imported, waiting on its stdin), woken when this rank's worker must be
        # replaced, so a restart skips the imports (about half of it on a 2-core host under load)
        self.keep_spare = spare
        self.spare: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.client: RpcClient | None = None
        self.ready = False  # answered a Ping since it was (re)started
        self.expected_exit = False  # stopped on purpose (defragmentation): restart without recovery
        self.restarts = 0
        self.last_exit: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _command(self, standby: bool) -> list[str]:
        cmd = [sys.executable, "-m", "workers.worker", "--endpoint", self.endpoint, "--device", self.device]
        cmd += ["--log-level", self.log_level]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        return [*cmd, "--standby"] if standby else cmd

    def start(self) -> None:
        """Start this rank's worker: its spare woken if there is a live one, else a new process."""
        woken = self._wake_spare()
        self.proc = woken or subprocess.Popen(
            self._command(False), stdin=subprocess.DEVNULL, start_new_session=False, env=worker_env(self.device)
        )
        self.pidfd = os.pidfd_open(self.proc.pid)
        # A fresh socket per process: messages queued for a dead worker must not reach its successor.
        if self.client:
            self.client.close()
        self.client = RpcClient(self.endpoint, self.ctx)
        self.ready = False
        how = "woken from its spare" if woken else "started"
        log.info("worker %d (%s) %s, pid %d", self.rank, self.device, how, self.proc.pid)

    def start_spare(self) -> None:
        """Start a spare for the next restart, if spares are on and there is none (the leader calls
        this once the worker answers, so the spare's imports do not compete with its start)."""
        if not self.keep_spare or (self.spare is not None and self.spare.poll() is None):
            return
        self.spare = subprocess.Popen(
            self._command(True), stdin=subprocess.PIPE, start_new_session=False, env=worker_env(self.device)
        )
        log.info("worker %d (%s): spare started, pid %d", self.rank, self.device, self.spare.pid)

    def _wake_spare(self) -> subprocess.Popen | None:
        """The spare, told to serve (one line on its stdin), or None when there is no live one."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        try:
            spare.stdin.write(b"serve\n")
            spare.stdin.close()
            return spare
        except (BrokenPipeError, OSError, ValueError):  # it died waiting: start a new process instead
            self._stop_spare(spare)
            return None

    @staticmethod
    def _stop_spare(spare: subprocess.Popen) -> None:
        spare.terminate()  # it holds nothing yet: SIGTERM ends it at once
        try:
            spare.wait(5)
        except subprocess.TimeoutExpired:
            spare.kill()
            spare.wait()

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
        if self.spare is not None:
            self._stop_spare(self.spare)
            self.spare = None
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
