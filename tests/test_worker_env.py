"""A CPU worker's OpenMP threads sleep between steps rather than spin (cortex/supervisor.py,
``OMP_SPIN_COUNT``): the leader starts it with GOMP_SPINCOUNT set, unless the operator set their own
OpenMP wait settings, which are kept."""

from __future__ import annotations

from pathlib import Path

import zmq

from cortex.supervisor import OMP_SPIN_COUNT, WorkerHandle, worker_env
from tests.conftest import wait_for


def test_a_cpu_worker_gets_the_short_spin_by_default():
    assert worker_env("cpu", {"PATH": "/bin"}) == {"PATH": "/bin", "GOMP_SPINCOUNT": OMP_SPIN_COUNT}


def test_the_operators_openmp_settings_are_kept():
    assert worker_env("cpu", {"GOMP_SPINCOUNT": "300000"})["GOMP_SPINCOUNT"] == "300000"
    assert "GOMP_SPINCOUNT" not in worker_env("cpu", {"OMP_WAIT_POLICY": "active"})


def test_a_gpu_worker_is_left_as_it_is():
    assert worker_env("cuda:0", {"PATH": "/bin"}) == {"PATH": "/bin"}


def test_the_started_worker_process_has_it(tmp_path, monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    ctx = zmq.Context()
    handle = WorkerHandle(0, "cpu", tmp_path, ctx, threads=1)
    try:
        handle.start()
        raw = Path(f"/proc/{handle.pid}/environ").read_text()
        environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        assert environ.get("GOMP_SPINCOUNT") == OMP_SPIN_COUNT
        wait_for(lambda: (tmp_path / "worker-0.sock").exists(), what="the worker's socket")
    finally:
        handle.stop()
        ctx.term()
