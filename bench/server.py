"""Start a throwaway `cortex serve` for a benchmark: the embedded catalogue, a free port, its own run dir."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_server(threads: int, engine: str = "", env: dict | None = None, gateway: str = "") -> Iterator[str]:
    """Yield the base URL of a healthy server; stop it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = Path(tempfile.mkdtemp())
    (run / "cortex.toml").write_text(
        f'[node]\nrun_dir = "{run}"\nthreads = {threads}\nmodels_config = "{ROOT / "conf" / "models.toml"}"\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n{gateway}\n[engine]\n{engine}\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "serve", "--config", str(run / "cortex.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError("cortex serve exited")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
