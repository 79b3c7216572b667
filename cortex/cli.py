"""`cortex`: serve (leader + workers + HTTP front) and status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from cortex import __version__
from cortex.api import auth
from cortex.config import Config, ConfigError, HostPort, load, parse_host_port

log = logging.getLogger("cortex")

SHUTDOWN_GRACE_S = 6.0  # the front gets this long to finish; the whole stop stays under 10 s


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _start_front(cfg: Config, engine_endpoint: str, listen: HostPort) -> subprocess.Popen:
    settings = {
        "engine": engine_endpoint,
        "event_timeout_s": cfg.engine.step_timeout_s + 30,
        "load_timeout_s": cfg.engine.load_timeout_s + 30,
        "max_body_bytes": cfg.gateway.max_body_mb * 1024 * 1024,
        "node": cfg.node.name,
        "keepalive_s": cfg.gateway.keepalive_s,
        # digests, not keys: the front's environment is readable in /proc by the same user
        "api_key_digests": [auth.digest(k) for k in cfg.gateway.api_keys],
        "admin_key_digests": [auth.digest(k) for k in cfg.gateway.admin_keys],
        "open_paths": list(cfg.gateway.open_paths),
    }
    # fmt: off
    cmd = [
        sys.executable, "-m", "cortex.api.serve",
        "--bind", str(listen),
        "--workers", str(cfg.gateway.workers),
        "--threads", str(cfg.gateway.threads),
        "--worker-class", "gthread",
        "--graceful-timeout", str(int(SHUTDOWN_GRACE_S) - 1),
        "--keep-alive", "5",
        "--log-level", "warning",
        "--name", "cortex-front",
    ]
    # fmt: on
    env = {**os.environ, "CORTEX_FRONT": json.dumps(settings)}
    # its own process group: Ctrl-C in a terminal reaches the leader only, which stops the front in order
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, process_group=0)


def serve(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"cortex: configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    listen = cfg.gateway.listen
    if args.listen:
        try:
            listen = parse_host_port(args.listen)
        except ValueError as exc:
            print(f"cortex: --listen: {exc}", file=sys.stderr)
            return 2

    from cortex.leader import Leader
    from cortex.supervisor import wait_port

    leader = Leader(cfg)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        leader.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("cortex %s on node %s: config %s, devices %s", __version__, cfg.node.name, cfg.file, leader.devices)
    leader.start()
    front = _start_front(cfg, leader.engine_endpoint, listen)
    announced = False
    try:
        while not leader.stopping.is_set():
            leader.poll_once()
            if front.poll() is not None:
                log.error("the HTTP front exited (status %s); stopping", front.returncode)
                leader.stop()
                return 1
            if not announced and wait_port(listen.host, listen.port, 0):
                announced = True
                log.info("serving the OpenAI API on http://%s/v1 (health: http://%s/health)", listen, listen)
    finally:
        t0 = time.monotonic()
        if stop["signal"]:
            log.info("%s received: stopping", signal.Signals(stop["signal"]).name)
        if front.poll() is None:
            front.terminate()
        leader.shutdown()
        try:
            front.wait(max(SHUTDOWN_GRACE_S - (time.monotonic() - t0), 0.5))
        except subprocess.TimeoutExpired:
            front.kill()
            front.wait()
        log.info("stopped in %.1fs", time.monotonic() - t0)
    return 0


def status(args: argparse.Namespace) -> int:
    url = args.endpoint.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.load(r)
    except urllib.error.HTTPError as exc:
        data = json.load(exc)
    except OSError as exc:
        print(f"cortex: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if data.get("status") == "ok" else 1
    print(f"node {data.get('node')}: {data.get('status')}  (uptime {data.get('uptime_s')}s)")
    for w in data.get("workers", []):
        state = "up" if w["alive"] else "DOWN"
        print(f"  worker {w['rank']} {w['device']:<8} pid {w['pid']}  {state}  restarts {w['restarts']}")
    for m in data.get("models", []):
        where = ",".join(m["devices"]) or "-"
        err = f"  ({m['error']})" if m.get("error") else ""
        print(f"  model {m['id']:<32} {m['status']:<10} {where}{err}")
    return 0 if data.get("status") == "ok" else 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cortex", description="Self-hosted LLM inference fleet daemon.")
    p.add_argument("--version", action="version", version=f"cortex {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the leader, its workers and the HTTP API")
    s.add_argument("--config", help="path to cortex.toml (default: the embedded defaults)")
    s.add_argument("--listen", help="override [gateway] listen (host:port)")
    s.set_defaults(func=serve)
    st = sub.add_parser("status", help="show a running leader's health")
    st.add_argument("--endpoint", default="http://127.0.0.1:31313")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=status)
    args = p.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
